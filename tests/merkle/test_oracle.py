"""The pure-hashlib oracle against the network's golden vectors (Go v0.2.14) and the spec §1.4."""
import hashlib

import pytest

from cpoc_kernels.merkle import oracle

from ._golden import arrival, case_id, elements, golden_trees, tree_ids, verifier_cases


def test_empty_hashes_match_golden(smst_golden):
    assert [h.hex() for h in oracle.EMPTY_HASHES] == smst_golden["empty_hashes"]
    assert oracle.EMPTY_HASHES[0] == hashlib.sha256(b"\x00").digest()


def test_spec_section_1_4_vectors():
    # pocv2_protocol.md §1.4 (independent recomputation, identical to Go)
    t = oracle.OracleSMST()
    assert t.root_at(0).hex() == "c37ff3c98906a0a22cd65891ae94f8a25146c7c168c648470b4a827005660991"
    for n in (2, 0, 3, 1):
        t.insert(n, bytes(24))
    assert t.root_at(0).hex() == "41783d162b6900c6314cb28f4b44c7b20211516ad60b0282d745a0b58da288dc"
    t = oracle.OracleSMST()
    t.insert(5, bytes(24))
    t.insert(-1, bytes(range(24)))
    assert (t.depth, t.root_at(0).hex()) == (32, "df59d5eec7b0d1cbd56433db6ad388380975d2383186ff3656b89a378822095e")


@pytest.mark.parametrize("tree", golden_trees(), ids=tree_ids())
def test_oracle_reproduces_golden_tree(tree):
    t = oracle.OracleSMST()
    for nonce, vector in arrival(tree):
        t.insert(nonce, vector)
    assert (t.count, t.depth, t.root_at(0).hex()) == (tree["count"], tree["depth"], tree["root"])
    for p in tree["proofs"]:
        assert t.proof(p["dense_index"]) == b"".join(elements(p["proof_hex"]))
    for snap in tree["snapshots"]:
        assert t.root_at(snap["count"]).hex() == snap["root"]
        assert t.depth_at(snap["count"]) == snap["depth"]
        for p in snap.get("proofs", []):
            assert t.proof(p["dense_index"], snap["count"]) == b"".join(elements(p["proof_hex"]))
    for i, leaf in enumerate(tree["leaves"]):
        assert t.artifact(i) == (leaf["nonce"], bytes.fromhex(leaf["vector_hex"]))


@pytest.mark.parametrize("case", verifier_cases(), ids=case_id)
def test_oracle_verifier_matches_go(case):
    code = oracle.verify_code(bytes.fromhex(case["root"]), case["count"], case["dense_index"], case["nonce"],
                              bytes.fromhex(case["leaf_data_hex"]), elements(case["proof_hex"]))
    assert (code == oracle.VALID) == case["expected_valid"], oracle.VERIFY_REASONS[code]
