"""Failure reports (DESIGN §7).

A report is built from a replay document (:mod:`conformance.failures.document`), which
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

import sys
from typing import Any

import attrs

from conformance.failures import document
from conformance.failures import interleaving as columns
from conformance.failures.state import step_number
from conformance.machines.parallel import PARALLEL_RULES


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
    #: The realized interleaving of the failing parallel step, or of the last
    #: one before the failing step (empty if there is none).
    interleaving: list[str] = attrs.Factory(list)
    #: Which step that interleaving is of, and whether it is the failing one.
    interleaving_step: int | None = None
    #: Steps :mod:`conformance.failures.polish` deleted from Hypothesis's shrunk program.
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


def from_doc(doc: dict, *, replay_path: str | None = None,
             report_path: str | None = None) -> Report:
    """The report of a replay document (format 1 documents give a report
    without observations, tables or settings)."""
    failure = doc.get("failure") or {}
    failed_no = step_number(failure.get("step"))
    obs: dict[int, list[dict]] = {}
    for o in doc.get("observations", ()):
        obs.setdefault(o["step"], []).append(o)
    rows = []
    for label in doc.get("trace", ()):
        number = step_number(label)
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
        config = repr(document.decode(doc["config"]))
    if doc.get("layout") is not None:
        try:
            layout = document.decode(doc["layout"]).describe()
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
        caches=list(state.get("caches", ())), deleted_steps=doc.get("deleted_steps", 0),
        **_failing_interleaving(doc, failed_no))


def _failing_interleaving(doc: dict, failed_no: int | None) -> dict:
    """The recorded interleaving of the parallel step that failed or, when the
    failure comes later (a leak found at teardown), of the last parallel step
    before it that interleaved anything."""
    parallel = [n for n, step in enumerate(doc.get("steps", ()), start=1)
                if step.get("rule") in PARALLEL_RULES]
    runs = doc.get("interleavings") or []
    if failed_no is None:
        return {}
    for i in range(min(len(parallel), len(runs)) - 1, -1, -1):
        if parallel[i] <= failed_no and runs[i]:
            return {"interleaving": list(runs[i]), "interleaving_step": parallel[i]}
    return {}


def _interleaving_title(report) -> str:
    n = report.interleaving_step
    if n == _failed_number(report):
        return f"interleaving of parallel step {n}, the failing step"
    return f"interleaving of parallel step {n}, the last one before the failing step"


def _failed_number(report):
    return next((r.number for r in report.rows if r.failed), None)


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
    if report.interleaving:
        cols = columns.columns(report.interleaving)
        fired = columns.preemptions(cols)
        title = _interleaving_title(report)
        lines += [f"## {title[0].upper()}{title[1:]}", "",
                  "One column per task (CPU), one row per scheduling decision; **>>** marks "
                  "a preemption of the schedule" + (f" ({'; '.join(fired)})" if fired
                                                     else " (none fired)") + ".", "",
                  *columns.as_markdown(cols), ""]
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
    if report.interleaving:
        out.append(f"{_interleaving_title(report)} (one column per task; >> a preemption):")
        out.extend(f"  {line}" for line in columns.as_text(columns.columns(report.interleaving)))
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
    if report.interleaving:
        cols = columns.columns(report.interleaving)
        parts.append(Panel(Text("\n".join(columns.as_text(cols, width=40))), box=box.SQUARE,
                           expand=False, title=f"{_interleaving_title(report)} "
                           "(one column per task; >> a preemption)", title_align="left"))
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


__all__ = ["Report", "StepRow", "from_doc", "markdown", "text", "show", "renderable"]
