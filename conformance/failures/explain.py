"""``stage2-conformance explain PROPERTY``: what a property family checks.

The registry is built from the suite's own docstrings, so it cannot drift
from what the code checks: the table in :mod:`conformance.monitors` (the
monitor families) and the rules R1–R6 in :mod:`model.oracle` (what the oracle
allows), plus the four families raised outside the monitors:
``guest-observation``, ``host-observation``, ``dirty-log-harvest`` (the
oracle's comparisons in :mod:`conformance.machine`) and ``candidate-error``.

Every family's text cites the reference (``reference-kvm-arm64-stage2.md``:
``§N.M`` sections, invariants such as ``T1`` or ``D2`` from its §9, and KVM's
cache-maintenance promises ``G-C1``–``G-C4`` from §6.5); :func:`explain`
prints the cited invariants and section titles with the rule, so the
explanation stands on its own.
"""

from __future__ import annotations

import re
import textwrap

import attrs

#: The reference's invariants (§9) and KVM's cache-maintenance promises (§6.5),
#: quoted so that ``explain`` can print what a family's text cites.
INVARIANTS = {
    'G-C1': 'At the moment a RAM page becomes guest-accessible through a new S2 mapping, the PoC holds the latest data written through host cacheable aliases up to that point (clean to PoC), and no stale clean lines for it remain (invalidate).',
    'G-C2': 'Before any S2 leaf becomes executable, the I-cache has been invalidated to PoU for that granule after the data was cleaned (I/D coherence for data present at mapping time).',
    'G-C3': 'When the guest changes SCTLR_EL1.{M,C} while TVM trapping is armed, and on the first set/way op, all guest RAM currently mapped at S2 is cleaned+invalidated to PoC before the guest continues.',
    'G-C4': "After unmap (e.g. swap-out, migration via notifier), the page is clean to PoC so the host's subsequent DMA/cacheable access sees the guest's non-cacheable writes and cannot be shadowed by stale lines.",
    'S1': 'Well-formed: every valid non-L3 entry is a table or a block at a level ≥ MIN_BLOCK_LEVEL; no L0 blocks (4K); every L3 valid entry has type=1; blocks/pages are aligned (IPA and OA aligned to the granule).',
    'S2': 'Refcount: for every non-PGD table page T, `refcount(T) == 1 + #non-zero entries(T)` when quiescent; no table page is reachable from two parents; every allocated table page is reachable from the PGD, pending in an RCU free list, or in a memcache (no leaks).',
    'S3': 'No LOCKED entries when quiescent; no entry other than 0, LOCKED (transient), owner annotations (pKVM), valid leaves, valid tables.',
    'S4': 'Attribute encoding: every valid leaf has AF set at creation, SH=IS (non-LPA2), S2AP_R set (KVM never creates R-less guest mappings), MemAttr ∈ {Normal, NC, Device}; Device/NC leaves have XN; leaf prot round-trips through `pte_prot`.',
    'S5': "Empty tables may exist (not required to be pruned), but unmap of a range that covers an entire table's span leaves no table page with zero entries reachable in that span (unmap prunes empty tables in POST order).",
    'G1': 'Memslot fidelity: if `S2(ipa)` is valid then `slot(ipa>>12)` exists, is not being deleted, and the OA equals `pfn_of(hva(ipa))` as of the last completed invalidation for that hva (no stale mapping after an `invalidate_range_end` returns).',
    'G2': 'Containment: a block leaf of size S at IPA base B maps only gfns that all belong to the same memslot, with `uaddr(B) ≡ B (mod S)` and host backing mapped at ≥ S contiguously (hugetlb/THP/PFNMAP).',
    'G3': "Permission soundness: `S2(ipa)` writable ⇒ memslot not READONLY ∧ host mapping was writable when GUP ran (and no invalidation completed since, N2) ∧ (memslot not logging ∨ the gfn's dirty bit is set ∨ the installing vCPU is still inside its fault handler and will set it before resuming — D2). Executable ⇒ memory (not device/NC) ∧ (an instruction-fetch fault happened for this leaf or CTR_EL0.DIC).",
    'G4': "Read-only memslots: guest writes (with syndrome) to RO slots produce `KVM_EXIT_MMIO` with `is_write=1` and never modify the slot's memory; writes without syndrome fail KVM_RUN with `ENOSYS` (or `KVM_EXIT_ARM_NISV` when enabled); reads/execs behave as RAM.",
    'G5': 'Progress: a guest access to an IPA inside a valid memslot, with no concurrent invalidation and enough memory, eventually succeeds after a bounded number of faults (no livelock).',
    'G6': 'Fault routing: faults outside memslots → MMIO exit (data) / prefetch abort injected (instruction) / data abort injected (S1PTW) / instruction skipped (cache maintenance op); IPA ≥ VM IPA size → external abort injected; ≥ PARange → address-size fault injected.',
    'G7': 'Lazy remap is allowed: KVM may unmap more than requested (whole blocks) and rely on refaults; a correct model never requires a mapping to persist except that G5 holds.',
    'T1': 'BBM: no CPU TLB ever holds, for one IPA, two different valid translations, or a translation whose OA/size/memtype differs from the current valid leaf unless the current leaf was installed after an invalidation that removed it (i.e. every valid→different-valid change goes through invalid + broadcast TLBI + DSB first).',
    'T2': 'Removal: after `unmap`/notifier `invalidate_range_start` returns, no CPU TLB holds a translation for any IPA in the range; after `kvm_flush_remote_tlbs*` returns, none holds a writable entry for a wrprotected leaf.',
    'T3': 'Table replacement: after a table PTE is replaced or cleared, no walk-cache or leaf entry for any IPA in its span survives (range/VMID flush) before the table page can be reused.',
    'T4': 'Relaxation: after `relax_perms` on CPU c returns (any result 0/`-EAGAIN`), `TLB_c(ipa)` holds no entry with fewer permissions than the PTE. Other CPUs may still hold weaker entries (allowed).',
    'T5': 'Invalid/AF=0 entries are never cached (model hardware rule); `mkyoung` and installs into empty slots need no TLBI.',
    'T6': 'VMID tagging: TLBIs target the VMID of the page table being modified.',
    'D1': 'Enabling: when `KVM_SET_USER_MEMORY_REGION` adding LOG_DIRTY_PAGES returns (non-INITIALLY_SET mode), no S2 leaf in the slot is writable and no TLB holds a writable entry for it.',
    'D2': "No lost dirty page: for any guest write to gfn g in a logging slot that completes at time t, some harvest whose snapshot is taken at or after t reports g (or g is still set in the live bitmap at the end of the test). Sufficient implementation rule: every fault that makes a logging-slot leaf writable sets g's bit either (i) while still holding `mmu_lock` (≤v6.12; harvests need the write lock, so install+mark is atomic w.r.t. a harvest) or (ii) after the PTE is writable but before the vCPU resumes (v6.13+: after unlock). The forbidden interleaving is: mark → harvest (clears bit, write-protects) → install writable PTE.",
    'D3': 'Harvest re-protect: after `KVM_GET_DIRTY_LOG` (or `KVM_CLEAR_DIRTY_LOG` in manual mode) returns, every gfn reported (cleared) is write-protected at S2 and flushed from all TLBs.',
    'D4': 'Over-report allowed, under-report never; INITIALLY_SET reports all pages once.',
    'D5': 'Granularity: while logging, no new leaf larger than 4K is created in the slot; existing blocks are RO (until split).',
    'D6': 'RO memslots never appear dirty; S1PTW hardware updates of guest PTs appear dirty (page_fault_test expectations).',
    'D7': 'Disabling logging does not invalidate correctness: later faults may recreate blocks (collapse), never with stale contents.',
    'N1': 'After `invalidate_range_start(r)` returns, no S2 leaf maps any hva in r (for all memslots/aliases), and no TLB holds such a translation (T2). The host may then free/migrate/CoW the pages.',
    'N2': 'Between start and end, no fault installs a mapping for r: any fault whose pfn lookup overlapped the invalidation retries (sequence/in_progress check under `mmu_lock`). A fault that checks for retry before taking the lock violates this.',
    'N3': 'After `release`, the S2 is destroyed exactly once; concurrent/later notifier callbacks and walkers observe `pgt == NULL` and do nothing.',
    'N4': 'Aging: `clear_flush_young`/`clear_young`/`test_young` return true iff some leaf in the range had AF=1 at walk time; `clear_*` clears AF on those leaves; only `clear_flush_young` flushes the VMID. No aging operation changes OA/permissions or unmaps.',
    'N5': 'Host permission upgrades produce no KVM unmapping (no start/end for upgrades after 2023 rework); KVM upgrades S2 permissions only through its own faults.',
    'N6': 'No page reference is held by S2 mappings: after a fault completes, the GUP reference count delta is zero.',
    'C1': 'Before a cacheable leaf becomes valid, the target granule was cleaned+invalidated to PoC *after* the last host cacheable write.',
    'C2': 'Before a leaf becomes executable (map with X, or relax adding X), the I-cache was invalidated to PoU for the granule after the D-side clean (PoU or PoC).',
    'C3': 'After unmap of a cacheable leaf, the granule was cleaned+invalidated to PoC after the TLBI (order matters: CMO before TLBI would let the guest re-dirty lines).',
    'C4': 'A guest change of SCTLR_EL1.{M,C} while TVM is armed, or the first set/way op, results in a full clean+invalidate of all S2-mapped guest RAM before the guest continues; TVM is armed at every vCPU reset.',
    'C5': 'Split/create_unlinked perform no CMO and no TLBI for the new (unlinked) tables; only the BBM of the replaced block does TLBI.',
    'L1': 'No shared walker ever writes an entry without a successful cmpxchg from the value it observed.',
    'L2': 'A table page that was reachable while shared walkers may be running is not freed before an RCU grace period; exclusive-only frees may be immediate.',
    'L3': 'The fault path never restructures tables (split/collapse/alloc) under a lock mode where other restructurers may run unless using BBM with LOCKED (pre-v6.2 model: never under read lock).',
    'L4': 'Walkers that drop `mmu_lock` (resched) revalidate `mmu->pgt` and tolerate concurrent teardown.',
    'L5': 'At EL2 (pKVM) no SHARED walk is accepted.',
}
#: Section titles of the reference, for the sections the families cite.
SECTIONS = {
    '0': 'Provenance (what was actually read)',
    '1': 'Stage-2 descriptor format (4 KiB granule)',
    '1.1': 'Geometry',
    '1.2': 'Descriptor bit layout as KVM uses it (non-LPA2, 4K)',
    '1.3': '`enum kvm_pgtable_prot` → descriptor (`stage2_set_prot_attr`)',
    '1.4': 'Invalid descriptors',
    '1.5': 'Hardware walk, TLB caching rules, and what the ESR tells KVM',
    '2': 'The `kvm_pgtable` walker framework (`arch/arm64/kvm/hyp/pgtable.c`)',
    '2.1': 'Objects',
    '2.2': 'Walk algorithm (paraphrase)',
    '2.3': '`mm_ops` contract',
    '2.4': 'Break-before-make primitives',
    '2.5': 'Operations',
    '2.5.1': 'Operation summary (v6.12)',
    '2.6': 'TLB invalidation primitives (hyp side, `arch/arm64/kvm/hyp/{vhe,nvhe}/tlb.c`)',
    '3': 'The fault path (`arch/arm64/kvm/mmu.c`)',
    '3.1': '`kvm_handle_guest_abort(vcpu)` decision tree (v6.6; later deltas in brackets)',
    '3.2': '`user_mem_abort()` step by step (v6.6, with v6.13+ deltas)',
    '3.2.1': 'Install decision table (what the fault path does to the S2)',
    '3.3': 'Huge-mapping eligibility (`fault_supports_stage2_huge_mapping`)',
    '3.4': 'THP adjustment (`transparent_hugepage_adjust`, `get_user_mapping_size`)',
    '3.5': 'Device / MMIO mappings',
    '3.6': '`handle_access_fault`',
    '4': 'Dirty logging',
    '4.1': 'State and configuration',
    '4.2': 'Enabling (`kvm_arch_commit_memory_region`, v6.4+)',
    '4.3': 'Fault behaviour while logging',
    '4.4': '`KVM_GET_DIRTY_LOG` (`kvm_get_dirty_log_protect`, under `slots_lock`)',
    '4.5': '`KVM_CLEAR_DIRTY_LOG` and `kvm_arch_mmu_enable_log_dirty_pt_masked`',
    '4.6': 'Disabling',
    '4.7': 'Guarantees userspace relies on (model invariants D1–D6 in §9)',
    '5': 'MMU notifiers (`virt/kvm/kvm_main.c`, `include/linux/mmu_notifier.h`)',
    '5.1': 'Generic machinery (v6.6 text; v6.8+ switched the tracked range to gfns)',
    '5.2': 'arm64 handlers (`arch/arm64/kvm/mmu.c`)',
    '5.3': 'The teardown race (historical)',
    '5.4': '"Notify on PTE permission upgrades" (Alistair Popple, May 2023) and why KVM must not zap on upgrades',
    '6': 'Cache maintenance',
    '6.1': 'Why it is needed (non-FWB hardware)',
    '6.2': 'What KVM does (v6.x)',
    '6.3': 'TVM trapping and `kvm_toggle_cache`',
    '6.4': 'Set/way operations (`access_dcsw`, `kvm_set_way_flush`)',
    '6.5': "What KVM promises vs. what remains userspace's job",
    '7': 'Concurrency design',
    '7.1': 'Locks and who holds what (v6.2–v6.12 unless noted)',
    '7.2': 'Concurrent actors and allowed races',
    '7.3': 'RCU-protected traversal ("Protect stage-2 traversal with RCU", v6.2)',
    '7.4': 'The unlinked-subtree (table-collapse) problem',
    '7.5': 'The fast-path permission-relaxation question',
    '7.6': 'pKVM and EL2 (no RCU)',
    '8': 'Historical real bugs / fixes',
    '9': 'Properties a correct implementation guarantees (checkable invariants)',
    '9.1': 'Structural (page-table shape)',
    '9.2': 'Translation correctness (guest-visible)',
    '9.3': 'TLB / break-before-make',
    '9.4': 'Dirty logging',
    '9.5': 'MMU notifier coherence (host-visible)',
    '9.6': 'Cache maintenance (non-FWB model; FWB: C1/C3/C4 vacuous)',
    '9.7': 'Concurrency',
    '9.8': 'Selftest oracles to mirror',
    '9.9': 'Suggested executable-model structure (hints)',
    '10': 'Open questions / uncertainties',
}


