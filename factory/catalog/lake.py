"""The catalog on DuckLake: prefab's tables inside a lake whose metadata lives in a DuckDB
file (one machine) or PostgreSQL (a team), its Parquet objects under the lake's data path.

A catalog URL is ``ducklake:<metadata>[ DATA_PATH <path>]``: ``ducklake:/shared/prefab.ducklake``
or ``ducklake:postgres:dbname=prefab host=db DATA_PATH /mnt/prefab/``. The data path is
fixed when the lake is made (default for a file: ``<file>.files/``); later users need only
the metadata part. prefab's content-addressed objects go in ``<data path>/objects/`` and
DuckLake's own files in ``<data path>/lake/`` (DuckLake's data path): DuckLake's orphan
cleanup deletes every file under its data path it does not know, and it knows no index
file or attachment.

Each process keeps one in-memory DuckDB with the extensions loaded (loading them costs a
good part of a second) and attaches the lake for the span of its catalog operations
(:func:`factory.dbwait.shared_connection` decides when): a metadata file is then free for
other processes between operations, as the home catalog's file is. Concurrent writers meet
at commit: DuckLake refuses a transaction whose changes conflict with one committed since
it began, and every prefab write updates the one row of ``prefab.writes``, so any two
concurrent prefab writes conflict and the loser runs again on the new state (see
``Catalog._write``); version numbers stay unique without the primary keys DuckLake lacks.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb

from factory.catalog.db import DDL, MIGRATIONS, SCHEMA_VERSION
from factory.dbwait import Opener
from factory.lake_extensions import load_lake_extensions
from schemas.errors import PrefabError

CATALOG_VARIABLE = "PREFAB_CATALOG"
SCHEMA = "prefab"
# Every prefab write updates this row, so two concurrent writes always conflict in DuckLake.
SERIALIZE_WRITES = "UPDATE writes SET count = count + 1"
_DATA_PATH = re.compile(r"\s+DATA_PATH\s+")
FIRST_ATTACH_ATTEMPTS = 5
LAKE_FILES = "lake"  # DuckLake's own data path, inside prefab's


@dataclass(frozen=True)
class LakeSpec:
    metadata: str  # what follows ``ducklake:``: a file path or ``postgres:<libpq DSN>``
    data_path: str | None = None

    @property
    def url(self) -> str:
        return f"ducklake:{self.metadata}" + (f" DATA_PATH {self.data_path}" if self.data_path else "")

    @property
    def metadata_file(self) -> Path | None:
        return None if self.metadata.startswith("postgres:") else Path(self.metadata)

    @property
    def alias(self) -> str:
        """The name the lake is attached under in this process's DuckDB."""
        return "lake_" + hashlib.sha256(self.metadata.encode()).hexdigest()[:12]


def parse_catalog_url(text: str) -> LakeSpec:
    """``ducklake:<metadata>[ DATA_PATH <path>]`` as a :class:`LakeSpec` (a file made absolute)."""
    if not text.startswith("ducklake:"):
        raise PrefabError(f"unknown catalog {text!r} ({CATALOG_VARIABLE} or --catalog): expected "
                          "ducklake:<metadata file> or ducklake:postgres:<dsn>, each optionally followed "
                          "by ' DATA_PATH <path>'")
    metadata, *rest = _DATA_PATH.split(text[len("ducklake:"):].strip(), maxsplit=1)
    data_path = rest[0].strip() if rest else None
    if not metadata:
        raise PrefabError(f"catalog {text!r} names no metadata database after 'ducklake:'")
    if metadata.startswith(("sqlite:", "mysql:")):
        raise PrefabError(f"catalog {text!r}: prefab supports a DuckDB metadata file or PostgreSQL")
    if not metadata.startswith("postgres:"):
        metadata = str(Path(metadata).expanduser().resolve())
        data_path = data_path or metadata + ".files"
    if data_path and "://" in data_path:
        raise PrefabError(f"catalog {text!r}: an object-store DATA_PATH is not supported yet; "
                          "name a path every machine mounts at the same place")
    if data_path:
        data_path = str(Path(data_path).expanduser().resolve())
    return LakeSpec(metadata, data_path.rstrip("/") + "/" if data_path else None)


_ENGINE: duckdb.DuckDBPyConnection | None = None
_ENGINE_LOCK = threading.Lock()
_POSTGRES_LOADED = False


