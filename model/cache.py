"""Data and instruction caches for one page, as a pure value (rules §6).

The model's cache line is a whole 4 KiB page: guest and host values are
page-granular (DESIGN §3), so nothing is lost by it. A page's state is
:class:`LineState`: the value at the Point of Coherency (``mem``), an optional
data-cache line (value, clean or dirty) and an optional instruction-cache line.

The same transition functions serve twice:

* the platform keeps one concrete ``LineState`` per physical page and applies
  the hardware's choices (speculative fills, evictions) as Hypothesis draws them;
* the oracle keeps a *set* of ``LineState`` per VMM page, closed under every
  choice the hardware may make (:func:`hw_closure`), so that what it accepts is
  exactly what the architecture allows.

Without FEAT_S2FWB, a guest with its MMU or D-cache off accesses memory
Non-cacheably (rules §6.1): :func:`nc_read` / :func:`nc_write` bypass the
line; the host always uses its cacheable linear alias.
"""

from __future__ import annotations

import attrs

#: What a page holds before the host allocator hands it out: never a value any
#: program wrote. Fresh pages are then zeroed through the cacheable alias.
GARBAGE = -1


@attrs.frozen(cache_hash=True)
class LineState:
    mem: int = GARBAGE
    dline: int | None = None
    dirty: bool = False
    iline: int | None = None


FRESH_ZEROED = LineState(mem=GARBAGE, dline=0, dirty=True, iline=GARBAGE)
"""A page the host just allocated and cleared with cacheable stores (DC ZVA).

Its I-cache line still holds the page's previous life (code the host ran from
it, or a speculative fetch): nothing invalidates the I-cache on allocation, so
the adversarial choice is a stale line until someone issues IC IVAU/IALLU
(rules §6.2, §9.6 C2)."""


def cacheable_read(s: LineState) -> tuple[int, LineState]:
    """A hit returns the line; a miss allocates a clean line from PoC."""
    if s.dline is not None:
        return s.dline, s
    return s.mem, attrs.evolve(s, dline=s.mem, dirty=False)


def nc_read(s: LineState) -> int:
    """Non-cacheable reads go to PoC and ignore any line (rules §6.1 hazard a)."""
    return s.mem


def cacheable_write(s: LineState, value: int) -> LineState:
    return attrs.evolve(s, dline=value, dirty=True)


def nc_write(s: LineState, value: int) -> LineState:
    """Non-cacheable writes reach PoC and leave any line alone (hazard b)."""
    return attrs.evolve(s, mem=value)


def clean_inval(s: LineState) -> LineState:
    """DC CIVAC to PoC; also what a line eviction does."""
    if s.dline is None:
        return s  # no line: nothing to write back or drop
    mem = s.dline if s.dirty else s.mem
    return attrs.evolve(s, mem=mem, dline=None, dirty=False)


def speculative_fill(s: LineState) -> LineState:
    """The host's cacheable alias lets the CPU fetch any line at any time."""
    if s.dline is not None:
        return s
    return attrs.evolve(s, dline=s.mem, dirty=False)


def _ifill_value(s: LineState, idc: bool) -> int:
    # Without IDC the I-side fills from PoU, which the model takes as PoC.
    if idc and s.dline is not None:
        return s.dline
    return s.mem


def ifetch(s: LineState, *, idc: bool, dic: bool) -> tuple[int, LineState]:
    """Instruction fetch. With DIC the I-side is coherent: it sees the data view."""
    if dic:
        return cacheable_read(s)
    if s.iline is not None:
        return s.iline, s
    value = _ifill_value(s, idc)
    return value, attrs.evolve(s, iline=value)


def iinval(s: LineState) -> LineState:
    """IC IVAU / IC IALLU to PoU."""
    return s if s.iline is None else attrs.evolve(s, iline=None)


def ispeculative_fill(s: LineState, *, idc: bool, dic: bool) -> LineState:
    if dic or s.iline is not None:
        return s
    return attrs.evolve(s, iline=_ifill_value(s, idc))


def hw_successors(s: LineState, *, idc: bool, dic: bool) -> tuple[LineState, ...]:
    """Every state one free hardware choice can reach from ``s``."""
    return (clean_inval(s), speculative_fill(s), iinval(s),
            ispeculative_fill(s, idc=idc, dic=dic))


def hw_closure(states, *, idc: bool, dic: bool) -> frozenset[LineState]:
    """All states reachable by any number of free hardware choices."""
    seen = set(states)
    todo = list(seen)
    while todo:
        for nxt in hw_successors(todo.pop(), idc=idc, dic=dic):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return frozenset(seen)
