"""``mmu_lock`` and RCU, with owners (DESIGN §6; rules §7.1, §7.3).

:class:`RwLock` and :class:`Rcu` know which task holds what, so misuse names
the culprit, and they work both sequentially and under the
:class:`~conformance.platform.scheduler.Scheduler`:

- *sequentially* (no scheduler, or outside :meth:`Scheduler.run`) nothing
  else can run to release a lock, so a contended acquire is reported at once
  as :class:`LockMisuse` ("would deadlock"), and ``call_rcu`` callbacks run
  inline when the platform asks (:meth:`Rcu.run_ready`);
- *in a parallel step* a contended acquire parks the task
  (:meth:`Scheduler.wait_until`); tasks waiting on each other become the
  scheduler's :class:`~conformance.platform.scheduler.Deadlock`; callbacks
  become background tasks once their grace period has elapsed.

Owners are task ids. :class:`RwLock` records the sequential caller (task
``None``) as :data:`SEQUENTIAL` (-1), because ``writer is None`` means the
lock is free; :class:`Rcu` keys its readers by the task as given.
The ``scheduler`` attribute of both may be (re)assigned, e.g. for the
duration of one parallel step.
"""

from __future__ import annotations

import collections
from typing import Callable

import attrs

from conformance.platform.scheduler import Scheduler

#: The owner recorded for the sequential caller (task ``None``).
SEQUENTIAL = -1


class LockMisuse(Exception):
    """An unlock by a non-owner, an unlock of what is not held, a recursive
    or self-deadlocking acquire, or a contended acquire that cannot wait."""


@attrs.frozen
class LockStats:
    """A snapshot of an :class:`RwLock`. ``readers`` is ``(task, nesting)``
    sorted by task; the waiting tuples are in queue order."""

    writer: int | None
    readers: tuple[tuple[int, int], ...]
    waiting_writers: tuple[int, ...]
    waiting_readers: tuple[int, ...]
    #: Successful acquires, read and write.
    acquisitions: int
    #: Acquires that had to park first.
    contended: int


class _Waiter:
    """A parked acquirer (compared by identity: its place in the queue)."""

    __slots__ = ("task", "mode")

    def __init__(self, task: int, mode: str):
        self.task, self.mode = task, mode


def _owner(task: int | None) -> int:
    return SEQUENTIAL if task is None else task


