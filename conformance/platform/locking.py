"""mmu_lock and RCU on the platform (DESIGN §6; rules §7.1, §7.3).

The candidate takes them through services (``write_lock``, ``read_lock``,
``rcu_read_lock`` ...); the platform forwards to a
:class:`~conformance.platform.sync.RwLock` and an
:class:`~conformance.platform.sync.Rcu`, which know their owners. Outside a
parallel step a contended acquire cannot wait and is reported as a
deadlock; in a parallel step it parks the task. ``call_rcu`` callbacks run
after their grace period: inline at the end of the outermost candidate call
when sequential, as tasks that run at the first scheduling point after it in
a parallel step (as early as RCU allows).
"""

from __future__ import annotations

from typing import Callable

from conformance.platform.sync import LockMisuse
from conformance.platform.tasks import TaskContext


class Locking:
    """The part of :class:`~conformance.platform.core.Platform` that owns
    mmu_lock and RCU (a mixin: the state lives on the platform)."""

    def task_id(self) -> int | None:
        """The running task's id, ``None`` when sequential."""
        s = self.scheduler
        return s.current if s is not None else None

    def resume(self) -> None:
        """After anything that may have switched tasks: the running task's
        context is the platform's again."""
        s = self.scheduler
        if s is not None and s.current is not None:
            self.ctx = self.task_ctx[s.current]

    def lock_op(self, op: str) -> None:
        """``read_lock``, ``write_unlock``, ``rcu_read_lock`` ... for the
        running task; misuse is a ``locking`` violation."""
        if op.startswith("rcu_"):
            target, method = self.rcu, op[len("rcu_"):]
        else:
            target, method = self.mmu_lock, op
        try:
            getattr(target, method)(self.task_id())
        except LockMisuse as exc:
            self.fail("locking", str(exc))
        finally:
            self.resume()

    @property
    def mmu_lock_writer(self) -> bool:
        return self.mmu_lock.writer is not None

    @property
    def mmu_lock_readers(self) -> int:
        return sum(self.mmu_lock.readers.values())

    @property
    def rcu_readers(self) -> int:
        return sum(self.rcu.readers().values())

    # ------------------------------------------------------------ RCU
    def queue_rcu(self, callback: Callable[[], None]) -> None:
        self.rcu.call_rcu(lambda: self._rcu_callback(callback))

    def _rcu_callback(self, callback: Callable[[], None]) -> None:
        s = self.scheduler
        if s is not None and s.current is not None and s.current not in self.task_ctx:
            self.task_ctx[s.current] = TaskContext(name="call_rcu callback")
            self.ctx = self.task_ctx[s.current]
        self.counters["rcu callbacks"] += 1
        self._guarded(callback, "call_rcu callback", ())

    def grace_period(self) -> None:
        """Sequentially: run every ``call_rcu`` callback whose grace period has
        elapsed (as late as possible: at the end of the outermost call), and
        the per-call checks after each batch."""
        while self.rcu.run_ready():
            self.monitors.after_call("call_rcu callback")
