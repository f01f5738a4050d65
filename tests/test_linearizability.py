"""Tests for conformance.machines.linearizability, the porcupine-style check
of a parallel step (docs/parallel.md), with the real oracle."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from conformance.machines.linearizability import ORDERS_CAP, Op, Result, check, prune
from conformance.protocol import Memslot, VmConfig
from model.oracle import Oracle, Outcome
from oracle_helpers import GFN, HVA, PAGE, hva, oracle, read, write

WINDOW = 512  # pages in a 2 MiB window


# ------------------------------------------------------------- helpers
def guest(index, kind, value, *, vcpu=None, gfn=GFN, call, ret, observed=None):
    """A guest access as the parallel machine records it: a ``write`` of
    ``value`` observes ``value``; a ``read`` observes ``observed``."""
    vcpu = index if vcpu is None else vcpu
    got = Outcome(value=value if kind == "write" else observed)

    def apply(o, observation):
        return observation in o.guest_access(vcpu, gfn, kind,
                                             value if kind == "write" else None,
                                             observed=observation)
    label = f"vCPU{vcpu} {kind} gfn {gfn:#x}" + (f" = {value}" if kind == "write" else "")
    return Op(index=index, label=label, call=call, ret=ret, observation=got, apply=apply)


def host(index, op, gfn=GFN, *, call, ret):
    def apply(o, _observed):
        o.host_op(op, hva(gfn), hva(gfn) + PAGE)
        return True
    return Op(index=index, label=f"notifier {op}", call=call, ret=ret, observation=None,
              apply=apply)


def reads_of(states, gfn=GFN):
    """What a guest read of ``gfn`` may return in each state (on clones)."""
    return [read(s.clone(), gfn) for s in states]


def observes(value, gfn=GFN, vcpu=0):
    """A sequential guest read that observed ``value``, for :func:`prune`."""
    got = Outcome(value=value)
    return lambda o: got in o.guest_access(vcpu, gfn, "read", None, observed=got)


def as_list(states):
    """States as a list, compared with ``==``."""
    return list(states)


def concurrent_writes():
    """vCPU0 writes 1 during [0, 3], vCPU1 writes 2 during [1, 2]."""
    return [guest(0, "write", 1, call=0, ret=3), guest(1, "write", 2, call=1, ret=2)]


# ------------------------------------------- several states survive
def test_concurrent_writes_to_one_page_leave_two_survivors():
    start = oracle()
    before = start.clone()
    result = check([start], concurrent_writes())
    assert result.status == "pass"
    assert result.orders == ((0, 1), (1, 0))
    assert reads_of(result.survivors) == [{2}, {1}]  # last writer wins, in each order
    assert start == before  # the starting states are never mutated


@pytest.mark.parametrize("value", [1, 2])
def test_a_later_read_decides_between_survivors(value):
    survivors = check([oracle()], concurrent_writes()).survivors
    kept = prune(survivors, observes(value))
    assert len(kept) == 1 and reads_of(kept) == [{value}]
    assert len(survivors) == 2  # prune works on clones
    # the same read as a one-op step of its own
    again = check(survivors, [guest(0, "read", None, call=0, ret=0, observed=value)])
    assert again.status == "pass" and again.orders == ((0,),)
    assert as_list(again.survivors) == as_list(kept)


def test_a_later_read_of_neither_value_fails():
    survivors = check([oracle()], concurrent_writes()).survivors
    assert prune(survivors, observes(3)) == ()
    result = check(survivors, [guest(0, "read", None, call=0, ret=0, observed=3)])
    assert result == Result("fail", (), ((),), 2)  # one configuration per starting state


def test_a_notifier_racing_a_write_leaves_both_outcomes():
    """madvise(DONTNEED) || write 5: the page is either zeroed or holds 5."""
    ops = [guest(0, "write", 5, call=0, ret=4), host(1, "madvise_dontneed", call=1, ret=2)]
    result = check([oracle()], ops)
    assert result.status == "pass" and result.orders == ((0, 1), (1, 0))
    assert reads_of(result.survivors) == [{0}, {5}]


# ------------------------------------------------------ real time
def test_real_time_order_is_respected():
    """write 1 returns before write 2 is called; a read called after both
    returned sees 1: not linearizable. The longest consistent prefix is both
    writes in real-time order; the read is the op that cannot be placed."""
    ops = [guest(0, "write", 1, call=0, ret=1), guest(1, "write", 2, call=2, ret=3),
           guest(2, "read", None, vcpu=0, call=4, ret=5, observed=1)]
    result = check([oracle()], ops)
    assert result.status == "fail" and result.survivors == ()
    assert result.orders == ((0, 1),)
    assert result.explored == 3  # (), (0,), (0, 1): nothing else respects real time


def test_overlapping_writes_make_the_same_history_linearizable():
    ops = [guest(0, "write", 1, call=0, ret=3), guest(1, "write", 2, call=1, ret=2),
           guest(2, "read", None, vcpu=0, call=4, ret=5, observed=1)]
    result = check([oracle()], ops)
    assert result.status == "pass" and result.orders == ((1, 0, 2),)
    assert reads_of(result.survivors) == [{1}]


def test_touching_intervals_overlap():
    """``a`` precedes ``b`` only when ``a.ret < b.call``: equal times overlap."""
    ops = [guest(0, "write", 1, call=0, ret=2), guest(1, "write", 2, call=2, ret=3)]
    assert check([oracle()], ops).orders == ((0, 1), (1, 0))


def test_an_observation_no_order_allows_fails():
    """A read of a value nobody wrote, concurrent with a write."""
    ops = [guest(0, "write", 1, call=0, ret=2), guest(1, "read", None, call=1, ret=3,
                                                      observed=99)]
    result = check([oracle()], ops)
    assert result.status == "fail" and result.survivors == ()
    assert result.orders == ((0,),)  # the write fits; the read fits nowhere
    alone = check([oracle()], [guest(0, "read", None, call=0, ret=0, observed=99)])
    assert alone.status == "fail" and alone.orders == ((),)


def test_no_ops_pass_with_the_distinct_starting_states():
    a, b = oracle(), oracle()
    write(b, GFN, 7)
    result = check([a, a.clone(), b], [])
    assert result.status == "pass" and result.orders == ((),) and result.explored == 2
    assert as_list(result.survivors) == as_list([a, b])


# ---------------------------------------------------- the cache
def wide_oracle(nr_vcpus=4):
    """One slot of four 2 MiB windows: accesses in different windows commute."""
    o = Oracle(VmConfig(nr_vcpus=nr_vcpus))
    o.mmap(HVA, HVA + 4 * WINDOW * PAGE)
    o.set_memslot(None, Memslot(0, GFN, 4 * WINDOW, HVA))
    return o


def independent_ops(counter=None):
    """Four concurrent writes, one per vCPU, each in its own window."""
    ops = [guest(i, "write", 10 + i, gfn=GFN + i * WINDOW, call=0, ret=9) for i in range(4)]
    if counter is None:
        return ops

    def counted(op):
        def apply(o, observation):
            counter.append(op.index)
            return op.apply(o, observation)
        return Op(index=op.index, label=op.label, call=op.call, ret=op.ret,
                  observation=op.observation, apply=apply)
    return [counted(op) for op in ops]


def test_the_cache_explores_each_configuration_once():
    """Bound: when every order of n ops reaches the same state, each of the
    2^n subsets of placed ops is one configuration per distinct starting
    state, so ``explored == 2^n * starts`` (16 here) and ``apply`` runs
    n * 2^(n-1) times (32). Without the cache the permutation tree has
    sum_k n!/(n-k)! = 65 nodes per start and 64 calls of ``apply``."""
    n, calls = 4, []
    tree = sum(math.factorial(n) // math.factorial(n - k) for k in range(n + 1))
    assert tree == 65
    result = check([wide_oracle()], independent_ops(calls))
    assert result.status == "pass" and len(result.survivors) == 1
    assert result.explored == 2 ** n < tree
    assert len(calls) == n * 2 ** (n - 1)
    assert result.orders == ((0, 1, 2, 3),)  # every other order meets a cached prefix

    other = wide_oracle()
    write(other, GFN + 1, 5)  # a second, distinct starting state
    two = check([wide_oracle(), wide_oracle(), other], independent_ops())
    assert two.status == "pass" and len(two.survivors) == 2
    assert two.explored == 2 ** n * 2  # equal starting states are explored once


def test_budget_exceeded_is_unknown_never_pass():
    result = check([wide_oracle()], independent_ops(), budget=4)
    assert result.status == "unknown" and result.survivors == ()
    assert result.explored == 4
    assert result.orders == ((0, 1, 2),)  # the deepest prefix reached
    # a survivor was found, but others may be missing: still unknown
    assert check([wide_oracle()], independent_ops(), budget=5) == \
        Result("unknown", (), ((0, 1, 2, 3),), 5)
    assert check([wide_oracle()], independent_ops(), budget=16).status == "pass"
    assert check([wide_oracle()], independent_ops(), budget=15).status == "unknown"


def test_one_survivor_per_last_writer():
    """Five concurrent writes of distinct values to one page: five survivors,
    one per last writer, and one order reported for each."""
    ops = [guest(i, "write", i + 1, vcpu=i % 2, call=0, ret=9) for i in range(5)]
    result = check([oracle()], ops)
    assert result.status == "pass" and len(result.survivors) == len(result.orders) == 5
    assert sorted(v for vals in reads_of(result.survivors) for v in vals) == [1, 2, 3, 4, 5]
    assert sorted(order[-1] for order in result.orders) == [0, 1, 2, 3, 4]


def test_orders_are_capped():
    """Three concurrent writes to one page and two to the next (same 2 MiB
    window): the final state depends on the last writer of each page and on
    which page was touched last (the one certainly mapped), so more than
    ORDERS_CAP final configurations, and only ORDERS_CAP orders reported."""
    ops = [guest(i, "write", i + 1, vcpu=i % 2, gfn=GFN + (i >= 3), call=0, ret=9)
           for i in range(5)]
    result = check([oracle()], ops)
    assert result.status == "pass" and len(result.survivors) > ORDERS_CAP
    assert len(result.orders) == len(set(result.orders)) == ORDERS_CAP


# -------------------------------------------------- determinism
def mixed_step():
    return [guest(0, "write", 1, call=0, ret=5), guest(1, "write", 2, call=1, ret=3),
            host(2, "migrate", call=2, ret=6), guest(3, "read", None, vcpu=0, gfn=GFN + 1,
                                                     call=4, ret=7, observed=0)]


def test_same_input_same_result():
    first = check([oracle(nr_vcpus=4)], mixed_step())
    second = check([oracle(nr_vcpus=4)], mixed_step())
    assert first.status == "pass" and len(first.survivors) >= 2
    assert as_list(first.survivors) == as_list(second.survivors)
    assert (first.orders, first.explored) == (second.orders, second.explored)


def test_op_indices_must_be_0_to_n_minus_1():
    with pytest.raises(ValueError):
        check([oracle()], [guest(1, "write", 1, call=0, ret=1)])
    with pytest.raises(ValueError):
        check([oracle()], [guest(0, "write", 1, call=2, ret=1)])


# --------------------------------------------- a property: sequential histories
ACCESS = st.tuples(st.sampled_from(["read", "write"]), st.integers(0, 1),   # vcpu
                   st.sampled_from([0, 1, WINDOW]), st.integers(1, 9))       # page, value


@settings(max_examples=40, deadline=None, database=None)
@given(st.lists(ACCESS, min_size=1, max_size=5), st.data())
def test_a_sequential_history_the_oracle_accepts_is_accepted_in_that_order(accesses, data):
    """Ops that do not overlap in real time, whose observations the oracle
    accepts in that order, pass with exactly that order and the state the
    sequential run reaches; made all concurrent, they still pass, and that
    state is among the survivors."""
    reference, ops = oracle(), []
    for i, (kind, vcpu, page, value) in enumerate(accesses):
        if kind == "write":
            write(reference, GFN + page, value, vcpu=vcpu)
            observed = None
        else:
            observed = data.draw(st.sampled_from(sorted(read(reference.clone(), GFN + page,
                                                             vcpu=vcpu))))
            read(reference, GFN + page, vcpu=vcpu, observed=Outcome(value=observed))
        ops.append(guest(i, kind, value, vcpu=vcpu, gfn=GFN + page,
                         call=2 * i, ret=2 * i + 1, observed=observed))
    result = check([oracle()], ops)
    assert result.status == "pass"
    assert result.orders == (tuple(range(len(ops))),)
    assert as_list(result.survivors) == [reference]
    assert result.explored == len(ops) + 1

    overlapping = [Op(index=op.index, label=op.label, call=0, ret=len(ops), apply=op.apply,
                      observation=op.observation) for op in ops]
    wide = check([oracle()], overlapping)
    assert wide.status == "pass"
    assert reference in as_list(wide.survivors)
