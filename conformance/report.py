"""Failure reports (DESIGN §7).

A report is built from a replay document (:mod:`conformance.replay`), which
is self-contained: besides the steps it records, at the failure, what each
guest access and VMM read observed and what the oracle allowed, and the
stage-2 tables and TLB contents for the addresses the failing step touched.
So the same report comes out of a live machine (when the failure happens,
under Hypothesis or in a replay) and out of a JSON file read later.

A report shows:

* the violated property, named as the failure message names it (in KVM
  terms, with the reference section), and the failing step;
* the VM configuration and the memslot/VMA layout;
* a numbered table of the (shrunk) steps — the numbers are the step labels
  of the failure message, ``boot`` being 1 — with expected vs observed for
  every guest access and VMM read;
* for the IPAs involved in the failing step (named in the message, accessed
  by it, or picked by its ``where`` argument): the stage-2 walk from the PGD
  to the leaf (level, table page, index, descriptor: table/block/page, output
  address, permissions, AF, memory type, table refcount) and every vCPU's
  TLB and walk-cache entries covering them; then a summary of all leaves;
* the cost counters of the failing program, and the Hypothesis settings.

Renderings: :func:`markdown` (written next to the replay file),
:func:`text` (plain, for pipes and the pytest report section) and
:func:`show` (rich on a terminal, plain text otherwise).
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterable

import attrs


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
    from model import descriptors as d

    names = getattr(d, "_MEMTYPE_NAMES", {})
    return names.get(memattr, f"MemAttr={memattr:#x}")


def walk_lines(platform, ipa: int) -> list[str]:
    """The architectural walk of ``ipa`` from the PGD, one line per level,
    reading table memory directly (a freed or unlinked table page is shown,
    not treated as an error)."""
    from model import descriptors as d
    from model.geometry import index
    from model.memory import PageUse

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
    gfn's hva, when they differ both (reference §6.1)."""
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
    from model.walker import walk
    from model.walker import WalkFault

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
    from model import descriptors as d

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
@attrs.define
class StepRow:
    number: int
    call: str
    observer: str = ""
    expected: str = ""
    observed: str = ""
    failed: bool = False


@attrs.define
class Report:
    candidate: str
    status: str  # "fail", "error" or "pass"
    property: str | None
    kind: str | None
    message: str | None
    failing_step: str | None
    config: str | None
    layout: str | None
    rows: list[StepRow]
    ipas: list[str]
    tree: list[str]
    tlbs: list[str]
    leaves: list[str]
    counters: dict
    settings: dict | None
    replay_path: str | None = None
    report_path: str | None = None
    caches: list[str] = attrs.Factory(list)
    #: Steps :mod:`conformance.polish` deleted from Hypothesis's shrunk program.
    deleted_steps: int = 0

    @property
    def steps_note(self) -> str:
        """How short the counterexample is, and whether step deletion helped."""
        n = sum(1 for r in self.rows if not r.call.startswith(("boot", "teardown")))
        them = "them" if self.deleted_steps > 1 else "it"
        extra = (f"; {self.deleted_steps} more deleted after Hypothesis's shrink, "
                 f"failing the same way without {them}" if self.deleted_steps else "")
        return f"{n} step(s) after boot{extra}"

    @property
    def headline(self) -> str:
        if self.status == "pass":
            return f"PASS {self.candidate}"
        tag = f"candidate-error: {self.kind}" if self.property == "candidate-error" \
            else self.property
        return f"{'ERROR' if self.status == 'error' else 'FAIL'} {self.candidate}: [{tag}]"


def _step_number(label: str | None) -> int | None:
    if not label:
        return None
    head = label.split(":", 1)[0].strip()
    return int(head) if head.isdigit() else None


