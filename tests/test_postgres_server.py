"""The throwaway PostgreSQL server, and DuckDB's ducklake and postgres extensions loaded
offline from their wheels: the pieces the team catalog (DuckLake on PostgreSQL) stands on."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import duckdb
import pytest

from factory.lake_extensions import extension_path, load_lake_extensions
from schemas.errors import PrefabError
from tests.postgres_server import (
    PostgresUnavailable,
    _dsn_fields,
    _unavailable,
    start_postgres,
)


def _lake_connection(postgres: bool) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect()
    try:
        load_lake_extensions(connection, postgres=postgres)
    except PrefabError as exc:
        connection.close()
        pytest.skip(f"lake extensions unavailable: {exc}")
    return connection


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.postgres
def test_start_postgres_outside_pytest_serves_then_stops_and_cleans(tmp_path: Path):
    try:
        dsn, stop = start_postgres(tmp_path)
    except PostgresUnavailable as exc:
        _unavailable(str(exc))
    port = int(_dsn_fields(dsn)["port"])
    assert _accepts(port)
    stop()
    assert not _accepts(port)
    assert not list(tmp_path.glob("prefab-pg-*")), "the cluster's folder is removed"


def test_server_gives_a_database_and_fresh_ones(postgres_dsn: str, postgres_database: str):
    assert _dsn_fields(postgres_dsn)["dbname"] == "prefab"
    assert _dsn_fields(postgres_database)["dbname"] != "prefab"
    connection = _lake_connection(postgres=True)
    connection.execute(f"ATTACH '{postgres_dsn}' AS pg (TYPE postgres)")
    connection.execute("CREATE TABLE pg.public.probe (id INTEGER, text VARCHAR)")
    connection.execute("INSERT INTO pg.public.probe VALUES (1, 'a'), (2, 'b')")
    assert connection.execute("SELECT sum(id) FROM pg.public.probe").fetchone() == (3,)
    # Another database of the same server sees none of it.
    connection.execute(f"ATTACH '{postgres_database}' AS fresh (TYPE postgres)")
    tables = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = 'fresh' "
        "AND schema_name = 'public'"
    ).fetchone()
    assert tables == (0,)
    connection.execute("DROP TABLE pg.public.probe")
    connection.close()


def test_ducklake_on_postgres_snapshots_and_time_travel(postgres_database: str, tmp_path: Path):
    data = tmp_path / "lake-data"
    connection = _lake_connection(postgres=True)
    connection.execute(
        f"ATTACH 'ducklake:postgres:{postgres_database}' AS lake (DATA_PATH '{data}')"
    )
    connection.execute("CREATE TABLE lake.pairs (id VARCHAR, score DOUBLE)")
    connection.execute("INSERT INTO lake.pairs VALUES ('a', 1.0), ('b', 2.0)")
    first = connection.execute(
        "SELECT max(snapshot_id) FROM lake.snapshots()"
    ).fetchone()[0]
    # A few rows are inlined into the catalog's own tables; this many go to a Parquet file.
    connection.execute("INSERT INTO lake.pairs SELECT 'r' || range, range FROM range(1000)")
    second = connection.execute(
        "SELECT max(snapshot_id) FROM lake.snapshots()"
    ).fetchone()[0]
    assert second > first
    # snapshots() returns TIMESTAMPTZ columns: fetching them needs pytz beside duckdb.
    assert all(row[1] is not None for row in connection.execute(
        "SELECT snapshot_id, snapshot_time FROM lake.snapshots()").fetchall())
    then = connection.execute(
        f"SELECT id FROM lake.pairs AT (VERSION => {first}) ORDER BY id"
    ).fetchall()
    assert then == [("a",), ("b",)]
    assert connection.execute("SELECT count(*) FROM lake.pairs").fetchone() == (1002,)
    assert list(data.rglob("*.parquet")), "the lake's rows are Parquet files under DATA_PATH"
    connection.close()

    # A second client with only the catalog's DSN and the data path reads the same versions.
    reader = _lake_connection(postgres=True)
    reader.execute(
        f"ATTACH 'ducklake:postgres:{postgres_database}' AS lake "
        f"(DATA_PATH '{data}', READ_ONLY)"
    )
    assert reader.execute(
        f"SELECT count(*) FROM lake.pairs AT (VERSION => {first})"
    ).fetchone() == (2,)
    assert reader.execute("SELECT count(*) FROM lake.pairs").fetchone() == (1002,)
    reader.close()


def test_ducklake_on_a_local_metadata_file(tmp_path: Path):
    connection = _lake_connection(postgres=False)
    connection.execute(
        f"ATTACH 'ducklake:{tmp_path / 'meta.ducklake'}' AS lake (DATA_PATH '{tmp_path / 'data'}')"
    )
    connection.execute("CREATE TABLE lake.t AS SELECT range AS i FROM range(5)")
    version = connection.execute("SELECT max(snapshot_id) FROM lake.snapshots()").fetchone()[0]
    connection.execute("DELETE FROM lake.t WHERE i < 2")
    assert connection.execute(
        f"SELECT count(*) FROM lake.t AT (VERSION => {version})"
    ).fetchone() == (5,)
    assert connection.execute("SELECT count(*) FROM lake.t").fetchone() == (3,)
    connection.close()


def test_missing_extension_names_the_extra(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "duckdb_extension_ducklake", None)  # import fails
    with pytest.raises(PrefabError, match=r"pip install 'prefab\[lake\]'.*duckdb==1\.5\.5"):
        extension_path("ducklake")


def test_mismatched_duckdb_names_both_versions(monkeypatch: pytest.MonkeyPatch):
    try:
        extension_path("ducklake")
    except PrefabError as exc:
        pytest.skip(f"lake extension wheel unavailable: {exc}")
    monkeypatch.setattr(duckdb, "__version__", "0.0.1")
    with pytest.raises(PrefabError, match=r"for DuckDB 1\.5\.5.*duckdb 0\.0\.1"):
        extension_path("ducklake")


def test_no_binaries_gives_the_reason_and_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path):
    import tests.postgres_server as server

    monkeypatch.setattr(server, "find_postgres_bin", lambda: None)
    with pytest.raises(PostgresUnavailable, match="apt-get install postgresql"):
        start_postgres(tmp_path)
