"""The conformance machines of the bundled correct candidates.

The ``from conformance.pytest_plugin.suite import *`` below is how the default ``pytest``
run collects them (one ``TestConformance_<name>`` per candidate; see
:mod:`conformance.pytest_plugin.suite` and the collection notes in :mod:`conformance.pytest_plugin.plugin`).
The functions below test that module itself.
"""

from hypothesis import is_hypothesis_test, settings

from conformance.pytest_plugin import suite as _suite
from conformance.pytest_plugin.suite import *  # noqa: F401,F403 — pytest collects the classes


def test_bundled_selection_is_every_correct_candidate():
    names = [name for name, _ in _suite.selection()]
    assert "reference" in names
    assert not any(name.startswith("mutant-") for name in names)
    assert _suite.SELECTED == names
    assert "TestConformance_reference" in _suite.__all__


def test_conformance_case_runs_under_the_profile_loaded_at_run_time():
    case = _suite.TestConformance_reference
    assert case.candidate_name == "reference"
    assert is_hypothesis_test(case().runTest)
    before = settings.get_current_profile_name()
    try:
        settings.load_profile("thorough")
        assert case().settings.max_examples == 1000
        assert case().settings.stateful_step_count == 60
        settings.load_profile("ci")
        assert case().settings.max_examples == 60
        assert case().settings.derandomize
        assert case().settings.deadline is None
    finally:
        settings.load_profile(before)
