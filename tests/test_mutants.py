"""Every mutant of the corpus is caught, by the property family it breaks, with
a short counterexample (DESIGN §8; issue: foundation)."""

from __future__ import annotations

import pytest

from candidates.mutants import MUTANTS
from conformance.runner import run

#: Budget per mutant: derandomized (the same programs every run), so a catch
#: here is a catch in CI too.
MUTANT_BUDGET = dict(profile="ci", max_examples=300)
MAX_SHRUNK_STEPS = 8


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(name):
    cls = MUTANTS[name]
    assert cls.known_bug
    result = run(name, cls, **MUTANT_BUDGET)
    assert result.status == "fail", f"{name} ({cls.bug}) was not caught: {result.status}"
    assert result.failed_property in cls.expected_property, (
        f"{name} caught by {result.failed_property}, expected one of "
        f"{cls.expected_property}: {result.failure}")
    assert f"[{result.failed_property}]" in str(result.failure)
    assert 1 <= result.steps <= MAX_SHRUNK_STEPS, "\n".join(result.trace)


def test_reference_passes_the_same_budget():
    from candidates.reference import ReferenceCandidate
    result = run("reference", ReferenceCandidate, **MUTANT_BUDGET)
    assert result.status == "pass", f"{result.failure}\n" + "\n".join(result.trace)
