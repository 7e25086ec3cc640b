"""The HF continuous-PoC step of ``bench/gpu_check.py``, run as its own process (hard timeout, GPU memory freed).

    python bench/gpu_check_hf.py --json OUT.json [--dry-run] [--budget SECONDS]

On a Qwen3-0.6B-shaped bf16 model with deterministic weights (``cpoc-tiny`` in a dry run), in this order:

1. pure PoC: ``PoCRunner`` nonces/s (plain [B, seq_len, H] batches);
2. PoC alone in the engine: continuous PoC in transformers' continuous batching with no chat, nonces/s;
3. chat TPOT with PoC off, then on: the same closed-loop chat stream (``concurrency`` requests in flight, a new one
   as soon as one finishes); TPOT per request = (last token time - first token time) / (tokens - 1), from the
   engine's per-token timestamps; also time to first token, and whether greedy outputs changed;
4. artifacts vs plain batches: the artifacts of runs 2–3 recomputed by ``PoCRunner``: bit-identical count, L2
   distances, the validator's verdict.

Every phase is isolated (an exception is recorded and the next phase runs) and the JSON is rewritten after each
phase, so a timeout still leaves what finished. Phases that no longer fit the budget are skipped and named.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
else:
    os.environ.setdefault("TRITON_INTERPRET", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

# (model, dtype, seq_len, engine sizes, chat shape, concurrency, chat requests, idle seconds, pure nonces, batch,
# artifacts recomputed). GPU: mainnet seq_len 1024; 4096 tokens per step; KV for 32 nonces + chat.
CONFIG = {
    "gpu": dict(model="qwen3-0.6b-shaped", seq_len=1024, max_batch_tokens=4096, num_blocks=3072, page_size=16,
                max_requests_per_batch=64, prompt_len=(128, 256), output_len=(64, 96), concurrency=16, requests=48,
                idle_seconds=10.0, pure_nonces=128, pure_batch=32, recompute=64),
    "dry": dict(model="cpoc-tiny", seq_len=16, max_batch_tokens=128, num_blocks=64, page_size=16,
                max_requests_per_batch=8, prompt_len=(8, 16), output_len=(4, 8), concurrency=2, requests=4,
                idle_seconds=1.0, pure_nonces=8, pure_batch=4, recompute=8),
}
# Seconds each phase needs at most on an H100/H200 (estimates; see gpu_check.py for the arithmetic).
PHASE_SECONDS = {"build": 25, "pure_poc": 15, "idle_poc": 20, "chat_off": 20, "chat_on": 30, "artifacts": 15}


def _pct(values, p):
    return float(np.percentile(np.asarray(values), p)) if len(values) else None


def chat_run(model, cfg: dict, requests, *, poc: bool, rnd, nonce_start: int, timeout: float) -> dict:
    """One closed-loop chat session (``cfg['concurrency']`` in flight) on a fresh manager, PoC off or on."""
    from transformers import GenerationConfig

    from cpoc_kernels.integrations.hf import ContinuousPoC, cb_config

    gen = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
    mgr = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb_config(
        max_batch_tokens=cfg["max_batch_tokens"], num_blocks=cfg["num_blocks"], page_size=cfg["page_size"],
        max_requests_per_batch=cfg["max_requests_per_batch"]))
    cp = ContinuousPoC(model, mgr, mode="fill", slo_overhead=0.05) if poc else None
    submitted: dict[str, float] = {}
    done: dict[str, dict] = {}
    order: list[str] = []
    stats = None
    try:
        mgr.start()
        if cp is not None:
            cp.start(rnd["block_hash"], rnd["public_key"], iter(range(nonce_start, 2**31 - 1)), rnd["seq_len"])
        t0 = time.perf_counter()
        nxt = 0
        while len(done) < len(requests):
            while nxt < len(requests) and len(submitted) - len(done) < cfg["concurrency"]:
                prompt, max_new = requests[nxt]
                rid = mgr.add_request(prompt, max_new_tokens=max_new, record_timestamps=True)
                submitted[rid] = time.perf_counter()
                order.append(rid)
                nxt += 1
            out = mgr.get_result(timeout=0.05)
            if out is not None:
                if out.request_id not in submitted:
                    raise RuntimeError(f"unexpected output {out.request_id!r} in the chat stream")
                if out.error is not None:
                    raise RuntimeError(f"chat request {out.request_id} failed: {out.error}")
                ts = list(out.timestamps or [])
                tokens = list(out.generated_tokens)
                done[out.request_id] = dict(
                    tokens=tokens, ttft=(ts[0] - submitted[out.request_id]) if ts else None,
                    tpot=(ts[-1] - ts[0]) / (len(ts) - 1) if len(ts) > 1 else None)
            if time.perf_counter() - t0 > timeout or not mgr.is_running():
                raise RuntimeError(f"chat requests not served in {timeout:.0f} s ({len(done)}/{len(requests)} done)")
        window = time.perf_counter() - t0
        if cp is not None:
            stats = cp.stats()
            cp.stop(drain=True, timeout=60)
    finally:
        mgr.stop(block=True, timeout=60)
        if cp is not None:
            cp.detach()
    tpot = [d["tpot"] * 1e3 for d in done.values() if d["tpot"] is not None]
    ttft = [d["ttft"] * 1e3 for d in done.values() if d["ttft"] is not None]
    res = dict(poc=poc, requests=len(requests), window_s=window, tpot_ms_p50=_pct(tpot, 50), tpot_ms_p90=_pct(tpot, 90),
               tpot_ms_mean=float(np.mean(tpot)) if tpot else None, ttft_ms_p50=_pct(ttft, 50),
               ttft_ms_p90=_pct(ttft, 90), output_tokens=sum(len(d["tokens"]) for d in done.values()),
               tokens=[done[r]["tokens"] for r in order])
    if cp is not None:
        res.update(nonces_done=stats["nonces_done"], nonces_per_s=stats["nonces_done"] / window,
                   poc_token_share=stats["poc_token_share"], nonces_preempted=stats.get("nonces_preempted", 0),
                   failed=stats.get("failed"), error=stats.get("error"))
        res["artifacts"] = list(cp.collected)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for all phases")
    args = ap.parse_args()
    t_start = time.perf_counter()
    cfg = CONFIG["dry" if args.dry_run else "gpu"]
    device = torch.device("cpu" if args.dry_run else "cuda")
    report: dict = dict(config={k: v for k, v in cfg.items()}, device=str(device), phases={}, errors={}, skipped=[])

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(args.json)

    state: dict = {}

    def phase(name, fn):
        left = args.budget - (time.perf_counter() - t_start)
        if left < PHASE_SECONDS[name] * (0.05 if args.dry_run else 1.0):
            report["skipped"].append(f"{name} (budget: {left:.0f} s left, needs ~{PHASE_SECONDS[name]} s)")
            print(f"[hf] skip {name}: {left:.0f} s left", flush=True)
            save()
            return
        t0 = time.perf_counter()
        try:
            report["phases"][name] = fn() or {}
            report["phases"][name]["seconds"] = time.perf_counter() - t0
            print(f"[hf] {name}: {json.dumps(report['phases'][name], default=str)[:600]}", flush=True)
        except Exception as exc:  # noqa: BLE001  (recorded; the next phase runs)
            report["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            print(f"[hf] ERROR in {name}: {exc!r}", flush=True)
        save()

    rnd = dict(block_hash="GPU_CHECK_HF", public_key="gpu_check_pub_key", seq_len=cfg["seq_len"])

    def build():
        import transformers

        from cpoc_kernels.integrations.hf import build_model

        state["model"] = build_model(cfg["model"], dtype=torch.bfloat16, device=device)
        return dict(model=cfg["model"], dtype="bfloat16", transformers=transformers.__version__,
                    params=sum(p.numel() for p in state["model"].parameters()))

    def pure_poc():
        from cpoc_kernels.integrations.hf.mixed_bench import Round, pure_poc_rate

        rate = pure_poc_rate(state["model"], Round(rnd["block_hash"], rnd["public_key"], rnd["seq_len"]),
                             n=cfg["pure_nonces"], batch_size=cfg["pure_batch"])
        state["pure"] = rate
        return dict(nonces_per_s=rate, batch_size=cfg["pure_batch"], nonces=cfg["pure_nonces"])

    def idle_poc():
        from cpoc_kernels.integrations.hf.mixed_bench import EngineSettings, Round, run_session

        settings = EngineSettings(max_batch_tokens=cfg["max_batch_tokens"], num_blocks=cfg["num_blocks"],
                                  page_size=cfg["page_size"], max_requests_per_batch=cfg["max_requests_per_batch"])
        res = run_session(state["model"], settings, [], [], poc=True,
                          rnd=Round(rnd["block_hash"], rnd["public_key"], rnd["seq_len"]),
                          nonces=iter(range(0, 10**6)), poc_seconds=cfg["idle_seconds"], timeout=120)
        state["artifacts_idle"] = list(res.artifacts)
        pure = state.get("pure")
        return dict(nonces_per_s=res.nonces_per_s, nonces_done=res.nonces_done, window_s=res.window_s,
                    poc_token_share=res.poc_token_share, of_pure=res.nonces_per_s / pure if pure else None)

    def chat_requests():
        rng = np.random.default_rng(0)
        vocab = state["model"].config.vocab_size
        lo, hi = cfg["prompt_len"]
        olo, ohi = cfg["output_len"]
        return [(rng.integers(1, vocab, size=int(rng.integers(lo, hi + 1))).tolist(), int(rng.integers(olo, ohi + 1)))
                for _ in range(cfg["requests"])]

    def chat(poc: bool):
        def run():
            res = chat_run(state["model"], cfg, chat_requests(), poc=poc, rnd=rnd, nonce_start=10**6, timeout=120)
            arts = res.pop("artifacts", [])
            if poc:
                state["artifacts_chat"] = arts
            tokens = res.pop("tokens")
            if not poc:
                state["off"], state["off_tokens"] = res, tokens
            elif "off" in state:
                off = state["off"]
                res["outputs_differ_from_off"] = sum(a != b for a, b in zip(tokens, state["off_tokens"]))
                if off.get("tpot_ms_p50") and res.get("tpot_ms_p50"):
                    res["tpot_p50_overhead"] = res["tpot_ms_p50"] / off["tpot_ms_p50"] - 1
                    res["tpot_p90_overhead"] = res["tpot_ms_p90"] / off["tpot_ms_p90"] - 1
            return res
        return run

    def artifacts():
        from cpoc_kernels.integrations.hf.mixed_bench import Round, recompute_and_validate

        # Half from PoC beside chat (rows mixed into chat steps), the rest from PoC alone in the engine.
        chat_arts = sorted(state.get("artifacts_chat", []), key=lambda a: a.nonce)[: cfg["recompute"] // 2]
        idle_arts = sorted(state.get("artifacts_idle", []), key=lambda a: a.nonce)[: cfg["recompute"] - len(chat_arts)]
        arts = chat_arts + idle_arts
        if not arts:
            raise RuntimeError("no artifacts from the continuous runs to compare")
        result, recomputed = recompute_and_validate(
            state["model"], Round(rnd["block_hash"], rnd["public_key"], rnd["seq_len"]), arts)
        ref = {a.nonce: a.vector() for a in recomputed}
        identical = sum(np.array_equal(a.vector(), ref[a.nonce]) for a in arts if a.nonce in ref)
        finite = [d for d in result.distances.values() if d != math.inf]
        return dict(compared=len(arts), from_chat_run=len(chat_arts), from_idle_run=len(idle_arts),
                    bit_identical=identical, max_l2=max(finite) if finite else None,
                    mean_l2=float(np.mean(finite)) if finite else None, mismatches_l2_gt_0_2=result.n_mismatch,
                    p_value=result.p_value, fraud=result.fraud)

    print(f"[hf] device {device}, config {cfg['model']}, budget {args.budget:.0f} s", flush=True)
    phase("build", build)
    if "model" in state:
        phase("pure_poc", pure_poc)
        phase("idle_poc", idle_poc)
        phase("chat_off", chat(False))
        phase("chat_on", chat(True))
        phase("artifacts", artifacts)
    report["seconds"] = time.perf_counter() - t_start
    save()
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
