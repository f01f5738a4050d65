"""The sequential conformance machine (DESIGN §5).

One ``RuleBasedStateMachine`` subclass per candidate (see
:func:`machine_for`): every rule drives the platform (and so the candidate) and
the oracle with the same operation, compares what the guest or the VMM
observed with what the oracle allows, and lets the monitors check the rest.
Hardware nondeterminism (TLB evictions, speculative line fills, evictions) are
rules too, so they shrink like everything else.
"""

from __future__ import annotations

import collections

import attrs
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from conformance import profiles  # noqa: F401 - pins generation constants (seed = programs)
from conformance.errors import ConformanceFailure, PropertyViolation
from conformance.findings import BLOCK_SPLIT_NO_CMO, check_declared
from conformance.machines.boot import Boot
from conformance.machines.steps import (
    AGING, CACHE_CONTROL, HOST_OPS, INDEX, MEMSLOT_OPS, PAGES, SCTLR_FOR, SLOT0_MOSTLY,
    VCPU, _spread, checked, event, note, publish_failure)
from conformance.platform.core import Platform
from conformance.protocol import MemslotChange
from model.cache import GARBAGE
from model.host import PAGE, THP_SIZE
from model.oracle import Oracle
from strategies.layouts import configs, layouts


class Stage2Machine(Boot, RuleBasedStateMachine):
    """Subclassed per candidate by :func:`machine_for`."""

    candidate_cls: type = None  # type: ignore[assignment]
    #: Which machine this is (``sequential``, ``parallel``): recorded in
    #: replay files so that a replay runs the same machine.
    kind = "sequential"
    #: May slot 0 cross a 1 GiB IPA boundary (``strategies.layouts.layouts``)?
    layouts_cross_1g = False
    #: The candidate's validated ``known_findings`` (docs/findings.md).
    known_findings: frozenset[str] = frozenset()
    #: (failure, step labels, machine) of the most recent failing program; after
    #: a Hypothesis run this is the shrunk one (it is replayed last).
    last_failure = None
    #: Cost counters summed over every passing program of this machine class.
    totals: collections.Counter = collections.Counter()
    #: For each ``event()`` label, how many passing programs produced it at
    #: least once (what ``--hypothesis-show-statistics`` shows as percentages).
    event_programs: collections.Counter = collections.Counter()

    def __init__(self):
        super().__init__()
        self.platform: Platform | None = None
        self.oracle: Oracle | None = None
        self.steps = 0
        self.trace: list[str] = []
        self.calls: list[tuple[str, dict]] = []  # (rule, kwargs): the replay
        self.failed = False
        self.next_value = 0
        self.origin: dict[int, str] = {GARBAGE: "never-written memory (garbage)",
                                       0: "zero (a fresh page)"}
        self.events: set[str] = set()
        self.holes: list[tuple[int, int]] = []
        #: (step, where, allowed, observed) per guest access and VMM read, for
        #: the report's expected-vs-observed column (see record_observation).
        self.observations: list[tuple] = []

    @property
    def live(self) -> bool:
        return self.platform is not None and not self.platform.released

    @property
    def booted(self) -> bool:
        """Guest accesses stay possible after the VMM exited (a parallel
        step's ``release``): each must then exit (oracle R8)."""
        return self.platform is not None

    def _event(self, label: str) -> None:
        """A Hypothesis ``event()`` (statistics), also counted per program."""
        self.events.add(label)
        event(label)

    def _explain(self, outcome) -> str:
        if outcome.exit is not None:
            return outcome.describe()
        return f"value {outcome.value} ({self.origin.get(outcome.value, 'unknown')})"

    # -------------------------------------------------------- observations
    def record_observation(self, where: tuple, allowed, got) -> None:
        """Remember what an observer saw and what the oracle allowed in this
        step, for the failure report (:mod:`conformance.failures.report`). ``where`` is
        ``(vcpu, kind, ipa)`` for a guest access and ``("vmm", "read", hva)``
        for a VMM read; ``allowed`` is the oracle's set, ``got`` the
        observation (formatted only when a report is written)."""
        self.observations.append((self.steps, where, allowed, got))

    # --------------------------------------------------------------- guest
    def _guest_access(self, vcpu, where, kind):
        self._guest_access_gfn(self._vcpu(vcpu), self._gfn(where), kind)

    def _guest_access_gfn(self, vcpu, gfn, kind):
        if kind == "exec" and self.oracle.slot_for_gfn(gfn) is None:
            kind = "read"  # instruction fetches from MMIO inject aborts; not modelled
        value = self._value(f"guest write by vCPU{vcpu}") if kind == "write" else None
        got = self.platform.guest_access(vcpu, gfn << 12, kind, value)
        allowed = self.oracle.guest_access(vcpu, gfn, kind, value, observed=got)
        self.record_observation((vcpu, kind, gfn << 12), allowed, got)
        self._event(f"guest {kind}: {got.exit.value if got.exit else 'value'}")
        slot = self.oracle.slot_for_gfn(gfn)
        if got not in allowed and got.exit is None and slot is not None and \
                self._known_finding(slot.gfn_to_hva(gfn), got.value):
            return
        if got not in allowed:
            mode = "caches on" if self.oracle.guest_cacheable(vcpu) else "MMU/caches off"
            want = " or ".join(sorted(self._explain(o) for o in allowed))
            raise PropertyViolation(
                "guest-observation",
                f"vCPU{vcpu} ({mode}) {kind} of IPA {gfn << 12:#x} (gfn {gfn:#x}) gave "
                f"{self._explain(got)}; a correct implementation gives {want}")

    def _guest_run(self, vcpu, where, kind, pages):
        """``pages`` pages spread evenly over the 2 MiB window holding the page
        at ``where``, that page included (1: just that page)."""
        vcpu = self._vcpu(vcpu)
        for gfn in _spread(self._gfn(where), pages):
            self._guest_access_gfn(vcpu, gfn, kind)

    # Three rules rather than one with a ``kind``: Hypothesis picks rules
    # uniformly, and guest accesses should be a good share of every program.
    # ``pages`` > 1 is a guest memset or page-cache fill: guests touch memory
    # in runs, which is what makes a block mapping pay off and a later unmap,
    # split or collapse cover many pages.
    @precondition(lambda self: self.booted)
    @rule(vcpu=VCPU, where=INDEX, pages=PAGES)
    @checked
    def guest_read(self, vcpu, where, pages):
        """vCPU ``vcpu`` loads from the page at ``where`` (and from ``pages`` - 1
        more in its 2 MiB window), retried after every RESUME as the vCPU run
        loop does."""
        self._guest_run(vcpu, where, "read", pages)

    @precondition(lambda self: self.booted)
    @rule(vcpu=VCPU, where=INDEX, pages=PAGES)
    @checked
    def guest_write(self, vcpu, where, pages):
        """vCPU ``vcpu`` stores a new value to the page at ``where`` (and to
        ``pages`` - 1 more in its 2 MiB window)."""
        self._guest_run(vcpu, where, "write", pages)

    @precondition(lambda self: self.booted)
    @rule(vcpu=VCPU, where=INDEX)
    @checked
    def guest_fetch(self, vcpu, where):
        """vCPU ``vcpu`` fetches an instruction from the page at ``where``."""
        self._guest_access(vcpu, where, "exec")

    @precondition(lambda self: self.live)
    @rule(vcpu=VCPU, op=CACHE_CONTROL)
    @checked
    def guest_cache_control(self, vcpu, op):
        """The guest writes SCTLR_EL1.{M,C}; KVM sees it only while TVM is
        armed for the vCPU."""
        self._write_sctlr(self._vcpu(vcpu), SCTLR_FOR[op])

    # Its own rule, not an op of guest_cache_control: DC CISW is another
    # instruction, and as a rule swarm testing switches it on by itself, which
    # makes a set/way op in a guest with its caches on common enough to catch
    # what goes wrong there in a few programs.
    @precondition(lambda self: self.live)
    @rule(vcpu=VCPU)
    @checked
    def guest_set_way(self, vcpu):
        """The guest issues a DC CISW set/way op (always trapped, HCR_EL2.TSW)."""
        vcpu = self._vcpu(vcpu)
        self.platform.guest_set_way(vcpu)
        self.oracle.set_way(vcpu)

    def _write_sctlr(self, vcpu, new):
        self.platform.guest_write_sctlr(vcpu, new)
        self.oracle.write_sctlr(vcpu, new)

    def _known_finding(self, hva: int, value: int) -> bool:
        """Is this unexpected observation of ``value`` at ``hva`` the known
        finding block-split-no-cmo, on a candidate that declares it? If so it
        is counted, the oracle adopts the value (R7), and the step goes on."""
        if BLOCK_SPLIT_NO_CMO.id not in self.known_findings:
            return False
        if not self.platform.drops.take(hva):
            return False
        self.oracle.adopt_stale_line(hva, value)
        self.platform.counters[f"known finding: {BLOCK_SPLIT_NO_CMO.id}"] += 1
        self._event(f"known finding: {BLOCK_SPLIT_NO_CMO.id}")
        note(f"known finding {BLOCK_SPLIT_NO_CMO.id} at hva {hva:#x} in step "
             f"{self.steps}: value {value} ({self.origin.get(value, '?')}), see "
             f"{BLOCK_SPLIT_NO_CMO.page}")
        return True

    # ----------------------------------------------------------------- VMM
    @precondition(lambda self: self.live)
    @rule(op=st.sampled_from(["write", "read"]), where=INDEX)
    @checked
    def vmm(self, op, where):
        """The VMM writes or reads guest memory through its mapping (hva)."""
        hva = self._hva(where)
        if hva is None or not self.oracle.vma_at(hva):
            return
        if op == "write":
            value = self._value("VMM write")
            self.platform.vmm_write(hva, value)
            self.oracle.vmm_write(hva, value)
            return
        got = self.platform.vmm_read(hva)
        allowed = self.oracle.vmm_read(hva, observed=got)
        self.record_observation(("vmm", "read", hva), allowed, got)
        if got not in allowed and self._known_finding(hva, got):
            return
        if got not in allowed:
            want = " or ".join(f"{v} ({self.origin.get(v, '?')})" for v in sorted(allowed))
            raise PropertyViolation(
                "host-observation", f"VMM read of hva {hva:#x} gave {got} "
                f"({self.origin.get(got, '?')}); a correct implementation gives {want}")

    @precondition(lambda self: self.live)
    @rule(op=st.sampled_from(HOST_OPS), where=INDEX, huge=st.booleans())
    @checked
    def host_mm(self, op, where, huge):
        """A host mm operation on the page (or 2 MiB window) at ``where``;
        ``ksm_merge`` merges it with the next interesting page."""
        if op == "mmap_again":
            return self._mmap_again(where)
        if op == "ksm_merge":
            return self._ksm_merge(where + 1, where)
        hva = self._hva(where)
        if hva is None:
            return
        start = hva & ~(THP_SIZE - 1) if huge else hva
        end = start + (THP_SIZE if huge else PAGE)
        host = self.platform.host
        if op in ("migrate", "thp_split") and host.pte(hva) is None:
            return
        if op == "thp_split" and not host.pte(hva).huge:
            return
        if op == "thp_collapse" and (not host.thp_possible(hva) or
                                     (host.pte(hva) and host.pte(hva).huge)):
            return
        if op in ("thp_split", "thp_collapse") or (op == "migrate" and host.pte(hva).huge):
            start, end = hva & ~(THP_SIZE - 1), (hva & ~(THP_SIZE - 1)) + THP_SIZE
        if op == "migrate" and not host.pte(hva).huge:
            start, end = hva & ~(PAGE - 1), (hva & ~(PAGE - 1)) + PAGE
        if any(host.vma_at(a) is None for a in (start, end - PAGE)):
            return
        self.platform.host_op(op, start, end)
        self.oracle.host_op(op, start, end)
        if op == "munmap":
            self.holes.append((start, end))
        self._event(f"host: {op}")

    @precondition(lambda self: self.live)
    @rule(op=st.sampled_from(AGING), where=INDEX, huge=st.booleans())
    @checked
    def host_aging(self, op, where, huge):
        """The MMU notifier aging calls (clear_flush_young, clear_young,
        test_young) on the page or its 2 MiB window."""
        hva = self._hva(where)
        if hva is None:
            return
        start = hva & ~(THP_SIZE - 1) if huge else hva
        self.platform.aging(op, start, start + (THP_SIZE if huge else PAGE))

    def _mmap_again(self, which):
        if not self.holes:
            return
        start, end = self.holes.pop(which % len(self.holes))
        self.platform.host_mmap(start, end, thp=False)
        self.oracle.mmap(start, end)

    def _ksm_merge(self, keep, merge):
        a, b = self._hva(keep), self._hva(merge)
        host = self.platform.host
        if a is None or b is None or host.pte(a) is None or host.pte(b) is None:
            return
        if host.pte(a).huge or host.pte(b).huge or not self.oracle.can_ksm_merge(a, b):
            return
        self.platform.host_op("ksm_merge", b, b + PAGE, other=a)
        self.oracle.host_op("ksm_merge", b, b + PAGE, other=a)
        self._event("host: ksm_merge")

    # ------------------------------------------------------------ memslots
    # Set, not toggle: a step that sets logging means the same thing whatever
    # the shrinker deletes before it, so programs shrink further.
    @precondition(lambda self: self.live)
    @rule(which=SLOT0_MOSTLY, on=st.booleans())
    @checked
    def memslot_logging(self, which, on):
        """KVM_SET_USER_MEMORY_REGION setting or clearing KVM_MEM_LOG_DIRTY_PAGES
        (a no-op if already so; its own rule: logging changes drive split,
        collapse and write-protection; mostly on slot 0, the one with 2 MiB
        windows)."""
        if self.slots:
            self._memslot_set_logging(which, on)

    @precondition(lambda self: self.live)
    @rule(op=MEMSLOT_OPS, which=INDEX)
    @checked
    def memslot(self, op, which):
        """KVM_SET_USER_MEMORY_REGION: set or clear dirty logging, delete,
        re-create or move a memslot."""
        if op == "recreate":
            self._memslot_recreate(which)
        elif self.slots and op.startswith("logging "):
            self._memslot_set_logging(which, op == "logging on")
        elif self.slots:
            getattr(self, f"_memslot_{op}")(which)

    def _memslot_set_logging(self, which, on):
        old = self._slot(which)
        if old.log_dirty_pages == on:
            return
        self._change(old, attrs.evolve(old, log_dirty_pages=on), MemslotChange.FLAGS_ONLY)
        self._event(f"dirty logging {'on' if on else 'off'}")

    @precondition(lambda self: self.live)
    @rule(which=INDEX)
    @checked
    def memslot_harvest(self, which):
        """KVM_GET_DIRTY_LOG on a logging slot (a no-op when none logs)."""
        logging = [s for s in self.slots.values() if s.is_logging]
        if not logging:
            return
        slot = logging[which % len(logging)]
        got = self.platform.get_dirty_log(slot)
        missing, extra = self.oracle.harvest(slot, got)
        if extra:
            self._event("dirty log: over-reported")
        if missing:
            gfns = ", ".join(f"{g:#x}" for g in sorted(missing)[:4])
            raise PropertyViolation(
                "dirty-log-harvest", f"get_dirty_log(slot {slot.id}) lost dirty gfn(s) "
                f"{gfns}: the guest wrote them since logging was enabled or last "
                "harvested, but they were not reported (rules §4.7, §9.4 D2)")

    # ------------------------------------------------------------ hardware
    @precondition(lambda self: self.live)
    @rule(op=st.sampled_from(["tlb_evict", "fill", "evict", "ifill", "ievict"]),
          vcpu=VCPU, where=INDEX)
    @checked
    def hardware(self, op, vcpu, where):
        """Free hardware choices: evict a TLB entry of ``vcpu``; speculatively
        fill or evict the D- or I-cache line of the page at ``where``."""
        if op == "tlb_evict":
            return self.platform.hw_tlb_evict(self._vcpu(vcpu), where)
        hva = self._hva(where)
        pte = None if hva is None else self.platform.host.pte(hva)
        if pte is not None:
            self.platform.hw_cache(op, pte.pfn)

    # ------------------------------------------------------------ teardown
    def teardown(self):
        """The VMM exits: ``exit_mmap`` raises the notifier ``release``, then
        the VM is destroyed and every table page and GUP reference must be
        gone (rules §5.2, §9.1 S2, §9.5 N3/N6)."""
        if self.platform is None or self.failed:
            return
        label = f"{self.steps + 1}: teardown (exit_mmap release, destroy, leak checks)"
        self.platform.step = label
        self.trace.append(label)
        try:
            self.platform.exit_mmap()
            self.platform.destroy()
        except ConformanceFailure as exc:
            publish_failure(self, exc)
            raise
        totals = type(self).totals
        totals.update(self.platform.counters)
        totals["examples"] += 1
        totals["steps"] += self.steps
        type(self).event_programs.update(self.events)


def machine_for(name: str, candidate_cls: type, class_name: str | None = None,
                base: type[Stage2Machine] = Stage2Machine,
                min_vcpus: int = 1) -> type[Stage2Machine]:
    """A machine subclass bound to one candidate, with a stable name (so the
    example database keys and test ids are stable per candidate). Machines
    given the same ``class_name`` generate the same programs under a
    derandomized profile, which is how candidates are compared."""
    safe = class_name or "Stage2Machine_" + "".join(c if c.isalnum() else "_" for c in name)

    @initialize(config=configs(candidate_cls.capabilities, min_vcpus),
                layout=layouts(cross_1g=base.layouts_cross_1g))
    @checked
    def boot(self, config, layout):
        self._boot(config, layout)

    return type(safe, (base,),
                {"candidate_cls": candidate_cls, "candidate_name": name, "boot": boot,
                 "known_findings": check_declared(candidate_cls),
                 "__module__": __name__,
                 "totals": collections.Counter(),
                 "event_programs": collections.Counter()})
