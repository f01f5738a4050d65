"""Is a parallel step linearizable? (DESIGN §6, docs/parallel.md)

A parallel step passes if SOME order of its operations that respects real
time (``a`` before ``b`` whenever ``a.ret < b.call``) lets the oracle accept
every observation. The search is porcupine's ``checkSingle``
(anishathalye/porcupine, ``checker.go``): depth first, place an operation
when the model accepts it, backtrack otherwise, and remember every
configuration (bitmask of placed operations, oracle state) so that none is
explored twice. States are compared with ``==`` (attrs equality: the dicts
and sets of two clones share their values, so comparing is a C loop over
shared objects), never hashed: a hashable snapshot of every page costs
thirty times more. Unlike porcupine it does not stop at the first
linearization: every distinct final state survives (two concurrent writes to
one page are both legal until a later read decides), and the caller keeps
them as the starting states of the next step (:func:`prune` applies a
sequential step to them).

No scheduling and no formatting here: the parallel machine records the
:class:`Op` values and words the failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from model.oracle import Oracle

#: At most this many orders are reported in :attr:`Result.orders`.
ORDERS_CAP = 8


@attrs.frozen(kw_only=True)
class Op:
    """One operation of a parallel step, as it ran."""

    index: int                 # 0..n-1 within the step
    label: str                 # for reports, e.g. "vCPU1 write gfn 0x40001 = 7"
    call: int                  # logical time it started (the scheduler's decision count)
    ret: int                   # logical time it finished (ret >= call)
    observation: Any           # what it observed (hashable)
    apply: Callable[[Oracle, Any], bool]
    """Applies the op to the given oracle (mutating it) and says whether the
    oracle accepts ``observation``; only ever called on a private clone."""


@attrs.frozen
class Result:
    """``status``: ``"pass"``, ``"fail"`` or ``"unknown"`` (the budget ran out:
    never a pass). ``survivors``: the distinct final oracle states (by
    ``==``), in the order the search found them; empty unless
    ``pass``. ``orders``: on a pass, orders (op indices) that linearize:
    the first that reached each final configuration (an order whose prefix
    meets an explored configuration is cut there, so not every linearizing
    order is listed); otherwise the longest partial linearizations found (the
    operations missing from one could not be placed after it; on
    ``unknown``, those reached before the budget ran out). At most
    :data:`ORDERS_CAP`, in search order. ``explored``: configurations
    explored, never more than the budget."""

    status: str
    survivors: tuple
    orders: tuple[tuple[int, ...], ...]
    explored: int


class _OutOfBudget(Exception):
    pass


def check(states: Sequence[Oracle], ops: Sequence[Op], *, budget: int = 20_000) -> Result:
    """Search for the real-time-respecting orders of ``ops`` that the oracle
    accepts, from each of ``states`` (which are never mutated); see
    :class:`Result`. More than ``budget`` configurations give ``unknown``."""
    by_index = _by_index(ops)
    n = len(by_index)
    full = (1 << n) - 1
    # preds[i]: the ops that finished before op i started (they come first)
    preds = [sum(1 << j.index for j in by_index if j.ret < op.call) for op in by_index]
    seen: dict[int, list[Oracle]] = {}   # placed-ops mask -> states explored with it
    survivors: list[Oracle] = []         # in search order
    orders: list[tuple[int, ...]] = []   # full orders, or the longest prefixes so far
    explored = 0

    def visit(state: Oracle, done: int, order: tuple[int, ...]) -> None:
        nonlocal explored
        explored_here = seen.setdefault(done, [])
        if state in explored_here:  # == on each: a few states per mask
            return
        if explored >= budget:
            raise _OutOfBudget
        explored_here.append(state)
        explored += 1
        _keep_longest(orders, order)
        if done == full:
            survivors.append(state)
            return
        for op in by_index:
            bit = 1 << op.index
            if done & bit or preds[op.index] & ~done:
                continue  # placed already, or a real-time predecessor is not
            nxt = state.clone()
            if op.apply(nxt, op.observation):
                visit(nxt, done | bit, order + (op.index,))

    try:
        for state in states:
            visit(state.clone(), 0, ())
    except _OutOfBudget:
        return Result("unknown", (), tuple(orders), explored)
    status = "pass" if survivors else "fail"
    return Result(status, tuple(survivors), tuple(orders), explored)


def prune(states: Sequence[Oracle], apply: Callable[[Oracle], bool]) -> tuple[Oracle, ...]:
    """One sequential operation after a parallel step: ``apply`` it to a clone
    of each state, keep the clones that accept it, deduplicated by ``==``
    (first one wins, in the order of ``states``)."""
    kept: list[Oracle] = []
    for state in states:
        nxt = state.clone()
        if apply(nxt) and nxt not in kept:
            kept.append(nxt)
    return tuple(kept)


def _keep_longest(orders: list[tuple[int, ...]], order: tuple[int, ...]) -> None:
    """Keep the longest orders seen so far: at most ORDERS_CAP, no repeats."""
    if orders and len(order) > len(orders[0]):
        orders.clear()
    if (not orders or len(order) == len(orders[0])) and len(orders) < ORDERS_CAP \
            and order not in orders:
        orders.append(order)


def _by_index(ops: Sequence[Op]) -> list[Op]:
    by_index = sorted(ops, key=lambda op: op.index)
    if [op.index for op in by_index] != list(range(len(by_index))):
        raise ValueError(f"op indices must be 0..{len(by_index) - 1}: "
                         f"{[op.index for op in ops]}")
    for op in by_index:
        if op.ret < op.call:
            raise ValueError(f"op {op.index} ({op.label}) returns before it is called")
    return by_index
