"""The interleaving of a failing parallel step, one column per task (CPU).

The replay file records each scheduling decision as one line
(``Event.describe()``: ``decision  task N  kind  detail``). A reader wants
to see who did what while the others waited: this module lays the lines out
as a table with one column per task, headed by the operation the task ran
(vCPU faults, notifiers, harvests, RCU callbacks), and marks the
preemptions that made the interleaving.
"""

from __future__ import annotations

import attrs

#: Rows shown before the elision (the start of the step) and after it (the
#: events leading to the failure).
HEAD, TAIL = 12, 48


@attrs.frozen
class Row:
    """One event, or a run of ``repeat`` identical events of one task
    (decisions ``decision`` .. ``last``)."""

    decision: int
    task: int
    text: str
    repeat: int = 1
    last: int | None = None

    @property
    def number(self) -> str:
        return str(self.decision) if self.repeat == 1 else f"{self.decision}-{self.last}"

    @property
    def shown(self) -> str:
        return self.text if self.repeat == 1 else f"{self.text} (x{self.repeat})"


@attrs.frozen
class Columns:
    """``tasks[i]``: the header of task i; ``rows``: every event, in order."""

    tasks: tuple[str, ...]
    rows: tuple[Row, ...]


def columns(lines) -> Columns:
    """Parse recorded interleaving lines into one column per task."""
    rows, names = [], {}
    for line in lines:
        parts = line.strip().split("  ")
        if len(parts) < 3 or not parts[1].startswith("task "):
            continue
        decision, task, kind = int(parts[0]), int(parts[1][5:]), parts[2]
        detail = "  ".join(parts[3:])
        if kind == "start":
            names[task] = detail
            continue
        if kind == "switch":
            text = f">> {detail}" if "preemption" in detail else f"-> {detail}"
        elif kind == "pte store":  # the detail names the service and the entry
            text = detail
        else:
            text = f"{kind} {detail}".strip()
        prev = rows[-1] if rows else None
        if prev is not None and prev.task == task and prev.text == text \
                and not text.startswith(("->", ">>")):
            rows[-1] = attrs.evolve(prev, repeat=prev.repeat + 1, last=decision)
        else:
            rows.append(Row(decision, task, text))
    n = max([r.task for r in rows] + list(names) + [-1]) + 1
    tasks = tuple(f"task {t}: {names.get(t, '?')}" for t in range(n))
    return Columns(tasks, tuple(rows))


def _shown(rows):
    """The first HEAD and last TAIL rows, with ``None`` where rows are left out."""
    if len(rows) <= HEAD + TAIL + 1:
        return list(rows)
    return list(rows[:HEAD]) + [None] + list(rows[-TAIL:])


def as_markdown(cols: Columns) -> list[str]:
    """A Markdown table: the decision number, then one column per task."""
    out = ["| # | " + " | ".join(cols.tasks) + " |",
           "|---:|" + "---|" * len(cols.tasks)]
    for row in _shown(cols.rows):
        if row is None:
            out.append("| … |" + " |" * len(cols.tasks))
            continue
        cells = [""] * len(cols.tasks)
        cells[row.task] = f"`{row.shown}`" if not row.text.startswith(">>") else \
            f"**{row.text}**"
        out.append(f"| {row.number} | " + " | ".join(cells) + " |")
    return out


def as_text(cols: Columns, width: int = 48) -> list[str]:
    """Fixed-width columns for a terminal or a text report."""
    def cell(text: str) -> str:
        return text if len(text) <= width else text[:width - 1] + "~"

    out = ["          # " + " ".join(cell(t).ljust(width) for t in cols.tasks).rstrip()]
    for row in _shown(cols.rows):
        if row is None:
            out.append("        ...")
            continue
        cells = [""] * len(cols.tasks)
        cells[row.task] = cell(row.shown)
        out.append(f"{row.number:>11} " + " ".join(c.ljust(width) for c in cells).rstrip())
    return out


def preemptions(cols: Columns) -> list[str]:
    """The preemptions that fired, as ``decision N: task T -> task U``."""
    return [f"decision {r.decision}: task {r.task} {r.text[3:]}" for r in cols.rows
            if r.text.startswith(">>")]


def divergence(recorded, realized) -> str | None:
    """Where a replay's interleavings first differ from the recorded ones
    (lists of per-parallel-step line lists), in words; ``None`` if equal.
    Against the same candidate and suite version they never differ: the
    scheduler is deterministic. A different candidate (a fix) or a changed
    candidate takes another path, and this says where."""
    recorded, realized = list(recorded or ()), list(realized or ())
    for step, (was, now) in enumerate(zip(recorded, realized), start=1):
        was, now = list(was), list(now)
        for was_line, now_line in zip(was, now):
            if was_line != now_line:
                return (f"parallel step #{step} diverged from the recorded interleaving: "
                        f"recorded '{was_line.strip()}', now '{now_line.strip()}'")
        if len(was) != len(now):
            return (f"parallel step #{step} diverged from the recorded interleaving: "
                    f"{len(was)} decisions recorded, {len(now)} now")
    if len(recorded) != len(realized):
        return (f"{len(recorded)} parallel step(s) recorded, {len(realized)} ran "
                "(the program ended elsewhere)")
    return None