#: Families raised outside the monitors: (source, text, oracle rules applied).
EXTRA = {
    "guest-observation": (
        "oracle",
        "A guest read, write or instruction fetch gave an outcome (a value, or an "
        "MMIO/EFAULT exit) outside the set the oracle allows: the last value "
        "written, unless the cache rules make the page indeterminate for this "
        "observer; an exit exactly where there is no memslot, a read-only slot or "
        "no VMA. Typical causes: a mapping to the wrong or a stale host page, "
        "missing clean+invalidate before mapping with the guest's caches off, "
        "missing I-cache invalidation before making a page executable "
        "[§3.1, §5.1, §6.5, §9.2 G4/G6].",
        ("R1", "R2", "R3", "R4", "R6")),
    "host-observation": (
        "oracle",
        "A VMM read of guest memory through its own mapping (an hva) gave a value "
        "the oracle does not allow: usually data the guest wrote with its caches off "
        "is shadowed by a stale cache line because the page was not cleaned to PoC "
        "when it was unmapped [§6.5 G-C4].",
        ("R1", "R3", "R4")),
    "dirty-log-harvest": (
        "oracle",
        "KVM_GET_DIRTY_LOG did not report a gfn the guest wrote in that memslot "
        "since logging was enabled or since the last harvest (over-reporting is "
        "allowed and counted) [§4.7, §9.4 D2/D4].",
        ("R5",)),
    "candidate-error": (
        "platform",
        "The candidate did not behave like a candidate, so nothing about the "
        "stage-2 rules can be concluded: KIND is 'raised' (the constructor, a "
        "method or an RCU callback raised), 'bad-return' (wrong return type: "
        "handle_guest_abort must return an Exit, get_dirty_log a set of gfns inside "
        "the slot, the aging callbacks a bool, everything else None), 'timeout' (a "
        "call did not return within 10 s or made more than 200,000 service calls) "
        "or 'import' (the registered entry point cannot be imported). Reported as "
        "[candidate-error: KIND] in step N: ... ; see docs/candidate-protocol.md "
        "section 9.",
        ()),
}


