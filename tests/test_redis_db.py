"""The shared example database (DESIGN §8; reference-testing-tools §1.3): a
failure found on one machine is replayed first on another that shares only
the Redis database with it.

Starts a real ``redis-server`` on 127.0.0.1 (a free port, no persistence);
skipped when the binary or the ``redis`` package is missing (``.ci/run``
installs the server, the ``test`` extra the package)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
from hypothesis import Phase
from hypothesis.database import DirectoryBasedExampleDatabase

from candidates.mutants import MUTANTS
from conformance import cli, profiles
from conformance.cli.common import timed_run

if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run "
                "installs it when it can)", allow_module_level=True)
redis = pytest.importorskip("redis", reason="the redis package is not installed "
                                            "(pip install -e '.[test]')")

NAME = "mutant-no-dirty-mark"
#: Only the database's examples run: a failure can only come from it.
REUSE_ONLY = dict(phases=[Phase.reuse], max_examples=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--save", "", "--appendonly", "no", "--port", str(port),
         "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(autouse=True)
def failures_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("STAGE2_FAILURES_DIR", str(tmp_path / "failures"))


def _entries(path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def test_a_failure_found_on_one_machine_is_replayed_first_on_another(tmp_path, redis_url):
    cls = MUTANTS[NAME]
    # Machine A finds the bug (random, seeded), saving it locally and in Redis.
    db_a = profiles.shared_database(redis_url, tmp_path / "A")
    found, _ = timed_run(NAME, cls, profile="dev", seed=1, max_examples=300, database=db_a)
    assert found.status == "fail", found
    assert _entries(tmp_path / "A") >= 1
    client = redis.Redis.from_url(redis_url)
    assert client.keys(profiles.REDIS_KEY_PREFIX + b"*")

    # Machine B has nothing locally and may only run the database's examples
    # (no generation): a failure can only come from Redis. It is its very
    # first program.
    db_b = profiles.shared_database(redis_url, tmp_path / "B")
    assert _entries(tmp_path / "B") == 0
    again, first = timed_run(NAME, cls, profile="dev", database=db_b, **REUSE_ONLY)
    assert again.status == "fail"
    assert str(again.failure) == str(found.failure)
    assert first["examples"] == 1
    assert _entries(tmp_path / "B") >= 1  # and now B has it locally too

    # A normal small run on a third machine fails at once, too.
    db_c = profiles.shared_database(redis_url, tmp_path / "C")
    third, first = timed_run(NAME, cls, profile="dev", database=db_c, max_examples=1)
    assert third.status == "fail" and first["examples"] == 1


def test_the_ci_profile_runs_non_derandomized_with_a_shared_db(redis_url):
    shared, note = profiles.with_shared_db(profiles.PROFILES["ci"], redis_url)
    assert shared.derandomize is False and shared.database is not None
    assert "derandomized" in note
    shared, note = profiles.with_shared_db(profiles.PROFILES["dev"], redis_url)
    assert note is None


def test_unreachable_redis_is_a_clear_error():
    with pytest.raises(profiles.SharedDatabaseError, match="cannot reach Redis"):
        profiles.shared_database(f"redis://127.0.0.1:{_free_port()}")


def test_cli_run_shares_failures(tmp_path, redis_url, monkeypatch, capsys):
    dirs = iter([tmp_path / "one", tmp_path / "two"])
    monkeypatch.setattr(profiles, "local_database",
                        lambda path=None: DirectoryBasedExampleDatabase(str(next(dirs))))
    argv = ["run", "--candidate", NAME, "--shared-db", redis_url]
    assert cli.main(argv + ["--profile", "ci", "--examples", "300"]) == 1
    out = capsys.readouterr().out
    assert "note: --shared-db: the profile is derandomized" in out
    assert "shared database" in out
    assert cli.main(argv + ["--examples", "1"]) == 1
    out = capsys.readouterr().out
    assert "first failure after 1 programs" in out


pytest_plugins = ["pytester"]


def test_pytest_shared_db_option(pytester, tmp_path, redis_url, monkeypatch):
    """Two pytest sessions that share only Redis: the second, allowed to run
    nothing but the database's examples, still fails."""
    pytester.makeconftest(
        "from hypothesis import Phase, settings\n"
        "settings.register_profile('reuse-only', max_examples=1, phases=[Phase.reuse],\n"
        "                          deadline=None)\n")
    monkeypatch.setenv("STAGE2_FAILURES_DIR", str(tmp_path / "failures"))
    monkeypatch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", str(tmp_path / "first"))
    first = pytester.runpytest_subprocess("--candidate", NAME, "--shared-db", redis_url,
                                          "--hypothesis-profile", "ci", "-p", "no:randomly")
    first.assert_outcomes(failed=1)
    first.stdout.fnmatch_lines([
        f"*--shared-db {redis_url}: hypothesis profile 'ci-shared-db'*derandomized*",
        "*stage2-conformance failure files*",
        f"*replay: stage2-conformance replay *{NAME}.json"])

    monkeypatch.setenv("HYPOTHESIS_STORAGE_DIRECTORY", str(tmp_path / "second"))
    alone = pytester.runpytest_subprocess("--candidate", NAME,
                                          "--hypothesis-profile", "reuse-only")
    alone.assert_outcomes(skipped=1)  # nothing to replay: Hypothesis runs nothing
    shared = pytester.runpytest_subprocess("--candidate", NAME, "--shared-db", redis_url,
                                           "--hypothesis-profile", "reuse-only")
    shared.assert_outcomes(failed=1)
    shared.stdout.fnmatch_lines(["*[[]dirty-logging[]]*"])
