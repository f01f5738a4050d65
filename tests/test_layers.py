"""The layering contract (pyproject.toml, ``[tool.importlinter]``): the tree
keeps it, and an upward import breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("conformance", "model", "strategies", "candidates")


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    script = shutil.which("lint-imports", path=sysconfig.get_path("scripts")) \
        or shutil.which("lint-imports")
    if script is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([script, "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _copy_tree(dest: Path) -> None:
    for name in PACKAGES:
        shutil.copytree(ROOT / name, dest / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def test_the_tree_keeps_every_contract():
    proc = _lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    _copy_tree(tmp_path)
    services = tmp_path / "conformance" / "platform" / "services.py"
    services.write_text(services.read_text()
                        + "\nfrom conformance.failures import report  # upward\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "conformance layers BROKEN" in proc.stdout
    assert "conformance.platform.services -> conformance.failures.report" in proc.stdout


def test_a_module_outside_every_layer_breaks_the_layers(tmp_path):
    """``exhaustive = true``: a new module must be given a layer."""
    _copy_tree(tmp_path)
    (tmp_path / "conformance" / "scheduler.py").write_text('"""Not in a layer."""\n')
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "conformance.scheduler" in proc.stdout


def test_a_candidate_importing_the_platform_breaks_a_contract(tmp_path):
    _copy_tree(tmp_path)
    ref = tmp_path / "candidates" / "reference.py"
    ref.write_text(ref.read_text() + "\nfrom conformance.platform import core  # noqa\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "candidates use only the public surface of the harness BROKEN" in proc.stdout


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
