"""Known-bug mutants: the corpus every change to the suite must keep catching.

Each mutant is a small subclass that reintroduces one real bug (rules §8)
or breaks one invariant (rules §9). Metadata on the class says what it is
(``bug``) and which property families must catch it (``expected_property``);
``tests/test_mutants.py`` checks that the suite does, with a short
counterexample.

* :mod:`candidates.mutants.reference_mutants` — mutants of ``reference``;
* :mod:`candidates.mutants.classic_mutants` — mutants of ``kvm-classic``;
* :mod:`candidates.mutants.concurrency_mutants` — races of ``kvm-classic`` and
  ``kvm-parallel``, on the parallel machine.
"""

from candidates.mutants.classic_mutants import MUTANTS as CLASSIC_MUTANTS
from candidates.mutants.concurrency_mutants import MUTANTS as CONCURRENCY_MUTANTS
from candidates.mutants.reference_mutants import MUTANTS as REFERENCE_MUTANTS

MUTANTS = {**REFERENCE_MUTANTS, **CLASSIC_MUTANTS, **CONCURRENCY_MUTANTS}
assert len(MUTANTS) == len(REFERENCE_MUTANTS) + len(CLASSIC_MUTANTS) + \
    len(CONCURRENCY_MUTANTS), "duplicate mutant name"

__all__ = ["MUTANTS", "CLASSIC_MUTANTS", "CONCURRENCY_MUTANTS", "REFERENCE_MUTANTS"]
