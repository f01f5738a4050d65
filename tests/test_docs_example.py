"""The minimal candidate of docs/candidate-protocol.md passes the suite, and
the page shows exactly the file that is tested (so the page cannot rot)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from conformance.runner import run

DOCS = Path(__file__).resolve().parent.parent / "docs"
EXAMPLE = DOCS / "examples" / "minimal_candidate.py"
PAGE = DOCS / "candidate-protocol.md"


def load_example():
    """docs/ is not a package: import the example by path."""
    spec = importlib.util.spec_from_file_location("minimal_candidate", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_minimal_candidate_passes():
    cls = load_example().MinimalCandidate
    result = run("minimal", cls, profile="ci", max_examples=30)
    assert result.status == "pass", f"{result.failure}\n" + "\n".join(result.trace)


def test_page_shows_the_example_verbatim():
    page = PAGE.read_text()
    blocks = re.findall(r"^```python\n(.*?)^```$", page, flags=re.M | re.S)
    shown = [b for b in blocks if "class MinimalCandidate" in b]
    assert len(shown) == 1, "candidate-protocol.md must show the example exactly once"
    assert shown[0] == EXAMPLE.read_text()
