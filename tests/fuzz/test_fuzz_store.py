"""Fuzzing the artifact store's files: malformed logs, checksum files and roots files.

Every mutated store must either open (and then serve proofs that verify against its flushed roots) or fail
with a ValueError, leaving every file byte for byte as it was. The cases run in a child process (the open
path reaches the C++ hashing), bounded by hypothesis' example count; the child is this file run as a script.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_fuzzed_store_files_fail_cleanly_in_a_child_process():
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child"], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"child failed (rc {out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "fuzz-store: ok" in out.stdout, out.stdout[-2000:]


def _child() -> None:
    import numpy as np
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from cpoc_kernels.merkle import verify_artifact_proof
    from cpoc_kernels.merkle.store import DATA_FILE, ROOTS_FILE, SUMS_FILE, ArtifactStore

    names = [DATA_FILE, ROOTS_FILE, SUMS_FILE]
    template = Path(tempfile.mkdtemp()) / "template"
    with ArtifactStore(template, flush_interval_s=None) as store:
        rng = np.random.default_rng(0)
        for c in (2, 5, 9):
            nonces = rng.choice(2**24, c, replace=False).astype(np.int32) + 2**24 * c  # disjoint per batch
            rows = rng.standard_normal((c, 12)).astype("<f2").view(np.uint8).reshape(-1, 24)
            store.extend(nonces, rows)
            store.flush()
        store.append(-7, rows[0].tobytes())  # one unflushed record
    files = {n: (template / n).read_bytes() for n in names}

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=70),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["count", "root", "x"]), inner,
                                                                     max_size=3), max_leaves=6)
    byte_edit = st.tuples(st.sampled_from(["flip", "cut", "insert", "replace"]), st.integers(0, 10**6),
                          st.binary(min_size=1, max_size=40))
    line_edit = st.tuples(st.integers(0, 5), json_values | st.binary(max_size=80))

    def apply(blob: bytes, edit) -> bytes:
        kind, at, data = edit
        at = at % (len(blob) + 1)
        if kind == "flip" and blob:
            at = min(at, len(blob) - 1)
            return blob[:at] + bytes([blob[at] ^ (data[0] or 1)]) + blob[at + 1:]
        if kind == "cut":
            return blob[:at]
        if kind == "insert":
            return blob[:at] + data + blob[at:]
        return blob[:at] + data + blob[at + len(data):]

    seen = {"opened": 0, "refused": 0}

    def check(directory: Path) -> None:
        before = {p.name: p.read_bytes() for p in directory.iterdir()}
        try:
            store = ArtifactStore(directory, flush_interval_s=None)
        except ValueError as exc:
            assert str(exc), "empty error message"
            after = {p.name: p.read_bytes() for p in directory.iterdir() if p.name in before}
            assert after == before, f"a failed open changed the files ({exc})"
            seen["refused"] += 1
            return
        seen["opened"] += 1
        with store:  # it opened: everything it serves must verify
            for count, root in store.flushed:
                served = store.artifacts_and_proofs(list(range(min(count, 4))), count, root=root)
                for s in served:
                    assert verify_artifact_proof(root, count, s.leaf_index, s.nonce, s.vector, s.proof)

    @settings(max_examples=int(os.environ.get("CPOC_FUZZ_EXAMPLES", "150")), deadline=None,
              suppress_health_check=list(HealthCheck), database=None)
    @given(which=st.sampled_from(names), edits=st.lists(byte_edit, min_size=1, max_size=3),
           lines=st.lists(line_edit, max_size=2))
    def run(which, edits, lines):
        directory = Path(tempfile.mkdtemp())
        contents = dict(files)
        for edit in edits:
            contents[which] = apply(contents[which], edit)
        roots_lines = contents[ROOTS_FILE].split(b"\n")
        for i, value in lines:
            raw = value if isinstance(value, bytes) else json.dumps(value).encode()
            roots_lines[i % len(roots_lines)] = raw.replace(b"\n", b" ")
        contents[ROOTS_FILE] = b"\n".join(roots_lines)
        for name, blob in contents.items():
            (directory / name).write_bytes(blob)
        check(directory)

    run()
    print(f"fuzz-store: ok (opened {seen['opened']}, refused {seen['refused']})")


if __name__ == "__main__" and "--child" in sys.argv:
    _child()
