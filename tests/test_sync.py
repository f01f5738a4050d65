"""mmu_lock and RCU of parallel steps (conformance/platform/sync.py), on toy
tasks under the deterministic scheduler."""

from __future__ import annotations


import pytest

from conformance.platform.scheduler import (
    Deadlock, Preemption, Schedule, Scheduler)
from conformance.platform.sync import SEQUENTIAL, LockMisuse, Rcu, RwLock

from scheduler_helpers import live_greenlets


@pytest.fixture(autouse=True)
def no_leftover_greenlets():
    before = len(live_greenlets())
    yield
    assert len(live_greenlets()) == before


# ---------------------------------------------------------------- mmu_lock
def test_qrwlock_a_waiting_writer_blocks_a_new_reader():
    sched = Scheduler(Schedule([Preemption(0, 1, "read_unlock", 1)]))
    lock, log = RwLock(sched), []

    def reader(tag):
        def body():
            lock.read_lock(sched.current)
            log.append(f"{tag} in")
            lock.read_unlock(sched.current)
        return body

    def writer():
        lock.write_lock(sched.current)
        log.append("writer in")
        lock.write_unlock(sched.current)

    sched.spawn(reader("first reader"), name="r0")
    sched.spawn(writer, name="w")
    sched.spawn(reader("late reader"), name="r2")
    trace = sched.run()
    # The late reader arrived while only a reader held the lock, but a writer
    # was waiting: it queues behind the writer.
    assert log == ["first reader in", "writer in", "late reader in"]
    blocks = [(e.task, e.detail) for e in trace if e.kind == "block"]
    assert blocks == [(1, "write_lock(mmu_lock) held for read by task 0 (r0)"),
                      (2, "read_lock(mmu_lock) queued behind waiting task 1 (w) "
                          "(qrwlock fairness)")]
    stats = lock.statistics()
    assert (stats.acquisitions, stats.contended, stats.writer, stats.readers) == (3, 2, None, ())


def test_nested_read_lock_behind_a_waiting_writer_deadlocks():
    sched = Scheduler(Schedule([Preemption(0, 2, "read_lock", 1)]))
    lock = RwLock(sched)

    def nested_reader():
        lock.read_lock(sched.current)
        lock.read_lock(sched.current)  # the writer now waits: this queues behind it

    sched.spawn(nested_reader, name="nested")
    sched.spawn(lambda: lock.write_lock(sched.current), name="writer")
    sched.spawn(lambda: None, name="bystander")
    with pytest.raises(Deadlock) as info:
        sched.run()
    assert set(info.value.waiting) == {0, 1}


def test_lock_misuse_names_the_lock_the_task_and_the_owners():
    lock = RwLock(None, "mmu_lock")
    lock.write_lock(0)
    assert lock.held_by(0) == "write" and lock.held_by(1) is None
    with pytest.raises(LockMisuse, match=r"write_unlock\(mmu_lock\) by task 1.*"
                                         r"held for write by task 0"):
        lock.write_unlock(1)
    with pytest.raises(LockMisuse, match="recursive write_lock"):
        lock.write_lock(0)
    with pytest.raises(LockMisuse, match="would deadlock"):
        lock.read_lock(1)  # contended, and nothing can run to release it
    lock.write_unlock(0)
    with pytest.raises(LockMisuse, match=r"read_unlock\(mmu_lock\) by task 2.*not held"):
        lock.read_unlock(2)
    lock.read_lock(None)
    lock.read_lock(None)  # read locks nest
    assert lock.readers == {SEQUENTIAL: 2} and lock.held_by(None) == "read"
    with pytest.raises(LockMisuse, match="the sequential caller, which holds it for read"):
        lock.write_lock(None)
    lock.read_unlock(None)
    lock.read_unlock(None)
    lock.write_lock(None)
    assert lock.writer == SEQUENTIAL
    with pytest.raises(LockMisuse, match="it would wait for itself"):
        lock.read_lock(None)


def test_lock_misuse_inside_a_task_is_raised_in_that_task():
    sched = Scheduler()
    lock = RwLock(sched)

    def holder():
        lock.write_lock(sched.current)
        sched.point("a")

    def thief():
        lock.write_unlock(sched.current)

    sched.spawn(holder, name="holder")
    sched.spawn(thief, name="thief")
    with pytest.raises(LockMisuse, match=r"by task 1 \(thief\).*held for write by "
                                         r"task 0 \(holder\)"):
        sched.run()


