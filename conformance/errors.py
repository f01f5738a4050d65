"""The two ways a conformance run fails.

* :class:`PropertyViolation`: the candidate broke a rule (an oracle mismatch or
  a monitor). ``property`` is the family name ``stage2-conformance explain``
  knows about; the message says what happened in KVM terms.
* :class:`CandidateError`: the candidate did not behave like a candidate at all
  (raised, returned the wrong type, never returned, failed to import).

Both carry the step they happened in so reports and replay files can name it.
"""

from __future__ import annotations


class ConformanceFailure(AssertionError):
    """Base class; an ``AssertionError`` so pytest and Hypothesis treat it as a
    test failure, not a harness crash."""

    property: str = "conformance"

    def __init__(self, message: str, *, step: str | None = None):
        super().__init__(message)
        self.message = message
        self.step = step

    def __str__(self) -> str:
        where = f" (step: {self.step})" if self.step else ""
        return f"[{self.property}] {self.message}{where}"


class PropertyViolation(ConformanceFailure):
    def __init__(self, property: str, message: str, *, step: str | None = None):
        super().__init__(message, step=step)
        self.property = property


class CandidateError(ConformanceFailure):
    """``kind`` is one of ``raised``, ``bad-return``, ``timeout``, ``import``."""

    property = "candidate-error"

    def __init__(self, kind: str, message: str, *, step: str | None = None):
        super().__init__(message, step=step)
        self.kind = kind

    def __str__(self) -> str:
        where = f" in step {self.step}" if self.step else ""
        return f"[candidate-error: {self.kind}]{where}: {self.message}"
