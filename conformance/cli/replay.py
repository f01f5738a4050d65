"""``stage2-conformance replay FILE``: re-run a replay file without Hypothesis."""

from __future__ import annotations

import argparse
import sys

from conformance import registry
from conformance.cli.common import PROG, finding_lines

def _capability_warnings(doc: dict, cls: type) -> list[str]:
    from conformance.failures import document

    caps = getattr(cls, "capabilities", None)
    config = document.decode(doc["config"]) if doc.get("config") else None
    if caps is None or config is None:
        return []
    out = []
    for feature in ("fwb", "hw_af", "dic"):
        if getattr(config, feature, False) and not getattr(caps, feature, True):
            out.append(f"the recorded VM uses {feature}, which this candidate does not "
                       "declare")
    if config.nr_vcpus > getattr(caps, "max_vcpus", config.nr_vcpus):
        out.append(f"the recorded VM has {config.nr_vcpus} vCPUs; this candidate "
                   f"declares at most {caps.max_vcpus}")
    return out


def command(args: argparse.Namespace) -> int:
    from conformance.failures import document, replay, report

    try:
        doc = document.load(args.file)
    except (OSError, ValueError) as exc:
        print(f"{PROG}: cannot read replay file {args.file}: {exc}", file=sys.stderr)
        return 2
    name = args.candidate or doc["candidate"]
    recorded = doc.get("failure") or {}
    try:
        cls = registry.load(name)
    except registry.UnknownCandidate as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except registry.CandidateImportError as exc:
        print(f"ERROR {name}: [candidate-error: import] in step 0: import: {exc}")
        return 2
    steps = len(doc["steps"])
    print(f"replaying {args.file}: {steps} step(s) recorded against "
          f"{doc['candidate']}, now against {name}")
    for warning in _capability_warnings(doc, cls):
        print(f"warning: {warning}")
    if not doc["steps"]:  # a recorded import failure: the import was the replay
        print(f"PASS {name}: it imports now (recorded: [{recorded.get('property')}: "
              f"{recorded.get('kind')}] {recorded.get('message')})")
        return 0
    result, machine, out = replay.replay_machine(doc, cls, candidate=name)
    if doc.get("interleavings") is not None:
        from conformance.failures.interleaving import divergence

        diverged = divergence(doc["interleavings"],
                              [list(i) for i in getattr(machine, "interleavings", ())])
        print(diverged or "the same interleavings as recorded")
    if result.status == "pass":
        print(f"PASS {name}: the recorded program no longer fails "
              f"(recorded: [{recorded.get('property')}] in step {recorded.get('step')})")
        for line in finding_lines(result.counters):
            print(line)
        return 0
    report.show(report.from_doc(out, replay_path=args.file))
    now = result.failure
    if (recorded.get("property"), recorded.get("step")) == (now.property, now.step):
        print("the same failure as recorded")
    else:
        print(f"a different failure from the recorded one ([{recorded.get('property')}] "
              f"in step {recorded.get('step')})")
    return 2 if result.status == "error" else 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "replay", help="re-run a replay file without Hypothesis",
        description="Re-run the steps of a replay file (stage2-failures/NAME.json) "
                    "deterministically, without Hypothesis and without writing failure "
                    "files, and print the report. Exit 1 if it still fails, 0 if it "
                    "passes (e.g. against a fixed candidate), 2 for a candidate error "
                    "(including one that still fails to import) or an unreadable file.")
    p.add_argument("file", metavar="FILE", help="the replay JSON file")
    p.add_argument("--candidate", metavar="NAME",
                   help="replay against this registered candidate instead of the "
                        "recorded one")
    p.set_defaults(func=command)
