import contextlib
import uuid

import pytest

from sinks.store import Store


@contextlib.contextmanager
def scratch_store(dsn: str, prefix: str = "t_"):
    """A store in a new database of ``dsn``, dropped afterwards: the session's embedded engine
    would otherwise gather hundreds of databases, and every later schema and query slows down
    (a fresh store took 0.6 s alone, 9 s late in the suite)."""
    st = Store(dsn, prefix + uuid.uuid4().hex[:12])
    try:
        yield st
    finally:
        try:
            st.command(f"DROP DATABASE IF EXISTS {st.database} SYNC")
        except Exception:  # the test closed it (as a service would): drop through a new client
            again = Store(dsn, st.database, apply_schema=False)
            try:
                again.command(f"DROP DATABASE IF EXISTS {st.database} SYNC")
            finally:
                again.close()
        finally:
            st.close()


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory):
    """One embedded ClickHouse per test session (chdb allows one store path per process);
    every test gets its own database in it."""
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture
def store(chdb_dsn):
    with scratch_store(chdb_dsn) as st:
        yield st


@pytest.fixture
def other_store(chdb_dsn):
    with scratch_store(chdb_dsn) as st:
        yield st


# The longest modules first (measured: `./tapeflow test --durations=30`): with one worker per core
# they then overlap with the many short ones instead of running alone at the end. Order only.
SLOW_FIRST = ("tests/integration/test_determinism.py", "tests/integration/test_learning_loop.py",
              "tests/integration/test_malformed_kafka.py", "tests/integration/test_kafka_pipeline.py",
              "tests/integration/test_ingest.py", "tests/integration/test_compose.py", "tests/test_cli.py")


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOW_FIRST)))  # stable: the rest keep their order
