"""moeframe's top-level names: ``__all__`` (a literal list, which linters and type checkers
read) names exactly the lazily imported names, and each one resolves."""

from __future__ import annotations

import pytest

import moeframe


def test_all_names_exactly_the_lazy_names() -> None:
    assert len(moeframe.__all__) == len(set(moeframe.__all__)), "a name is listed twice"
    assert set(moeframe.__all__) == set(moeframe._LAZY) | {"__version__"}


def test_every_public_name_resolves() -> None:
    for name in moeframe.__all__:
        assert getattr(moeframe, name) is not None, name
    assert dir(moeframe) == sorted(moeframe.__all__)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        moeframe.no_such_name  # noqa: B018 (the attribute access is the test)