def _engine(spec: LakeSpec) -> duckdb.DuckDBPyConnection:
    """This process's DuckDB with the extensions the lake needs loaded."""
    global _ENGINE, _POSTGRES_LOADED
    with _ENGINE_LOCK:
        if _ENGINE is None:
            engine = duckdb.connect()
            load_lake_extensions(engine)
            _ENGINE = engine
        if spec.metadata_file is None and not _POSTGRES_LOADED:
            load_lake_extensions(_ENGINE, postgres=True)
            _POSTGRES_LOADED = True
        return _ENGINE


def _forget_engine_after_fork() -> None:
    global _ENGINE, _ENGINE_LOCK, _POSTGRES_LOADED
    _ENGINE, _POSTGRES_LOADED, _ENGINE_LOCK = None, False, threading.Lock()


os.register_at_fork(after_in_child=_forget_engine_after_fork)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def lake_opener(spec: LakeSpec) -> Opener:
    """Attach the lake on open, detach it on close; each cursor starts in the ``prefab`` schema."""

    def open_lake(read_only: bool) -> duckdb.DuckDBPyConnection:
        connection = _engine(spec).cursor()
        lake_files = f"{spec.data_path}{LAKE_FILES}/"
        options = [f"DATA_PATH {_quote(lake_files)}"] if spec.data_path and not read_only else []
        options += ["READ_ONLY"] if read_only else []
        statement = (f"ATTACH {_quote('ducklake:' + spec.metadata)} AS {spec.alias}"
                     + (f" ({', '.join(options)})" if options else ""))
        for attempt in range(FIRST_ATTACH_ATTEMPTS):
            try:
                connection.execute(statement)
                return connection
            except duckdb.Error as exc:
                text = str(exc)
                if "does not match existing data path" in text:
                    connection.close()
                    raise PrefabError(f"catalog {spec.url}: {text.splitlines()[0]} (leave DATA_PATH out "
                                      "of the catalog URL to use the lake's own)") from None
                # Two processes making the same new lake: the loser finds the winner's tables.
                racing = "Failed to initialize DuckLake" in text and ("already exists" in text or "duplicate key" in text)
                if not racing or attempt == FIRST_ATTACH_ATTEMPTS - 1:
                    connection.close()
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def close_lake(connection: duckdb.DuckDBPyConnection) -> None:
        try:
            connection.execute(f"DETACH {spec.alias}")
        finally:
            connection.close()

    def cursor(connection: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
        handed = connection.cursor()
        try:
            handed.execute(f"USE {spec.alias}.{SCHEMA}")
        except duckdb.CatalogException:  # a new lake: initialise makes the schema
            handed.execute(f"USE {spec.alias}")
        return handed

    return Opener(open_lake, close_lake, cursor)


def _lake_ddl() -> str:
    """The home catalog's tables without their primary keys (DuckLake has none), plus ``writes``."""
    ddl = re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", DDL).replace(" PRIMARY KEY", "")
    return ddl + "\nCREATE TABLE IF NOT EXISTS writes (count BIGINT NOT NULL);\n" + MIGRATIONS + LAKE_MIGRATIONS


# Columns only a lake's tables have: a model's files are copied to the shared data path, and
# ``manifest`` (JSON: file path inside the model folder -> sha256) lets any host check them.
LAKE_MIGRATIONS = "ALTER TABLE models ADD COLUMN IF NOT EXISTS manifest VARCHAR;\n"


TABLES = ("meta", "datasets", "versions", "version_parents", "files", "version_files", "tags",
          "tag_events", "quarantine", "failures", "runs", "models", "writes")


def is_initialised(connection: duckdb.DuckDBPyConnection, spec: LakeSpec) -> bool:
    found = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND schema_name = ?",
        [spec.alias, SCHEMA]).fetchone()[0]
    manifest = connection.execute(
        "SELECT count(*) FROM duckdb_columns() WHERE database_name = ? AND schema_name = ? "
        "AND table_name = 'models' AND column_name = 'manifest'", [spec.alias, SCHEMA]).fetchone()[0]
    return found == len(TABLES) and manifest == 1


