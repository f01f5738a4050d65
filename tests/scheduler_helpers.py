"""Shared by the scheduler tests: toy tasks and a greenlet leak check."""

from __future__ import annotations

import gc

import greenlet


def live_greenlets(collect: bool = True) -> list:
    """Started, unfinished greenlets other than the one running the test."""
    if collect:
        gc.collect()
    here = greenlet.getcurrent()
    return [g for g in gc.get_objects()
            if isinstance(g, greenlet.greenlet) and g and g is not here and g.parent is not None]



def stepper(sched, log, me, kinds):
    """A task that passes one point per kind, logging after each point."""
    def body():
        for i, kind in enumerate(kinds):
            sched.point(kind)
            log.append((me, kind, i))
    return body


def kinds_of(trace, *kinds):
    return [(e.task, e.kind) for e in trace if e.kind in kinds]

