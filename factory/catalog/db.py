"""The catalog database: its tables, and connections that wait (boundedly) for the lock.

DuckDB lets one process hold a database file at a time, so every catalog operation opens a
short-lived connection; another process waiting for it retries until ``lock_timeout`` and
then fails with :class:`CatalogBusy`. Inside one process, threads share one connection
(:func:`factory.dbwait.shared_connection`), so readers and writers never clash there. The SQL
stays portable: no extensions, and no ``ON CONFLICT`` (DuckLake has no keys to conflict on).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from factory.dbwait import Opener, parse_lock_timeout, shared_connection
from schemas.errors import PrefabError

SCHEMA_VERSION = "1"

DDL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS datasets (
    name VARCHAR PRIMARY KEY,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    dataset VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL,
    message VARCHAR,
    rows BIGINT NOT NULL,
    lineage VARCHAR NOT NULL,
    PRIMARY KEY (dataset, version)
);
CREATE TABLE IF NOT EXISTS version_parents (
    dataset VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    parent_dataset VARCHAR NOT NULL,
    parent_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    sha256 VARCHAR PRIMARY KEY,
    relpath VARCHAR NOT NULL,
    bytes BIGINT NOT NULL,
    rows BIGINT NOT NULL,
    created_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS version_files (
    dataset VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    role VARCHAR NOT NULL,  -- 'data' (the pairs) or 'index' (pair_id, prompt_id, verdict hash)
    ordinal INTEGER NOT NULL,
    sha256 VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    dataset VARCHAR NOT NULL,
    tag VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (dataset, tag)
);
CREATE TABLE IF NOT EXISTS tag_events (
    dataset VARCHAR NOT NULL,
    tag VARCHAR NOT NULL,
    old_version INTEGER,
    new_version INTEGER NOT NULL,
    moved_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    dataset VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    file VARCHAR,
    line BIGINT,
    field VARCHAR,
    reason VARCHAR NOT NULL,
    raw VARCHAR
);
CREATE TABLE IF NOT EXISTS failures (
    dataset VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    step VARCHAR,
    pair_id VARCHAR,
    reason VARCHAR NOT NULL,
    raw VARCHAR  -- the input row as JSON
);
-- A commit whose rows equal the version's (an "unchanged" commit) is a later run of it:
-- its lineage, failures, quarantine and attachments are kept under the run's number so a
-- step keyed by its lineage finds the version; run 0 is the commit that made the version.
CREATE TABLE IF NOT EXISTS runs (
    dataset VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    run INTEGER NOT NULL,
    created_at TIMESTAMP NOT NULL,
    message VARCHAR,
    lineage VARCHAR NOT NULL,
    PRIMARY KEY (dataset, version, run)
);
CREATE TABLE IF NOT EXISTS models (
    name VARCHAR NOT NULL,
    version INTEGER NOT NULL,
    relpath VARCHAR NOT NULL,
    dataset VARCHAR,
    dataset_version INTEGER,
    metrics VARCHAR NOT NULL,
    params VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL,
    PRIMARY KEY (name, version)
);
"""


class CatalogBusy(PrefabError):
    pass


def lock_timeout_seconds() -> float:
    """``$PREFAB_LOCK_TIMEOUT`` (seconds, default 60), refused in one line if it is not a number."""
    return parse_lock_timeout(os.environ.get("PREFAB_LOCK_TIMEOUT"))


@contextmanager
def connect(path: Path | str, *, read_only: bool = False, timeout: float | None = None,
            opener: Opener | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
    """A connection to the catalog database, waiting while another process holds it.

    ``path`` is the home's database file, or with ``opener`` a DuckLake's URL.
    """
    timeout = lock_timeout_seconds() if timeout is None else timeout
    if read_only and isinstance(path, Path) and not path.exists():
        read_only = False  # the first reader creates the database
    with shared_connection(
        path, timeout=timeout, read_only=read_only, opener=opener,
        on_timeout=lambda: CatalogBusy(
            f"catalog busy: {path} is held by another prefab process (or another connection of "
            f"this one) for over {timeout:.0f} s (set PREFAB_LOCK_TIMEOUT to wait longer)"
        ),
    ) as connection:
        yield connection


# Columns added after catalogs existed: older catalogs gain them (their rows are run 0).
MIGRATIONS = """
ALTER TABLE version_files ADD COLUMN IF NOT EXISTS run INTEGER DEFAULT 0;
ALTER TABLE quarantine ADD COLUMN IF NOT EXISTS run INTEGER DEFAULT 0;
ALTER TABLE failures ADD COLUMN IF NOT EXISTS run INTEGER DEFAULT 0;
"""


def initialise(connection: duckdb.DuckDBPyConnection) -> None:
    connection.execute(DDL)
    connection.execute(MIGRATIONS)
    connection.execute(
        "INSERT INTO meta SELECT 'schema_version', ? WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'schema_version')",
        [SCHEMA_VERSION],
    )
