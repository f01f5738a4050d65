"""A set of oracle states used as one oracle (porcupine's ``ToModel``).

After a parallel step, several oracle states may survive: two concurrent
writes to one page are both legal until a later read decides which one was
last (DESIGN §6). The parallel machine keeps them all in an
:class:`OracleSet` and goes on calling it as it calls an
:class:`~model.oracle.Oracle`:

* an observing call (``guest_access``, ``vmm_read`` with ``observed``) allows
  the union of what the states allow, and keeps only the states that allow
  what was observed (each commits it);
* ``harvest`` keeps the states under which nothing was lost;
* every other call (memslots, host operations, SCTLR writes, ...) is applied
  to every state; queries about structure (memslots, VMAs) are the same in
  every state, since parallel steps change neither, and are answered by the
  first.

States that become equal are merged (by ``==``), so the set stays small.
"""

from __future__ import annotations

from model.oracle import Oracle

#: Calls answered by the first state: every state agrees on them.
_SHARED_QUERIES = frozenset({"slot_for_gfn", "vma_at", "guest_cacheable", "config",
                             "memslots", "vmas", "tvm_armed", "sctlr"})


class OracleSet:
    def __init__(self, states):
        self.states: list[Oracle] = _distinct(states)

    def __len__(self) -> int:
        return len(self.states)

    def guest_access(self, vcpu, gfn, kind, value, observed=None):
        return self._observing(lambda s: s.guest_access(vcpu, gfn, kind, value,
                                                        observed=observed), observed)

    def vmm_read(self, hva, observed=None):
        return self._observing(lambda s: s.vmm_read(hva, observed=observed), observed)

    def _observing(self, call, observed):
        if len(self.states) == 1:  # the common case: nothing to merge
            return call(self.states[0])
        allowed_each = [call(s) for s in self.states]
        union = frozenset().union(*allowed_each)
        if observed is not None and observed in union:
            self.states = _distinct(s for s, allowed in zip(self.states, allowed_each)
                                    if observed in allowed)
        return union

    def harvest(self, slot, reported, in_flight=frozenset()):
        results = [s.harvest(slot, reported, in_flight) for s in self.states]
        kept = [s for s, (missing, _extra) in zip(self.states, results) if not missing]
        if kept:
            self.states = _distinct(kept)
            return frozenset(), min((extra for _missing, extra in results), key=len)
        return min(results, key=lambda r: len(r[0]))

    def can_ksm_merge(self, keep, merge) -> bool:
        return all(s.can_ksm_merge(keep, merge) for s in self.states)

    def __getattr__(self, name):
        first = getattr(self.states[0], name)
        if name in _SHARED_QUERIES or not callable(first):
            return first

        if len(self.states) == 1:
            return first

        def each(*args, **kwargs):
            results = [getattr(s, name)(*args, **kwargs) for s in self.states]
            self.states = _distinct(self.states)
            return results[0]
        return each


def _distinct(states) -> list[Oracle]:
    states = list(states)
    if len(states) == 1:
        return states
    out: list[Oracle] = []
    for s in states:
        if s not in out:
            out.append(s)
    return out
