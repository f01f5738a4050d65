"""The result of running a machine against a candidate (or replaying a
program): what the runner, the replay and the CLI report."""

from __future__ import annotations

import attrs

from conformance.errors import ConformanceFailure

@attrs.define
class RunResult:
    candidate: str
    status: str  # "pass", "fail" or "error"
    seconds: float
    failure: ConformanceFailure | None = None
    trace: list[str] = attrs.Factory(list)
    counters: dict = attrs.Factory(dict)
    examples: int = 0  # passing programs run (for a failure: until the first)
    total_steps: int = 0
    #: event label -> passing programs that produced it (``Stage2Machine.event_programs``)
    events: dict = attrs.Factory(dict)
    #: The failing program as ``(rule, arguments)`` pairs, boot first.
    calls: list = attrs.Factory(list)

    def event_fraction(self, label: str) -> float:
        """The share of passing programs that produced event ``label``."""
        return self.events.get(label, 0) / self.examples if self.examples else 0.0

    @property
    def failed_property(self) -> str | None:
        return None if self.failure is None else self.failure.property

    @property
    def steps(self) -> int:
        """Rule steps in the shrunk counterexample (boot and teardown excluded)."""
        return sum(1 for t in self.trace if ": boot" not in t and "teardown" not in t)
