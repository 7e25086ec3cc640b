"""NonceIterator against the golden sequences (spec §8)."""
import pytest

from cpoc_kernels.reference import NonceIterator
from cpoc_kernels.reference.nonces import INT32_MAX


def test_nonce_iterator_golden(primitives):
    for case in primitives["nonce_iterator"]:
        it = NonceIterator(case["node_id"], case["node_count"], case["group_id"], case["n_groups"])
        assert [it.nonce(x) for x in case["x"]] == case["nonces"]
        assert it.take(len(case["x"])) == case["nonces"]


def test_take_continues_where_it_stopped():
    it = NonceIterator(1, 2)
    assert it.take(3) == [1, 3, 5]
    assert next(it) == 7


def test_stops_at_int32_range():
    it = NonceIterator(0, 1)
    it._x = INT32_MAX - 1
    assert list(it) == [INT32_MAX - 1, INT32_MAX]


@pytest.mark.parametrize("args", [(1, 1, 0, 1), (0, 0, 0, 1), (0, 2, 2, 2), (-1, 2, 0, 1), (0, 1, 0, 0)])
def test_bad_arguments(args):
    with pytest.raises(ValueError):
        NonceIterator(*args)
