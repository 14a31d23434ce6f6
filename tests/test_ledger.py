"""The native extension and its pure twin agree; the native one is really loaded."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from _native import _ledger_py
from zaiproxy.ledger import LedgerUnavailable, load

IMPLEMENTATIONS = ["native", "python"]


def test_native_module_loaded_when_expected() -> None:
    # `make test` builds the extension; the suite must fail, not fall back, if it did not load.
    if os.environ.get("ZAIPROXY_LEDGER", "native") == "native":
        assert load().IMPLEMENTATION == "native"
        assert load().__name__ == "_native._ledger"
        assert load().__file__.endswith(".so")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_known_vectors(impl: str) -> None:
    mod = load(impl)
    # FNV-1a 64 reference values (http://www.isthe.com/chongo/tech/comp/fnv/).
    assert mod.stable_hash(b"") == 0xCBF29CE484222325
    assert mod.stable_hash(b"a") == 0xAF63DC4C8601EC8C
    assert mod.stable_hash(b"foobar") == 0x85944171F73967E8


@given(st.binary(max_size=512))
def test_twins_agree(data: bytes) -> None:
    assert load("native").stable_hash(data) == _ledger_py.stable_hash(data)


def test_unknown_choice_is_an_error() -> None:
    with pytest.raises(LedgerUnavailable):
        load("bogus")