@attrs.frozen
class Family:
    """One property family (or oracle rule) and what it cites."""

    name: str
    source: str  # "monitor", "oracle", "platform" or "oracle rule"
    text: str
    rules: tuple[str, ...] = ()  # oracle rules the family applies

    @property
    def invariants(self) -> list[str]:
        return cited_invariants(self.text)

    @property
    def sections(self) -> list[str]:
        return cited_sections(self.text)


def _clean(text: str) -> str:
    return " ".join(text.replace("``", "").split())


def monitor_families(doc: str | None = None) -> dict[str, str]:
    """The ``name -> text`` table of :mod:`conformance.monitors`' docstring
    (an RST simple table: a row starts with ````name````, continuation lines
    are indented)."""
    if doc is None:
        from conformance.platform import monitors

        doc = monitors.__doc__ or ""
    rows: dict[str, list[str]] = {}
    current = None
    inside = False
    for line in doc.splitlines():
        if line.startswith("===="):
            if inside:
                break
            inside = True
            continue
        if not inside:
            continue
        m = re.match(r"``([a-z0-9-]+)``\s+(.*)", line)
        if m:
            current = m.group(1)
            rows[current] = [m.group(2)]
        elif current is not None and line.strip():
            rows[current].append(line.strip())
    return {name: _clean(" ".join(parts)) for name, parts in rows.items()}