class RwLock:
    """mmu_lock: a rwlock with owners and queued-rwlock (qrwlock) fairness:
    once a writer waits, new readers wait behind it; the writer gets the lock
    when the readers drain. Parked acquirers are served in FIFO order
    (consecutive readers together), as qrwlock's wait queue does.

    As with qrwlock in process context, a task that already holds the read
    lock and takes it again while a writer waits queues behind the writer:
    that is a real deadlock, and is reported as one.

    ``points=False`` drops the lock's own scheduling points, for a caller
    whose every lock operation is already a point (the platform's services).
    """

    def __init__(self, scheduler: Scheduler | None, name: str = "mmu_lock", *,
                 points: bool = True):
        self.scheduler = scheduler
        self.name = name
        self.points = points
        #: Owner of the write side (SEQUENTIAL for the sequential caller), or None.
        self.writer: int | None = None
        #: Owner -> read nesting (no zero entries).
        self.readers: collections.Counter = collections.Counter()
        self._queue: list[_Waiter] = []
        self._acquisitions = self._contended = 0

    # ----------------------------------------------------------- acquire
    def read_lock(self, task: int | None) -> None:
        me = _owner(task)
        self._point("read_lock")
        if self.writer == me:
            self._misuse(f"read_lock({self.name}) by {self._who(me)}, which holds it for "
                         "write: it would wait for itself (deadlock)")
        if not self._can_take("read", None):
            self._park(me, "read_lock", "read")
        self.readers[me] += 1
        self._acquisitions += 1

    def write_lock(self, task: int | None) -> None:
        me = _owner(task)
        self._point("write_lock")
        if self.writer == me:
            self._misuse(f"recursive write_lock({self.name}) by {self._who(me)}, which "
                         "already holds it for write (deadlock)")
        if self.readers[me]:
            self._misuse(f"write_lock({self.name}) by {self._who(me)}, which holds it for "
                         "read: it would wait for itself (deadlock)")
        if not self._can_take("write", None):
            self._park(me, "write_lock", "write")
        self.writer = me
        self._acquisitions += 1

    # ----------------------------------------------------------- release
    def read_unlock(self, task: int | None) -> None:
        me = _owner(task)
        self._point("read_unlock")
        if not self.readers[me]:
            self._misuse(f"read_unlock({self.name}) by {self._who(me)}, which does not "
                         f"hold it for read; {self._holders()}")
        self.readers[me] -= 1
        if not self.readers[me]:
            del self.readers[me]

    def write_unlock(self, task: int | None) -> None:
        me = _owner(task)
        self._point("write_unlock")
        if self.writer != me:
            self._misuse(f"write_unlock({self.name}) by {self._who(me)}, which does not "
                         f"hold it for write; {self._holders()}")
        self.writer = None

    # ------------------------------------------------------------- state
    def held_by(self, task: int | None) -> str | None:
        """``"write"``, ``"read"`` or ``None`` for ``task``."""
        me = _owner(task)
        if self.writer == me:
            return "write"
        return "read" if self.readers[me] else None

    def statistics(self) -> LockStats:
        return LockStats(self.writer, tuple(sorted(self.readers.items())),
                         tuple(w.task for w in self._queue if w.mode == "write"),
                         tuple(w.task for w in self._queue if w.mode == "read"),
                         self._acquisitions, self._contended)

    # ---------------------------------------------------------- internals
    def _running(self) -> Scheduler | None:
        s = self.scheduler
        return s if s is not None and s.current is not None else None

    def _point(self, kind: str) -> None:
        s = self._running()
        if s is not None and self.points:
            s.point(kind, self.name)

    def _can_take(self, mode: str, me: _Waiter | None) -> bool:
        """May ``mode`` be taken now by the parked waiter ``me`` (or, for
        ``None``, by a newcomer, who queues behind everybody)?"""
        if self.writer is not None or (mode == "write" and self.readers):
            return False
        for waiter in self._queue:
            if waiter is me:
                return True
            # A writer waits for everyone ahead of it; nobody passes a writer.
            if mode == "write" or waiter.mode == "write":
                return False
        return True

    def _park(self, me: int, op: str, mode: str) -> None:
        s = self._running()
        if s is None:
            self._misuse(f"{op}({self.name}) by {self._who(me)} while {self._holders()}: "
                         "nothing else can run to release it, so it would deadlock")
        waiter = _Waiter(me, mode)
        self._queue.append(waiter)
        self._contended += 1
        try:
            s.wait_until(lambda: self._can_take(mode, waiter),
                         lambda: self._reason(op, waiter))
            granted = self._can_take(mode, waiter)
        finally:
            self._queue.remove(waiter)
        if not granted:  # only while the scheduler unwinds a failed run
            self._misuse(f"{op}({self.name}) by {self._who(me)} while the run is unwinding "
                         f"and {self._holders()}: it would deadlock")
        s.progress()

    def _reason(self, op: str, waiter: _Waiter) -> str:
        """Why ``waiter`` cannot take the lock now."""
        if self.writer is not None:
            return f"{op}({self.name}) held for write by {self._who(self.writer)}"
        if waiter.mode == "write" and self.readers:
            return f"{op}({self.name}) held for read by {self._reader_list()}"
        ahead = self._queue[:self._queue.index(waiter)] if waiter in self._queue else []
        writers = [w for w in ahead if w.mode == "write"]
        return (f"{op}({self.name}) queued behind waiting "
                f"{', '.join(self._who(w.task) for w in writers or ahead)} (qrwlock fairness)")

    def _who(self, owner: int) -> str:
        if owner == SEQUENTIAL:
            return "the sequential caller"
        s = self.scheduler
        return f"task {owner}" + (f" ({s.name_of(owner)})" if s is not None else "")

    def _reader_list(self) -> str:
        return ", ".join(self._who(t) + (f" x{n}" if n > 1 else "")
                         for t, n in sorted(self.readers.items()))

    def _holders(self) -> str:
        if self.writer is not None:
            return f"it is held for write by {self._who(self.writer)}"
        if self.readers:
            return f"it is held for read by {self._reader_list()}"
        return "it is not held"

    def _misuse(self, message: str):
        raise LockMisuse(message)


