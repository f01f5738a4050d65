"""Known findings: behaviour of a faithful KVM that the suite shows to be a
real hazard (``docs/findings.md``).

A finding is not a candidate bug to fix in the candidate: it is KVM's, and a
faithful candidate must keep it. Such a candidate declares the finding in
``Candidate.known_findings``; when a program then shows it (the platform
recognises its precise signature), the run counts it as that finding
(``known finding: <id>`` in the counters, an event in the statistics) and goes
on, instead of failing at random. A candidate that does not declare it fails
with the property the hazard breaks, like any bug.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Finding:
    """One known finding: ``id`` is what a candidate declares."""

    id: str
    title: str
    #: The property families its observations break when not declared.
    families: tuple[str, ...]
    #: Where it is explained.
    page: str


BLOCK_SPLIT_NO_CMO = Finding(
    "block-split-no-cmo",
    "pages a map-time block split drops from stage 2 are not cleaned+invalidated "
    "to PoC (no FWB), so a stale clean line can shadow the guest's "
    "non-cacheable writes for a later cacheable reader",
    ("host-observation", "guest-observation"),
    "docs/findings.md#block-split-no-cmo")

#: Every known finding by id.
FINDINGS: dict[str, Finding] = {f.id: f for f in (BLOCK_SPLIT_NO_CMO,)}


def check_declared(candidate_cls: type) -> frozenset[str]:
    """The candidate's ``known_findings``, validated: a set of known ids."""
    declared = getattr(candidate_cls, "known_findings", frozenset())
    if isinstance(declared, str) or not all(isinstance(f, str) for f in declared):
        raise TypeError(f"{candidate_cls.__qualname__}.known_findings must be a set of "
                        f"finding ids (strings), not {declared!r}")
    unknown = sorted(set(declared) - set(FINDINGS))
    if unknown:
        raise ValueError(f"{candidate_cls.__qualname__}.known_findings names unknown "
                         f"finding(s) {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(sorted(FINDINGS))} (docs/findings.md)")
    return frozenset(declared)
