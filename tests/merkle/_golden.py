"""Helpers for reading tests/golden/smst_vectors.json (Go v0.2.14 output; see its `notes`)."""
import functools
import json
import pathlib

GOLDEN = pathlib.Path(__file__).parent.parent / "golden" / "smst_vectors.json"


@functools.lru_cache(maxsize=None)
def load_golden() -> dict:
    return json.loads(GOLDEN.read_text())


def golden_trees() -> list[dict]:
    return load_golden()["trees"]


def tree_ids() -> list[str]:
    return [t["name"] for t in golden_trees()]


def tree_vectors(tree) -> dict[int, bytes]:
    """nonce -> vector bytes."""
    return {leaf["nonce"]: bytes.fromhex(leaf["vector_hex"]) for leaf in tree["leaves"]}


def arrival(tree) -> list[tuple[int, bytes]]:
    """(nonce, vector) in the tree's insert (arrival) order."""
    vec = tree_vectors(tree)
    return [(n, vec[n]) for n in tree["insert_order"]]


def elements(hex_list) -> list[bytes]:
    return [bytes.fromhex(e) for e in hex_list]


def verifier_cases() -> list[dict]:
    """negative_cases (incl. the honest 'none' ones) and raw_leaf_data_cases, all with expected_valid."""
    g = load_golden()
    return g["negative_cases"] + g["raw_leaf_data_cases"]


def case_id(case) -> str:
    return f"{case['tree_name']}-{case['tampered']}-{case['source_dense_index']}"
