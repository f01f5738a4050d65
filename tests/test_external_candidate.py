"""A candidate from a separate, installed distribution is found through the
entry-point group and can be tested from the user's own directory, where the
suite's ``tests/`` does not exist (DESIGN §8).

The distribution is installed into a temporary ``site`` directory (with pip
when it can build without the network, otherwise as a hand-written
``.dist-info``), and every check runs in a subprocess with that directory on
``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

GROUP = "stage2_conformance.candidates"

PYPROJECT = textwrap.dedent(f"""\
    [build-system]
    requires = ["setuptools>=61"]
    build-backend = "setuptools.build_meta"

    [project]
    name = "extcand"
    version = "0.0.1"

    [tool.setuptools]
    py-modules = ["extcand"]

    [project.entry-points."{GROUP}"]
    ext-reference = "extcand:ExtCandidate"
    """)

MODULE = textwrap.dedent('''\
    """An out-of-tree candidate: the reference, under another name."""
    from candidates.reference import ReferenceCandidate


    class ExtCandidate(ReferenceCandidate):
        version = "ext-0.0.1"
    ''')


def _write_dist_info(site: Path, dist: Path) -> None:
    """What pip would install, by hand: the module and a ``.dist-info`` with
    METADATA and entry_points.txt (all importlib.metadata reads)."""
    site.mkdir(parents=True, exist_ok=True)
    shutil.copy(dist / "extcand.py", site / "extcand.py")
    info = site / "extcand-0.0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: extcand\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{GROUP}]\next-reference = extcand:ExtCandidate\n")
    (info / "top_level.txt").write_text("extcand\n")
    (info / "INSTALLER").write_text("tests\n")
    (info / "RECORD").write_text("")


@pytest.fixture(scope="module")
def ext(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("external")
    dist, site, user = root / "dist", root / "site", root / "user-repo"
    dist.mkdir()
    user.mkdir()
    (dist / "pyproject.toml").write_text(PYPROJECT)
    (dist / "extcand.py").write_text(MODULE)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--target", str(site), str(dist)],
        capture_output=True, text=True, cwd=root)
    if pip.returncode != 0 or not list(site.glob("extcand-*.dist-info")):
        # e.g. no `wheel` for an older setuptools: install by hand instead.
        shutil.rmtree(site, ignore_errors=True)
        _write_dist_info(site, dist)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "HYPOTHESIS_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(site)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {"root": root, "site": site, "user": user, "env": env}


def _run(ext, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), cwd=ext["user"], env=ext["env"], capture_output=True,
                          text=True, timeout=timeout)


def _cli() -> list[str]:
    script = shutil.which("stage2-conformance", path=sysconfig.get_path("scripts"))
    return [script] if script else [sys.executable, "-m", "conformance.cli"]


def test_list_shows_the_external_candidate(ext):
    proc = _run(ext, *_cli(), "list")
    assert proc.returncode == 0, proc.stderr
    line = next((line for line in proc.stdout.splitlines() if line.startswith("ext-reference")),
                None)
    assert line is not None, proc.stdout
    assert "correct" in line and "extcand:ExtCandidate" in line and "ext-0.0.1" in line


def test_cli_runs_the_external_candidate(ext):
    proc = _run(ext, *_cli(), "run", "--candidate", "ext-reference", "--examples", "3")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("PASS ext-reference")


@pytest.mark.parametrize("extra", [[], ["-n", "2"]], ids=["serial", "xdist"])
def test_pytest_candidate_from_another_directory(ext, extra):
    proc = _run(ext, sys.executable, "-m", "pytest", "--candidate", "ext-reference",
                "-p", "no:cacheprovider", "--hypothesis-profile=ci", "-v", *extra)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for machine in ("TestConformance", "TestParallel"):  # it is concurrent, as reference is
        assert any(f"conformance/pytest_plugin/suite.py::{machine}_ext_reference::runTest"
                   in line and "PASSED" in line for line in out.splitlines()), out
    assert "2 passed" in out
    assert "TestConformance_reference" not in out  # only the selected candidate


def test_pytest_unknown_candidate_is_a_one_line_usage_error(ext):
    proc = _run(ext, sys.executable, "-m", "pytest", "--candidate", "no-such-thing",
                "-p", "no:cacheprovider")
    assert proc.returncode != 0
    lines = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "available candidates:" in line]
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert "unknown candidate 'no-such-thing'" in lines[0]
    assert "reference" in lines[0] and "ext-reference" in lines[0]


def test_other_projects_keep_their_hypothesis_profile(ext):
    """The plugin is active in every pytest run of the environment; it must
    not switch an unrelated project to our ``dev`` profile."""
    other = ext["root"] / "other-project"
    other.mkdir()
    (other / "test_own.py").write_text(
        "from hypothesis import settings\n\n\n"
        "def test_profile():\n"
        "    # Hypothesis' own choice: 'default', or 'ci' when it detects CI\n"
        "    assert settings.get_current_profile_name() in ('default', 'ci')\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"],
                          cwd=other, env=ext["env"], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
