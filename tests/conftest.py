import uuid

import pytest

from sinks.clickhouse import Store


@pytest.fixture(scope="session")
def chdb_dsn(tmp_path_factory):
    """One embedded ClickHouse per test session (chdb allows one store path per process);
    every test gets its own database in it."""
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture
def store(chdb_dsn):
    st = Store(chdb_dsn, "t_" + uuid.uuid4().hex[:12])
    yield st
    st.close()


@pytest.fixture
def other_store(chdb_dsn):
    st = Store(chdb_dsn, "t_" + uuid.uuid4().hex[:12])
    yield st
    st.close()
