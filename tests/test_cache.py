"""Tests for model.cache: one page's PoC value, D-line and I-line (rules §6.1, §6.2)."""

import pytest
from hypothesis import given, settings, strategies as st

from model.cache import (
    FRESH_ZEROED,
    GARBAGE,
    LineState,
    cacheable_read,
    cacheable_write,
    clean_inval,
    hw_closure,
    hw_successors,
    iinval,
    ifetch,
    ispeculative_fill,
    nc_read,
    nc_write,
    speculative_fill,
)

VALUES = st.sampled_from([GARBAGE, 0, 1, 2])


@st.composite
def line_states(draw):
    dline = draw(st.none() | VALUES)
    dirty = dline is not None and draw(st.booleans())  # no dirty flag without a line
    return LineState(mem=draw(VALUES), dline=dline, dirty=dirty,
                     iline=draw(st.none() | VALUES))


LINE_STATES = line_states()
#: Every small state, for exhaustive checks (cheaper than sampling 200 states).
ALL_STATES = [
    LineState(mem=m, dline=dl, dirty=dirty, iline=il)
    for m in (GARBAGE, 0, 1) for dl in (None, GARBAGE, 0, 1) for il in (None, 0, 1)
    for dirty in ((False,) if dl is None else (False, True))
]
FEATURES = st.sampled_from([(False, False), (True, False), (False, True), (True, True)])


# ------------------------------------------------------------------ data side
def test_cacheable_read_miss_allocates_clean_line_from_poc():
    value, s = cacheable_read(LineState(mem=7))
    assert value == 7
    assert s == LineState(mem=7, dline=7, dirty=False)


def test_cacheable_read_hit_returns_line_not_poc():
    s = LineState(mem=7, dline=9, dirty=False)  # stale clean line
    value, after = cacheable_read(s)
    assert value == 9
    assert after == s


def test_cacheable_read_hit_dirty_line_unchanged():
    s = LineState(mem=7, dline=9, dirty=True)
    assert cacheable_read(s) == (9, s)


def test_nc_read_ignores_lines():
    assert nc_read(LineState(mem=3, dline=4, dirty=True)) == 3
    assert nc_read(LineState(mem=3, dline=4, dirty=False)) == 3


def test_nc_write_reaches_poc_and_leaves_stale_line():
    s = nc_write(LineState(mem=1, dline=1, dirty=False), 5)
    assert s.mem == 5
    assert s.dline == 1 and not s.dirty
    # a later cacheable read hits the stale line (hazard b)
    assert cacheable_read(s)[0] == 1


def test_cacheable_write_makes_dirty_line_and_leaves_poc():
    s = cacheable_write(LineState(mem=1), 5)
    assert s == LineState(mem=1, dline=5, dirty=True)
    assert nc_read(s) == 1  # hazard a: NC reader sees stale PoC


def test_clean_inval_writes_back_dirty_line():
    assert clean_inval(LineState(mem=1, dline=5, dirty=True)) == LineState(mem=5)


def test_clean_inval_discards_clean_line_without_writeback():
    assert clean_inval(LineState(mem=1, dline=5, dirty=False)) == LineState(mem=1)


def test_clean_inval_keeps_iline():
    assert clean_inval(LineState(mem=1, dline=5, dirty=True, iline=3)).iline == 3


def test_speculative_fill_allocates_clean_line_from_poc():
    assert speculative_fill(LineState(mem=4)) == LineState(mem=4, dline=4, dirty=False)


@pytest.mark.parametrize("dirty", [False, True])
def test_speculative_fill_never_overwrites_line(dirty):
    s = LineState(mem=4, dline=6, dirty=dirty)
    assert speculative_fill(s) == s


def test_fresh_zeroed_is_dirty_zero_over_garbage():
    assert FRESH_ZEROED.mem == GARBAGE
    assert FRESH_ZEROED.dline == 0 and FRESH_ZEROED.dirty
    assert cacheable_read(FRESH_ZEROED)[0] == 0
    assert nc_read(FRESH_ZEROED) == GARBAGE
    assert nc_read(clean_inval(FRESH_ZEROED)) == 0


# ---------------------------------------------------------- instruction side
def test_ifetch_without_idc_fills_from_poc_not_dline():
    s = LineState(mem=1, dline=2, dirty=True)
    value, after = ifetch(s, idc=False, dic=False)
    assert value == 1
    assert after.iline == 1
    assert after.dline == 2 and after.dirty  # D-side untouched


def test_ifetch_with_idc_fills_from_dline():
    s = LineState(mem=1, dline=2, dirty=True)
    value, after = ifetch(s, idc=True, dic=False)
    assert value == 2
    assert after.iline == 2


def test_ifetch_with_idc_and_no_dline_fills_from_poc():
    value, after = ifetch(LineState(mem=1), idc=True, dic=False)
    assert (value, after.iline) == (1, 1)


@pytest.mark.parametrize("idc", [False, True])
def test_ifetch_hits_stale_iline(idc):
    s = LineState(mem=1, dline=2, dirty=True, iline=0)
    assert ifetch(s, idc=idc, dic=False) == (0, s)