@attrs.frozen(eq=False)
class _Callback:
    """A queued ``call_rcu`` callback and the read-side sections, as
    ``(task, section id)``, that were open when it was queued."""

    seq: int
    fn: Callable[[], None]
    waits_for: frozenset


class Rcu:
    """RCU with per-reader epochs. A callback queued by call_rcu runs only
    after every read-side critical section that had begun when it was queued
    has ended; it may run while a section that began later is still inside
    (that is legal RCU).

    Each outermost ``read_lock`` opens a section with a fresh id; a callback
    remembers the sections open at enqueue and is eligible once none of them
    is. Read-side operations are not scheduling points here: the platform's
    services already are.
    """

    def __init__(self, scheduler: Scheduler | None):
        self.scheduler = scheduler
        self._nesting: dict[int | None, int] = {}
        self._section: dict[int | None, int] = {}  # task -> its open section's id
        self._sections = 0
        self._queue: list[_Callback] = []
        self._queued = 0
        # Set when eligibility may have changed (a section closed, a callback
        # was queued), so that poll() at every point is cheap otherwise.
        self._dirty = False

    def read_lock(self, task: int | None) -> None:
        depth = self._nesting.get(task, 0)
        if depth == 0:
            self._sections += 1
            self._section[task] = self._sections
        self._nesting[task] = depth + 1

    def read_unlock(self, task: int | None) -> None:
        depth = self._nesting.get(task, 0)
        if depth == 0:
            who = "the sequential caller" if task is None else f"task {task}"
            inside = ", ".join("the sequential caller" if t is None else f"task {t}"
                               for t in self._nesting) or "nobody"
            raise LockMisuse(f"rcu_read_unlock() by {who} outside any RCU read-side "
                             f"critical section (inside: {inside})")
        if depth == 1:
            del self._nesting[task], self._section[task]
            self._dirty = True
        else:
            self._nesting[task] = depth - 1

    def call_rcu(self, callback: Callable[[], None]) -> None:
        self._queued += 1
        self._queue.append(_Callback(self._queued, callback,
                                     frozenset(self._section.items())))
        self._dirty = True

    def open_sections(self) -> frozenset:
        """The read-side sections open now, as ``(task, section id)``: a
        section that is in this set again later has not ended in between."""
        return frozenset(self._section.items())

    def readers(self) -> dict[int | None, int]:
        """Task -> nesting, for the tasks inside a read-side section (a copy)."""
        return dict(self._nesting)

    def pending(self) -> int:
        """Callbacks queued and not yet run (or handed to the scheduler)."""
        return len(self._queue)

    def run_ready(self) -> int:
        """Without a running scheduler: run, inline and in queue order, every
        callback whose grace period has elapsed; with one: spawn each as a
        background task. How many ran (or were spawned); each runs once."""
        self._dirty = False
        if self._spawning():
            return self._spawn_ready()
        ran = 0
        for cb in list(self._queue):
            # Removed before it runs: a callback that raises, or queues more
            # callbacks, must not run twice.
            if cb in self._queue and self._elapsed(cb):
                self._queue.remove(cb)
                cb.fn()
                ran += 1
        return ran

    def poll(self) -> None:
        """At a scheduling point: spawn the callbacks that became eligible."""
        if self._dirty and self._queue and self._spawning():
            self._dirty = False
            self._spawn_ready()

    def _spawning(self) -> bool:
        # Not while unwinding a failed run: the task would never run, and
        # the callback stays queued instead.
        s = self.scheduler
        return s is not None and s.running and not s.unwinding

    def _spawn_ready(self) -> int:
        ready = [cb for cb in self._queue if self._elapsed(cb)]
        for cb in ready:
            self._queue.remove(cb)
            self.scheduler.spawn(cb.fn, name=f"call_rcu callback #{cb.seq}",
                                 background=True, eager=True)
        return len(ready)

    def _elapsed(self, cb: _Callback) -> bool:
        return all(self._section.get(task) != sid for task, sid in cb.waits_for)
