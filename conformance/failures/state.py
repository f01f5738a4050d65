"""What a failure report shows of the machine at the failure (DESIGN §7).

Captured when the failure happens (under Hypothesis or in a replay) and
stored in the replay document, so the same report comes out of a live
machine and out of a JSON file read later: the observations of every guest
access and VMM read beside what the oracle allowed, and for the IPAs the
failing step involves, the stage-2 walk, every vCPU's TLB entries, the cache
lines, and a summary of all leaves.
"""

from __future__ import annotations

import re
from typing import Iterable

from model import descriptors as d
from model.geometry import index
from model.memory import PageUse
from model.walker import WalkFault, walk


#: How many IPAs of the failing step get a table walk in the report.
MAX_IPAS = 4
#: How many stage-2 leaves the summary lists.
MAX_LEAVES = 16


# ------------------------------------------------------------------ capture
def observations(machine) -> list[dict]:
    """The machine's recorded observations (``Stage2Machine.observations``)
    as ``{step, observer, expected, observed}`` dicts of text."""
    out = []
    explain = getattr(machine, "_explain", None)
    origin = getattr(machine, "origin", {})
    for step, where, allowed, got in getattr(machine, "observations", ()):
        try:
            if where[0] == "vmm":
                observer = f"VMM {where[1]} of hva {where[2]:#x}"
                expected = " or ".join(f"value {v} ({origin.get(v, '?')})"
                                       for v in sorted(allowed, key=_sort_key))
                observed = "nothing (no page)" if got is None else \
                    f"value {got} ({origin.get(got, '?')})"
            else:
                vcpu, kind, ipa = where
                observer = f"vCPU{vcpu} {kind} of IPA {ipa:#x}"
                fmt = explain or (lambda o: o.describe())
                expected = " or ".join(sorted(fmt(o) for o in allowed))
                observed = fmt(got)
        except Exception as exc:  # never let a report crash the run
            observer, expected, observed = repr(where), "?", f"? ({exc!r})"
        out.append({"step": step, "observer": observer, "expected": expected,
                    "observed": observed})
    return out


def _sort_key(v):
    return (v is None, v if isinstance(v, int) else 0)


_HEX = r"(0x[0-9a-fA-F]+)"
_IPA_RE = re.compile(r"\bIPA " + _HEX)
_GFN_RE = re.compile(r"\bgfn(?:\(s\))? (" + r"0x[0-9a-fA-F]+(?:, 0x[0-9a-fA-F]+)*)")
_HVA_RE = re.compile(r"\bhva " + _HEX)


def involved_ipas(machine, message: str, step_no: int | None, calls: list) -> list[int]:
    """Page-aligned IPAs the failing step is about, most specific first: those
    named in the failure message (IPA, gfn, hva), the address the step's guest
    access or VMM read used, and the gfn its ``where`` argument picks."""
    platform = machine.platform
    found: list[int] = []

    def add(ipa):
        if ipa is not None:
            ipa &= ~0xFFF
            if ipa not in found:
                found.append(ipa)

    message = message or ""
    for m in _IPA_RE.finditer(message):
        add(int(m.group(1), 16))
    for m in _GFN_RE.finditer(message):
        for g in m.group(1).split(", "):
            add(int(g, 16) << 12)
    for m in _HVA_RE.finditer(message):
        add(_hva_to_ipa(platform, int(m.group(1), 16)))
    for step, where, _allowed, _got in getattr(machine, "observations", ()):
        if step == step_no:
            add(_hva_to_ipa(platform, where[2]) if where[0] == "vmm" else where[2])
    if step_no is not None and 1 <= step_no <= len(calls):
        args = calls[step_no - 1][1]
        picks_gfn = "where" in args and args.get("op") != "tlb_evict"  # a TLB index
        if picks_gfn and getattr(machine, "gfns", None):
            try:
                add(machine._gfn(args["where"]) << 12)
            except Exception:  # noqa: BLE001 — best effort
                pass
    return found[:MAX_IPAS]


def _hva_to_ipa(platform, hva: int) -> int | None:
    for slot in platform.memslots.values():
        if slot.userspace_addr <= hva < slot.userspace_addr + (slot.npages << 12):
            return (slot.base_gfn << 12) + (hva - slot.userspace_addr)
    return None


