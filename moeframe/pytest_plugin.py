"""moeframe's pytest plugin: the conformance kit in a plugin author's own test suite.

Loaded by pytest through the ``pytest11`` entry point of the ``moeframe`` distribution
(``-p no:moeframe`` turns it off).  It gives:

* the marker ``@pytest.mark.moeframe_conformance(kind=..., name=..., **options)`` on a test
  that takes the ``moeframe_case`` argument: the test runs once per case of the kit for
  that strategy (ids such as ``silu-bias-map-bfloat16-T7-E8K2``), and calls
  ``moeframe_case.check()``;
* the fixture ``moeframe_conformance``: ``moeframe_conformance.check(kind, name, **options)``
  runs every case in one test and fails with the list of failures.

The kinds, cases and options are those of :mod:`moeframe.conformance_kit`.  Importing
this module imports neither torch nor the rest of moeframe: that happens only in a
session that uses the marker or the fixture.
"""

from __future__ import annotations

from typing import Any

import pytest

MARKER = "moeframe_conformance"


class CaseToCheck:
    """One case of the kit, as the ``moeframe_case`` argument of a marked test."""

    def __init__(self, case: Any) -> None:
        self.case = case

    @property
    def id(self) -> str:
        return str(self.case.id)

    def check(self) -> None:
        """Run the case: return when it passes, fail the test with the case's message
        when it does not, skip the test when the case does not apply."""
        from moeframe.conformance_kit import Unsupported

        try:
            self.case.run()
        except Unsupported as exc:
            pytest.skip(f"{self.case.id}: {exc}")
        except AssertionError as exc:
            pytest.fail(str(exc), pytrace=False)

    def __repr__(self) -> str:
        return f"<moeframe case {self.case.kind} {self.case.name!r}: {self.case.id}>"


class ConformanceKit:
    """The ``moeframe_conformance`` fixture: the whole kit for a strategy in one test."""

    def cases(self, kind: str, name: str, **options: Any) -> list[CaseToCheck]:
        """The kit's cases for ``name`` of ``kind`` (see :mod:`moeframe.conformance_kit`)."""
        from moeframe.conformance_kit import conformance_cases

        return [CaseToCheck(c) for c in conformance_cases(kind, name, **options)]

    def check(self, kind: str, name: str, **options: Any) -> dict[str, int]:
        """Run every case; fail with every failing case's message (skipped cases are
        counted, not failures).  Returns ``{"passed": n, "skipped": n}``."""
        from moeframe.conformance_kit import Unsupported

        failures, passed, skipped = [], 0, 0
        for item in self.cases(kind, name, **options):
            try:
                item.case.run()
            except Unsupported:
                skipped += 1
            except AssertionError as exc:
                failures.append(str(exc))
            except Exception as exc:
                failures.append(f"{item.id}: raised {type(exc).__name__}: {exc}")
            else:
                passed += 1
        if failures:
            pytest.fail(
                f"{kind} {name!r}: {len(failures)} of {len(failures) + passed + skipped} conformance cases failed:\n"
                + "\n".join(f"  {f}" for f in failures),
                pytrace=False,
            )
        if not passed:
            pytest.fail(
                f"{kind} {name!r}: no conformance case applies ({skipped} skipped); nothing was checked", pytrace=False
            )
        return {"passed": passed, "skipped": skipped}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(kind, name, **options): run moeframe's conformance kit for the strategy `name` of `kind` "
        "(kernel, router, wrapper, dispatcher); the test takes `moeframe_case` and calls moeframe_case.check()",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        return
    where = metafunc.definition.nodeid
    if "moeframe_case" not in metafunc.fixturenames:
        _refuse(f"{where}: a test marked {MARKER} takes the argument `moeframe_case` and calls moeframe_case.check()")
    from moeframe.conformance_kit import conformance_cases
    from moeframe.errors import UserError

    # strict=False: more than two positional arguments are refused just below, with a message
    args = dict(zip(("kind", "name"), marker.args, strict=False))
    duplicated = set(args) & set(marker.kwargs)
    if duplicated or len(marker.args) > 2:
        _refuse(f"{where}: {MARKER} takes kind and name once (positionally or by keyword)")
    options = {**args, **marker.kwargs}
    kind, name = options.pop("kind", None), options.pop("name", None)
    if not kind or not name:
        _refuse(f'{where}: {MARKER} needs kind= and name=, e.g. @pytest.mark.{MARKER}(kind="kernel", name="my_kernel")')
    try:
        cases = conformance_cases(kind, name, **options)
    except (ValueError, UserError) as exc:  # unknown kind, option or strategy name: one line
        _refuse(f"{where}: {exc}")
    metafunc.parametrize("moeframe_case", [CaseToCheck(c) for c in cases], ids=[c.id for c in cases])


def _refuse(message: str) -> None:
    """A collection error that shows only ``message`` (no traceback through pytest)."""
    pytest.fail(message, pytrace=False)


@pytest.fixture
def moeframe_case() -> None:
    """Given by ``@pytest.mark.moeframe_conformance(...)``: one case of the kit."""
    raise pytest.UsageError(f"`moeframe_case` comes with @pytest.mark.{MARKER}(kind=..., name=...) on the test")


@pytest.fixture
def moeframe_conformance() -> ConformanceKit:
    """The conformance kit: ``moeframe_conformance.check(kind, name, **options)``."""
    return ConformanceKit()
