"""The deterministic scheduler of a parallel step (DESIGN §6).

Each operation runs as a task in its own greenlet, one at a time; control
changes hands only at scheduling points (:meth:`Scheduler.point`), when a task
blocks (``wait_until``), spins (``cpu_relax``) or finishes. The next task is a
pure function of the :class:`Schedule` and of what the tasks did so far (no
clock, no thread, no hash-ordered iteration): same inputs, same trace.

Every switch goes through the *hub*, the greenlet that called ``run()``, so
the policy lives in one place: a task runs until it finishes, blocks, spins or
a :class:`Preemption` fires; then ``to`` runs if it can, else the next runnable
foreground task after the current one in id order (the current one last),
else a background task. A ``call_rcu`` callback runs at the first
scheduling point after its grace period ends (as early as RCU allows: the
adversarial choice for a free). Each trace event is one *decision*; ``livelock_bound`` handovers
(switches and blocks) without progress (a task finishing or taking a lock),
or more than ``max_decisions`` decisions, is a :class:`Livelock`; no
runnable task while some are blocked is a :class:`Deadlock`. On any failure
every unfinished task is unwound (:class:`Unwound` is thrown in, its
``finally`` blocks run) before ``run()`` raises: no greenlet outlives it.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
import greenlet

from conformance.platform.schedule import (  # noqa: F401 - re-exported: the scheduler's API
    SHOWN_EVENTS, Deadlock, Event, Livelock, Preemption, Schedule, SchedulerError,
    SchedulerStats, Unwound, format_events)


def _body(fn):
    def body():
        fn()
        return (_FINISHED,)  # a greenlet's return value goes to its parent, the hub
    return body


def _text(reason) -> str:
    return reason if isinstance(reason, str) else reason()


_NEW, _RUNNABLE, _BLOCKED, _DONE = "new", "runnable", "blocked", "done"
#: Events that hand the CPU to another task (what a livelock is made of).
_HANDOVERS = frozenset({"switch", "block"})
# Requests a task sends to the hub when it gives up control.
_FINISHED, _RELAX, _BLOCK, _ABORT, _PREEMPT, _GRACE = (
    "finished", "cpu_relax", "blocked", "abort", "preempt", "grace")


@attrs.define(eq=False)
class _Task:
    """Mutable bookkeeping of one task (slotted: read on every point)."""

    id: int
    name: str
    fn: Callable[[], Any]
    background: bool
    #: Run at the first scheduling point after the spawn (an RCU callback
    #: whose grace period has just ended).
    eager: bool = False
    state: str = _NEW
    glet: greenlet.greenlet | None = None  # created when the task first runs
    ready: Callable[[], bool] | None = None
    reason: str | Callable[[], str] = ""
    parked_on: str = ""  # the reason's text when the task parked
    points: int = 0
    kinds: dict[str, int] = attrs.Factory(dict)  # counted only if a preemption names it


class Scheduler:
    """Runs tasks as greenlets, one at a time, under a :class:`Schedule`."""

    def __init__(self, schedule: Schedule = Schedule(), *, max_decisions: int = 20_000,
                 livelock_bound: int = 2_000):
        self.schedule, self.max_decisions = schedule, max_decisions
        self.livelock_bound = livelock_bound
        #: While a failed run unwinds: points never switch, waits never block.
        self.unwinding = False
        self.trace: list[Event] = []
        self._tasks: list[_Task] = []
        # Unfired preemptions per task, in schedule order (index kept for the trace).
        self._pending: dict[int, list[tuple[int, Preemption]]] = {}
        for i, p in enumerate(schedule.preemptions):
            self._pending.setdefault(p.task, []).append((i, p))
        self._cur: _Task | None = None
        self._hub: greenlet.greenlet | None = None
        self._started = False
        self._decisions = self._since_progress = self._unwind_points = 0
        self._switches = self._blocked_waits = self._fired = 0

    # ------------------------------------------------------------ tasks
    def spawn(self, fn: Callable[[], Any], *, name: str, background: bool = False,
              eager: bool = False) -> int:
        """A new task (ids 0, 1, 2 ... in spawn order), before :meth:`run` or
        from a running task. Spawned while unwinding, it never runs. An
        ``eager`` task runs at the next scheduling point of whichever task is
        running (unless a preemption fires there)."""
        task = _Task(len(self._tasks), name, fn, background, eager)
        self._tasks.append(task)
        return task.id

    @property
    def current(self) -> int | None:
        """The running task's id; ``None`` outside tasks (and in the hub)."""
        return None if self._cur is None else self._cur.id

    @property
    def running(self) -> bool:
        """Is :meth:`run` in progress?"""
        return self._hub is not None

    def name_of(self, task: int) -> str:
        """The name given at spawn (``"?"`` for an unknown id)."""
        return self._tasks[task].name if 0 <= task < len(self._tasks) else "?"

    def alive(self) -> tuple[int, ...]:
        """Tasks whose greenlet is started and not dead (empty after run())."""
        return tuple(t.id for t in self._tasks if t.glet is not None and t.glet)

    def statistics(self) -> SchedulerStats:
        """A snapshot of the counters."""
        return SchedulerStats(self._decisions, self._switches,
                              tuple(t.points for t in self._tasks), self._blocked_waits,
                              self._fired, len(self._tasks))

    # ------------------------------------------------- called by tasks
    def point(self, kind: str, detail: str = "") -> None:
        """A scheduling point of the running task: recorded, and control may
        go to another task before it returns. Outside a task, nothing."""
        request = self._cur and self._count_point(self._cur, kind, detail)
        if request:
            self._hub.switch(request)

    def cpu_relax(self) -> None:
        """A spin-loop point: another runnable foreground task runs first, if
        there is one (background tasks wait for all foreground ones)."""
        if self._cur is not None:
            request = self._count_point(self._cur, "cpu_relax", "")
            if not self.unwinding:
                self._hub.switch(request or (_RELAX,))

    def wait_until(self, ready: Callable[[], bool], reason: str | Callable[[], str]) -> None:
        """Park the running task until ``ready()`` (checked whenever the hub
        picks a task; never blocks while unwinding). ``reason`` may be a
        callable, so that a Deadlock says what the task waits for *then*."""
        if ready():
            return
        task = self._cur
        if task is None:
            raise SchedulerError(f"wait_until({_text(reason)}) outside a running task "
                                 "would block forever", self.trace)
        if self.unwinding:
            return
        task.state, task.ready, task.reason = _BLOCKED, ready, reason
        task.parked_on = _text(reason)
        self._blocked_waits += 1
        self._record(task.id, "block", task.parked_on)
        self._check_bounds_in_task()
        self._hub.switch((_BLOCK,))

    def progress(self) -> None:
        """The running task made forward progress: restart the livelock count."""
        self._since_progress = 0

    def _count_point(self, task: _Task, kind: str, detail: str):
        """Record a point; the hub request it triggers (a preemption), if any."""
        self._record(task.id, kind, detail)
        task.points += 1
        if self.unwinding:
            self._unwind_points += 1
            if self._unwind_points > self.livelock_bound:  # a finally block spinning
                raise Unwound(f"task {task.id} is still running while unwinding")
            return None
        self._check_bounds_in_task()
        pending = self._pending.get(task.id)
        if pending:
            n = task.kinds[kind] = task.kinds.get(kind, 0) + 1
            fired = [(i, p) for i, p in pending
                     if (task.points if p.kind is None else n if p.kind == kind else 0)
                     == p.after]
            for entry in fired:
                pending.remove(entry)
            self._fired += len(fired)
            if fired:
                return (_PREEMPT, fired[0][1].to, fired[0][0])
        return self._grace_period_over()

    def _grace_period_over(self):
        """A ``call_rcu`` callback spawned since the last decision (its grace
        period has just ended) runs now: as early as RCU allows, the
        adversarial choice for a free (a walker outside any read-side section
        meets the freed page at once)."""
        for t in self._tasks:
            if t.eager and t.state is _NEW:
                return (_GRACE, t.id)
        return None

    # ------------------------------------------------------------- the hub
    def run(self) -> tuple[Event, ...]:
        """Run every task to completion; the trace. A task's exception (the
        same object), Deadlock or Livelock is raised after the unwinding."""
        if self._started:
            raise SchedulerError("Scheduler.run() may be called once", self.trace)
        self._started = True
        self._hub = greenlet.getcurrent()
        try:
            self._loop()
        except BaseException:
            self._unwind()
            raise
        finally:
            self._hub = self._cur = None
        return tuple(self.trace)

    def _loop(self) -> None:
        prev = None
        nxt = self._choose(None, None)
        while True:
            if nxt is None:
                blocked = [t for t in self._tasks if t.state is _BLOCKED]
                if blocked:
                    raise self._deadlock(blocked)
                return
            task = self._tasks[nxt]
            if task.state is _NEW:
                self._record(nxt, "start", task.name)
                task.glet = greenlet.greenlet(_body(task.fn), parent=self._hub)
            elif task.state is _BLOCKED:
                # What it parked on: evaluated now, the reason would be void.
                self._record(nxt, "wake", task.parked_on)
                task.ready, task.reason = None, ""
            task.state = _RUNNABLE
            self._cur = task
            try:
                request = task.glet.switch()
            except BaseException as exc:
                self._cur, task.state = None, _DONE
                # Type only: str(exc) may hold addresses, and the trace must repeat.
                self._record(nxt, "raise", type(exc).__name__)
                raise
            self._cur, prev = None, nxt
            nxt = self._after(task, request)
            if nxt is not None and nxt != prev:
                self._switches += 1
            message = self._livelock()
            if message:
                raise Livelock(message, self.trace)

    def _after(self, task: _Task, request) -> int | None:
        """The next task after ``task`` handed control back with ``request``."""
        what, prefer, why = request[0], None, request[0]
        if what == _ABORT:
            raise Livelock(request[1], self.trace)
        if what == _FINISHED:
            task.state = _DONE
            self._record(task.id, "finish")
            self._since_progress = 0
        elif what == _PREEMPT:
            why, prefer = f"preemption #{request[2]}", request[1]
        elif what == _GRACE:
            why, prefer = "grace period over", request[1]
        nxt = self._choose(task.id, prefer)
        if nxt is not None and nxt != task.id:
            self._record(task.id, "switch", f"to task {nxt} ({why})")
        return nxt

    def _runnable(self, task: _Task) -> bool:
        return bool(task.ready()) if task.state is _BLOCKED else task.state is not _DONE

    def _choose(self, after: int | None, prefer: int | None) -> int | None:
        tasks = self._tasks
        if prefer is not None and prefer < len(tasks) and self._runnable(tasks[prefer]):
            return prefer
        n, start = len(tasks), (-1 if after is None else after)
        order = [(start + i) % n for i in range(1, n + 1)]  # the current task last
        for background in (False, True):
            for i in order:
                if tasks[i].background is background and self._runnable(tasks[i]):
                    return i
        return None

    # --------------------------------------------------- failure and bounds
    def _record(self, task: int, kind: str, detail: str = "") -> None:
        self._decisions += 1
        if kind in _HANDOVERS:
            # Only handing the CPU over counts towards a livelock: a task
            # that goes on running (a long teardown walk) is making progress.
            self._since_progress += 1
        self.trace.append(Event(self._decisions, task, kind, detail))

    def _livelock(self) -> str:
        """The Livelock message if a bound is exceeded, else ``""``."""
        if self._decisions > self.max_decisions:
            why = f"more than {self.max_decisions} scheduling decisions (max_decisions)"
        elif self._since_progress > self.livelock_bound:
            why = (f"no progress within {self.livelock_bound} handovers between tasks (no "
                   "task finished or took a lock)")
        else:
            return ""
        states = "; ".join(f"task {t.id} ({t.name}): " + (
            f"waits for {_text(t.reason)}" if t.state is _BLOCKED else t.state)
            for t in self._tasks if t.state is not _DONE)
        return (f"livelock: {why}; unfinished: {states or 'none'}\nlast events:\n"
                f"{format_events(self.trace[-SHOWN_EVENTS:])}")

    def _check_bounds_in_task(self) -> None:
        message = "" if self.unwinding else self._livelock()
        if message:
            # Raised by the hub, not here: candidate code catching Exception
            # around a service call must not be able to hide it.
            self._hub.switch((_ABORT, message))

    def _deadlock(self, blocked: list[_Task]) -> Deadlock:
        waiting = {t.id: _text(t.reason) for t in blocked}
        waits = "; ".join(f"task {t.id} ({t.name}) waits for {waiting[t.id]}" for t in blocked)
        message = (f"deadlock: no task can run; {waits}\nlast events:\n"
                   f"{format_events(self.trace[-SHOWN_EVENTS:])}")
        return Deadlock(message, self.trace, waiting)

    def _unwind(self) -> None:
        """Throw :class:`Unwound` into every started, unfinished task (its
        ``finally`` blocks run) and drop the others; in id order, until none
        is left (``finally`` blocks may spawn)."""
        self.unwinding = True
        try:
            while True:
                left = [t for t in self._tasks if t.state is not _DONE]
                if not left:
                    return
                task = left[0]
                if task.glet is None:
                    task.state = _DONE
                    self._record(task.id, "unwind", "never started")
                    continue
                self._record(task.id, "unwind")
                self._cur, task.state = task, _DONE
                try:
                    task.glet.throw(Unwound(f"task {task.id} unwound: the run failed"))
                except (Exception, Unwound, greenlet.GreenletExit):
                    pass  # the first failure is the one run() reports
                finally:
                    self._cur = None
        finally:
            self.unwinding = False