@pytest.mark.parametrize("idc", [False, True])
def test_ifetch_with_dic_sees_data_view_ignoring_iline(idc):
    s = LineState(mem=1, dline=2, dirty=True, iline=0)
    assert ifetch(s, idc=idc, dic=True)[0] == 2
    value, after = ifetch(LineState(mem=3, iline=0), idc=idc, dic=True)
    assert value == 3
    assert after.dline == 3  # a cacheable read allocates


def test_iinval_drops_only_iline():
    s = LineState(mem=1, dline=2, dirty=True, iline=0)
    assert iinval(s) == LineState(mem=1, dline=2, dirty=True, iline=None)


def test_ispeculative_fill():
    s = LineState(mem=1, dline=2, dirty=True)
    assert ispeculative_fill(s, idc=False, dic=False).iline == 1
    assert ispeculative_fill(s, idc=True, dic=False).iline == 2
    assert ispeculative_fill(s, idc=False, dic=True) == s
    held = LineState(mem=1, iline=9)
    assert ispeculative_fill(held, idc=False, dic=False) == held


# ------------------------------------------------------------- hw_closure
def test_hw_closure_contains_start_states():
    starts = [FRESH_ZEROED, LineState(mem=5)]
    assert set(starts) <= hw_closure(starts, idc=False, dic=False)


def test_hw_closure_from_fresh_zeroed_reaches_zero_at_poc():
    closure = hw_closure([FRESH_ZEROED], idc=False, dic=False)
    assert any(s.mem == 0 for s in closure)
    assert any(s.mem == GARBAGE for s in closure)
    # cacheable observers always see 0; NC observers may see garbage or 0
    assert {cacheable_read(s)[0] for s in closure} == {0}
    assert {nc_read(s) for s in closure} == {GARBAGE, 0}


def test_hw_closure_of_clean_state_is_exactly_the_fill_choices():
    closure = hw_closure([LineState(mem=3)], idc=False, dic=False)
    assert closure == {
        LineState(mem=3), LineState(mem=3, dline=3),
        LineState(mem=3, iline=3), LineState(mem=3, dline=3, iline=3),
    }


def test_hw_closure_never_invents_values():
    closure = hw_closure([LineState(mem=1, dline=2, dirty=True)], idc=True, dic=False)
    values = set()
    for s in closure:
        values |= {s.mem, s.dline, s.iline}
    assert values <= {1, 2, None}


def test_hw_closure_never_resurrects_overwritten_value():
    # a dirty line hides mem=1; once evicted, 1 is gone for good
    closure = hw_closure([LineState(mem=1, dline=2, dirty=True)], idc=False, dic=False)
    assert {cacheable_read(s)[0] for s in closure} == {2}


@settings(max_examples=30, deadline=None, database=None)
@given(st.lists(LINE_STATES, min_size=1, max_size=3), FEATURES)
def test_hw_closure_is_closed_and_contains_starts(states, features):
    idc, dic = features
    closure = hw_closure(states, idc=idc, dic=dic)
    assert set(states) <= closure
    for s in closure:
        for nxt in hw_successors(s, idc=idc, dic=dic):
            assert nxt in closure


@settings(max_examples=30, deadline=None, database=None)
@given(LINE_STATES, FEATURES)
def test_hw_closure_is_idempotent(s, features):
    idc, dic = features
    closure = hw_closure([s], idc=idc, dic=dic)
    assert hw_closure(closure, idc=idc, dic=dic) == closure


@settings(max_examples=30, deadline=None, database=None)
@given(LINE_STATES, FEATURES)
def test_free_hw_choices_preserve_the_cacheable_value(s, features):
    # Evictions and speculative fills never change what a cacheable reader
    # sees unless the line was stale-clean (NC write hazard).
    idc, dic = features
    before = cacheable_read(s)[0]
    stale_clean = s.dline is not None and not s.dirty and s.dline != s.mem
    for nxt in hw_successors(s, idc=idc, dic=dic):
        after = cacheable_read(nxt)[0]
        assert after == before or (stale_clean and after == s.mem)


@settings(max_examples=30, deadline=None, database=None)
@given(LINE_STATES, VALUES)
def test_write_then_read_same_view(s, value):
    assert cacheable_read(cacheable_write(s, value))[0] == value
    assert nc_read(nc_write(s, value)) == value


@settings(max_examples=30, deadline=None, database=None)
@given(LINE_STATES)
def test_clean_inval_leaves_poc_equal_to_cacheable_view(s):
    before = cacheable_read(s)[0]
    after = clean_inval(s)
    assert after.dline is None and not after.dirty
    assert after.mem == (before if s.dirty else s.mem)
    assert nc_read(after) == cacheable_read(after)[0]


@settings(max_examples=30, deadline=None, database=None)
@given(LINE_STATES)
def test_speculative_fill_is_invisible_to_cacheable_reads(s):
    assert cacheable_read(speculative_fill(s))[0] == cacheable_read(s)[0]


@pytest.mark.parametrize("idc,dic", [(False, False), (True, False), (False, True)])
def test_hw_closure_closed_exhaustively(idc, dic):
    for s in ALL_STATES:
        closure = hw_closure([s], idc=idc, dic=dic)
        assert s in closure
        for member in closure:
            assert set(hw_successors(member, idc=idc, dic=dic)) <= closure
            # no free hardware choice changes the last-written cacheable value
            # unless a stale clean line is dropped (then PoC's newer value shows)
            assert cacheable_read(member)[0] in {cacheable_read(s)[0], s.mem}
