"""Exactness checks that only a GPU can settle (OPEN_GPU_CHECKS 1–3), plus the readout op and the device SMST root.

Each ``check_*`` function runs on one device (CUDA, or CPU for ``gpu_check.py --dry-run``) and returns
:class:`Check` records: cases compared, failures, and the first differing case written out exactly. The same
functions back the GPU-marked tests (``tests/bench/test_gpu_exact.py``) and the steps of ``bench/gpu_check.py``.

* pick order: ``torch.topk(-scores, k, largest=True, sorted=False)`` on the device, in both forms the network's
  reference uses (one ``[H]`` call per nonce; one ``[B, H]`` call per batch), against ``pick_table`` /
  ``reference.pick_indices`` and the golden ``pick`` section's ``indices_cuda_order_derived``;
* normals: torch's reference ``normal`` on the device against the golden ``*_cuda_libdevice_emulated`` fields (bit
  for bit), and the Triton normals / ``ops.poc_inputs`` against torch on the same device (fp32 bits, bf16, fp16);
* reflection: the reference expression (torch, on the device) against both reflect ops on random bf16 rows; a
  differing row passes only if it is explained by the dot's fp32 summation order (the kernel's row equals the
  reference expression with the neighbouring bf16 dot, and the exact dot lies at a bf16 rounding boundary);
* readout: ``ops.poc_readout`` against ``reference.output_stage`` on the device; a differing fp16 element passes only
  if it is the other fp16 neighbour of a reference value within a few fp32 ulps of an fp16 rounding boundary;
* SMST: ``smst_root_gpu`` against the C++ ``SMST`` root (random trees) and the golden Go roots.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cpoc_kernels import ops
from cpoc_kernels import reference as R
from cpoc_kernels.ops.inputs import normals_into_triton
from cpoc_kernels.ops.readout import pick_table
from cpoc_kernels.reference.codec import encode_vector
from cpoc_kernels.reference.rng import mmh
from cpoc_kernels.reference.seeds import pick_seed

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "tests" / "golden"
K = R.K_DIM
Stop = Callable[[], bool]


def never() -> bool:
    return False


@dataclass
class Check:
    """One comparison: ``cases`` compared, ``failures`` among them, the first failure written out exactly."""

    name: str
    cases: int = 0
    failures: int = 0
    first_failure: str | None = None
    notes: list[str] = field(default_factory=list)
    complete: bool = True  # False: the time budget stopped it before every case ran

    def fail(self, text: str) -> None:
        self.failures += 1
        if self.first_failure is None:
            self.first_failure = text

    @property
    def ok(self) -> bool:
        return self.cases > 0 and self.failures == 0

    @property
    def status(self) -> str:
        return "PASS" if self.ok else ("FAIL" if self.failures else "EMPTY")

    def line(self) -> str:
        part = "" if self.complete else " (stopped by the time budget)"
        text = f"[{self.status}] {self.name}: {self.cases - self.failures}/{self.cases} equal{part}"
        if self.first_failure:
            text += f"\n       first failure: {self.first_failure}"
        return text

    def to_json(self) -> dict:
        return dict(name=self.name, status=self.status, cases=self.cases, failures=self.failures,
                    first_failure=self.first_failure, notes=self.notes, complete=self.complete)


def _golden() -> dict:
    return json.loads((GOLDEN_DIR / "pocv2_primitives.json").read_text())


def _f32_bits(hexes) -> torch.Tensor:
    return torch.from_numpy(np.array([int(h, 16) for h in hexes], dtype=np.uint32).view(np.int32).copy())


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor's bits, on the CPU (fp32 -> int32, 16-bit floats -> int16)."""
    t = t.detach().contiguous().cpu()
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal (on the tensors' device: no copy of large outputs to the host)."""
    view = torch.int32 if a.dtype == torch.float32 else torch.int16
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(view), b.contiguous().view(view))


