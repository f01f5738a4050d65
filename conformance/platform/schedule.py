"""The values of the deterministic scheduler (:mod:`.scheduler`): a
:class:`Schedule` of :class:`Preemption` values (a rule argument of every
parallel step), the realized interleaving as :class:`Event` values, the
scheduler's statistics and errors."""

from __future__ import annotations

import attrs

#: Events shown in a Deadlock or Livelock message.
SHOWN_EVENTS = 20


@attrs.frozen
class Preemption:
    """After task ``task`` has passed its ``after``-th scheduling point of
    kind ``kind`` (1-based; ``kind`` None counts every point), switch to task
    ``to``. It fires at most once, at that point, before the operation the
    point guards. If ``to`` cannot run (finished, blocked, not spawned, or
    out of range) the round-robin choice applies; ``to == task`` is a no-op."""

    task: int = attrs.field(validator=attrs.validators.ge(0))
    after: int = attrs.field(validator=attrs.validators.ge(1))
    kind: str | None
    to: int = attrs.field(validator=attrs.validators.ge(0))


@attrs.frozen
class Schedule:
    """The preemptions of one parallel step. The empty schedule runs each task
    until it finishes or blocks, in id order. When several preemptions fire
    at the same point the first listed picks ``to`` (the others are spent)."""

    preemptions: tuple[Preemption, ...] = attrs.field(default=(), converter=tuple)


@attrs.frozen
class Event:
    """One entry of the realized interleaving. ``decision`` numbers the
    events from 1 (a logical clock: strictly increasing); ``kind`` is a point
    kind (``"read_pte"``, ``"cpu_relax"`` ...) or one of ``start``,
    ``finish``, ``block``, ``wake``, ``switch`` (``task`` is the one that
    stops), ``raise`` and ``unwind``."""

    decision: int
    task: int
    kind: str
    detail: str = ""

    def describe(self) -> str:
        return f"{self.decision:>6}  task {self.task}  {self.kind}" + \
            (f"  {self.detail}" if self.detail else "")


def format_events(events) -> str:
    """Events one per line, as in Deadlock and Livelock messages."""
    return "\n".join("  " + e.describe() for e in events)


@attrs.frozen
class SchedulerStats:
    """Counters of one scheduler. ``points`` is indexed by task id."""

    decisions: int
    #: Times the running task changed (not counting the first start).
    switches: int
    points: tuple[int, ...]
    #: Times a task parked in ``wait_until``.
    blocked_waits: int
    preemptions_fired: int
    tasks: int


class SchedulerError(Exception):
    """Base of the scheduler's errors; ``trace`` is the interleaving up to it."""

    def __init__(self, message: str, trace=()):
        super().__init__(message)
        self.trace: tuple[Event, ...] = tuple(trace)


class Deadlock(SchedulerError):
    """No task can run and some are blocked; ``waiting`` maps each blocked
    task to what it waits for."""

    def __init__(self, message: str, trace=(), waiting=None):
        super().__init__(message, trace)
        self.waiting: dict[int, str] = dict(waiting or {})


class Livelock(SchedulerError):
    """No progress within the bound, or more decisions than ``max_decisions``."""


class Unwound(BaseException):
    """Thrown into an unfinished task when the run fails. A BaseException
    (like GreenletExit) so that candidate code catching ``Exception`` does
    not swallow it."""
