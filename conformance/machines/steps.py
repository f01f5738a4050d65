"""What every step of a conformance machine shares: the rule argument
strategies, the step wrapper (:func:`checked`) and the failure listeners.

A rule argument is drawn once per step and recorded with the step, so a
program replays exactly and shrinks towards the simplest values.
"""

from __future__ import annotations

import functools
from typing import Callable

from hypothesis import event as _event
from hypothesis import note as _note
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from conformance.errors import ConformanceFailure
from conformance.protocol import SCTLR_C, SCTLR_M

INDEX = st.integers(0, 63)  # index into a small pool; shrinks towards the simplest
VCPU = st.integers(0, 3)
#: Index into the sorted memslot ids, three times in four the first (slot 0).
SLOT0_MOSTLY = st.sampled_from((0, 0, 1, 0))
#: Memslot changes. A deleted slot makes the rest of a program MMIO exits, so
#: ``recreate`` comes twice as often (a no-op when no slot is deleted); dirty
#: logging on/off are here too (as well as in their own rule), because swarm
#: testing switches whole rules off and logging changes drive split and collapse.
MEMSLOT_OPS = st.sampled_from(("logging off", "move", "recreate", "delete",
                               "recreate", "logging on"))
#: The guest's SCTLR_EL1 writes: ``caches on`` is M and C, ``caches off``
#: neither; whole on/off transitions are what guests do and what KVM's
#: TVM/toggle logic is about, so they come twice as often as M or C alone.
CACHE_CONTROL = st.sampled_from(("caches on", "caches off", "caches on", "caches off",
                                 "MMU only", "D-cache only"))
PTRS_PER_TABLE = 512  # 4 KiB pages in a 2 MiB block
#: Pages a guest read or write touches (shrinks to 1).
PAGES = st.sampled_from((1, 8, 64))
SCTLR_FOR = {"caches on": SCTLR_M | SCTLR_C, "caches off": 0, "MMU only": SCTLR_M,
             "D-cache only": SCTLR_C}
HOST_OPS = ["mprotect_ro", "mprotect_rw", "migrate", "madvise_dontneed", "munmap",
            "mmap_again", "ksm_merge", "thp_split", "thp_collapse"]
AGING = ["clear_flush_young", "clear_young", "test_young"]
#: The step label of ``boot`` (always step 1).
BOOT_LABEL = "boot (the VM and layout above)"


#: Called as ``listener(machine, failure)`` when a step (or teardown) of a
#: program fails, before the failure propagates. The failures layer registers
#: the writer of the replay file and the report here
#: (:func:`conformance.failures.files.write_failure`), so that machines never
#: import what formats their failures.
FAILURE_LISTENERS: list[Callable] = []


def publish_failure(machine, failure: ConformanceFailure) -> None:
    """Remember ``failure`` as the machine class's last one and tell every
    listener."""
    type(machine).last_failure = (failure, list(machine.trace), machine)
    for listener in list(FAILURE_LISTENERS):
        listener(machine, failure)


def event(label: str) -> None:
    if currently_in_test_context():  # replays run outside Hypothesis
        _event(label)


def note(text: str) -> None:
    if currently_in_test_context():
        _note(text)


def checked(fn):
    """Run a rule with its step label set; remember failures so teardown does
    not pile a second report on the first."""
    @functools.wraps(fn)
    def wrapper(self, **kwargs):
        self.steps += 1
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        # boot's arguments are the config and layout lines of every report;
        # repeating their reprs in the label would bury the failing step.
        label = (f"{self.steps}: {BOOT_LABEL}" if fn.__name__ == "boot"
                 else f"{self.steps}: {fn.__name__}({args})")
        self.trace.append(label)
        self.calls.append((fn.__name__, dict(kwargs)))
        if self.platform is not None:
            self.platform.step = label
        try:
            result = fn(self, **kwargs)
            if self.platform is not None and self.platform.events:
                for label in sorted(self.platform.events):
                    self._event(label)
                self.platform.events.clear()
            return result
        except ConformanceFailure as exc:
            # The platform's label is the rule's, or boot's with its phase.
            exc.step = exc.step or (self.platform and self.platform.step) or label
            self.failed = True
            publish_failure(self, exc)
            raise
        except BaseException:
            self.failed = True
            raise
    return wrapper



def _spread(gfn: int, pages: int) -> list[int]:
    """``pages`` gfns evenly spaced over the 2 MiB window of ``gfn``, ``gfn``
    among them (just ``[gfn]`` for one page)."""
    if pages == 1:
        return [gfn]
    stride = PTRS_PER_TABLE // pages
    first = (gfn & ~(PTRS_PER_TABLE - 1)) + gfn % stride
    return [first + i * stride for i in range(pages)]


def _slot_relative(memslots, gfn: int) -> tuple[int | None, int]:
    for slot in memslots:
        if slot.contains_gfn(gfn):
            return slot.id, gfn - slot.base_gfn
    return None, gfn
