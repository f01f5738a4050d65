"""Hypothesis settings profiles (DESIGN §8).

``dev``       default for people: random, the local example database, shrinking
              and no ``explain`` phase (it re-runs every step for coverage and
              costs minutes on stateful failures).
``ci``        what Hypothesis loads by itself when it detects CI; we register
              our own under the same name so it applies: derandomized (the same
              seed every run), no database, the same budget as ``dev``.
``thorough``  1,000 programs of up to 60 steps: the pre-posting run.

Every profile sets ``deadline=None`` (a deadline would apply to a whole
program) and suppresses only ``too_slow``.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
COMMON = dict(deadline=None, phases=PHASES, stateful_step_count=40,
              report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PROFILES = {
    "dev": settings(max_examples=60, **COMMON),
    "ci": settings(max_examples=60, derandomize=True, database=None, print_blob=True,
                   **COMMON),
    "thorough": settings(max_examples=1000, **{**COMMON, "stateful_step_count": 60}),
}


def register() -> None:
    for name, profile in PROFILES.items():
        settings.register_profile(name, profile)


register()
