"""Version vectors: ordering, merge, bump, text forms."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from repld.protocol.errors import ProtocolError
from repld.protocol.version import Order, VersionVector

A = "aaaaaaaa-0000-0000-0000-000000000000"
B = "bbbbbbbb-0000-0000-0000-000000000000"
C = "cccccccc-0000-0000-0000-000000000000"

vectors = st.dictionaries(st.sampled_from([A, B, C]), st.integers(0, 5)).map(VersionVector.of)


def test_orders():
    v1 = VersionVector.of({A: 1})
    v2 = v1.bump(B)
    assert v1.compare(v1) is Order.EQUAL
    assert v2.compare(v1) is Order.DOMINATES and v2.dominates(v1)
    assert v1.compare(v2) is Order.DOMINATED and not v1.dominates(v2)
    assert v1.bump(A).compare(v2) is Order.CONCURRENT
    assert VersionVector().compare(v1) is Order.DOMINATED


def test_zero_counters_are_not_stored():
    assert VersionVector.of({A: 0, B: 2}) == VersionVector.of({B: 2})
    assert VersionVector.of({A: 0}) == VersionVector()


def test_text_forms():
    v = VersionVector.of({B: 2, A: 4})
    assert v.encode() == f"{A}:4,{B}:2"
    assert str(v) == "aaaaaaaa:4,bbbbbbbb:2"
    assert VersionVector.decode(v.encode()) == v
    assert VersionVector.decode("") == VersionVector()
    for bad in ("x", "a:b", ":3", "a:-1"):
        with pytest.raises(ProtocolError):
            VersionVector.decode(bad)


@given(vectors, vectors)
def test_merge_dominates_or_equals_both(a, b):
    m = a.merge(b)
    assert m.descends(a) and m.descends(b)
    assert m == b.merge(a)
    if a.concurrent(b):
        assert m.dominates(a) and m.dominates(b)


@given(vectors, vectors)
def test_compare_is_antisymmetric(a, b):
    flip = {Order.DOMINATES: Order.DOMINATED, Order.DOMINATED: Order.DOMINATES}
    o = a.compare(b)
    assert b.compare(a) is flip.get(o, o)


@given(vectors)
def test_bump_dominates(a):
    assert a.bump(A).dominates(a)
    assert VersionVector.decode(a.encode()) == a