def _sha256_le(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(_bits(t).numpy().tobytes()).hexdigest()


# ============================================================================================ 1. pick order


def device_topk_pick(scores: torch.Tensor, k: int = K) -> torch.Tensor:
    """The network reference's pick expression on ``scores`` (int64 [..., H]): the indices of the k smallest."""
    return torch.topk(-scores, k=k, largest=True, sorted=False, dim=-1).indices


def describe_order(got: list[int], scores: list[int]) -> str:
    """Names the order of ``got`` (pick indices) given the scores of every coordinate."""
    by_score = sorted(got, key=lambda i: scores[i])
    if got == sorted(got):
        return "ascending index"
    if got == by_score:
        return "ascending score"
    if got == by_score[::-1]:
        return "descending score"
    if got[:-1] == sorted(got[:-1]) and got[-1] == by_score[-1]:
        return "k-1 ascending index, then the k-th smallest score (the derived order)"
    return "none of: ascending index, ascending/descending score, derived"


def order_counts(got: torch.Tensor, scores: torch.Tensor) -> dict[str, int]:
    """How many rows of pick indices ``got`` [R, k] follow each named order, given ``scores`` [R, H] (vectorised)."""
    s = torch.gather(scores, 1, got.to(scores.device))
    g = got.to(scores.device)
    asc_index = (g[:, 1:] > g[:, :-1]).all(dim=1)
    asc_score = (s[:, 1:] > s[:, :-1]).all(dim=1)
    derived = (g[:, 1:-1] > g[:, :-2]).all(dim=1) & (s[:, -1] == s.max(dim=1).values)
    return {"ascending index": int(asc_index.sum()), "ascending score": int(asc_score.sum()),
            "descending score": int((s[:, 1:] < s[:, :-1]).all(dim=1).sum()), "derived": int(derived.sum()),
            "rows": int(g.shape[0])}


def check_pick(device: torch.device, hiddens=(1024, 4096, 7168), batches=(1, 32, 200), rounds: int = 8,
               per_nonce_rows: int = 32, stop: Stop = never) -> list[Check]:
    """torch ``topk(sorted=False)`` order on ``device`` vs ``pick_table`` (= ``pick_indices``) and the golden picks.

    ``rounds`` block hashes per (H, B); nonces differ between rounds (negative ones included). The per-nonce form
    (one ``[H]`` topk call, as the network's per-nonce loop) runs on the first ``per_nonce_rows`` rows of a batch.
    """
    batched = Check("pick order: topk on [B, H] scores vs pick_indices")
    single = Check("pick order: topk on one nonce's [H] scores vs pick_indices")
    golden = Check("pick order: topk vs golden indices_cuda_order_derived")
    pk = "gpu_check_pub_key"
    for hidden in hiddens:
        keys = torch.arange(hidden, dtype=torch.int64, device=device)
        for nb in batches:
            bad_rows, group_orders = 0, {}
            for r in range(rounds):
                if stop():
                    batched.complete = single.complete = False
                    break
                bh = f"GPU_CHECK_BLOCK_{hidden}_{nb}_{r}"
                nonces = [(r * 7919 + 13 * i) * (-1 if i % 5 == 4 else 1) for i in range(nb)]
                seeds = torch.tensor([pick_seed(bh, pk, n, K) for n in nonces], dtype=torch.int64, device=device)
                scores = mmh(keys.view(1, -1), seeds.view(-1, 1))
                got = device_topk_pick(scores).cpu()
                want = pick_table(bh, pk, nonces, hidden, K)
                batched.cases += nb
                bad = (got != want).any(dim=1).nonzero().flatten()
                if bad.numel():
                    bad_rows += bad.numel()
                    counts = order_counts(got[bad], scores[bad.to(scores.device)])
                    for name, c in counts.items():
                        group_orders[name] = group_orders.get(name, 0) + c
                    i = int(bad[0])
                    batched.fail(f"H={hidden} B={nb} row {i} (block_hash={bh!r}, public_key={pk!r}, nonce={nonces[i]}):"
                                 f" topk {got[i].tolist()} vs pick_indices {want[i].tolist()}; same set: "
                                 f"{sorted(got[i].tolist()) == sorted(want[i].tolist())}; observed order: "
                                 f"{describe_order(got[i].tolist(), scores[i].cpu().tolist())}")
                    batched.failures += bad.numel() - 1
                for i in range(min(nb, per_nonce_rows)):
                    one = device_topk_pick(scores[i].contiguous()).cpu().tolist()
                    single.cases += 1
                    ref = R.pick_indices(bh, pk, nonces[i], hidden, K) if i == 0 else want[i].tolist()
                    if one != ref:
                        text = None if single.first_failure else (
                            f"H={hidden} row {i} of a batch of {nb} (block_hash={bh!r}, nonce={nonces[i]}): topk {one} "
                            f"vs pick_indices {ref}; observed order: {describe_order(one, scores[i].cpu().tolist())}")
                        single.fail(text or "")
            batched.notes.append(f"H={hidden} B={nb}: {bad_rows} rows differ"
                                 + (f"; orders of the differing rows: {group_orders}" if bad_rows else ""))
    for case in _golden()["pick"]:
        scores = mmh(torch.arange(case["hidden"], dtype=torch.int64, device=device), case["seed"])
        for form, got in (("[H]", device_topk_pick(scores)), ("[1, H]", device_topk_pick(scores.view(1, -1))[0])):
            got = got.cpu().tolist()
            golden.cases += 1
            want = case["indices_cuda_order_derived"]
            ref = R.pick_indices(case["block_hash"], case["public_key"], case["nonce"], case["hidden"], case["k"])
            if got != want or ref != want:
                golden.fail(f"golden seed_string {case['seed_string']!r} hidden {case['hidden']} ({form} call): topk "
                            f"{got} vs indices_cuda_order_derived {want} (pick_indices {ref}); observed order: "
                            f"{describe_order(got, scores.cpu().tolist())}")
    return [golden, batched, single]


# ============================================================================================ 2. normals


def _emulated_parts(case: dict, prefix_full: str, first: str, last: str, sha: str):
    """(full bits | None, first bits, last bits, sha256) of a golden entry's libdevice-emulated fields."""
    if f"{prefix_full}_cuda_libdevice_emulated" in case:
        return _f32_bits(case[f"{prefix_full}_cuda_libdevice_emulated"]), None, None, None
    return (None, _f32_bits(case[f"{first}_cuda_libdevice_emulated"]),
            _f32_bits(case[f"{last}_cuda_libdevice_emulated"]), case[f"{sha}_cuda_libdevice_emulated"])


def _compare_emulated(check: Check, what: str, got: torch.Tensor, parts) -> None:
    full, first, last, sha = parts
    bits = _bits(got)
    check.cases += 1
    if full is not None:
        diff = (bits != full).nonzero().flatten().tolist()
        if diff:
            i = diff[0]
            check.fail(f"{what}: {len(diff)}/{bits.numel()} elements differ; first at {i}: got 0x{bits[i].item() & 0xFFFFFFFF:08x}"
                       f" expected 0x{full[i].item() & 0xFFFFFFFF:08x}")
        return
    n = first.numel()
    for label, a, b in (("first", bits[:n], first), ("last", bits[-last.numel():], last)):
        diff = (a != b).nonzero().flatten().tolist()
        if diff:
            i = diff[0]
            check.fail(f"{what}: {label} {n} values: {len(diff)} differ; first at {i}: got 0x{a[i].item() & 0xFFFFFFFF:08x}"
                       f" expected 0x{b[i].item() & 0xFFFFFFFF:08x}")
            return
    if _sha256_le(got) != sha:
        check.fail(f"{what}: first/last values equal but sha256 of all {bits.numel()} values differs")


def _triton_normals(seed_row: list[int], n: int, device) -> torch.Tensor:
    out = torch.empty(1, n, dtype=torch.float32, device=device)
    normals_into_triton(out, torch.tensor([seed_row], dtype=torch.int64, device=device), seq_len=1)
    return out[0]


def check_normals_golden(device: torch.device, stop: Stop = never) -> list[Check]:
    """torch ``normal``/``stronger_normal`` and the Triton normals on ``device`` vs the libdevice-emulated goldens."""
    g = _golden()
    torch_c = Check("normals: torch on the device vs golden *_cuda_libdevice_emulated (bit for bit)")
    triton_c = Check("normals: Triton kernel vs golden *_cuda_libdevice_emulated (bit for bit)")
    for case in g["normal"]:
        parts = _emulated_parts(case, "values_f32_hex", "first_64_f32_hex", "last_64_f32_hex", "sha256_f32_le")
        what = f"normal(seed={case['seed']}, n={case['n']})"
        _compare_emulated(torch_c, what, R.normal(case["seed"], case["n"], device=device), parts)
        _compare_emulated(triton_c, what, _triton_normals([case["seed"]], case["n"], device), parts)
    for case in g["stronger_normal"]:
        parts = _emulated_parts(case, "-", "first_32_f32_hex", "last_32_f32_hex", "sha256_f32_le")
        what = f"stronger_normal(nonce={case['nonce']}, n={case['n']})"
        _compare_emulated(torch_c, what, R.stronger_normal(case["sub_seeds"], case["n"], device=device), parts)
        _compare_emulated(triton_c, what, _triton_normals(case["sub_seeds"], case["n"], device), parts)
    for case in g["haar"]:
        full = _f32_bits(case["u_raw_f32_hex_cuda_libdevice_emulated"])
        what = f"Haar raw normals (seed={case['seed']}, k={case['k']})"
        _compare_emulated(torch_c, what, R.normal(case["seed"], case["k"], device=device), (full, None, None, None))
        _compare_emulated(triton_c, what, _triton_normals([case["seed"]], case["k"], device), (full, None, None, None))
    for case in g["inputs"]:
        dtype = getattr(torch, case["dtype"])
        got = R.poc_inputs(case["block_hash"], case["public_key"], [case["nonce"]], case["seq_len"], case["hidden"],
                           dtype, stronger_rng=case["stronger_rng"], device=device)[0]
        torch_c.cases += 1
        if _sha256_le(got) != case["sha256_le_bytes_cuda_libdevice_emulated"]:
            torch_c.fail(f"inputs nonce {case['nonce']} [{case['seq_len']}, {case['hidden']}] {case['dtype']} "
                         f"stronger={case['stronger_rng']}: sha256 differs from the emulated one")
        got = ops.poc_inputs(case["block_hash"], case["public_key"], [case["nonce"]], case["seq_len"], case["hidden"],
                             dtype, device=device, stronger_rng=case["stronger_rng"], backend="triton")[0]
        triton_c.cases += 1
        if _sha256_le(got) != case["sha256_le_bytes_cuda_libdevice_emulated"]:
            triton_c.fail(f"poc_inputs nonce {case['nonce']} [{case['seq_len']}, {case['hidden']}] {case['dtype']} "
                          f"stronger={case['stronger_rng']}: sha256 differs from the emulated one")
    torch_c.notes.append("layer_vectors are not compared bit for bit: their norms are CPU-torch norms (golden README)")
    return [torch_c, triton_c]


def _first_diff(got: torch.Tensor, want: torch.Tensor, shape) -> str:
    gb, wb = _bits(got).flatten(), _bits(want).flatten()
    diff = (gb != wb).nonzero().flatten()
    i = int(diff[0])
    index = np.unravel_index(i, shape)
    mask = 0xFFFFFFFF if got.dtype == torch.float32 else 0xFFFF
    width = 8 if got.dtype == torch.float32 else 4
    return (f"{diff.numel()}/{gb.numel()} elements differ; first at {tuple(int(x) for x in index)}: got "
            f"0x{int(gb[i]) & mask:0{width}x} ({got.flatten()[i].item()!r}) expected 0x{int(wb[i]) & mask:0{width}x} "
            f"({want.flatten()[i].item()!r})")


def check_inputs_vs_torch(device: torch.device, shapes, backend: str = "auto", stop: Stop = never) -> list[Check]:
    """``ops.poc_inputs`` (Triton on CUDA) vs ``reference.poc_inputs`` (torch) on the same device: fp32 bits, then
    bf16 and fp16 (each its own kernel specialisation). shapes: (B, S, H, stronger_rng) tuples."""
    checks = {dt: Check(f"poc_inputs {dt}: Triton vs torch reference on the same device (bit for bit)")
              for dt in ("float32", "bfloat16", "float16")}
    bh, pk = "GPU_CHECK_INPUTS", "gpu_check_pub_key"
    for nb, seq, hidden, stronger in shapes:
        if stop():
            for c in checks.values():
                c.complete = False
            break
        nonces = list(range(3 * nb, 4 * nb))
        want32 = R.poc_inputs(bh, pk, nonces, seq, hidden, torch.float32, stronger_rng=stronger, device=device)
        for name, check in checks.items():
            dtype = getattr(torch, name)
            got = ops.poc_inputs(bh, pk, nonces, seq, hidden, dtype, device=device, stronger_rng=stronger,
                                 backend=backend)
            want = want32 if dtype == torch.float32 else want32.to(dtype)
            check.cases += 1
            if not _same_bits(got, want):
                check.fail(f"B={nb} S={seq} H={hidden} stronger={stronger}: " + _first_diff(got, want, got.shape))
            del got, want
        del want32
    return list(checks.values())


# ============================================================================================ 3. reflection


def _bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16)


