"""What the project's own tests share (``tests/``).

* Every test writes its failure files (replay JSON and Markdown report) to
  its own temporary directory, never into the working tree: the autouse
  fixture :func:`failures_dir` points ``$STAGE2_FAILURES_DIR`` at ``tmp_path``.
* :func:`play` runs a scripted program, ``boot`` first, through the real
  machine (platform, oracle, monitors) without Hypothesis and without writing
  files: the way to pin a counterexample, a finding or a start as a test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent / "tests"


@pytest.fixture(autouse=True)
def failures_dir(request, tmp_path, monkeypatch):
    """The directory failure files go to in this test (``tmp_path``).

    Only for the tests of the suite itself: a conformance test case (the
    machines ``tests/test_suite.py`` collects, or ``suite.py`` collected by
    ``pytest --candidate NAME`` from elsewhere against an editable install,
    which loads this file too) writes where the docs say, ``stage2-failures/``."""
    if getattr(request.cls, "candidate_name", None) is not None or \
            not Path(request.node.path).resolve().is_relative_to(TESTS):
        return None
    monkeypatch.setenv("STAGE2_FAILURES_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def play():
    """``play(cls, config, layout, *steps, name="scripted", machine="sequential")``
    runs ``[boot(config, layout), *steps]`` (each step a ``(rule, kwargs)``
    pair) and teardown against candidate class ``cls`` on that machine; it
    returns ``(failure, machine)``, ``failure`` being ``None`` when the
    program passed."""
    from conformance.failures import polish

    def _play(cls, config, layout, *steps, name="scripted", machine="sequential"):
        calls = [("boot", dict(config=config, layout=layout)), *steps]
        return polish.play(name, cls, calls, machine)

    return _play
