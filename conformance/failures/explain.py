"""``stage2-conformance explain PROPERTY``: what a property family checks.

The registry is built from the suite's own docstrings, so it cannot drift
from what the code checks: the table in :mod:`conformance.platform.monitors` (the
monitor families) and the rules R1–R7 in :mod:`model.oracle` (what the oracle
allows), plus the four families raised outside the monitors:
``guest-observation``, ``host-observation``, ``dirty-log-harvest`` (the
oracle's comparisons in :mod:`conformance.machines.sequential`) and ``candidate-error``.

Every family's text cites the suite's rules page (``docs/rules.md``:
``§N.M`` sections, invariants such as ``T1`` or ``D2`` from its §9, and KVM's
cache-maintenance promises ``G-C1``–``G-C4`` from §6.5); :func:`explain`
prints the cited invariants and section titles with the rule, so the
explanation stands on its own.
"""

from __future__ import annotations

import re
import textwrap

import attrs

#: Invariants of docs/rules.md §9 and KVM's cache-maintenance promises
#: (rules §6.5), in the page's words, so that ``explain`` prints what a
#: family's text cites. Keep them in step with docs/rules.md.
INVARIANTS = {
    'G-C1': 'When a RAM page first becomes guest-accessible through a new stage-2 mapping, PoC holds everything the host wrote to it through cacheable aliases and no stale line for it remains (clean+invalidate).',
    'G-C2': 'Before a stage-2 leaf becomes executable, the instruction cache has been invalidated to PoU over its granule, after the data side was cleaned, so instruction fetches see what memory held when the mapping was made.',
    'G-C3': 'A trapped guest change of `SCTLR_EL1.{M,C}` while TVM is armed, and the first set/way op, clean and invalidate to PoC all guest RAM currently mapped at stage 2 before the guest continues.',
    'G-C4': 'After a page is unmapped from stage 2 (swap-out, migration, any notifier unmap) it is clean to PoC, so later cacheable host reads and DMA see what the guest wrote with its caches off.',
    'S1': "Every valid entry at L0–L2 is a table or, at L1–L2 only, a block; every valid L3 entry has the page type bit; every leaf's IPA and output address are aligned to its size.",
    'S2': 'When quiescent, each non-root table page has refcount 1 + its non-zero entries and a single parent, and every allocated table page is reachable from the root, waiting for an RCU grace period, or in a memcache: nothing leaks.',
    'S3': 'When quiescent, no entry is LOCKED, and every entry is zero, an owner annotation (pKVM), a valid leaf or a valid table.',
    'S4': 'Every leaf KVM creates has AF set, is Inner-Shareable, has read permission, has MemAttr Normal, Normal-NC or Device (XN for the last two), and decodes back to the protection requested.',
    'S5': "Empty tables may remain, but an unmap covering a table's whole span leaves no empty table reachable in it (pruned in post-order).",
    'G1': "Stage 2 maps an IPA only inside a live memslot (not being deleted), and to the page the host backs that gfn's hva with as of the last completed invalidation of that hva.",
    'G2': 'A block of size S at IPA B lies entirely in one memslot, has its gfn and hva congruent modulo S, and is backed by at least S of contiguous, S-aligned host memory (THP, hugetlb or PFNMAP).',
    'G3': "A leaf is writable only if the memslot is writable, the host PTE was writable when GUP ran with no invalidation completed since (N2), and, in a logging slot, its gfn is marked dirty or will be before the installing vCPU resumes (D2); it is executable only for Normal memory and, by KVM's policy, after an instruction fetch or with `CTR_EL0.DIC`.",
    'G4': 'A guest write with a valid syndrome to a read-only memslot exits to the VMM as an MMIO write and leaves memory unchanged (without a syndrome `KVM_RUN` fails with `ENOSYS`, or exits `KVM_EXIT_ARM_NISV` when enabled); reads and fetches behave as RAM.',
    'G5': 'An access to an IPA inside a memslot, with no invalidation running and memory available, completes after a bounded number of stage-2 faults.',
    'G6': "Outside every memslot a data access exits as MMIO, a fetch gets a prefetch abort, a stage-1 walk a data abort, and a cache-maintenance instruction is skipped; beyond the VM's IPA size an external abort is injected, beyond PARange an address-size fault.",
    'G7': 'KVM may unmap more than asked (whole blocks) and rely on re-faults: no mapping has to persist beyond what G5 needs.',
    'T1': 'BBM: no TLB ever holds two different valid translations for one IPA, or one whose output, size or memory type differs from the current leaf; every such change goes invalid → broadcast TLBI (+DSB) → new entry.',
    'T2': 'When an unmap or `invalidate_range_start` returns, no TLB translates any IPA of the range; when the flush after a write-protect returns, no TLB holds a writable entry for a protected leaf.',
    'T3': 'When a table entry is cleared or replaced, no walk-cache or leaf entry for any IPA in the span it covered survives (range or VMID-wide invalidation), and the table page is not freed or reused before that.',
    'T4': "When `relax_perms` returns on a CPU, with 0 or `-EAGAIN`, that CPU's TLB holds no entry for the IPA with fewer permissions than the leaf; other CPUs may still hold weaker entries.",
    'T5': 'Invalid and AF=0 entries are never cached, so setting AF and filling an empty entry need no TLBI.',
    'T6': 'Every TLBI targets the VMID of the page table being changed.',
    'T7': 'A fault never lowers the permissions of a valid leaf: where the leaf it would install differs from the existing one only in permissions, it leaves the entry alone (§2.5 map step 3).',
    'D1': 'By the time the memslot update that turns logging on returns (without `INITIALLY_SET`), every stage-2 leaf of the slot is read-only and no TLB still grants write access to any of its pages.',
    'D2': 'Every completed guest write to a logged gfn is reported by a harvest whose snapshot is taken after it, or is still in the bitmap at the end; it suffices that every fault making a logging-slot leaf writable marks the gfn under `mmu_lock` (≤v6.12) or after unlocking but before the vCPU resumes (v6.13+) — the forbidden order is mark → harvest (clears and protects) → install writable.',
    'D3': 'When `KVM_GET_DIRTY_LOG` (or `KVM_CLEAR_DIRTY_LOG` in manual mode) returns, every gfn it reported or cleared is write-protected at stage 2 and flushed from every TLB.',
    'D4': 'Harvests may report gfns that were not written, never omit one that was; with `INITIALLY_SET` every page is reported once.',
    'D5': 'While a slot logs, no leaf larger than 4 KiB is created in it, and a block left from before stays read-only until it is split.',
    'D6': 'Read-only memslots are never reported dirty; hardware stage-1 walk updates (AF/DBM) to guest page tables are.',
    'D7': 'Turning logging off is always safe: later faults may rebuild blocks by collapse, never with stale contents.',
    'N1': 'When `invalidate_range_start` returns, no stage-2 leaf, in any memslot or alias, maps an hva of the range and no TLB holds such a translation, so the host may free, move or copy-on-write the pages.',
    'N2': 'Between `invalidate_range_start` and `_end` no fault installs a mapping for the range: a fault whose pfn lookup overlapped the invalidation sees the sequence or in-progress count change under `mmu_lock` and retries (a check before taking the lock is not enough).',
    'N3': '`release` tears the stage 2 down exactly once, and every later notifier callback or walker finds no page table and does nothing.',
    'N4': 'The aging calls report young exactly when some leaf in the range had AF set; the clearing forms clear only AF; only `clear_flush_young` flushes the VMID; no aging call changes an output, a permission or a mapping.',
    'N5': "A host permission upgrade causes no stage-2 unmapping; stage-2 permissions grow only through KVM's own faults.",
    'N6': 'Stage-2 mappings hold no page references: every reference GUP takes during a fault is dropped before the fault handler returns.',
    'C1': "Before a cacheable leaf becomes valid, its whole granule is cleaned and invalidated to PoC after the host's last cacheable write to it.",
    'C2': "Before a leaf becomes executable (mapped with X, or relaxed to gain X), its granule's I-cache lines are invalidated to PoU, after the data side was cleaned.",
    'C3': 'After a cacheable leaf is unmapped, its granule is cleaned and invalidated to PoC after the TLBI, not before (a clean before the TLBI lets the guest dirty the lines again).',
    'C4': 'TVM is armed at every vCPU reset, and a trapped change of `SCTLR_EL1.{M,C}` or the first set/way op with TVM clear cleans and invalidates all guest RAM mapped at stage 2 before the guest continues.',
    'C5': 'Splitting a block and building an unlinked subtree do no CMO and no TLBI for the new tables; only the break of the replaced block invalidates.',
    'L1': 'A shared (read-lock) walker changes an entry only by a successful compare-and-exchange from the value it read.',
    'L2': 'A table that shared walkers could have reached is freed only after an RCU grace period; one that only exclusive walkers could see may be freed at once.',
    'L3': 'The fault path restructures tables (allocate, split, collapse) only where no other restructurer can run, or through break-before-make with the LOCKED marker (v6.2+; before v6.2 never under the read lock).',
    'L4': 'A walker that drops `mmu_lock` to reschedule re-reads the page-table root afterwards and copes with it being gone.',
    'L5': 'No shared walk runs at EL2 (pKVM), which has no RCU.',
}
#: Section titles of docs/rules.md, for the sections the families cite.
SECTIONS = {
    '0': 'Sources',
    '1': 'Stage-2 descriptor format (4 KiB granule)',
    '1.1': 'Geometry',
    '1.2': 'Descriptor bits KVM uses',
    '1.3': 'From protection flags to descriptor bits',
    '1.4': 'Invalid descriptors',
    '1.5': 'Hardware rules and the fault syndrome',
    '2': 'The kvm_pgtable walker (arch/arm64/kvm/hyp/pgtable.c)',
    '2.1': 'Objects and walk flags',
    '2.2': 'Walk algorithm',
    '2.3': 'mm_ops and the refcount rule',
    '2.4': 'Break-before-make and the TLBI each change needs',
    '2.5': 'Operations',
    '2.5.1': 'Operation summary (v6.12)',
    '2.6': 'TLB invalidation primitives',
    '3': 'The fault path (arch/arm64/kvm/mmu.c)',
    '3.1': 'kvm_handle_guest_abort',
    '3.2': 'user_mem_abort, step by step',
    '3.2.1': 'What the fault path does to the tables',
    '3.3': 'Huge-mapping eligibility',
    '3.4': 'THP adjustment and GUP references',
    '3.5': 'Device and MMIO mappings',
    '3.6': 'Access-flag faults',
    '4': 'Dirty logging',
    '4.1': 'State and configuration',
    '4.2': 'Turning logging on',
    '4.3': 'Faults while logging',
    '4.4': 'KVM_GET_DIRTY_LOG',
    '4.5': 'KVM_CLEAR_DIRTY_LOG and the masked write-protect',
    '4.6': 'Turning logging off',
    '4.7': 'What userspace may rely on',
    '5': 'MMU notifiers (virt/kvm/kvm_main.c)',
    '5.1': 'The generic sequence',
    '5.2': 'The arm64 handlers',
    '5.3': 'The teardown race',
    '5.4': 'Host permission upgrades',
    '6': 'Cache maintenance',
    '6.1': 'Why it is needed without FWB',
    '6.2': 'What KVM cleans, and when',
    '6.3': 'TVM trapping and kvm_toggle_cache',
    '6.4': 'Set/way operations',
    '6.5': "KVM's promises and the VMM's share",
    '6.6': 'The gap: pages dropped by a map-time block split are not cleaned',
    '7': 'Concurrency',
    '7.1': 'Locks',
    '7.2': 'Who races with whom',
    '7.3': 'RCU-protected walks',
    '7.4': 'Collapsing a table others may be walking',
    '7.5': 'Permission relaxation without broadcast',
    '7.6': 'pKVM and EL2',
    '8': 'Real bugs the rules come from',
    '9': 'Invariants',
    '9.1': 'Structure (S)',
    '9.2': 'Guest-visible translation (G)',
    '9.3': 'TLB and break-before-make (T)',
    '9.4': 'Dirty logging (D)',
    '9.5': 'MMU notifiers (N)',
    '9.6': 'Cache maintenance (C)',
    '9.7': 'Concurrency (L)',
    '9.8': 'Selftest oracles',
    '9.9': 'Model structure',
    '10': 'Open points',
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
    """The ``name -> text`` table of :mod:`conformance.platform.monitors`' docstring
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
    """``R1``…``R7`` of :mod:`model.oracle`'s docstring: ``id -> text``."""
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
        lines += ["", "invariants cited (docs/rules.md §9):"]
        for ident in invariants:
            lines += _wrap(f"{ident:<5} {INVARIANTS[ident]}", "  ", "        ")
    if sections:
        lines += ["", "sections cited (docs/rules.md):"]
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
