"""The stage2-conformance pytest plugin (entry point ``pytest11:
stage2_conformance``; active wherever the distribution is installed).

What it does:

* Registers the Hypothesis profiles (:mod:`conformance.profiles`) and, when
  the user did not pass ``--hypothesis-profile`` and Hypothesis is still on its
  ``default`` profile, loads ``dev``. (Under CI Hypothesis loads ``ci`` by
  itself; ours is registered under that name, so it is the one that applies.)
  The plugin is active in every pytest run of the environment it is installed
  in, so this (and the report header) only happens when the session runs the
  suite: with ``--candidate``, or with the rootdir being this repository.
  Other projects keep their own Hypothesis defaults.
* Adds ``--candidate NAME`` (repeatable). Every name is resolved through
  :mod:`conformance.registry` first; an unknown or broken candidate is a
  ``pytest.UsageError`` whose one-line message lists the available candidates.

How the conformance machines are collected (the one mechanism):

* The machines live in :mod:`conformance.pytest_plugin.suite`, which builds one unittest
  ``TestConformance_<name>`` class per selected candidate when it is imported.
* **With** ``--candidate``: ``pytest_configure`` replaces ``config.args`` with
  the path of ``conformance/pytest_plugin/suite.py`` inside the installed package, so the
  session collects exactly those machines and nothing else, from any working
  directory (a user's own repository, where our ``tests/`` does not exist).
  A path given on the command line is collected whatever ``python_files``
  says, and unittest classes are collected whatever ``python_classes`` says.
  Other positional arguments are ignored; ``-k``, ``-x``, ``-n`` … still work.
  xdist workers re-parse the same command line, so they select and collect the
  same items. Test ids are
  ``conformance/pytest_plugin/suite.py::TestConformance_<name>::runTest``
  wherever pytest runs (see :func:`pytest_pycollect_makemodule`).
* **Without** ``--candidate``: nothing is redirected. The repository's
  ``tests/test_suite.py`` re-exports the classes of the suite module,
  which then selects every registered candidate that is not a known-bug
  mutant (the mutants have their own test module).

The selection is handed to the suite module through
:mod:`conformance.pytest_plugin.selection`.

Failures:

* Every failing test that wrote conformance failure files (the machine writes
  ``stage2-failures/<candidate>.json`` and ``.md`` on every failing program)
  gets a report section ``stage2-conformance report`` — the plain-text report
  of the shrunk failure, shown under the traceback beside Hypothesis's printed
  steps — and the two paths as ``user_properties`` (``stage2_report``,
  ``stage2_replay``). Both travel with the test report, so under xdist, where
  the worker writes the files, the controller's terminal summary still lists
  them in a ``stage2-conformance failure files`` section.

Shared example database:

* ``--shared-db redis://HOST:PORT`` loads a variant of the active profile
  (``<profile>-shared-db``) whose database is the local directory database
  multiplexed with Hypothesis's Redis database
  (:func:`conformance.profiles.with_shared_db`), in every xdist worker. A
  derandomized profile (``ci``) excludes a database, so the variant is
  non-derandomized; the report header says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from conformance import profiles  # noqa: F401 — registers dev / ci / thorough
from conformance import registry
from conformance.pytest_plugin import selection

#: The pytest module holding the conformance machines.
SUITE = Path(__file__).resolve().with_name("suite.py")
#: Its module name, and the test-id path it gets outside the rootdir.
SUITE_MODULE = "conformance.pytest_plugin.suite"
SUITE_NODEID = "conformance/pytest_plugin/suite.py"
#: The repository root of a source checkout (where ``tests/`` lives).
REPOSITORY = SUITE.parents[2]


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stage2-conformance", "stage2-conformance")
    group.addoption(
        "--candidate", action="append", dest="stage2_candidates", metavar="NAME",
        default=None,
        help="run only the conformance machines of this registered candidate "
             "(repeatable; see `stage2-conformance list`)")
    group.addoption(
        "--shared-db", dest="stage2_shared_db", metavar="redis://HOST:PORT", default=None,
        help="share Hypothesis's example database through Redis, multiplexed with the "
             "local directory database, so that a failure found on any machine is "
             "replayed first on all (needs the redis package; a derandomized profile "
             "such as ci runs non-derandomized with it)")


def _runs_the_suite(config: pytest.Config) -> bool:
    """``--candidate`` given, or pytest running in this repository."""
    if config.getoption("stage2_candidates", None):
        return True
    return Path(config.rootpath).resolve() == REPOSITORY


def _load_default_profile(config: pytest.Config) -> None:
    from hypothesis import settings

    if not _runs_the_suite(config) or config.getoption("hypothesis_profile", None):
        return
    if settings.get_current_profile_name() == "default":
        settings.load_profile("dev")


def pytest_configure(config: pytest.Config) -> None:
    _load_default_profile(config)

    names = config.getoption("stage2_candidates", None)
    selection.select(None)
    if names:
        for name in names:
            try:
                registry.load(name)
            except (registry.UnknownCandidate, registry.CandidateImportError) as exc:
                raise pytest.UsageError(str(exc)) from None
        selection.select(names)
        config.args = [str(SUITE)]
        config.args_source = pytest.Config.ArgsSource.ARGS
    built = sys.modules.get(SUITE_MODULE)
    if built is not None and getattr(built, "BUILT_FOR", None) != selection.selected_candidates():
        # A second in-process session (pytester, IDEs) with another selection
        # must rebuild the module rather than reuse the cached one.
        sys.modules.pop(SUITE_MODULE, None)


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
    """Give ``suite.py`` the node id ``conformance/pytest_plugin/suite.py`` when it lies
    outside the rootdir (an installed package under a user's repository);
    pytest would otherwise give an initial-path file an empty module part
    (``::TestConformance_x::runTest``)."""
    if selection.selected_candidates() is None or Path(module_path).resolve() != SUITE:
        return None
    if Path(module_path).resolve().is_relative_to(parent.config.rootpath.resolve()):
        return None
    return pytest.Module.from_parent(parent, path=Path(module_path),
                                     nodeid=SUITE_NODEID)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _shared_note
    selection.select(None)
    _shared_note = None


# ------------------------------------------------------- shared database
_shared_note: str | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    """``--shared-db``: load ``<current profile>-shared-db`` (runs after every
    plugin's ``pytest_configure``, so after ``--hypothesis-profile``)."""
    global _shared_note
    url = session.config.getoption("stage2_shared_db", None)
    if not url:
        return
    from hypothesis import settings

    current = settings.get_current_profile_name()
    try:
        shared, note = profiles.with_shared_db(settings.get_profile(current), url)
    except profiles.SharedDatabaseError as exc:
        raise pytest.UsageError(str(exc)) from None
    name = current if current.endswith("-shared-db") else f"{current}-shared-db"
    settings.register_profile(name, shared)
    settings.load_profile(name)
    _shared_note = (f"stage2-conformance: --shared-db {url}: hypothesis profile {name!r} "
                    "(local directory database + Redis)" + (f"; {note}" if note else ""))


# ------------------------------------------------------------ failure files
_MARK = pytest.StashKey[int]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    from conformance.failures import files

    item.stash[_MARK] = files.current_seq()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed or _MARK not in item.stash:
        return
    from conformance.failures import files, report

    written = files.written_since(item.stash[_MARK])
    if not written:
        return
    item.stash[_MARK] = files.current_seq()  # each file once per test
    for json_path, md_path in written:
        rep.user_properties.append(("stage2_report", md_path))
        rep.user_properties.append(("stage2_replay", json_path))
        found = files.last_report(json_path)
        if found is not None:
            rep.sections.append(("stage2-conformance report", report.text(found)))


def failure_files(reports) -> list[tuple[str, str, str]]:
    """``(nodeid, report path, replay path)`` from test reports'
    ``user_properties`` (lists after an xdist round trip)."""
    out = []
    for rep in reports:
        props = [tuple(p) for p in getattr(rep, "user_properties", ()) or ()]
        md = [v for k, v in props if k == "stage2_report"]
        js = [v for k, v in props if k == "stage2_replay"]
        out += [(rep.nodeid, m, j) for m, j in zip(md, js)]
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    from conformance.failures import files

    reports = list(terminalreporter.stats.get("failed", ())) + \
        list(terminalreporter.stats.get("error", ()))
    rows = failure_files(reports)
    if not rows:
        return
    tr = terminalreporter
    tr.section("stage2-conformance failure files", sep="=", bold=True)
    for nodeid, md, js in rows:
        tr.write_line(nodeid)
        tr.write_line(f"  report: {files.display(Path(md))}")
        tr.write_line(f"  replay: stage2-conformance replay {files.display(Path(js))}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    if not _runs_the_suite(config):
        return [_shared_note] if _shared_note else []
    from hypothesis import settings

    from conformance.pytest_plugin import suite

    names = ", ".join(suite.SELECTED) or "(none)"
    how = "--candidate" if selection.selected_candidates() is not None else "bundled correct candidates"
    lines = [f"stage2-conformance: candidates under test ({how}): {names}; "
             f"hypothesis profile {settings.get_current_profile_name()!r}"]
    if _shared_note:
        lines.append(_shared_note)
    return lines
