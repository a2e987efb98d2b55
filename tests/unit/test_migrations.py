"""Schema migrations (issue 11): numbered schema files are applied once per store and recorded in
``schema_migrations`` with their checksums; view files are recreated at every start; a store made
by the previous release is upgraded in place and every view then answers.

The previous release's schema is frozen in tests/fixtures/schema_v1 (infra/clickhouse as it was
before ``bars.profile_coarse``; its files were applied, every statement at every start, with no
record of what ran). All stores are real (embedded chdb), one database per test.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from sinks.store import SCHEMA_DIR, Store, StoreError, _statements, schema_files
from sinks.rows import BAR_COLUMNS

V1 = Path(__file__).resolve().parents[1] / "fixtures" / "schema_v1"


def _columns(store: Store) -> list[tuple]:
    """Every table's and view's columns with their types, in order."""
    return store.query("SELECT table, name, type FROM system.columns WHERE database = currentDatabase() "
                       "ORDER BY table, position")[1]


def _views(store: Store) -> set[str]:
    return {r[0] for r in store.query("SELECT name FROM system.tables WHERE database = currentDatabase() "
                                      "AND engine = 'View'")[1]}


def _previous_release_store(dsn: str, database: str) -> Store:
    """A store as the previous release left it: every statement of its schema files applied (that
    release's way), no schema_migrations, and a bar it wrote with its columns."""
    st = Store(dsn, database, apply_schema=False)
    for path in sorted(V1.glob("*.sql")):
        for stmt in _statements(path.read_text()):
            st.client.command(stmt)
    old_columns = [c for c in BAR_COLUMNS if c != "profile_coarse"]
    row = {c: 1.0 for c in old_columns} | {
        "exchange": "x", "symbol": "A/USDT:USDT", "tf": "1m", "start": datetime(2024, 1, 1, tzinfo=timezone.utc),
        "end": datetime(2024, 1, 1, 0, 1, tzinfo=timezone.utc), "trades": 3, "parent_orders": 2, "pro_orders": 1,
        "amateur_orders": 1, "partial": 0}
    st.client.insert("bars", [[row[c] for c in old_columns]], column_names=old_columns)
    return st


def test_a_store_of_the_previous_release_is_upgraded_in_place_and_every_view_answers(chdb_dsn):
    suffix = uuid.uuid4().hex[:10]
    old = _previous_release_store(chdb_dsn, "v1_" + suffix)
    assert "profile_coarse" not in {name for table, name, _ in _columns(old) if table == "bars"}
    old.close()

    upgraded = Store(chdb_dsn, "v1_" + suffix)  # what every command does at its start
    fresh = Store(chdb_dsn, "new_" + suffix)
    try:
        # every table and view has exactly the columns (and types) of a store made by this version
        assert _columns(upgraded) == _columns(fresh)
        # the old bar is still there and reads the new column's default
        _, rows = upgraded.query("SELECT symbol, trades, profile_coarse FROM bars FINAL")
        assert rows == [("A/USDT:USDT", 3, 0)]
        # every migration is recorded with the checksum of its file
        _, rec = upgraded.query("SELECT version, name, checksum FROM schema_migrations FINAL ORDER BY version")
        assert rec == [(f.version, f.name, f.checksum) for f in schema_files() if not f.views]
        # every view of the schema exists and can be queried on the upgraded store
        defined = {s.split()[4] for f in schema_files() if f.views for s in f.statements}
        assert _views(upgraded) == defined and len(defined) >= 19
        for view in sorted(defined):
            upgraded.query(f"SELECT * FROM {view} LIMIT 1")
        _, throughput = upgraded.query("SELECT symbol, trades FROM kpi_throughput")
        assert throughput == [("A/USDT:USDT", 3)]  # a view over the upgraded table sees the old row
    finally:
        upgraded.close()
        fresh.close()


def test_a_store_lives_in_its_named_database_and_a_second_open_finds_it(chdb_dsn):
    """Opening makes the database and names it the connection's default (one connection: the
    database is applied per query), so the schema lands there and not in ``default``."""
    name = "named_" + uuid.uuid4().hex[:10]
    st = Store(chdb_dsn, name)
    try:
        assert st.query("SELECT currentDatabase()")[1] == [(name,)]
        tables = {r[0] for r in st.query(f"SELECT name FROM system.tables WHERE database = '{name}'")[1]}
        assert {"bars", "schema_migrations"} <= tables
        in_default = st.query("SELECT count() FROM system.tables WHERE database = 'default' AND name = 'bars'")[1]
        assert in_default == [(0,)]
        st.client.command("INSERT INTO bars (exchange, symbol, tf, start, end, trades) VALUES "
                          "('x', 'A/USDT:USDT', '1m', '2024-01-01 00:00:00', '2024-01-01 00:01:00', 3)")
    finally:
        st.close()
    again = Store(chdb_dsn, name)
    try:
        assert again.query("SELECT count() FROM bars")[1] == [(1,)]
    finally:
        again.close()


def test_migrations_run_once_and_views_at_every_start(store):
    assert store.apply_schema() == []  # the fixture's open applied everything; nothing is left
    _, rec = store.query("SELECT count(), uniqExact(version) FROM schema_migrations")
    n = len([f for f in schema_files() if not f.views])
    assert rec == [(n, n)]  # one record each, not one per start
    store.command("DROP VIEW kpi_fees")
    store.apply_schema()
    assert "kpi_fees" in _views(store)  # views are recreated every start


def test_a_later_migration_reaches_an_existing_store(store, tmp_path):
    schema = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, schema)
    (schema / "900_fills_fee_tier.sql").write_text(
        "-- a column a later version adds\n"
        "ALTER TABLE fills ADD COLUMN IF NOT EXISTS fee_tier LowCardinality(String) DEFAULT '';\n")
    assert store.apply_schema(schema) == ["900_fills_fee_tier.sql"]
    assert ("fills", "fee_tier", "LowCardinality(String)") in _columns(store)
    assert store.apply_schema(schema) == []


