"""The candidate registry (conformance/registry.py)."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from candidates.mutants import MUTANTS
from candidates.reference import ReferenceCandidate
from conformance import registry


def _ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=registry.GROUP)


def test_reference_is_available():
    eps = registry.available()
    assert "reference" in eps
    assert eps["reference"].value == "candidates.reference:ReferenceCandidate"
    assert list(eps) == sorted(eps)


def test_every_bundled_mutant_is_registered():
    eps = registry.available()
    for name, cls in MUTANTS.items():
        assert name in eps, f"{name} missing from the entry points in pyproject.toml"
        assert registry.load(name) is cls


def test_load_returns_the_class():
    cls = registry.load("reference")
    assert cls is ReferenceCandidate
    assert not registry.is_known_bug(cls)


def test_unknown_candidate_lists_the_available_ones_on_one_line():
    with pytest.raises(registry.UnknownCandidate) as info:
        registry.load("no-such-candidate")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("unknown candidate 'no-such-candidate'; available candidates: ")
    listed = message.split("available candidates: ", 1)[1].split(", ")
    assert listed == list(registry.available())
    assert "reference" in listed


def test_broken_entry_point_is_a_candidate_import_error(monkeypatch):
    broken = _ep("broken", "no_such_module_xyz:X")
    real = registry.available()
    monkeypatch.setattr(registry, "available", lambda: {**real, "broken": broken})
    with pytest.raises(registry.CandidateImportError) as info:
        registry.load("broken")
    message = str(info.value)
    assert "\n" not in message
    assert message == ("candidate 'broken' (no_such_module_xyz:X) failed to import: "
                       "ModuleNotFoundError: No module named 'no_such_module_xyz'")


def test_missing_attribute_is_a_candidate_import_error(monkeypatch):
    monkeypatch.setattr(registry, "available",
                        lambda: {"typo": _ep("typo", "candidates.reference:Referense")})
    with pytest.raises(registry.CandidateImportError, match=r"^candidate 'typo' "
                       r"\(candidates\.reference:Referense\) failed to import: "
                       r"AttributeError"):
        registry.load("typo")


@pytest.mark.parametrize("value, what", [
    ("conformance.registry:load", "function"),
    ("conformance.registry:UnknownCandidate", "class UnknownCandidate"),
])
def test_non_candidate_object_is_rejected(monkeypatch, value, what):
    monkeypatch.setattr(registry, "available", lambda: {"odd": _ep("odd", value)})
    with pytest.raises(registry.CandidateImportError) as info:
        registry.load("odd")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"candidate 'odd' ({value}) is not a candidate")
    assert what in message and "handle_guest_abort" in message
