"""``eager-unmap``: :class:`~candidates.classic.ClassicCandidate` with the two
"simple but costly" alternatives from the seeds.

* Disabling dirty logging unmaps the whole memslot (seed 001: instead of
  collapsing 4K tables into blocks lazily in the fault path, zap and let the
  guest fault everything back as blocks). No table→block collapse then ever
  needs an RCU-deferred subtree free for this case.
* Every MMU-notifier invalidation unmaps its range, including the 2023
  proposal's PROTECTION_UPGRADE (seed 003: what a secondary MMU that ignores
  the event type does). Correct, but each upgrade costs refaults; the cost
  counters show it.
"""

from __future__ import annotations

from candidates.classic import ClassicCandidate
from candidates.common import KvmBase
from conformance.protocol import Memslot, NotifierRange


class EagerUnmapCandidate(ClassicCandidate):
    version = "kvm-arm64-v6.12-eager-unmap/1"

    def disable_logging(self, slot: Memslot) -> None:
        with self.services.mmu_write_lock():
            if self.pgt is not None:
                self.pgt.unmap(slot.base_gfn << 12, slot.npages << 12)

    def invalidate_range_start(self, rng: NotifierRange) -> None:
        KvmBase.invalidate_range_start(self, rng)  # ignore the event type

    def invalidate_range_end(self, rng: NotifierRange) -> None:
        KvmBase.invalidate_range_end(self, rng)
