"""The candidate registry: candidates are classes registered under the
entry-point group ``stage2_conformance.candidates`` (DESIGN §1, §4).

A distribution plugs a candidate in with, in its ``pyproject.toml``::

    [project.entry-points."stage2_conformance.candidates"]
    my-stage2 = "my_package.stage2:MyCandidate"

The suite ships ``reference`` and the known-bug mutants (``mutant-*``) this
way too. Errors are one line each, so that the CLI and the pytest plugin can
print them as they are.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

GROUP = "stage2_conformance.candidates"


class UnknownCandidate(Exception):
    """No candidate is registered under that name."""

    def __init__(self, name: str, available: list[str]):
        super().__init__(name, available)
        self.name = name
        self.available = list(available)

    def __str__(self) -> str:
        names = ", ".join(self.available) or "(none)"
        return f"unknown candidate {self.name!r}; available candidates: {names}"


class CandidateImportError(Exception):
    """A registered candidate could not be loaded, or what its entry point
    names is not a candidate class."""

    def __init__(self, name: str, value: str, reason: str):
        super().__init__(name, value, reason)
        self.name = name
        self.value = value
        self.reason = reason

    def __str__(self) -> str:
        return f"candidate {self.name!r} ({self.value}) {self.reason}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def available() -> dict[str, EntryPoint]:
    """Every registered candidate entry point, keyed by name, sorted by name.

    Nothing is imported. If two distributions register the same name, the
    first one ``importlib.metadata`` reports wins.
    """
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)
    return dict(sorted(found.items()))


def load(name: str) -> type:
    """Import and return the candidate class registered as ``name``.

    Raises :class:`UnknownCandidate` when no such entry point exists and
    :class:`CandidateImportError` when importing it fails (any exception,
    including a missing attribute) or when the object is not a class with a
    ``handle_guest_abort`` method.
    """
    eps = available()
    ep = eps.get(name)
    if ep is None:
        raise UnknownCandidate(name, list(eps))
    return load_entry_point(ep)


def load_entry_point(ep: EntryPoint) -> type:
    """Load one entry point and check that it names a candidate class (the
    part of :func:`load` that does not look the name up)."""
    try:
        obj = ep.load()
    except Exception as exc:  # noqa: BLE001 — any failure is the candidate's
        raise CandidateImportError(
            ep.name, ep.value,
            f"failed to import: {type(exc).__name__}: {_one_line(exc)}") from exc
    if not isinstance(obj, type) or not callable(getattr(obj, "handle_guest_abort", None)):
        what = f"class {obj.__qualname__}" if isinstance(obj, type) else \
            f"{type(obj).__name__} {_one_line(repr(obj))[:80]}"
        raise CandidateImportError(
            ep.name, ep.value,
            f"is not a candidate: it names a {what}, not a class with a "
            "handle_guest_abort method (see docs/candidate-protocol.md)")
    return obj


def is_known_bug(cls: type) -> bool:
    """True for the suite's known-bug mutants (``known_bug = True``)."""
    return bool(getattr(cls, "known_bug", False))