def oracle_rules(doc: str | None = None) -> dict[str, str]:
    """``R1``…``R6`` of :mod:`model.oracle`'s docstring: ``id -> text``."""
    if doc is None:
        from model import oracle

        doc = oracle.__doc__ or ""
    rules: dict[str, list[str]] = {}
    current = None
    for line in doc.splitlines():
        m = re.match(r"(R\d+) (.*)", line)
        if m:
            current = m.group(1)
            rules[current] = [m.group(2)]
        elif current is not None and line.startswith("   ") and line.strip():
            rules[current].append(line.strip())
        elif current is not None and not line.strip():
            current = None
    return {rid: _clean(" ".join(parts)) for rid, parts in rules.items()}


def registry() -> dict[str, Family]:
    """Every property family by name, and the oracle rules by id."""
    found: dict[str, Family] = {}
    for name, text in monitor_families().items():
        found[name] = Family(name, "monitor" if name != "forward-progress" else "platform",
                             text)
    rules = oracle_rules()
    for name, (source, text, applied) in EXTRA.items():
        found[name] = Family(name, source, text, tuple(r for r in applied if r in rules))
    for rid, text in rules.items():
        found[rid] = Family(rid, "oracle rule", text)
    return found


def family_names() -> list[str]:
    """The property family names (the oracle rule ids excluded)."""
    return sorted(n for n, f in registry().items() if f.source != "oracle rule")


