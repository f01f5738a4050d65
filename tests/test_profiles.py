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