def _reflect_with_dot(x: torch.Tensor, vb: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """The reference's reflect expression with a given bf16 dot [R, 1]: x - (2*dot)*vb, rounding as bf16 ops do."""
    return x - (2 * dot) * vb


def explain_reflect_rows(x: torch.Tensor, v: torch.Tensor, got: torch.Tensor, want: torch.Tensor) -> list[str]:
    """For rows where ``got`` != ``want`` (bf16 [R, H], ``x`` the input rows): '' if the difference is explained by
    the dot's fp32 summation order, else a description of why not.

    Explained means: the kernel's row equals the reference expression with the bf16 neighbour of the reference's dot
    (so every other rounding point agrees), and the exact dot (fp64 sum of the bf16 products) lies within the fp32
    summation error bound ``H * 2^-24 * sum|p|`` of the bf16 rounding boundary between those two dots.
    """
    vb = v.to(device=x.device, dtype=x.dtype)
    p = x * vb  # bf16 products (one rounding each), as the reference
    dot_ref = torch.sum(p, dim=-1, keepdim=True)
    exact = p.double().sum(dim=-1)
    bound = x.shape[-1] * 2.0**-24 * p.double().abs().sum(dim=-1)
    out = []
    for i in range(x.shape[0]):
        d = dot_ref[i : i + 1]
        bits = d.view(torch.int16).item()
        candidates = [torch.tensor([[bits + s]], dtype=torch.int16, device=x.device).view(torch.bfloat16)
                      for s in (-1, 1)]
        match = None
        for c in candidates:
            if torch.equal(_reflect_with_dot(x[i : i + 1], vb, c).view(torch.int16), got[i : i + 1].view(torch.int16)):
                match = c
        if match is None:
            out.append(f"row {i}: kernel row is not the reference expression with dot {d.item()!r} or a neighbouring "
                       f"bf16 dot (exact dot {exact[i].item()!r})")
            continue
        boundary = (d.double() + match.double()).item() / 2
        if abs(exact[i].item() - boundary) > bound[i].item():
            out.append(f"row {i}: kernel used dot {match.item()!r}, reference {d.item()!r}, but the exact dot "
                       f"{exact[i].item()!r} is {abs(exact[i].item() - boundary):.3g} from their rounding boundary "
                       f"(> summation bound {bound[i].item():.3g})")
            continue
        out.append("")
    return out


EXPLAIN_MAX_ROWS = 512


def _random_rows(n: int, hidden: int, gen: torch.Generator, device) -> torch.Tensor:
    """bf16 rows with per-row scales over four decades (activations of very different magnitudes)."""
    scale = 10.0 ** (torch.rand(n, 1, generator=gen) * 4 - 2)
    return (torch.randn(n, hidden, generator=gen) * scale).to(torch.bfloat16).to(device)


def check_reflect(device: torch.device, shapes, backend: str = "auto", seed: int = 0,
                  stop: Stop = never) -> list[Check]:
    """Both reflect ops vs the reference expression on ``device`` (bf16), shapes: (rows, H) tuples.

    Per shape: every row through ``masked_reflect_`` (index list, hidden + residual) and ``masked_reflect_rows_mask_``
    (bool mask); then every 2nd row / a random mask, where unselected rows must keep their bits.
    """
    index_c = Check("reflect bf16: masked_reflect_ (row indices) vs reference expression (rows)")
    mask_c = Check("reflect bf16: masked_reflect_rows_mask_ (bool mask) vs reference expression (rows)")
    keep_c = Check("reflect bf16: rows not selected keep their bits (both ops)")
    gen = torch.Generator().manual_seed(seed)
    for n, hidden in shapes:
        if stop():
            index_c.complete = mask_c.complete = keep_c.complete = False
            break
        x = _random_rows(n, hidden, gen, device)
        res = _random_rows(n, hidden, gen, device)
        v = R.layer_vector("GPU_CHECK_REFLECT", hidden % 97, hidden, device=device)
        want_x, want_r = R.reflect(x, v), R.reflect(res, v)
        explained = 0
        for check, select in ((index_c, torch.arange(n, device=device)),
                              (mask_c, torch.ones(n, dtype=torch.bool, device=device))):
            hx, hr = x.clone(), res.clone()
            ops.masked_reflect_(hx, hr, v, select, backend=backend)
            for label, got, want, inp in (("hidden", hx, want_x, x), ("residual", hr, want_r, res)):
                rows = (got.view(torch.int16) != want.view(torch.int16)).any(dim=1).nonzero().flatten()
                check.cases += n
                if rows.numel() > EXPLAIN_MAX_ROWS:  # one row at a time on the host: examine the first ones only
                    check.notes.append(f"H={hidden} {label}: {rows.numel()} rows differ; the first {EXPLAIN_MAX_ROWS} "
                                       "were examined")
                    rows = rows[:EXPLAIN_MAX_ROWS]
                if rows.numel() and not stop():
                    reasons = explain_reflect_rows(inp[rows], v, got[rows], want[rows])
                    for r, why in zip(rows.tolist(), reasons):
                        if why:
                            check.fail(f"H={hidden} {label} row {r}: " + why.split(": ", 1)[1])
                        else:
                            explained += 1
        index_c.notes.append(f"H={hidden} x {n} rows: {explained} row results differ from the reference, each "
                             "explained by the dot's summation order (both ops, hidden + residual)")
        for kind in ("index", "mask"):
            hx, hr = x.clone(), res.clone()
            if kind == "index":
                select = torch.arange(0, n, 2, device=device)
                sel_mask = torch.zeros(n, dtype=torch.bool, device=device)
                sel_mask[select] = True
            else:
                sel_mask = torch.rand(n, generator=gen).lt(0.3).to(device)
                select = sel_mask
            ops.masked_reflect_(hx, hr, v, select, backend=backend)
            for got, inp in ((hx, x), (hr, res)):
                keep_c.cases += 1
                untouched = ~sel_mask
                if not torch.equal(got[untouched].view(torch.int16), inp[untouched].view(torch.int16)):
                    keep_c.fail(f"H={hidden} {kind} selection: an unselected row changed")
        del x, res, want_x, want_r
    golden = Check("reflect bf16: both ops vs golden reflect_bf16 rows (bit for bit)")
    for case in _golden()["reflect_bf16"]:
        v = torch.from_numpy(np.array([int(h, 16) for h in case["v_f32_hex"]], dtype=np.uint32).view(np.float32).copy())
        xs = torch.tensor([[int(h, 16) for h in row] for row in case["x_bf16_hex"]], dtype=torch.int32)
        ys = torch.tensor([[int(h, 16) for h in row] for row in case["y_bf16_hex"]], dtype=torch.int32)
        x = xs.to(torch.int16).view(torch.bfloat16).to(device)
        want = ys.to(torch.int16)
        for select in (torch.arange(x.shape[0], device=device), torch.ones(x.shape[0], dtype=torch.bool, device=device)):
            got = x.clone()
            ops.masked_reflect_(got, None, v.to(device), select, backend=backend)
            golden.cases += 1
            if not torch.equal(got.view(torch.int16).cpu(), want):
                golden.fail(f"golden H={case['hidden']} ({'mask' if select.dtype == torch.bool else 'index'} op): "
                            + _first_diff(got, want.view(torch.bfloat16), got.shape))
    return [index_c, mask_c, keep_c, golden]


def check_reflect_cuda_graph(device: torch.device, rows: int = 512, hidden: int = 4096, replays: int = 4) -> Check:
    """The mask op captured once in a CUDA graph, replayed with new masks and rows: equals the eager op each time."""
    check = Check("reflect bf16: masked_reflect_rows_mask_ in a CUDA graph, new mask per replay vs eager")
    gen = torch.Generator().manual_seed(7)
    h = _random_rows(rows, hidden, gen, device)
    r = _random_rows(rows, hidden, gen, device)
    v = R.layer_vector("GPU_CHECK_GRAPH", 3, hidden, device=device)
    mask = torch.zeros(rows, dtype=torch.bool, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        torch.ops.cpoc.masked_reflect_rows_mask_(h, r, v, mask)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.ops.cpoc.masked_reflect_rows_mask_(h, r, v, mask)
    for i in range(replays):
        xh, xr = _random_rows(rows, hidden, gen, device), _random_rows(rows, hidden, gen, device)
        m = torch.rand(rows, generator=gen).lt(0.2 + 0.2 * i).to(device)
        h.copy_(xh)
        r.copy_(xr)
        mask.copy_(m)
        graph.replay()
        eh, er = xh.clone(), xr.clone()
        torch.ops.cpoc.masked_reflect_rows_mask_(eh, er, v, m)
        torch.cuda.synchronize()
        check.cases += 1
        if not (torch.equal(h.view(torch.int16), eh.view(torch.int16))
                and torch.equal(r.view(torch.int16), er.view(torch.int16))):
            check.fail(f"replay {i} ({int(m.sum())} rows selected): graph result differs from the eager op")
    return check


# ============================================================================================ readout


def _fp16_boundary_ulps(y: torch.Tensor) -> torch.Tensor:
    """fp32 ulps between each fp32 value and the nearest fp16 rounding boundary (midpoint of its fp16 neighbours)."""
    y64 = y.double()
    h = y.half().double()
    up = torch.nextafter(y.half(), torch.full_like(y.half(), math.inf)).double()
    down = torch.nextafter(y.half(), torch.full_like(y.half(), -math.inf)).double()
    mid = torch.minimum((y64 - (h + up) / 2).abs(), (y64 - (h + down) / 2).abs())
    ulp = (torch.nextafter(y.abs(), torch.full_like(y, math.inf)) - y.abs()).double()
    return mid / ulp


def reference_readout_f32(hs: torch.Tensor, block_hash: str, public_key: str, nonces) -> torch.Tensor:
    """The reference output stage up to (not including) the fp16 cast: fp32 [B, k] on hs's device."""
    hs = hs.to(torch.float32)
    x = hs / (torch.linalg.vector_norm(hs, dim=-1, keepdim=True) + 1e-8)
    rows = []
    for b, nonce in enumerate(nonces):
        idx = torch.tensor(R.pick_indices(block_hash, public_key, int(nonce), hs.shape[1], K), device=hs.device)
        rows.append(R.rotate_picked(x[b, idx], R.haar_vectors(block_hash, public_key, int(nonce), K, device=hs.device)))
    return torch.stack(rows)


def check_readout(device: torch.device, shapes, backend: str = "auto", max_ulps: int = 64,
                  stop: Stop = never) -> list[Check]:
    """``ops.poc_readout`` vs ``reference.output_stage`` on ``device``; shapes: (B, H, dtype) tuples.

    A differing fp16 element passes only if the reference's fp32 value is within ``max_ulps`` fp32 ulps of an fp16
    rounding boundary and the op returned the other neighbour.
    """
    check = Check("readout: poc_readout vs reference.output_stage on the same device (fp16 bits)")
    golden = Check("readout: poc_readout on the golden output_stage rows vs vector_b64 (libdevice-emulated Haar)")
    bh, pk = "GPU_CHECK_READOUT", "gpu_check_pub_key"
    gen = torch.Generator().manual_seed(3)
    near = 0
    for nb, hidden, dtype in shapes:
        if stop():
            check.complete = False
            break
        hs = (torch.randn(nb, hidden, generator=gen) * 3).to(dtype).to(device)
        nonces = list(range(-5, nb - 5))
        got = ops.poc_readout(hs, bh, pk, nonces, backend=backend).vectors.cpu()
        want = R.output_stage(hs, bh, pk, nonces).cpu()
        check.cases += nb
        diff = (got.view(torch.int16) != want.view(torch.int16))
        if diff.any():
            y = reference_readout_f32(hs, bh, pk, nonces).cpu()
            ulps = _fp16_boundary_ulps(y)
            for b, j in diff.nonzero().tolist():
                neighbours = {torch.nextafter(want[b, j], torch.tensor(s, dtype=torch.float16)).item()
                              for s in (math.inf, -math.inf)}
                if ulps[b, j] <= max_ulps and got[b, j].item() in neighbours:
                    near += 1
                    continue
                check.fail(f"B={nb} H={hidden} {dtype} row {b} (nonce {nonces[b]}) element {j}: op {got[b, j].item()!r}"
                           f" vs reference {want[b, j].item()!r} (reference fp32 {y[b, j].item()!r}, "
                           f"{ulps[b, j].item():.1f} fp32 ulps from an fp16 boundary)")
    check.notes.append(f"{near} fp16 elements differ within {max_ulps} fp32 ulps of an fp16 rounding boundary")
    for case in _golden()["output_stage"]:
        hs = _f32_bits(case["hs_f32_hex"]).view(torch.float32).view(1, -1).to(device)
        res = ops.poc_readout(hs, case["block_hash"], case["public_key"], [case["nonce"]], backend=backend)
        got = encode_vector(res.vectors[0].cpu())
        ref = encode_vector(R.output_stage(hs, case["block_hash"], case["public_key"], [case["nonce"]])[0].cpu())
        want = case["vector_b64_with_cuda_libdevice_emulated_haar"]
        golden.cases += 1
        if got != want or ref != want:
            golden.fail(f"golden nonce {case['nonce']} H={case['hidden']}: op {got}, torch reference {ref}, expected "
                        f"{want} (CPU-torch golden {case['vector_b64']})")
    return [check, golden]


# ============================================================================================ SMST


def random_leaves(n: int, seed: int, nonce_space: int = 2**31):
    """(nonces int32 [n'], vectors fp16 [n', 12]) on the CPU: distinct nonces from [0, space) (or all of int32)."""
    g = torch.Generator().manual_seed(seed)
    if nonce_space <= 2**24:
        nonces = torch.randperm(nonce_space, generator=g)[:n].to(torch.int32)
    else:
        nonces = torch.unique(torch.randint(-(2**31), 2**31 - 1, (n,), generator=g, dtype=torch.int64))[:n]
        nonces = nonces[torch.randperm(nonces.numel(), generator=g)].to(torch.int32)
    return nonces, torch.randn((nonces.shape[0], K), generator=g).to(torch.float16)


def check_smst(device: torch.device, sizes, golden_max_leaves: int = 64, golden_limit: int | None = None,
               stop: Stop = never) -> list[Check]:
    """``smst_root_gpu`` on ``device`` vs the C++ root; sizes: (n, nonce_space) tuples of random trees; and the golden
    Go trees (at most ``golden_max_leaves`` leaves, at most ``golden_limit`` trees), whose device root is compared with
    both the Go root and the C++ root."""
    from cpoc_kernels.merkle import SMST, smst_root_gpu

    check = Check("SMST: smst_root_gpu vs the C++ SMST root (random and golden trees)")
    golden = Check("SMST: smst_root_gpu vs golden Go roots")

    def compare(what: str, nonces: torch.Tensor, vectors: torch.Tensor) -> bytes:
        tree = SMST()
        tree.extend(nonces, vectors)
        got = smst_root_gpu(nonces.to(device), vectors.to(device))
        check.cases += 1
        if got != tree.root:
            check.fail(f"{what}: device root {got.hex()} vs C++ {tree.root.hex()}")
        return got

    for i, (n, space) in enumerate(sizes):
        if stop():
            check.complete = False
            break
        nonces, vectors = random_leaves(n, 100 + i, space)
        compare(f"random tree N={nonces.numel()} nonce space {space}", nonces, vectors)
    check.notes.append("C++ core" if SMST().native else "C++ core not built: compared with the pure-Python SMST")
    trees = json.loads((GOLDEN_DIR / "smst_vectors.json").read_text())["trees"]
    for tree in sorted(trees, key=lambda t: t["count"]):
        if not 0 < tree["count"] <= golden_max_leaves:
            continue
        if stop() or (golden_limit is not None and golden.cases >= golden_limit):
            golden.complete = golden_limit is not None and golden.cases >= golden_limit
            break
        vec = {leaf["nonce"]: bytes.fromhex(leaf["vector_hex"]) for leaf in tree["leaves"]}
        nonces = torch.tensor(tree["insert_order"], dtype=torch.int32)
        vectors = torch.from_numpy(np.stack([np.frombuffer(vec[n], dtype="<f2") for n in tree["insert_order"]]).copy())
        got = compare(f"golden tree {tree['name']!r}", nonces, vectors)
        golden.cases += 1
        if got.hex() != tree["root"]:
            golden.fail(f"golden tree {tree['name']!r} ({tree['count']} leaves): {got.hex()} vs {tree['root']}")
    return [check, golden]


__all__ = ["Check", "check_inputs_vs_torch", "check_normals_golden", "check_pick", "check_readout", "check_reflect",
           "check_reflect_cuda_graph", "check_smst", "describe_order", "device_topk_pick", "explain_reflect_rows",
           "random_leaves", "reference_readout_f32"]