def initialise(connection: duckdb.DuckDBPyConnection, spec: LakeSpec) -> None:
    """Make the ``prefab`` schema and its tables (inside the caller's transaction)."""
    connection.execute(f"CREATE SCHEMA IF NOT EXISTS {spec.alias}.{SCHEMA}")
    connection.execute(f"USE {spec.alias}.{SCHEMA}")
    connection.execute(_lake_ddl())
    connection.execute("INSERT INTO writes SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM writes)")
    connection.execute("INSERT INTO meta SELECT 'schema_version', ? "
                       "WHERE NOT EXISTS (SELECT 1 FROM meta WHERE key = 'schema_version')", [SCHEMA_VERSION])


def data_path_of(connection: duckdb.DuckDBPyConnection, spec: LakeSpec) -> Path:
    """The data path the lake was made with (a URL names it only when it makes the lake)."""
    row = connection.execute(
        f"SELECT value FROM __ducklake_metadata_{spec.alias}.ducklake_metadata WHERE key = 'data_path'"
    ).fetchone()
    if row is None or not row[0]:
        raise PrefabError(f"catalog {spec.url} has no data path: name one with ' DATA_PATH <path>'")
    lake_files = Path(row[0])
    if lake_files.name != LAKE_FILES:
        raise PrefabError(f"catalog {spec.url}: its DuckLake data path {row[0]} does not end in "
                          f"'{LAKE_FILES}/', so it was not made by prefab")
    return lake_files.parent


def is_write_conflict(exc: BaseException) -> bool:
    """DuckLake refused a commit because another transaction committed a conflicting change."""
    return isinstance(exc, duckdb.TransactionException) and "conflict" in str(exc).lower()


def pairs_table(spec: LakeSpec, name: str) -> str:
    """The SQL name of a dataset's plain table, ``<lake>.main."pairs_<name>"``."""
    return f'{spec.alias}.main."pairs_{name}"'


def publish(connection: duckdb.DuckDBPyConnection, spec: LakeSpec, name: str, version: int,
            data_files: list[Path], *, repair: bool = False) -> None:
    """Make ``main.pairs_<name>`` hold version ``version`` (inside the commit's transaction).

    The table is made anew from the version's own Parquet files, registered in place (no
    copy), so its columns are the version's even when they changed; the snapshot of this
    transaction is the version, findable by its commit message ``prefab: <name>@<version>``.
    """
    table = pairs_table(spec, name)
    files = [str(path) for path in data_files]
    connection.execute(f"DROP TABLE IF EXISTS {table}")
    connection.execute(f"CREATE TABLE {table} AS SELECT * FROM read_parquet(?) LIMIT 0", [files])
    for path in files:
        connection.execute("CALL ducklake_add_data_files(?, ?, ?, schema => 'main')",
                           [spec.alias, f"pairs_{name}", path])
    # A repair's snapshot is named apart: time travel to ``name@version`` keeps finding the commit's.
    message = f"prefab: {'repair ' if repair else ''}{name}@{version}"
    connection.execute(f"CALL {spec.alias}.set_commit_message('prefab', ?, extra_info => ?)",
                       [message, f'{{"dataset": "{name}", "version": {version}}}'])


def check_published(connection: duckdb.DuckDBPyConnection, spec: LakeSpec, name: str, version: int,
                    rows: int, data_files: list[Path]) -> str | None:
    """What is wrong with ``main.pairs_<name>`` for its latest version ``version``, or None.

    Its current snapshot must list exactly the version's data files, with no delete file,
    and hold the version's row count (rows inserted into or deleted from the table behind
    prefab's back may be inlined in the metadata, not in any file).
    """
    table = pairs_table(spec, name)
    exists = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' AND table_name = ?",
        [spec.alias, f"pairs_{name}"]).fetchone()[0]
    if not exists:
        return "the table is missing"
    listed = connection.execute(
        "SELECT data_file, delete_file FROM ducklake_list_files(?, ?, schema => 'main')",
        [spec.alias, f"pairs_{name}"]).fetchall()
    found = sorted(str(Path(data_file)) for data_file, _ in listed)
    expected = sorted(str(path) for path in data_files)
    if found != expected:
        strangers = [f for f in found if f not in expected]
        lacking = [f for f in expected if f not in found]
        return ("its data files are not the version's: "
                + "; ".join([*(["not the version's: " + ", ".join(strangers)] if strangers else []),
                             *(["missing: " + ", ".join(lacking)] if lacking else [])]))
    if any(delete_file for _, delete_file in listed):
        return "rows were deleted from it (it has a delete file)"
    count = connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    if count != rows:
        return f"it holds {count} rows, the version has {rows}"
    return None