def test_a_migration_that_fails_is_not_recorded_and_runs_again_once_fixed(store, tmp_path):
    schema = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, schema)
    path = schema / "901_two_steps.sql"
    path.write_text("ALTER TABLE fills ADD COLUMN IF NOT EXISTS a UInt8;\n"
                    "ALTER TABLE no_such_table ADD COLUMN IF NOT EXISTS b UInt8;\n")
    with pytest.raises(StoreError, match=r"schema 901_two_steps\.sql .*UNKNOWN_TABLE"):
        store.apply_schema(schema)
    _, rec = store.query("SELECT count() FROM schema_migrations WHERE version = 901")
    assert rec == [(0,)]
    path.write_text("ALTER TABLE fills ADD COLUMN IF NOT EXISTS a UInt8;\n"
                    "ALTER TABLE equity ADD COLUMN IF NOT EXISTS b UInt8;\n")
    assert store.apply_schema(schema) == ["901_two_steps.sql"]  # its first statement runs again: idempotent


def test_an_applied_migration_that_changed_is_refused(store, tmp_path):
    schema = tmp_path / "schema"
    shutil.copytree(SCHEMA_DIR, schema)
    events = schema / "002_events.sql"
    text = events.read_text()
    # comment lines and layout are free to change
    events.write_text("-- a note added later\n" + text.replace("    kind      ", "  kind "))
    assert store.apply_schema(schema) == []
    # a change inside a statement would never reach this store: refused, naming the file
    events.write_text(text.replace("reason    String", "reason    LowCardinality(String)"))
    with pytest.raises(StoreError, match=r"002_events\.sql .*must not change.*new numbered file"):
        store.apply_schema(schema)


@pytest.mark.parametrize("files, message", [
    ({"001_a.sql": "CREATE TABLE IF NOT EXISTS a (x UInt8) ENGINE = Memory;",
      "001_b.sql": "CREATE TABLE IF NOT EXISTS b (x UInt8) ENGINE = Memory;"}, r"share version 001"),
    ({"001_a.sql": "CREATE TABLE IF NOT EXISTS a (x UInt8) ENGINE = Memory;\nCREATE OR REPLACE VIEW v AS SELECT 1;"},
     r"001_a\.sql mixes views"),
    ({"views.sql": "CREATE OR REPLACE VIEW v AS SELECT 1;"}, r"views\.sql is not named NNN_name\.sql"),
])
def test_schema_files_break_no_rule(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(StoreError, match=message):
        schema_files(tmp_path)


def test_this_versions_schema_files_are_valid():
    files = schema_files()
    assert [f.version for f in files] == sorted({f.version for f in files})
    assert any(f.views for f in files) and any(not f.views for f in files)