def from_doc(doc: dict, *, replay_path: str | None = None,
             report_path: str | None = None) -> Report:
    """The report of a replay document (format 1 documents give a report
    without observations, tables or settings)."""
    from conformance import replay

    failure = doc.get("failure") or {}
    failed_no = _step_number(failure.get("step"))
    obs: dict[int, list[dict]] = {}
    for o in doc.get("observations", ()):
        obs.setdefault(o["step"], []).append(o)
    rows = []
    for label in doc.get("trace", ()):
        number = _step_number(label)
        call = label.split(": ", 1)[-1]
        if call.startswith("boot("):
            call = "boot (the VM and layout above)"
        seen = obs.get(number, [])
        row = StepRow(number if number is not None else len(rows) + 1, call,
                      failed=number is not None and number == failed_no)
        if seen:
            # A step stops at its first unexpected observation, so all but the
            # last were as expected: one row, the last, after a count of them.
            o, earlier = seen[-1], len(seen) - 1
            fold = (f"({earlier} earlier access{'es' if earlier > 1 else ''} as expected; "
                    "then) " if earlier else "")
            row.observer, row.expected, row.observed = (fold + o["observer"], o["expected"],
                                                        o["observed"])
        rows.append(row)
    config = layout = None
    if doc.get("config") is not None:
        config = repr(replay.decode(doc["config"]))
    if doc.get("layout") is not None:
        try:
            layout = replay.decode(doc["layout"]).describe()
        except Exception:  # noqa: BLE001
            layout = repr(doc["layout"])
    state = doc.get("state") or {}
    status = "error" if failure.get("property") == "candidate-error" else \
        ("fail" if failure else "pass")
    return Report(
        candidate=doc.get("candidate", "?"), status=status,
        property=failure.get("property"), kind=failure.get("kind"),
        message=failure.get("message"), failing_step=failure.get("step"),
        config=config, layout=layout, rows=rows, ipas=list(state.get("ipas", ())),
        tree=list(state.get("tree", ())), tlbs=list(state.get("tlbs", ())),
        leaves=list(state.get("leaves", ())), counters=dict(doc.get("counters") or {}),
        settings=doc.get("settings"), replay_path=replay_path, report_path=report_path,
        caches=list(state.get("caches", ())), deleted_steps=doc.get("deleted_steps", 0))


def _settings_line(settings: dict | None) -> str | None:
    if not settings:
        return None
    keys = ("max_examples", "stateful_step_count", "derandomize", "seed", "database",
            "phases", "hypothesis_version")
    return ", ".join(f"{k}={settings[k]}" for k in keys if k in settings)


def _replay_command(report: Report) -> str | None:
    if not report.replay_path:
        return None
    return f"stage2-conformance replay {report.replay_path}"


