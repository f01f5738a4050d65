"""Where the table→block collapse spends its work, for designs that differ
in the collapse alone (default: ``kvm-parallel``, the merged v6.2 design, and
``kvm-parallel-subtree-lock``, the 2022 RFC's; docs/subtree-lock.md).

    python benchmarks/collapse_costs.py [--examples N] [--candidate NAME ...]

Runs each candidate on both machines on the programs ``stage2-conformance
matrix --examples N`` runs (profile ``ci``, ``same_programs``), with its
services wrapped in a counter, and prints per candidate and machine:

* ``collapses``: range TLBIs issued inside a guest fault. In these designs
  the only one is the break of a table entry that a fault collapses into a
  block (``stage2_try_break_pte`` on a table; unmaps and logging run on host
  threads, relaxation uses a local TLBI);
* ``xchg``: ``xchg_pte`` calls (the RFC's ``stage2_unlink_pte``);
* ``spins``: ``cpu_relax`` calls, all of them (the resumable unmap of
  kvm-parallel relaxes once between two 1 GiB chunks too);
* ``RCU callbacks``: all of them (the platform's counter), and ``from
  faults``: those queued by a guest fault, i.e. by a collapse (the others
  come from unmaps that prune tables and from ``release``);
* ``read_pte`` and ``put_page`` inside the callbacks queued by faults: the
  teardown work left to the grace period;
* ``put_page`` in faults: the references dropped in the faulting vCPU's
  critical path (the collapse's and everything else a fault puts).

The wrapper adds no scheduling point and draws nothing, so the programs and
interleavings are the matrix's (the ``rcu callbacks`` counter is printed
from the platform as a check).
"""

from __future__ import annotations

import argparse
import collections

from conformance.registry import load
from conformance.runner import run


class _Counting:
    """A candidate's services, counting calls by ``(where, name)``: ``where``
    is ``"fault"`` on a vCPU, ``"host"`` on a host thread, and inside a
    ``call_rcu`` callback ``"callback from "`` + where it was queued."""

    def __init__(self, svc, counts):
        self._svc, self._counts, self._callback = svc, counts, []

    def __getattr__(self, name):
        attr = getattr(self._svc, name)
        if not callable(attr):
            return attr
        counts, stack = self._counts, self._callback

        def counted(*args, **kwargs):
            where = stack[-1] if stack else \
                "fault" if self._svc.current_vcpu is not None else "host"
            counts[where, name] += 1
            if name == "call_rcu":
                callback, origin = args[0], f"callback from {where}"

                def wrapped():
                    stack.append(origin)
                    try:
                        callback()
                    finally:
                        stack.pop()
                return attr(wrapped)
            return attr(*args, **kwargs)
        return counted


def counting(cls, counts):
    class Counting(cls):
        def __init__(self, services, config):
            super().__init__(_Counting(services, counts), config)

    Counting.__name__ = Counting.__qualname__ = cls.__name__
    return Counting


def measure(name: str, machine: str, examples: int) -> dict:
    counts: collections.Counter = collections.Counter()
    result = run(name, counting(load(name), counts), profile="ci", same_programs=True,
                 machine=machine, max_examples=examples, database=None)
    if result.status != "pass":
        raise SystemExit(f"{name} ({machine}) did not pass: {result.failure}")

    def total(service):
        return sum(n for (_where, s), n in counts.items() if s == service)

    return {
        "candidate": name, "machine": machine, "programs": result.examples,
        "collapses": counts["fault", "tlb_flush_vmid_range"],
        "xchg": total("xchg_pte"),
        "spins": total("cpu_relax"),
        "RCU callbacks": result.counters.get("rcu callbacks", 0),
        "from faults": counts["fault", "call_rcu"],
        "their read_pte": counts["callback from fault", "read_pte"],
        "their put_page": counts["callback from fault", "put_page"],
        "put_page in faults": counts["fault", "put_page"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=200)
    ap.add_argument("--candidate", action="append")
    args = ap.parse_args()
    names = args.candidate or ["kvm-parallel", "kvm-parallel-subtree-lock"]
    rows = [measure(n, m, args.examples) for n in names for m in ("sequential", "parallel")]
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(keys))) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
