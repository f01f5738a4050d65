"""``stage2-conformance explain``: what a property family checks."""

from __future__ import annotations

import argparse
import sys

from conformance.cli.common import PROG

def command(args: argparse.Namespace) -> int:
    from conformance.failures import explain

    if args.property is None:
        sys.stdout.write(explain.summary())
        return 0
    text = explain.explain(args.property)
    if text is None:
        print(f"{PROG}: unknown property {args.property!r}; known: "
              f"{', '.join(explain.family_names())} (and the oracle rules R1-R7)",
              file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "explain", help="what a property family checks, with its reference",
        description="Print the rule behind a property family (the name in brackets in "
                    "a failure, e.g. tlb-conflict), the oracle rules it applies, and the "
                    "reference invariants and sections it cites. Without PROPERTY, list "
                    "the families. Also accepts the oracle rules R1-R7. An unknown name "
                    "exits 2.")
    p.add_argument("property", nargs="?", metavar="PROPERTY",
                   help="a property family, e.g. stale-translation, or R1-R7")
    p.set_defaults(func=command)