# --------------------------------------------------------------- Markdown
def _md_cell(text: str) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def markdown(report: Report) -> str:
    lines = [f"# stage2-conformance failure: {report.candidate}", ""]
    if report.status == "pass":
        lines += ["The program passes.", ""]
    else:
        tag = f"candidate-error: {report.kind}" if report.property == "candidate-error" \
            else report.property
        lines += [f"**[{tag}]** {report.message}", "",
                  f"Failing step: `{report.failing_step}`", ""]
    if report.config or report.layout:
        lines += ["## The VM", ""]
        if report.config:
            lines += [f"- configuration: `{report.config}`"]
        if report.layout:
            lines += [f"- layout: `{report.layout}`"]
        lines += [""]
    lines += ["## Steps", "",
              "Numbered as in the failure message (`boot` is step 1); rule names and "
              "arguments as in Hypothesis's printed program "
              f"({report.steps_note}).", "",
              "| # | step | observation | expected | observed |", "|---|---|---|---|---|"]
    for r in report.rows:
        mark = f"**{r.number}** ✗" if r.failed else str(r.number)
        lines.append(f"| {mark} | `{_md_cell(r.call)}` | {_md_cell(r.observer)} | "
                     f"{_md_cell(r.expected)} | {_md_cell(r.observed)} |")
    lines += [""]
    if report.tree or report.tlbs:
        ipas = ", ".join(report.ipas) or "none named"
        lines += [f"## Stage-2 tables at the failing step (IPAs: {ipas})", "",
                  "```", *report.tree, "```", "", "## TLBs at the failing step", "",
                  "```", *report.tlbs, "```", ""]
    if report.caches:
        lines += ["## Caches at the failing step", "", "```", *report.caches, "```", ""]
    if report.leaves:
        lines += ["## All stage-2 leaves", "", "```", *report.leaves, "```", ""]
    if report.counters:
        lines += ["## Cost counters (the failing program)", "", "| counter | value |",
                  "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(report.counters.items())]
        lines += [""]
    settings = _settings_line(report.settings)
    if settings:
        lines += ["## Hypothesis settings", "", f"`{settings}`", ""]
    cmd = _replay_command(report)
    if cmd:
        lines += ["## Replay", "", f"`{cmd}` (add `--candidate NAME` to replay it "
                  "against another candidate, e.g. a fixed one)", ""]
    return "\n".join(lines)


# -------------------------------------------------------------- plain text
def text(report: Report) -> str:
    out = [report.headline]
    if report.status != "pass":
        out.append(f"  {report.message}")
        out.append(f"  failing step: {report.failing_step}")
    if report.config:
        out.append(f"VM:     {report.config}")
    if report.layout:
        out.append(f"layout: {report.layout}")
    out.append(f"counterexample ({report.steps_note}):")
    for r in report.rows:
        mark = "✗" if r.failed else " "
        out.append(f"{mark}{r.number:3d}: {r.call}")
        if r.observer:
            out.append(f"        {r.observer}: expected {r.expected}; observed {r.observed}")
    if report.tree:
        out.append("stage-2 tables at the failing step:")
        out.extend(f"  {line}" for line in report.tree)
    if report.tlbs:
        out.append("TLBs at the failing step:")
        out.extend(f"  {line}" for line in report.tlbs)
    if report.caches:
        out.append("caches at the failing step:")
        out.extend(f"  {line}" for line in report.caches)
    if report.leaves:
        out.append("all stage-2 leaves: " + report.leaves[0])
        out.extend(f"  {line}" for line in report.leaves[1:])
    if report.counters:
        out.append("cost counters: " + ", ".join(
            f"{k}={v}" for k, v in sorted(report.counters.items())))
    settings = _settings_line(report.settings)
    if settings:
        out.append(f"hypothesis: {settings}")
    if report.report_path:
        out.append(f"report: {report.report_path}")
    cmd = _replay_command(report)
    if cmd:
        out.append(f"replay: {cmd}")
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------- rich
def renderable(report: Report):
    """The report as a rich renderable (a group of panels and tables)."""
    from rich import box
    from rich.console import Group
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []
    style = "green" if report.status == "pass" else "red"
    head = Text(report.headline, style=f"bold {style}")
    if report.status != "pass":
        head.append(f"\n{report.message}", style="")
        head.append(f"\nfailing step: {report.failing_step}", style="dim")
    parts.append(Panel(head, box=box.ROUNDED, border_style=style, expand=False))
    if report.config or report.layout:
        vm = Table.grid(padding=(0, 1))
        if report.config:
            vm.add_row("[bold]VM[/bold]", escape(report.config))
        if report.layout:
            vm.add_row("[bold]layout[/bold]", escape(report.layout))
        parts.append(vm)
    steps = Table(title=f"steps (boot is 1; {report.steps_note})", box=box.SIMPLE_HEAD,
                  title_justify="left")
    steps.add_column("#", justify="right", no_wrap=True)
    steps.add_column("step")
    observed_any = any(r.observer for r in report.rows)
    if observed_any:
        steps.add_column("observation")
        steps.add_column("expected")
        steps.add_column("observed")
    for r in report.rows:
        row_style = "bold red" if r.failed else None
        cells = [f"{'✗ ' if r.failed else ''}{r.number}", escape(r.call)]
        if observed_any:
            observed = escape(r.observed)
            if r.observer and r.observed not in r.expected.split(" or "):
                observed = f"[red]{observed}[/red]"
            cells += [escape(r.observer), escape(r.expected), observed]
        steps.add_row(*cells, style=row_style)
    parts.append(steps)
    if report.tree:
        parts.append(Panel(Text("\n".join(report.tree)), box=box.SQUARE, expand=False,
                           title="stage-2 tables at the failing step", title_align="left"))
    if report.tlbs:
        parts.append(Panel(Text("\n".join(report.tlbs)), box=box.SQUARE, expand=False,
                           title="TLBs at the failing step", title_align="left"))
    if report.caches:
        parts.append(Panel(Text("\n".join(report.caches)), box=box.SQUARE, expand=False,
                           title="caches at the failing step", title_align="left"))
    if report.leaves:
        parts.append(Panel(Text("\n".join(report.leaves)), box=box.SQUARE, expand=False,
                           title="all stage-2 leaves", title_align="left"))
    if report.counters:
        counters = Table(title="cost counters", box=box.SIMPLE_HEAD, title_justify="left")
        counters.add_column("counter")
        counters.add_column("value", justify="right")
        for k, v in sorted(report.counters.items()):
            counters.add_row(escape(k), str(v))
        parts.append(counters)
    tail = []
    settings = _settings_line(report.settings)
    if settings:
        tail.append(f"[dim]hypothesis: {escape(settings)}[/dim]")
    if report.report_path:
        tail.append(f"report: {escape(report.report_path)}")
    cmd = _replay_command(report)
    if cmd:
        tail.append(f"replay: [bold]{escape(cmd)}[/bold]")
    if tail:
        parts.append(Text.from_markup("\n".join(tail)))
    return Group(*parts)


def show(report: Report, file=None) -> None:
    """Print ``report``: with rich on a terminal, as plain text otherwise."""
    from rich.console import Console

    file = file or sys.stdout
    console = Console(file=file)
    if console.is_terminal:
        console.print(renderable(report))
    else:
        file.write(text(report))
        file.flush()


__all__ = ["Report", "StepRow", "from_doc", "markdown", "text", "show", "renderable",
           "observations", "state_at_failure", "involved_ipas", "walk_lines",
           "tlb_lines", "leaf_lines", "cache_lines"]
