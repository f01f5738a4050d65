"""The deterministic scheduler of parallel steps
(conformance/platform/scheduler.py), on toy tasks."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conformance.platform.scheduler import (
    Deadlock, Event, Livelock, Preemption, Schedule, Scheduler, SchedulerError, Unwound)
from conformance.platform.sync import Rcu, RwLock

from scheduler_helpers import kinds_of, live_greenlets, stepper


@pytest.fixture(autouse=True)
def no_leftover_greenlets():
    before = len(live_greenlets())
    yield
    assert len(live_greenlets()) == before


# ------------------------------------------------------------- the policy
def test_empty_schedule_runs_tasks_in_id_order_to_completion():
    sched, log = Scheduler(), []
    for me in range(3):
        assert sched.spawn(stepper(sched, log, me, ["a", "b"]), name=f"t{me}") == me
    trace = sched.run()
    assert [entry[0] for entry in log] == [0, 0, 1, 1, 2, 2]
    assert kinds_of(trace, "start", "finish") == [
        (0, "start"), (0, "finish"), (1, "start"), (1, "finish"), (2, "start"), (2, "finish")]
    assert [e.decision for e in trace] == list(range(1, len(trace) + 1))
    stats = sched.statistics()
    assert stats.points == (2, 2, 2) and stats.switches == 2 and stats.tasks == 3
    assert sched.current is None and sched.alive() == ()


def test_preemption_switches_at_exactly_the_jth_point_of_its_kind():
    sched, log = Scheduler(Schedule([Preemption(task=0, after=2, kind="a", to=1)])), []
    sched.spawn(stepper(sched, log, 0, ["a", "b", "a", "b", "a"]), name="t0")
    sched.spawn(stepper(sched, log, 1, ["c"]), name="t1")
    sched.run()
    # The switch happens at the second "a" point, before what it guards.
    assert log == [(0, "a", 0), (0, "b", 1), (1, "c", 0), (0, "a", 2), (0, "b", 3),
                   (0, "a", 4)]
    assert sched.statistics().preemptions_fired == 1


def test_preemption_of_kind_none_counts_every_point():
    sched, log = Scheduler(Schedule([Preemption(0, 3, None, 1)])), []
    sched.spawn(stepper(sched, log, 0, ["a", "b", "c", "d"]), name="t0")
    sched.spawn(stepper(sched, log, 1, ["x"]), name="t1")
    sched.run()
    assert [entry[:2] for entry in log] == [(0, "a"), (0, "b"), (1, "x"), (0, "c"), (0, "d")]


def test_preemption_to_a_task_that_cannot_run_falls_back_to_round_robin():
    sched, log = Scheduler(Schedule([Preemption(1, 1, "a", 0), Preemption(0, 1, "a", 7)])), []
    for me in range(3):
        sched.spawn(stepper(sched, log, me, ["a", "a"]), name=f"t{me}")
    trace = sched.run()
    # Task 0 is preempted towards 7 (absent): the next after it, task 1, runs;
    # task 1 is preempted towards 0, which can run.
    assert [(e.task, e.detail) for e in trace if e.kind == "switch"] == [
        (0, "to task 1 (preemption #1)"), (1, "to task 0 (preemption #0)"),
        (0, "to task 1 (finished)"), (1, "to task 2 (finished)")]
    assert [entry[0] for entry in log] == [0, 0, 1, 1, 2, 2]


def test_preemption_to_itself_is_a_no_op():
    sched, log = Scheduler(Schedule([Preemption(0, 1, "a", 0)])), []
    sched.spawn(stepper(sched, log, 0, ["a", "a"]), name="t0")
    sched.spawn(stepper(sched, log, 1, ["a"]), name="t1")
    sched.run()
    assert [entry[0] for entry in log] == [0, 0, 1]


def scenario():
    """Locks, RCU, blocking, spinning and preemptions: a busy interleaving."""
    sched = Scheduler(Schedule([Preemption(0, 1, "read_lock", 1),
                                Preemption(1, 2, None, 2), Preemption(2, 1, "cpu_relax", 0)]))
    lock, rcu, flag, freed = RwLock(sched), Rcu(sched), [], []

    def reader():
        lock.read_lock(sched.current)
        rcu.read_lock(sched.current)
        sched.point("read_pte")
        rcu.read_unlock(sched.current)
        rcu.poll()
        lock.read_unlock(sched.current)
        flag.append(1)

    def writer():
        lock.write_lock(sched.current)
        rcu.call_rcu(lambda: freed.append(sched.current))
        lock.write_unlock(sched.current)
        rcu.poll()

    def spinner():
        while not flag:
            sched.cpu_relax()
        sched.progress()

    for fn in (reader, writer, spinner):
        sched.spawn(fn, name=fn.__name__)
    return sched.run(), freed


def test_the_same_schedule_gives_a_byte_identical_trace():
    runs = [scenario() for _ in range(3)]
    texts = [repr(trace).encode() for trace, _ in runs]
    assert texts[0] == texts[1] == texts[2]
    assert all(freed == [3] for _, freed in runs)  # the callback ran once, as task 3
    assert {e.kind for e in runs[0][0]} >= {"block", "wake", "switch", "cpu_relax"}


# ------------------------------------------------------------- failures
def test_a_task_exception_unwinds_the_others_and_is_reraised():
    sched, cleaned = Scheduler(Schedule([Preemption(0, 1, "a", 1)])), []
    boom = ValueError("boom")

    def careful(me, wait):
        def body():
            try:
                sched.point("a")
                if wait:
                    sched.wait_until(lambda: False, "never")
                sched.point("a")
            finally:
                sched.point("cleanup")  # may not switch while unwinding
                cleaned.append(me)
        return body

    def failing():
        sched.point("b")
        raise boom

    sched.spawn(careful(0, False), name="careful")
    sched.spawn(careful(1, True), name="waiting")
    sched.spawn(failing, name="failing")
    sched.spawn(lambda: cleaned.append("never started"), name="late")
    with pytest.raises(ValueError) as info:
        sched.run()
    assert info.value is boom
    assert info.traceback[-1].name == "failing"  # the original traceback is kept
    assert sorted(cleaned) == [0, 1]
    assert sched.alive() == () and not sched.unwinding and sched.current is None
    assert [e.task for e in sched.trace if e.kind == "unwind"] == [0, 1, 3]
    assert [(e.task, e.detail) for e in sched.trace if e.kind == "raise"] == [(2, "ValueError")]


def test_unwound_is_not_caught_by_except_exception():
    sched, seen = Scheduler(Schedule([Preemption(0, 1, "a", 1)])), []

    def swallower():
        try:
            sched.point("a")
            sched.point("a")
        except Exception:  # noqa: BLE001 - what candidate code may do
            seen.append("swallowed")
        except Unwound:
            seen.append("unwound")
            raise

    sched.spawn(swallower, name="swallower")
    sched.spawn(lambda: 1 / 0, name="failing")
    with pytest.raises(ZeroDivisionError):
        sched.run()
    assert seen == ["unwound"]


def test_wait_until_blocks_and_wakes():
    sched, state, log = Scheduler(), {"ready": False}, []

    def waiter():
        log.append("waiting")
        sched.wait_until(lambda: state["ready"], "the flag")
        log.append("woken")

    def setter():
        log.append("set")
        state["ready"] = True
        sched.point("store")
        log.append("setter done")

    sched.spawn(waiter, name="waiter")
    sched.spawn(setter, name="setter")
    trace = sched.run()
    assert log == ["waiting", "set", "setter done", "woken"]
    assert kinds_of(trace, "block", "wake") == [(0, "block"), (0, "wake")]
    assert sched.statistics().blocked_waits == 1
    sched.wait_until(lambda: True, "already true")  # returns at once, even outside run()
    with pytest.raises(SchedulerError, match="outside a running task"):
        sched.wait_until(lambda: False, "never")


def test_lock_order_deadlock_names_both_waits():
    sched = Scheduler(Schedule([Preemption(0, 2, "write_lock", 1)]))
    a, b, released = RwLock(sched, "A"), RwLock(sched, "B"), []

    def locker(first, second):
        def body():
            me = sched.current
            first.write_lock(me)
            try:
                second.write_lock(me)
                second.write_unlock(me)
            finally:
                first.write_unlock(me)
                released.append(me)
        return body

    sched.spawn(locker(a, b), name="A then B")
    sched.spawn(locker(b, a), name="B then A")
    with pytest.raises(Deadlock) as info:
        sched.run()
    exc = info.value
    assert exc.waiting == {0: "write_lock(B) held for write by task 1 (B then A)",
                           1: "write_lock(A) held for write by task 0 (A then B)"}
    message = str(exc)
    assert "task 0 (A then B) waits for write_lock(B)" in message
    assert "task 1 (B then A) waits for write_lock(A)" in message
    assert "last events" in message and exc.trace
    assert sorted(released) == [0, 1]  # unwound: their finally blocks ran
    assert a.writer is None and b.writer is None
    assert a.statistics().waiting_writers == b.statistics().waiting_writers == ()


def test_a_finally_block_that_spins_while_unwinding_is_cut_short():
    sched = Scheduler(Schedule([Preemption(0, 1, "a", 1)]), livelock_bound=50)

    def stubborn():
        try:
            sched.point("a")
        finally:
            while True:  # cpu_relax cannot switch while unwinding
                sched.cpu_relax()

    sched.spawn(stubborn, name="stubborn")
    sched.spawn(lambda: {}["missing"], name="failing")
    with pytest.raises(KeyError):
        sched.run()
    assert sched.alive() == ()


def test_spinning_on_a_condition_that_never_holds_is_a_livelock():
    sched = Scheduler(livelock_bound=100)

    def spin():
        while True:
            sched.cpu_relax()

    sched.spawn(spin, name="spin a")
    sched.spawn(spin, name="spin b")
    with pytest.raises(Livelock, match="no progress within 100") as info:
        sched.run()
    assert "last events" in str(info.value) and "cpu_relax" in str(info.value)
    assert sched.alive() == ()


def test_max_decisions_is_a_livelock_and_progress_resets_the_bound():
    sched = Scheduler(max_decisions=500, livelock_bound=50)

    def busy():
        for _ in range(1000):
            sched.point("work")
            sched.progress()

    sched.spawn(busy, name="busy")
    with pytest.raises(Livelock, match="more than 500"):
        sched.run()
    ok = Scheduler(livelock_bound=50)
    ok.spawn(lambda: [ok.point("work") or ok.progress() for _ in range(200)], name="ok")
    ok.run()


def test_spawn_from_a_running_task_and_background_tasks_run_last():
    sched, log = Scheduler(), []

    def parent():
        log.append("parent")
        sched.spawn(lambda: log.append("background"), name="bg", background=True)
        sched.spawn(lambda: log.append("child"), name="child")
        sched.point("a")
        log.append("parent done")

    sched.spawn(parent, name="parent")
    sched.spawn(lambda: log.append("sibling"), name="sibling")
    sched.run()
    assert log == ["parent", "parent done", "sibling", "child", "background"]


def test_a_preemption_naming_a_background_task_runs_it_early():
    sched, log = Scheduler(Schedule([Preemption(0, 1, "a", 1)])), []
    sched.spawn(stepper(sched, log, 0, ["a", "a"]), name="fg")
    sched.spawn(lambda: log.append("bg"), name="bg", background=True)
    sched.run()
    assert log == ["bg", (0, "a", 0), (0, "a", 1)]


def test_outside_run_points_do_nothing_and_run_is_once():
    sched = Scheduler()
    sched.point("a")
    sched.cpu_relax()
    assert sched.trace == [] and sched.current is None and not sched.running
    assert sched.run() == ()
    with pytest.raises(SchedulerError, match="once"):
        sched.run()
    with pytest.raises(ValueError):
        Preemption(0, 0, None, 1)
    assert Schedule([Preemption(0, 1, None, 1)]).preemptions == (Preemption(0, 1, None, 1),)
    assert Event(1, 0, "start").describe().split() == ["1", "task", "0", "start"]



# ---------------------------------------------------------------- property
KINDS = ("a", "lock", "read_lock", "write_lock", "cpu_relax", None)
PREEMPTIONS = st.builds(Preemption, task=st.integers(0, 3), after=st.integers(1, 8),
                        kind=st.sampled_from(KINDS), to=st.integers(0, 4))


def toy_run(preemptions, fail_in):
    sched = Scheduler(Schedule(preemptions), livelock_bound=300)
    lock, rcu, state = RwLock(sched), Rcu(sched), {"done": 0}

    def task(me):
        def body():
            for round_ in range(2):
                sched.point("a")
                if me == 2:
                    lock.write_lock(me)
                    rcu.call_rcu(lambda: sched.point("a"))
                    lock.write_unlock(me)
                else:
                    lock.read_lock(me)
                    rcu.read_lock(me)
                    sched.point("lock")
                    if me == 1:  # nested: deadlocks if the writer waits now
                        lock.read_lock(me)
                        lock.read_unlock(me)
                    rcu.read_unlock(me)
                    lock.read_unlock(me)
                rcu.poll()
                if me == fail_in and round_:
                    raise KeyError(me)
            state["done"] += 1
            while state["done"] < 3:  # wait for the others, politely
                sched.cpu_relax()
            sched.progress()
        return body

    for me in range(3):
        sched.spawn(task(me), name=f"t{me}")
    try:
        trace = sched.run()
    except (KeyError, Deadlock, Livelock) as exc:  # Livelock: a spinner beside a deadlock
        trace = ("raised", type(exc).__name__, tuple(sched.trace))
    assert sched.alive() == () and not live_greenlets(collect=False)
    return trace


@settings(max_examples=150, deadline=None)
@given(st.lists(PREEMPTIONS, max_size=5), st.sampled_from([None, 0, 2]))
def test_random_schedules_terminate_deterministically_and_leave_no_greenlet(ps, fail_in):
    first = toy_run(ps, fail_in)
    assert toy_run(ps, fail_in) == first
    if first[0] != "raised":
        assert first[-1].kind == "finish" and fail_in is None