def state_at_failure(machine, message: str, step_no: int | None, calls: list) -> dict:
    """The stage-2 walk and TLB entries for the involved IPAs, and a leaf
    summary, as text lines (``{"ipas", "tree", "tlbs", "leaves"}``)."""
    platform = getattr(machine, "platform", None)
    if platform is None:
        return {"ipas": [], "tree": ["no VM was built (the failure came first)"],
                "tlbs": [], "leaves": []}
    try:
        ipas = involved_ipas(machine, message, step_no, calls)
        tree: list[str] = []
        for ipa in ipas:
            tree.extend(walk_lines(platform, ipa))
        if not ipas:
            tree.append("(the failing step names no IPA; see all leaves below)")
        return {"ipas": [f"{i:#x}" for i in ipas], "tree": tree,
                "tlbs": tlb_lines(platform, ipas), "leaves": leaf_lines(platform),
                "caches": cache_lines(platform, ipas, getattr(machine, "origin", {}))}
    except Exception as exc:  # noqa: BLE001 — a report must never crash a run
        return {"ipas": [], "tree": [f"(could not describe the tables: {exc!r})"],
                "tlbs": [], "leaves": [], "caches": []}


def _memtype(memattr: int) -> str:

    names = getattr(d, "_MEMTYPE_NAMES", {})
    return names.get(memattr, f"MemAttr={memattr:#x}")


def walk_lines(platform, ipa: int) -> list[str]:
    """The architectural walk of ``ipa`` from the PGD, one line per level,
    reading table memory directly (a freed or unlinked table page is shown,
    not treated as an error)."""

    geo = platform.geometry
    gfn = ipa >> 12
    slot = platform.slot_for_gfn(gfn)
    where = (f"slot {slot.id}, hva {slot.gfn_to_hva(gfn):#x}" if slot is not None
             else "in no memslot")
    lines = [f"IPA {ipa:#x} (gfn {gfn:#x}, {where})"]
    if ipa >= geo.ipa_limit:
        return lines + [f"  outside the {geo.ipa_bits}-bit IPA space"]
    if platform.pgd_pfn is None:
        return lines + ["  no PGD installed"]
    page, _ = geo.pgd_slot(ipa)
    pfn, level = platform.pgd_pfn + page, geo.start_level
    while True:
        idx = index(ipa, level)
        use = platform.mem.page_use(pfn)
        entries = platform.mem.tables.get(pfn)
        kind = "PGD  " if use is PageUse.PGD else "table"
        at = f"  L{level} {kind} PA {pfn << 12:#x} [{idx:3d}]"
        if entries is None:
            lines.append(f"{at}: not a table page ({use.value if use else 'unallocated'})")
            break
        pte = entries[idx]
        notes = []
        if use not in (PageUse.TABLE, PageUse.PGD):
            notes.append(f"table page is {use.value if use else 'unallocated'}")
        refcount = platform.mem.refcount.get(pfn)
        if use is not PageUse.PGD and refcount is not None:
            notes.append(f"refcount {refcount}")
        text = d.describe(pte, level)
        lines.append(f"{at}: {text}" + (f"   ({'; '.join(notes)})" if notes else ""))
        if level < 3 and d.is_valid(pte) and d.is_table(pte, level):
            pfn, level = d.pte_pa(pte) >> 12, level + 1
            continue
        break
    return lines


def tlb_lines(platform, ipas: Iterable[int]) -> list[str]:
    """Every vCPU's leaf and walk-cache entries covering ``ipas`` (or all
    entries, up to a limit, when there are none)."""
    ipas = list(ipas)
    out = []
    for vcpu, tlb in enumerate(platform.tlbs):
        out.append(f"vCPU{vcpu}: {len(tlb.leaves)} leaf entr{'y' if len(tlb.leaves) == 1 else 'ies'}"
                   f", {len(tlb.walks)} walk-cache entr{'y' if len(tlb.walks) == 1 else 'ies'}"
                   " in all")
        if not ipas:
            entries = sorted(tlb.leaves.values(), key=lambda e: (e.ipa, e.level))
            out.extend(f"  {_tlb_entry(e)}" for e in entries[:MAX_LEAVES])
            continue
        for ipa in ipas:
            hits = [e for e in tlb.leaves.values() if e.covers(ipa)]
            walks = sorted((w for w in tlb.walks.values() if w.covers(ipa)),
                           key=lambda w: w.level)
            if not hits and not walks:
                out.append(f"  IPA {ipa:#x}: nothing cached")
                continue
            for e in sorted(hits, key=lambda e: e.level):
                out.append(f"  IPA {ipa:#x} hits leaf {_tlb_entry(e)}")
            for w in walks:
                out.append(f"  IPA {ipa:#x} hits walk cache: L{w.level} entry for IPA "
                           f"{w.ipa:#x} -> table PA {w.table_pfn << 12:#x}")
    return out


