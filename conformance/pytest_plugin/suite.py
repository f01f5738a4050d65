"""The conformance machines as pytest tests (collected through
:mod:`conformance.pytest_plugin.plugin`; see its docstring for how).

When imported, this module defines one unittest class
``TestConformance_<safe name>`` per selected candidate (``safe name``: the
candidate name with every non-alphanumeric character replaced by ``_``), so
test ids are stable, e.g. ``conformance/pytest_plugin/suite.py::TestConformance_reference::runTest``.

Selection: the names given with ``pytest --candidate`` if any; otherwise every
registered candidate that is not a known-bug mutant (``known_bug = False``).
A registered candidate that fails to import becomes a test that fails with the
one-line import error, so one broken plug-in does not hide the others.

Each test runs the sequential machine (:func:`conformance.machines.sequential.machine_for`);
a candidate that declares ``Capabilities(concurrent=True)`` also gets
``TestParallel_<safe name>``, the parallel machine
(:mod:`conformance.machines.parallel`). Both run under the Hypothesis profile that is loaded *when the test runs*
(``--hypothesis-profile``, the ``ci`` auto-detection, or ``dev``), with
``deadline=None`` forced because a deadline would apply to a whole program.
"""

from __future__ import annotations

import unittest

from hypothesis import settings as Settings

from conformance import registry
from conformance.errors import ConformanceFailure
from conformance.failures import polish
from conformance.machines.parallel import machine_class
from conformance.pytest_plugin.selection import selected_candidates

#: The candidate names this module was built for, in order.
SELECTED: list[str] = []
#: ``selected_candidates()`` when it was built (None: the default set).
BUILT_FOR: list[str] | None = selected_candidates()

__all__: list[str] = []


class _CurrentProfileSettings:
    """``StateMachineTestCase.settings`` as a descriptor: the current profile,
    read at access time (the inherited ``runTest`` reads ``self.settings``)."""

    def __get__(self, obj, owner=None) -> Settings:
        return Settings(Settings(), deadline=None)


def safe_name(name: str) -> str:
    """The identifier form of a candidate name (as :func:`machine_for` uses)."""
    return "".join(c if c.isalnum() else "_" for c in name)


def selection() -> list[tuple[str, type | Exception]]:
    """``(name, class)`` for every selected candidate, or ``(name, error)`` for
    one that failed to import."""
    explicit = selected_candidates()
    chosen: list[tuple[str, type | Exception]] = []
    if explicit is not None:
        for name in explicit:
            try:
                chosen.append((name, registry.load(name)))
            except (registry.UnknownCandidate, registry.CandidateImportError) as exc:
                chosen.append((name, exc))
        return chosen
    for name, ep in registry.available().items():
        try:
            cls = registry.load_entry_point(ep)
        except registry.CandidateImportError as exc:
            chosen.append((name, exc))
            continue
        if not registry.is_known_bug(cls):
            chosen.append((name, cls))
    return chosen


def conformance_test_case(name: str, cls: type,
                          machine_kind: str = "sequential") -> type[unittest.TestCase]:
    """The pytest-collectable TestCase running ``cls``'s conformance machine
    of kind ``machine_kind`` under the current Hypothesis profile."""
    machine = machine_class(name, cls, machine_kind)
    base = machine.TestCase

    def runTest(self):
        machine.last_failure = None
        try:
            base.runTest(self)
        except ConformanceFailure as exc:
            # Hypothesis has shrunk and re-raised the last replay's failure;
            # shorten that program on the rule level too, so the report and
            # the replay file are the shortest.
            found = machine.last_failure
            if found is not None and found[0] is exc:
                polish.after_failure(name, cls, found)
            raise

    # What Hypothesis's pytest plugin looks for (statistics, --hypothesis-seed).
    runTest.is_hypothesis_test = True
    runTest._hypothesis_state_machine_class = machine

    prefix = "TestConformance" if machine_kind == "sequential" else "TestParallel"
    return type(f"{prefix}_{safe_name(name)}", (base,), {
        "runTest": runTest,
        "settings": _CurrentProfileSettings(),
        "candidate_name": name,
        "candidate_cls": cls,
        "__module__": __name__,
        "__doc__": f"Conformance of candidate {name!r} ({cls.__module__}.{cls.__qualname__}).",
    })


def broken_test_case(name: str, error: Exception) -> type[unittest.TestCase]:
    """A TestCase that fails with ``error``'s one-line message."""
    message = str(error)

    def runTest(self):
        self.fail(message)

    return type(f"TestConformance_{safe_name(name)}", (unittest.TestCase,), {
        "runTest": runTest, "candidate_name": name, "__module__": __name__})


def _cases(name: str, found) -> list[type[unittest.TestCase]]:
    """The sequential machine for every candidate, and the parallel machine
    for those that declare ``Capabilities(concurrent=True)``."""
    if isinstance(found, Exception):
        return [broken_test_case(name, found)]
    cases = [conformance_test_case(name, found)]
    if getattr(getattr(found, "capabilities", None), "concurrent", False):
        cases.append(conformance_test_case(name, found, "parallel"))
    return cases


def _build() -> None:
    for name, found in selection():
        for case in _cases(name, found):
            _register(name, case)


def _register(name: str, case) -> None:
    attr, n = case.__name__, 2
    while attr in globals():  # "a-b" and "a_b" both registered
        attr = f"{case.__name__}_{n}"
        n += 1
    case.__name__ = case.__qualname__ = attr
    globals()[attr] = case
    __all__.append(attr)
    if name not in SELECTED:
        SELECTED.append(name)


_build()
