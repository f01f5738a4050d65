"""The ``--candidate`` selection of the running pytest session: set by
:mod:`conformance.pytest_plugin.plugin` when pytest configures, read by
:mod:`conformance.pytest_plugin.suite` when it builds its test cases."""

from __future__ import annotations

_selected: list[str] | None = None


def selected_candidates() -> list[str] | None:
    """The candidate names given with ``--candidate`` in the running pytest
    session (validated, duplicates removed), or ``None`` when none were given
    (or outside pytest)."""
    return None if _selected is None else list(_selected)


def select(names: list[str] | None) -> None:
    """Set the selection (``None``: the default set of candidates)."""
    global _selected
    _selected = None if names is None else list(dict.fromkeys(names))