# --------------------------------------------------------------------- RCU
def test_rcu_callback_waits_for_earlier_readers_only():
    rcu, ran = Rcu(None), []
    rcu.read_lock(1)
    rcu.read_lock(1)  # nested: one section
    rcu.call_rcu(lambda: ran.append("cb"))
    rcu.read_lock(2)  # began after the callback was queued
    assert rcu.run_ready() == 0 and rcu.pending() == 1
    rcu.read_unlock(1)
    assert rcu.run_ready() == 0  # task 1's section is still open
    rcu.read_unlock(1)
    assert rcu.run_ready() == 1 and ran == ["cb"]  # task 2 is still inside: legal
    assert rcu.readers() == {2: 1}
    assert rcu.run_ready() == 0 and ran == ["cb"]  # exactly once


def test_rcu_a_new_section_of_the_same_task_does_not_hold_the_callback():
    rcu, ran = Rcu(None), []
    rcu.read_lock(None)
    rcu.call_rcu(lambda: ran.append(1))
    rcu.read_unlock(None)
    rcu.read_lock(None)  # a later section of the same reader
    assert rcu.run_ready() == 1 and ran == [1]
    with pytest.raises(LockMisuse, match="outside any RCU read-side"):
        rcu.read_unlock(3)


def test_rcu_callbacks_queued_by_callbacks_run_once_each():
    rcu, ran = Rcu(None), []
    rcu.call_rcu(lambda: (ran.append("a"), rcu.call_rcu(lambda: ran.append("b"))))
    while rcu.run_ready():
        pass
    assert ran == ["a", "b"] and rcu.pending() == 0


def test_rcu_under_the_scheduler_callbacks_are_background_tasks():
    sched = Scheduler(Schedule([Preemption(0, 1, "after call_rcu", 1),
                                Preemption(1, 1, "inside", 0)]))
    rcu, log = Rcu(sched), []

    def early_reader():
        rcu.read_lock(sched.current)
        rcu.call_rcu(lambda: log.append("callback"))
        sched.point("after call_rcu")  # -> late reader
        log.append("early reader leaves")
        rcu.read_unlock(sched.current)
        rcu.poll()
        sched.point("left")  # the late reader is still inside
        log.append("early reader done")

    def late_reader():
        rcu.read_lock(sched.current)
        assert rcu.run_ready() == 0 and rcu.pending() == 1  # the early reader is inside
        sched.point("inside")  # -> early reader
        rcu.poll()
        log.append("late reader leaves")
        rcu.read_unlock(sched.current)

    sched.spawn(early_reader, name="early")
    sched.spawn(late_reader, name="late")
    sched.run()
    # Spawned once the early reader left, and run at its next scheduling point
    # (as early as RCU allows), although the late reader is still inside.
    assert log == ["early reader leaves", "callback", "early reader done",
                   "late reader leaves"]
    assert sched.name_of(2) == "call_rcu callback #1" and rcu.pending() == 0


def test_rcu_run_ready_under_the_scheduler_spawns_each_callback_once():
    sched, ran = Scheduler(), []
    rcu = Rcu(sched)

    def task():
        rcu.call_rcu(lambda: ran.append(sched.current))
        rcu.call_rcu(lambda: ran.append(sched.current))
        assert rcu.run_ready() == 2 and rcu.run_ready() == 0
        rcu.poll()
        assert rcu.pending() == 0

    sched.spawn(task, name="task")
    sched.run()
    assert ran == [1, 2]
    rcu.call_rcu(lambda: ran.append("inline"))  # after run(): inline again
    assert rcu.run_ready() == 1 and ran == [1, 2, "inline"]


def test_rcu_callback_may_run_while_a_later_reader_is_inside():
    # The adversarial grace period: a preemption names the callback's task (id 2).
    sched = Scheduler(Schedule([Preemption(1, 1, "inside", 2)]))
    rcu, log = Rcu(sched), []

    def updater():
        rcu.read_lock(sched.current)
        rcu.call_rcu(lambda: log.append(("callback", dict(rcu.readers()))))
        rcu.read_unlock(sched.current)
        rcu.poll()

    def late_reader():
        rcu.read_lock(sched.current)
        sched.point("inside")
        log.append("late reader leaves")
        rcu.read_unlock(sched.current)

    sched.spawn(updater, name="updater")
    sched.spawn(late_reader, name="late")
    sched.run()
    assert log == [("callback", {1: 1}), "late reader leaves"]