def cache_lines(platform, ipas: Iterable[int], origin: dict | None = None) -> list[str]:
    """The data and instruction cache state of every physical page behind
    ``ipas``: the page the stage-2 tables map and the host page behind the
    gfn's hva, when they differ both (rules §6.1)."""
    origin = origin or {}

    def value(v) -> str:
        return f"{v} ({origin[v]})" if v in origin else str(v)

    out = []
    seen: set[int] = set()
    for ipa in ipas:
        pages = []
        s2 = _s2_pa(platform, ipa)
        if s2 is not None:
            pages.append((s2 >> 12, f"stage 2 maps IPA {ipa:#x} here"))
        for vcpu, tlb in enumerate(platform.tlbs):
            for e in tlb.lookup(ipa):
                pages.append((e.translate(ipa) >> 12, f"vCPU{vcpu}'s TLB maps IPA {ipa:#x} here"))
        slot = platform.slot_for_gfn(ipa >> 12)
        if slot is not None:
            hva = slot.gfn_to_hva(ipa >> 12)
            pte = platform.host.pte(hva)
            if pte is not None:
                pages.append((pte.pfn, f"the host page of hva {hva:#x}"))
        if not pages:
            out.append(f"IPA {ipa:#x}: no page behind it (not mapped, no host page)")
        for pfn, why in pages:
            if pfn in seen:
                continue
            seen.add(pfn)
            why = " and ".join(dict.fromkeys(w for p, w in pages if p == pfn))
            line = platform.mem.line(pfn)
            use = platform.mem.page_use(pfn)
            dline = "none" if line.dline is None else \
                f"{value(line.dline)} {'dirty' if line.dirty else 'clean'}"
            if line.dline is not None and not line.dirty and line.dline != line.mem:
                dline += " (stale: differs from PoC)"
            iline = "none" if line.iline is None else value(line.iline)
            out.append(f"PA {pfn << 12:#x} ({why}{'' if use is None else ', ' + use.value}):")
            out.append(f"  PoC {value(line.mem)}; D-line {dline}; I-line {iline}")
    return out


def _s2_pa(platform, ipa: int) -> int | None:

    if platform.pgd_pfn is None or ipa >= platform.geometry.ipa_limit:
        return None
    try:
        result = walk(platform.mem.tables.get, platform.geometry, platform.pgd_pfn, ipa)
    except Exception:  # noqa: BLE001 — a freed or missing table page
        return None
    if isinstance(result, WalkFault):
        return None
    return result.leaf.oa + (ipa & (result.leaf.size - 1))


def _tlb_entry(e) -> str:
    return f"{e.describe()} {_memtype(e.memattr)}"


def leaf_lines(platform) -> list[str]:
    """A summary of every stage-2 leaf: counts by size, then the first few."""

    if platform.pgd_pfn is None:
        return ["no PGD installed"]
    try:
        leaves = platform.leaves(0, platform.geometry.ipa_limit)
    except Exception as exc:  # noqa: BLE001 — e.g. a freed table still linked
        return [f"(cannot walk the whole tree: {exc})"]
    sizes = {1: "L1 blocks", 2: "L2 blocks", 3: "L3 pages"}
    counts = {}
    for step, _leaf in leaves:
        counts[step.level] = counts.get(step.level, 0) + 1
    summary = ", ".join(f"{n} {sizes[lvl]}" for lvl, n in sorted(counts.items())) or "none"
    tables = len(platform.mem.live_tables())
    noun = "leaf" if len(leaves) == 1 else "leaves"
    lines = [f"{len(leaves)} {noun} ({summary}); {tables} live table pages besides the PGD"]
    for step, _leaf in leaves[:MAX_LEAVES]:
        lines.append(f"  IPA {step.ipa:#x}: {d.describe(step.pte, step.level)}")
    if len(leaves) > MAX_LEAVES:
        lines.append(f"  ... and {len(leaves) - MAX_LEAVES} more")
    return lines


# ------------------------------------------------------------------- model


def step_number(label: str | None) -> int | None:
    """The number of a step label (``"3: guest_write(...)"`` -> 3)."""
    if not label:
        return None
    head = label.split(":", 1)[0].strip()
    return int(head) if head.isdigit() else None
