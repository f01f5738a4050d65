"""Hypothesis settings profiles and the shared example database (DESIGN §8).

``dev``       default for people: random, the local example database, shrinking
              and no ``explain`` phase (it re-runs every step for coverage and
              costs minutes on stateful failures).
``ci``        what Hypothesis loads by itself when it detects CI; we register
              our own under the same name so it applies: derandomized (the same
              seed every run), no database, the same budget as ``dev``.
``thorough``  1,000 programs of up to 60 steps: the pre-posting run.

Every profile sets ``deadline=None`` (a deadline would apply to a whole
program) and suppresses only ``too_slow`` and ``data_too_large``.

**Sharing failures between machines.** :func:`shared_database` combines the
local directory database with Hypothesis's Redis database
(``MultiplexedDatabase(DirectoryBasedExampleDatabase(local),
RedisExampleDatabase(redis))``): every failure any machine finds is saved in
both, and every run replays what either holds first. :func:`with_shared_db`
applies it to a profile; since ``derandomize=True`` and a database exclude
each other, a derandomized profile (``ci``) is run *non-derandomized* with the
shared database, and the returned note says so. Hypothesis's database keys are
digests of the machine class, and its format changes between versions, so the
machines sharing a Redis database should pin the same suite and Hypothesis
versions.
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings

PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)
COMMON = dict(deadline=None, phases=PHASES, stateful_step_count=40,
              report_multiple_bugs=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def pin_generation_constants() -> bool:
    """Make a seed alone decide the programs.

    Since 6.131 Hypothesis draws, in about 5% of integer draws, a literal
    collected from every *local* module in ``sys.modules`` (our packages, a
    user's candidate, the ``__main__`` script; not tests, not site-packages).
    Which modules are loaded differs between pytest, the command line and a
    script, and changes when a module is imported mid-run, so the same seed
    (or the derandomized ``ci`` profile) generated different programs
    depending on how the suite was started. Our strategies draw small indices
    and ``sampled_from`` choices, where those literals add nothing; we empty
    the local pool (Hypothesis's built-in constants stay). Uses a Hypothesis
    internal: returns False, changing nothing, if it is not there."""
    try:
        from hypothesis.internal.conjecture import providers
        empty = providers.Constants()
        providers._get_local_constants  # noqa: B018 - present in this version?
        providers.CONSTANTS_CACHE.cache.clear()
    except (ImportError, AttributeError):
        return False
    global _unpinned
    _unpinned = providers._get_local_constants
    providers._get_local_constants = lambda: empty
    return True


_unpinned = None  # Hypothesis's own pool function, for tests


PINNED_CONSTANTS = pin_generation_constants()

# Built on Hypothesis's "default" profile, not on whatever profile is loaded at
# import time: under CI Hypothesis has already loaded its own derandomized,
# database-less "ci" profile, and ``settings(...)`` would inherit from it.
_BASE = settings.get_profile("default")

PROFILES = {
    "dev": settings(_BASE, max_examples=60, **COMMON),
    "ci": settings(_BASE, max_examples=60, derandomize=True, database=None, print_blob=True,
                   **COMMON),
    "thorough": settings(_BASE, max_examples=1000, **{**COMMON, "stateful_step_count": 60}),
}

#: Key prefix of the suite's entries in a shared Redis database.
REDIS_KEY_PREFIX = b"stage2-conformance:"


def register() -> None:
    for name, profile in PROFILES.items():
        settings.register_profile(name, profile)


class SharedDatabaseError(Exception):
    """``--shared-db`` cannot be used (bad URL, no ``redis`` package, Redis not
    reachable); the message is one line."""


def local_database(path=None):
    """The normal local directory database (``.hypothesis/examples`` unless
    ``path``, or ``$HYPOTHESIS_STORAGE_DIRECTORY``, says otherwise)."""
    from hypothesis.database import DirectoryBasedExampleDatabase

    if path is None:
        from hypothesis.configuration import storage_directory

        where = storage_directory("examples", intent_to_write=False)
        path = getattr(where, "path", where)
    return DirectoryBasedExampleDatabase(str(path))


def redis_database(url: str, *, check: bool = True):
    """Hypothesis's ``RedisExampleDatabase`` on ``url``
    (``redis://HOST:PORT[/DB]``); with ``check`` it pings the server first so a
    wrong address is a clear error rather than a failure in the middle of a
    run."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise SharedDatabaseError(
            f"--shared-db {url!r}: expected a Redis URL such as redis://HOST:6379")
    try:
        import redis
        from hypothesis.extra.redis import RedisExampleDatabase
    except ImportError as exc:
        raise SharedDatabaseError(
            f"--shared-db needs the 'redis' package ({exc}); install it with "
            "pip install redis, or pip install -e \".[test]\"") from None
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    if check:
        try:
            client.ping()
        except Exception as exc:  # noqa: BLE001 — any connection problem
            raise SharedDatabaseError(
                f"--shared-db: cannot reach Redis at {url}: "
                f"{' '.join(str(exc).split())}") from None
    return RedisExampleDatabase(client, key_prefix=REDIS_KEY_PREFIX)


def shared_database(url: str, local_path=None, *, check: bool = True):
    """The local directory database and the Redis database at ``url``, as one
    ``MultiplexedDatabase``: saves go to both, fetches read both."""
    from hypothesis.database import MultiplexedDatabase

    return MultiplexedDatabase(local_database(local_path), redis_database(url, check=check))


def with_shared_db(base: settings, url: str, local_path=None) -> tuple[settings, str | None]:
    """``base`` with the shared database at ``url``; non-derandomized if
    ``base`` was derandomized (they exclude each other), in which case the
    returned note says so (else the note is ``None``)."""
    db = shared_database(url, local_path)
    note = None
    if base.derandomize:
        note = ("--shared-db: the profile is derandomized, which excludes an example "
                "database; running it non-derandomized (random programs) with the "
                "shared database")
    return settings(base, database=db, derandomize=False), note


register()
