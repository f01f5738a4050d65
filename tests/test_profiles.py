"""The suite's profiles do not inherit from whatever profile Hypothesis loaded
first (under CI it loads its own derandomized, database-less ``ci``)."""

import os
import subprocess
import sys

import pytest

from conformance import profiles


@pytest.mark.parametrize("ci", ["true", ""])
def test_dev_and_thorough_are_random_with_a_database_whether_or_not_ci_is_set(ci):
    code = ("from conformance.profiles import PROFILES as P\n"
            "print(P['dev'].derandomize, P['dev'].database is None,"
            " P['thorough'].derandomize, P['ci'].derandomize, P['ci'].database is None)")
    env = {**os.environ, "CI": ci}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "False", "False", "True", "True"]


def test_profiles_are_registered_under_their_names():
    from hypothesis import settings

    for name, profile in profiles.PROFILES.items():
        assert settings.get_profile(name).max_examples == profile.max_examples



def _drawn() -> list[int]:
    """What a seeded Hypothesis test draws from ``integers(0, 2000)``."""
    from hypothesis import given, seed, settings, strategies as st

    got: list[int] = []

    @seed(7)
    @settings(max_examples=300, database=None, derandomize=False)
    @given(st.integers(0, 2000))
    def draw(x):
        got.append(x)

    draw()
    return got


def _import_local_module_with_constants(tmp_path, monkeypatch, name, first):
    # Hypothesis skips literals below 100 in magnitude and takes up to 1024
    (tmp_path / f"{name}.py").write_text(
        "TABLE = [" + ", ".join(str(i) for i in range(first, first + 900)) + "]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(name)


def test_a_seed_gives_the_same_draws_whatever_local_modules_are_loaded(tmp_path, monkeypatch):
    """Hypothesis mixes literals of loaded local modules into its draws, so
    importing a module (a candidate, a script, the report code) changed what a
    seed generates; profiles.pin_generation_constants stops that."""
    from hypothesis.internal.conjecture import providers

    assert profiles.PINNED_CONSTANTS
    before = _drawn()
    _import_local_module_with_constants(tmp_path, monkeypatch, "extra_constants_a", 100)
    assert _drawn() == before

    # The hazard is real: with Hypothesis's own pool, a new module changes the draws.
    monkeypatch.setattr(providers, "_get_local_constants", profiles._unpinned)
    providers.CONSTANTS_CACHE.cache.clear()
    unpinned = _drawn()
    _import_local_module_with_constants(tmp_path, monkeypatch, "extra_constants_b", 1000)
    assert _drawn() != unpinned
    providers.CONSTANTS_CACHE.cache.clear()
