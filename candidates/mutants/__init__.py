"""Known-bug mutants of the reference candidate.

Each mutant is a small subclass that reintroduces one real bug (reference §8)
or breaks one invariant (reference §9). Metadata on the class says what it is
and which property family must catch it; ``tests/test_mutants.py`` checks that
the suite does, with a short counterexample.
"""

from candidates.mutants.reference_mutants import MUTANTS

__all__ = ["MUTANTS"]