_REFS = re.compile(r"[\(\[]([^\)\]]*)[\)\]]")
_INV = re.compile(r"(?<![\w-])(G-C|[SGTDNCL])(\d)(?:\s*(?:–|-|\.\.)\s*(?:G-C|[SGTDNCL])?(\d))?")
_SEC = re.compile(r"§(\d+(?:\.\d+)*)")


def cited_invariants(text: str) -> list[str]:
    """Invariant ids cited in the bracketed references of ``text``, ranges
    expanded (``D1–D5``, ``G-C1..G-C4``, ``T1/T3``)."""
    out: list[str] = []
    for ref in _REFS.findall(text):
        for prefix, first, last in _INV.findall(ref):
            for n in range(int(first), int(last or first) + 1):
                ident = f"{prefix}{n}"
                if ident in INVARIANTS and ident not in out:
                    out.append(ident)
    return out


def cited_sections(text: str) -> list[str]:
    """Reference sections (``§N.M``) cited in ``text`` (not DESIGN's)."""
    out: list[str] = []
    for sec in _SEC.findall(re.sub(r"DESIGN §[\d.]+", "", text)):
        if sec not in out:
            out.append(sec)
    return out


def explain(name: str) -> str | None:
    """The explanation of a family (or oracle rule), or ``None`` if unknown."""
    reg = registry()
    family = reg.get(name) or reg.get(name.upper()) or reg.get(name.lower())
    if family is None:
        return None
    lines = [f"{family.name} ({family.source})", "", *_wrap(family.text, "  ")]
    texts = [family.text]
    if family.rules:
        lines += ["", "oracle rules applied (model/oracle.py, docs/oracle.md):"]
        for rid in family.rules:
            lines += _wrap(f"{rid} {reg[rid].text}", "  ", "     ")
            texts.append(reg[rid].text)
    invariants, sections = [], []
    for t in texts:
        invariants += [i for i in cited_invariants(t) if i not in invariants]
        sections += [s for s in cited_sections(t) if s not in sections]
    if invariants:
        lines += ["", "reference invariants cited:"]
        for ident in invariants:
            lines += _wrap(f"{ident:<5} {INVARIANTS[ident]}", "  ", "        ")
    if sections:
        lines += ["", "reference sections (reference-kvm-arm64-stage2.md):"]
        for sec in sections:
            title = SECTIONS.get(sec) or SECTIONS.get(sec.split(".")[0], "")
            lines.append(f"  §{sec:<6} {title}".rstrip())
    return "\n".join(lines) + "\n"


def summary() -> str:
    """One line per family: name, source and the first clause of its text."""
    reg = registry()
    names = family_names()
    width = max(len(n) for n in names)
    lines = []
    for name in names:
        f = reg[name]
        first = textwrap.shorten(f.text, 100, placeholder=" ...")
        lines.append(f"{name:<{width}}  {f.source:<8}  {first}")
    rules = sorted(n for n, f in reg.items() if f.source == "oracle rule")
    lines.append("")
    lines.append(f"oracle rules: {', '.join(rules)} (explain R1 ... for the text)")
    return "\n".join(lines) + "\n"


def _wrap(text: str, indent: str, subsequent: str | None = None) -> list[str]:
    return textwrap.wrap(text, width=92, initial_indent=indent,
                         subsequent_indent=subsequent if subsequent is not None else indent,
                         break_on_hyphens=False) or [indent]
