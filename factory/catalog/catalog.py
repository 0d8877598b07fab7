"""The catalog: immutable, numbered dataset versions over content-addressed Parquet.

Layout of a home folder::

    catalog.duckdb        datasets, versions, lineage, tags, files, quarantine, failures, models
    objects/ab/<sha256>.parquet
    models/<name>/<version>/

With ``$PREFAB_CATALOG`` (or ``--catalog``) naming a DuckLake, the same tables live in the
lake's ``prefab`` schema and the objects (and registered models' copies) under its data
path; the home keeps caches (see :mod:`factory.catalog.lake`).

A commit streams its rows into content-addressed data files first (checking each row's
``pair_id``/``prompt_id`` against its content on the way) and then records the version in
one database transaction; a crash at any point leaves the previous state and at most an
unreferenced object, which ``gc`` removes once it is older than its grace period.

Every read of a version's files (``batches``, ``scanner``, ``read_table``, exports,
training) first checks their sha256 against the catalog, once per file per process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from factory.catalog import lake
from factory.catalog.db import CatalogBusy, connect, initialise, lock_timeout_seconds
from factory.catalog.index import INDEX_SCHEMA, IndexBuilder
from factory.catalog.refs import Ref, RefError, check_name, check_tag, parse_ref
from factory.catalog.store import ROW_GROUP_ROWS, ObjectStore, ObjectWriter, StoredObject
from factory.home import resolve_home
from schemas.errors import PrefabError
from schemas.pairs import PAIR_SCHEMA, conform, content_ids
from schemas.readers.base import QUARANTINE_SCHEMA

# Rows a step could not process, kept beside the version like ingest's quarantine.
FAILURE_SCHEMA = pa.schema(
    [
        pa.field("step", pa.string()),
        pa.field("pair_id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string()),  # the input row as JSON
    ]
)

# Lineage keys only the catalog writes: a caller's lineage dict may repeat them, not change them.
PROTECTED_LINEAGE = ("parents", "rows_out", "code_version")

READ_BATCH_ROWS = 16_384
# Rows whose ids a commit checks at a time (see ``Catalog.stage``).
ID_CHECK_ROWS = ROW_GROUP_ROWS // 4
# Checked batches queued for the data writer thread: one row group's worth.
WRITES_IN_FLIGHT = ROW_GROUP_ROWS // ID_CHECK_ROWS


class DataFileError(PrefabError):
    """A version's data file is missing or its bytes no longer match the recorded sha256."""


@functools.cache
def code_version() -> str:
    """``prefab X.Y.Z``, plus ``(git abc1234[, dirty])`` when running from a git checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = f"prefab {version('prefab')}"
    except PackageNotFoundError:
        base = "prefab (not installed)"
    git = _git_state(Path(__file__).resolve().parents[2])
    return f"{base} ({git})" if git else base


def _git_state(root: Path) -> str | None:
    """Commit and dirty flag of the checkout prefab runs from; None when that is unknowable."""
    if not (root / ".git").exists():  # an installed wheel: no git call at all
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = ", dirty" if status.returncode == 0 and status.stdout.strip() else ""
    return f"git {head.stdout.strip()}{dirty}"


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _crash_point(name: str) -> None:
    """Fault injection for the crash-safety tests: die here, as SIGKILL would."""
    if os.environ.get("PREFAB_TEST_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class VersionInfo:
    name: str
    version: int
    rows: int
    created_at: datetime
    message: str
    lineage: dict[str, Any]
    files: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    index_files: list[str] = field(default_factory=list)
    file_sha256: list[str] = field(default_factory=list)
    index_sha256: list[str] = field(default_factory=list)
    # Set by a commit whose content equals the latest version: no new version was made.
    unchanged: bool = False
    # Tables stored beside the data, by role (e.g. a filter's "scores"): role -> (relpath, sha256)
    attachments: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Which run of the version ``lineage`` and ``attachments`` describe: 0 is the commit that
    # made it, N > 0 a later commit of equal rows (see ``Catalog.runs``).
    run: int = 0

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "name": self.name,
            "version": self.version,
            "rows": self.rows,
            "created_at": self.created_at.isoformat(timespec="seconds") + "Z",
            "message": self.message,
            "tags": self.tags,
            "files": self.files,
            "attachments": {role: relpath for role, (relpath, _) in self.attachments.items()},
            "lineage": self.lineage,
            **({"run": self.run} if self.run else {}),
        }


@dataclass
class StagedData:
    """Rows written to the object store (data file and key index), not yet a version."""

    data: StoredObject
    index: StoredObject
    schema: pa.Schema
    # Kept for an in-memory table so its files can be rewritten if a gc removed them.
    table: pa.Table | None = None

    @property
    def rows(self) -> int:
        return self.data.rows


T = TypeVar("T")

Data = pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch | pa.Table] | StagedData


class Catalog:
    def __init__(self, home: str | Path | None = None, *, create: bool = True, catalog: str | None = None) -> None:
        """Open the catalog in ``home``; with ``create=False`` a missing catalog is an error.

        ``catalog`` (default ``$PREFAB_CATALOG``) names a DuckLake to use instead of the
        home's own catalog (see :mod:`factory.catalog.lake`); the home then keeps caches.
        """
        self.home = resolve_home(home)
        url = catalog if catalog is not None else os.environ.get(lake.CATALOG_VARIABLE) or None
        self.lake = lake.parse_catalog_url(url) if url else None
        self.db_path = self.home / "catalog.duckdb"
        metadata = self.lake.metadata_file if self.lake else self.db_path
        if not create and metadata is not None and not metadata.is_file():
            if self.lake:
                raise PrefabError(f"no catalog at {metadata}: the file does not exist "
                                  f"(check --catalog or {lake.CATALOG_VARIABLE})")
            what = "the folder does not exist" if not self.home.exists() else "it holds no catalog.duckdb"
            raise PrefabError(f"no catalog at {self.home}: {what} (check --home or PREFAB_HOME)")
        self.home.mkdir(parents=True, exist_ok=True)
        self.data_root = self.home
        if self.lake is None:
            with self._connect() as connection:
                initialise(connection)
        else:
            if metadata is not None:
                metadata.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as connection:
                ready = lake.is_initialised(connection, self.lake)
                self.data_root = lake.data_path_of(connection, self.lake)
            if not ready:
                self._write(lambda connection: lake.initialise(connection, self.lake))
        self.store = ObjectStore(self.data_root / "objects")
        self.models_dir = self.home / "models"

    @property
    def location(self) -> str:
        """Where the catalog is, as a user names it: the lake's URL or the home folder."""
        return self.lake.url if self.lake else str(self.home)

    def _connect(self, read_only: bool = False) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        if self.lake is None:
            return connect(self.db_path, read_only=read_only)
        return connect(self.lake.url, read_only=read_only, opener=lake.lake_opener(self.lake))

    def _write(self, body: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``body`` in one write transaction, committed, its result returned.

        On a lake another writer may commit first; DuckLake then refuses this commit (every
        write updates ``prefab.writes``) and ``body`` runs again on the new state, until
        ``PREFAB_LOCK_TIMEOUT`` seconds have passed.
        """
        timeout = lock_timeout_seconds()
        deadline = time.monotonic() + timeout
        delay = 0.02
        while True:
            with self._connect() as connection:
                connection.execute("BEGIN TRANSACTION")
                try:
                    result = body(connection)
                    if self.lake is not None:
                        connection.execute(lake.SERIALIZE_WRITES)
                    connection.execute("COMMIT")
                    return result
                except BaseException as exc:
                    with contextlib.suppress(duckdb.Error):
                        connection.execute("ROLLBACK")
                    if not lake.is_write_conflict(exc):
                        raise
            if time.monotonic() >= deadline:
                raise CatalogBusy(f"catalog busy: other writers of {self.location} kept committing first "
                                  f"for over {timeout:g} s (set PREFAB_LOCK_TIMEOUT to wait longer)")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    # ---- writing -------------------------------------------------------------------------

    def stage(self, data: Data) -> StagedData:
        """Write rows to the object store without recording a version (see :meth:`commit`).

        Rows stream through in batches: each is put in canonical column order (extra
        columns kept after them), its ``pair_id``/``prompt_id`` checked against its content
        (absent or null ids are filled in), then written to the data file and the index.
        """
        if isinstance(data, StagedData):
            return data
        table = data if isinstance(data, pa.Table) else None
        builder = IndexBuilder()
        writers: list[ObjectWriter] = []
        offset = 0

        # The data file, the bulk of the bytes, is compressed and written on a second thread
        # (Parquet encoding releases the GIL) while this one checks the next batch's ids and
        # builds and writes the key index: the two threads carry about equal CPU, so on two
        # cores the commit takes little more than the data file's write alone. Ids are
        # checked a quarter row group at a time, so the data writer starts once one short
        # batch is hashed; the writer compresses whole row groups, so up to a row group of
        # checked batches may wait for it (memory: about three row groups), or this thread
        # would idle through every row group's compression.
        with ThreadPoolExecutor(max_workers=1) as pool:
            in_flight: deque[Future[None]] = deque()
            try:
                schema: pa.Schema | None = None
                for batch in _batches_of(data, ID_CHECK_ROWS):
                    rows = _with_checked_ids(conform(_with_id_columns(batch), extra=True), offset)
                    if schema is None:
                        schema = rows.schema
                        writers = [self.store.writer(schema), self.store.writer(INDEX_SCHEMA)]
                    elif not rows.schema.equals(schema):
                        rows = _aligned(rows, schema, offset)
                    while len(in_flight) > WRITES_IN_FLIGHT:
                        in_flight.popleft().result()
                    in_flight.append(pool.submit(writers[0].write, rows))
                    writers[1].write(builder.batch(rows))
                    offset += rows.num_rows
                while in_flight:
                    in_flight.popleft().result()
                if schema is None:  # no batches at all: an empty version's files
                    schema = conform(table if table is not None else PAIR_SCHEMA.empty_table(), extra=True).schema
                    writers = [self.store.writer(schema), self.store.writer(INDEX_SCHEMA)]
                data_object = writers[0].finish()
                index_object = writers[1].finish()
            except BaseException:
                for future in in_flight:
                    with contextlib.suppress(BaseException):
                        future.result()  # never abort a writer another thread is using
                for writer in writers:
                    writer.abort()
                raise
            finally:
                builder.close()
        return StagedData(data_object, index_object, schema, table)

    def commit(
        self,
        name: str,
        data: Data,
        *,
        message: str = "",
        lineage: dict[str, Any] | None = None,
        parents: Sequence[str] = (),
        quarantine: pa.Table | None = None,
        failures: pa.Table | None = None,
        attachments: dict[str, pa.Table] | None = None,
        allow_empty: bool = False,
    ) -> VersionInfo:
        """Record ``data`` as the next version of ``name``; returns the new version.

        ``data`` is a table, record batches (streamed: memory stays at about a row group)
        or what :meth:`stage` returned. Columns beyond the canonical ones are kept after
        them. Refused: a row whose ``pair_id``/``prompt_id`` does not match its content, and
        an empty version unless ``allow_empty``. If the rows equal the latest version's, no
        version is made and that version comes back with ``unchanged`` set.
        ``failures`` (``FAILURE_SCHEMA``) are rows a step could not process; like
        ``quarantine`` they are stored in the same transaction. ``attachments`` are tables
        stored beside the data under a role name (a filter's per-row ``scores`` of every
        input row, dropped ones included), hashed, verified and kept by gc like data files.
        """
        check_name(name)
        started = time.monotonic()
        parent_infos = [self.resolve(parent) for parent in parents]
        failed = _conform_failures(failures)
        _crash_point("before_files")
        staged = self.stage(data)
        if staged.rows == 0 and not allow_empty:
            raise PrefabError(f"refusing to commit an empty version of {name!r}: there are no rows")
        for role in attachments or {}:
            if role in ("data", "index"):
                raise PrefabError(f"attachment role {role!r} is reserved")
        attached = {role: self.store.write_table(table) for role, table in (attachments or {}).items()}
        _crash_point("after_files")
        record = dict(lineage or {})
        protected = {"code_version": code_version(), "parents": [p.ref for p in parent_infos],
                     "rows_out": staged.rows}
        for key, value in protected.items():
            if key in record and record[key] != value:
                raise PrefabError(f"lineage[{key!r}] = {record[key]!r} disagrees with the commit's {value!r}; "
                                  f"the catalog records {', '.join(PROTECTED_LINEAGE)} itself")
            record[key] = value
        record.setdefault("models", [])
        record.setdefault("judges", [])
        record.setdefault("rows_quarantined", quarantine.num_rows if quarantine is not None else 0)
        record.setdefault("rows_failed", failed.num_rows if failed is not None else 0)
        now = _now()
        with self._connect():  # held across the check and the transaction: no gc in between (home)
            if not (staged.data.path.exists() and staged.index.path.exists()):
                if staged.table is None:  # a streamed input cannot be replayed
                    raise PrefabError("the data files written for this commit were deleted before it "
                                      "was recorded (a `catalog gc --grace 0` meanwhile?); run it again")
                staged = self.stage(staged.table)  # a gc ran between our write and this lock
            for role, obj in list(attached.items()):
                if not obj.path.exists():
                    attached[role] = self.store.write_table(attachments[role])  # type: ignore[index]
            files = {"data": staged.data, "index": staged.index, **attached}

            def record_commit(connection: duckdb.DuckDBPyConnection) -> tuple[int, int]:
                """(version, run): a new version is run 0; equal rows make a run of the latest."""
                latest = connection.execute(
                    "SELECT max(version) FROM versions WHERE dataset = ?", [name]
                ).fetchone()[0]
                record.setdefault("commit_seconds", round(time.monotonic() - started, 3))
                if latest is not None and self._data_sha256(connection, name, latest) == [staged.data.sha256]:
                    # Same rows: no new version, but this run's record is kept under the
                    # version, so a step keyed by its lineage finds it and reruns nothing.
                    run = self._next_run(connection, name, latest)
                    connection.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                                       [name, latest, run, now, message, json.dumps(record, default=str)])
                    self._record_side_tables(connection, name, latest, run, attached, quarantine, failed, now)
                    _crash_point("in_transaction")
                    return latest, run
                version = (latest or 0) + 1
                connection.execute("INSERT INTO datasets SELECT ?, ? WHERE NOT EXISTS "
                                   "(SELECT 1 FROM datasets WHERE name = ?)", [name, now, name])
                self._record_side_tables(connection, name, version, 0, files, quarantine, failed, now)
                connection.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                    [name, version, now, message, staged.rows, json.dumps(record, default=str)],
                )
                for parent in parent_infos:
                    connection.execute(
                        "INSERT INTO version_parents VALUES (?, ?, ?, ?)",
                        [name, version, parent.name, parent.version],
                    )
                if self.lake is not None:
                    lake.publish(connection, self.lake, name, version, [staged.data.path])
                _crash_point("in_transaction")
                return version, 0

            version, run = self._write(record_commit)
        info = self.resolve(Ref(name, version=version)) if not run else self._resolve_run(name, version, run)
        info.unchanged = bool(run)
        return info

    def _resolve_run(self, name: str, version: int, run: int) -> VersionInfo:
        with self._connect(read_only=True) as connection:
            return self._resolve(connection, Ref(name, version=version), run=run)

    def _record_side_tables(self, connection: duckdb.DuckDBPyConnection, name: str, version: int, run: int,
                            files: dict[str, StoredObject], quarantine: pa.Table | None,
                            failed: pa.Table | None, now: datetime) -> None:
        """A run's files (by role), quarantined rows and failed rows, inside the caller's transaction."""
        for role, obj in files.items():
            connection.execute(
                "INSERT INTO files SELECT ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM files WHERE sha256 = ?)",
                [obj.sha256, str(obj.path.relative_to(self.data_root)), obj.bytes, obj.rows, now, obj.sha256],
            )
            connection.execute(
                "INSERT INTO version_files (dataset, version, role, ordinal, sha256, run) "
                "VALUES (?, ?, ?, 0, ?, ?)", [name, version, role, obj.sha256, run]
            )
        if quarantine is not None and quarantine.num_rows:
            bad = quarantine.select(QUARANTINE_SCHEMA.names)  # noqa: F841 - read by SQL
            connection.execute(
                "INSERT INTO quarantine (dataset, version, file, line, field, reason, raw, run) "
                "SELECT ?, ?, file, line, field, reason, raw, ? FROM bad", [name, version, run],
            )
        if failed is not None and failed.num_rows:
            connection.execute(
                "INSERT INTO failures (dataset, version, step, pair_id, reason, raw, run) "
                "SELECT ?, ?, step, pair_id, reason, raw, ? FROM failed", [name, version, run],
            )

    @staticmethod
    def _next_run(connection: duckdb.DuckDBPyConnection, name: str, version: int) -> int:
        return connection.execute(
            "SELECT coalesce(max(run), 0) + 1 FROM runs WHERE dataset = ? AND version = ?", [name, version]
        ).fetchone()[0]

    @staticmethod
    def _data_sha256(connection: duckdb.DuckDBPyConnection, name: str, version: int) -> list[str]:
        return [r[0] for r in connection.execute(
            "SELECT sha256 FROM version_files WHERE dataset = ? AND version = ? AND role = 'data' "
            "ORDER BY ordinal", [name, version]).fetchall()]

    def merge(self, refs: Sequence[str], name: str, *, message: str = "") -> VersionInfo:
        """Combine versions into a new version of ``name`` whose parents are all of them.

        Policy for a ``pair_id`` found in several inputs: the first input (in the order
        given) that has it keeps all its rows; the later inputs' rows for it are dropped
        and counted (``duplicates_dropped``; ``label_conflicts`` counts those whose label
        -- the side that won, or a tie -- differs from every kept row's, and
        ``annotation_conflicts`` those with a kept row's label but another margin, votes,
        weight or attribute). Repeats within one input are separate judgments and stay.
        Counts reconcile: ``rows_in == rows_out + duplicates_dropped``.
        """
        if len(refs) < 2:
            raise PrefabError("merge needs at least two versions")
        check_name(name)
        started = time.monotonic()
        infos = [self.resolve(ref) for ref in refs]
        schema = _merged_schema([self.schema(info) for info in infos])
        per_input: list[dict[str, Any]] = []
        keys = IndexBuilder()
        kept_keys: dict[str, list[pa.Array]] = {"label": [], "verdict": []}
        dropped_keys: dict[str, list[pa.Array]] = {"label": [], "verdict": []}

        def rows() -> Iterator[pa.Table]:
            seen = pa.array([], pa.string())
            for info in infos:
                ids = self.read_table(info, columns=["pair_id"]).column("pair_id")
                # One hash set per input, not per batch: is_in rebuilds it on every call.
                keep = pc.invert(pc.is_in(ids, value_set=seen)).combine_chunks()
                offset = 0
                for batch in self.batches(info):
                    mask = keep.slice(offset, batch.num_rows)
                    offset += batch.num_rows
                    index = keys.batch(batch)
                    for kind in ("label", "verdict"):
                        key = pc.binary_join_element_wise(index["pair_id"], index[kind].cast(pa.string()), ":")
                        kept_keys[kind].append(key.filter(mask).combine_chunks())
                        dropped_keys[kind].append(key.filter(pc.invert(mask)).combine_chunks())
                    yield _aligned(conform(batch, extra=True).filter(mask), schema, 0)
                kept_here = int(pc.sum(keep).as_py() or 0)
                per_input.append({"ref": info.ref, "rows": info.rows, "kept": kept_here,
                                  "duplicates_dropped": info.rows - kept_here})
                seen = pa.concat_arrays([seen, pc.unique(ids.filter(keep))])

        try:
            staged = self.stage(rows())
        finally:
            keys.close()
        differs = {kind: _unmatched(dropped_keys[kind], kept_keys[kind]) for kind in ("label", "verdict")}
        conflicts = int(pc.sum(differs["label"]).as_py() or 0)
        annotation_conflicts = int(pc.sum(pc.and_(differs["verdict"], pc.invert(differs["label"]))).as_py() or 0)
        rows_in = sum(info.rows for info in infos)
        duplicates = sum(item["duplicates_dropped"] for item in per_input)
        if rows_in != staged.rows + duplicates:  # the policy's own invariant; never expected to fire
            raise PrefabError(f"merge counts do not reconcile: {rows_in} in, {staged.rows} out, {duplicates} dropped")
        lineage = {
            "command": "merge",
            "params": {"refs": [info.ref for info in infos], "duplicates": "keep-first"},
            "rows_in": rows_in,
            "duplicates_dropped": duplicates,
            "label_conflicts": conflicts,
            "annotation_conflicts": annotation_conflicts,
            "inputs": per_input,
            "wall_seconds": round(time.monotonic() - started, 3),
        }
        return self.commit(name, staged, message=message or f"merge {' + '.join(i.ref for i in infos)}",
                           lineage=lineage, parents=[info.ref for info in infos])

    def tag(self, ref: str, tag: str, *, force: bool = False) -> dict[str, Any]:
        """Name a version. Tags are immutable; moving one needs ``force`` and is logged."""
        check_tag(tag)
        target = self.resolve(ref)

        def place(connection: duckdb.DuckDBPyConnection) -> int | None:
            row = connection.execute(
                "SELECT version FROM tags WHERE dataset = ? AND tag = ?", [target.name, tag]
            ).fetchone()
            old = row[0] if row else None
            if old is not None and old != target.version and not force:
                raise RefError(
                    f"tag {target.name}@{tag} already points to version {old}; "
                    "tags are immutable (use --force to move it)"
                )
            if old != target.version:
                connection.execute("DELETE FROM tags WHERE dataset = ? AND tag = ?", [target.name, tag])
                connection.execute("INSERT INTO tags VALUES (?, ?, ?, ?)", [target.name, tag, target.version, _now()])
                connection.execute(
                    "INSERT INTO tag_events VALUES (?, ?, ?, ?, ?)",
                    [target.name, tag, old, target.version, _now()],
                )
            return old

        old = self._write(place)
        return {"dataset": target.name, "tag": tag, "version": target.version, "moved_from": old}

    def tag_history(self, name: str, version: int | None = None) -> list[dict[str, Any]]:
        """Every tag placement and move of a dataset (or those touching one version), oldest first."""
        with self._connect(read_only=True) as connection:
            rows = connection.execute(
                "SELECT tag, old_version, new_version, moved_at FROM tag_events WHERE dataset = ? "
                "AND (?::INTEGER IS NULL OR new_version = ? OR old_version = ?) ORDER BY moved_at, tag",
                [name, version, version, version],
            ).fetchall()
        return [{"tag": tag, "from_version": old, "to_version": new,
                 "at": at.isoformat(timespec="seconds") + "Z"} for tag, old, new, at in rows]

    # ---- reading -------------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> VersionInfo:
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        with self._connect(read_only=True) as connection:
            return self._resolve(connection, parsed)

    def _resolve(self, connection: duckdb.DuckDBPyConnection, ref: Ref, run: int = 0) -> VersionInfo:
        """The version ``ref`` names, with the lineage and attachments of its run ``run``."""
        if ref.tag is not None:
            row = connection.execute(
                "SELECT version FROM tags WHERE dataset = ? AND tag = ?", [ref.name, ref.tag]
            ).fetchone()
            if row is None:
                raise RefError(f"no tag {ref.tag!r} on dataset {ref.name!r}")
            version = row[0]
        elif ref.version is not None:
            version = ref.version
        else:
            row = connection.execute(
                "SELECT max(version) FROM versions WHERE dataset = ?", [ref.name]
            ).fetchone()
            if row[0] is None:
                raise RefError(f"no dataset named {ref.name!r} in the catalog")
            version = row[0]
        row = connection.execute(
            "SELECT rows, created_at, message, lineage FROM versions WHERE dataset = ? AND version = ?",
            [ref.name, version],
        ).fetchone()
        if row is None:
            known = connection.execute(
                "SELECT max(version) FROM versions WHERE dataset = ?", [ref.name]
            ).fetchone()[0]
            if known is None:
                raise RefError(f"no dataset named {ref.name!r} in the catalog")
            raise RefError(f"dataset {ref.name!r} has no version {version} (latest is {known})")
        created_at, message, lineage = row[1], row[2], row[3]
        if run:
            run_row = connection.execute(
                "SELECT created_at, message, lineage FROM runs WHERE dataset = ? AND version = ? AND run = ?",
                [ref.name, version, run],
            ).fetchone()
            if run_row is None:
                raise RefError(f"{ref.name}@{version} has no run {run}")
            created_at, message, lineage = run_row
        files: dict[str, list[str]] = {"data": [], "index": []}
        hashes: dict[str, list[str]] = {"data": [], "index": []}
        attachments: dict[str, tuple[str, str]] = {}
        for role, relpath, sha256, file_run in connection.execute(
            "SELECT v.role, f.relpath, f.sha256, v.run FROM version_files v JOIN files f USING (sha256) "
            "WHERE v.dataset = ? AND v.version = ? AND v.run IN (0, ?) ORDER BY v.ordinal",
            [ref.name, version, run],
        ).fetchall():
            if role in files:
                files[role].append(relpath)
                hashes[role].append(sha256)
            elif file_run == run:  # attachments belong to the run that stored them
                attachments[role] = (relpath, sha256)
        tags = [
            r[0]
            for r in connection.execute(
                "SELECT tag FROM tags WHERE dataset = ? AND version = ? ORDER BY tag",
                [ref.name, version],
            ).fetchall()
        ]
        return VersionInfo(ref.name, version, row[0], created_at, message or "", json.loads(lineage),
                           files["data"], tags, files["index"], hashes["data"], hashes["index"],
                           attachments=attachments, run=run)

    def paths(self, ref: str | VersionInfo, role: str = "data") -> list[Path]:
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        return [self.data_root / relpath for relpath in (info.files if role == "data" else info.index_files)]

    def checked_paths(self, ref: str | VersionInfo, role: str = "data") -> list[Path]:
        """A version's files, each checked against its recorded sha256 (once per process).

        A missing or changed file raises :class:`DataFileError`, one line naming the version.
        """
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        if role == "data":
            relpaths, hashes = info.files, info.file_sha256
        elif role == "index":
            relpaths, hashes = info.index_files, info.index_sha256
        elif role in info.attachments:
            relpaths, hashes = [info.attachments[role][0]], [info.attachments[role][1]]
        else:
            raise PrefabError(f"{info.ref} has no {role!r} table (it has: "
                              f"{', '.join(sorted(info.attachments)) or 'none'})")
        paths = []
        for relpath, sha256 in zip(relpaths, hashes, strict=True):
            path = self.data_root / relpath
            _check_file(path, sha256, self.store, f"{info.ref}: its {role} file {relpath}")
            paths.append(path)
        return paths

    def schema(self, ref: str | VersionInfo) -> pa.Schema:
        """The version's columns: canonical ones first, then any extra columns its files hold."""
        schemas = [pq.read_schema(path) for path in self.checked_paths(ref)]
        if not schemas:
            return PAIR_SCHEMA
        return pa.unify_schemas([s.remove_metadata() for s in schemas])

    def batches(self, ref: str | VersionInfo, columns: list[str] | None = None,
                batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
        """A version's rows one batch at a time, file by file, all in the version's schema."""
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        schema = self.schema(info)
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        for path in self.checked_paths(info):
            # pre_buffer would read whole row groups ahead (hundreds of MiB on big versions).
            reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            wanted = [c for c in schema.names if c in reader.schema_arrow.names]
            for batch in reader.iter_batches(batch_size=batch_rows, columns=wanted):
                if batch.schema.equals(schema):
                    yield batch
                else:  # a file without some of the version's extra columns
                    yield from _aligned(pa.Table.from_batches([batch]), schema, 0).to_batches()

    def scanner(self, ref: str | VersionInfo) -> pads.Dataset:
        """A lazy Arrow dataset over a version's (checked) files, for streaming and SQL."""
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        return pads.dataset([str(p) for p in self.checked_paths(info)], format="parquet",
                            schema=self.schema(info))

    def read_table(self, ref: str | VersionInfo, columns: list[str] | None = None) -> pa.Table:
        return self.scanner(ref).to_table(columns=columns)

    def read_attachment(self, ref: str | VersionInfo, role: str) -> pa.Table:
        """A table stored beside a version's data (e.g. its filter ``scores``)."""
        (path,) = self.checked_paths(ref, role)
        return pq.read_table(path)

    def find_by_lineage(self, key: str, value: str, name: str | None = None) -> VersionInfo | None:
        """The latest run (of a version of ``name``, or any) whose lineage has ``key`` equal to ``value``.

        Runs include commits that found their rows equal to an existing version: the
        version comes back with that run's lineage and attachments (``run`` says which).
        """
        with self._connect(read_only=True) as connection:
            found = self._runs_with(connection, key, value, name)
            return None if not found else self._resolve(connection, Ref(found[0][0], version=found[0][1]),
                                                        run=found[0][2])

    @staticmethod
    def _runs_with(connection: duckdb.DuckDBPyConnection, key: str, value: str,
                   name: str | None) -> list[tuple[str, int, int]]:
        """(dataset, version, run) of every run whose lineage has ``key`` = ``value``, newest first."""
        return connection.execute(
            "SELECT dataset, version, run FROM ("
            "  SELECT dataset, version, 0 AS run, created_at, lineage FROM versions"
            "  UNION ALL SELECT dataset, version, run, created_at, lineage FROM runs) "
            "WHERE json_extract_string(lineage, '$.' || ?) = ? AND (?::VARCHAR IS NULL OR dataset = ?) "
            "ORDER BY created_at DESC, version DESC, run DESC",
            [key, value, name, name],
        ).fetchall()

    def find_scores(self, score_key: str) -> tuple[VersionInfo, pa.Table] | None:
        """The run (version info with that run's lineage) and stored scores of the latest run
        whose lineage carries ``score_key``.

        A filter run records the key of its step identity (inputs, step, scoring parameters,
        backend, ...); a later run with only new thresholds finds its scores here instead of
        recomputing them.
        """
        with self._connect(read_only=True) as connection:
            infos = [self._resolve(connection, Ref(name, version=version), run=run)
                     for name, version, run in self._runs_with(connection, "score_key", score_key, None)]
        for info in infos:
            if "scores" in info.attachments:
                try:
                    return info, self.read_attachment(info, "scores")
                except DataFileError:
                    continue  # a damaged copy is only lost work: recompute
        return None

    def runs(self, ref: str | VersionInfo) -> list[VersionInfo]:
        """Every run of a version, oldest first: the commit that made it, then each commit of equal rows."""
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        with self._connect(read_only=True) as connection:
            numbers = [r[0] for r in connection.execute(
                "SELECT run FROM runs WHERE dataset = ? AND version = ? ORDER BY run", [info.name, info.version]
            ).fetchall()]
            return [self._resolve(connection, Ref(info.name, version=info.version), run=n) for n in (0, *numbers)]

    def head(self, ref: str | VersionInfo, rows: int) -> pa.Table:
        """The first ``rows`` rows, reading no more than one batch of them."""
        taken: list[pa.RecordBatch] = []
        count = 0
        for batch in self.batches(ref, batch_rows=max(rows, 1)):
            if count >= rows:
                break
            taken.append(batch.slice(0, rows - count))
            count += taken[-1].num_rows
        return pa.Table.from_batches(taken) if taken else self.schema(ref).empty_table()

    def failures(self, ref: str | VersionInfo, run: int | None = None) -> pa.Table:
        """Rows a step could not process for this version: step, pair_id, reason, raw.

        Every run's failures (see :meth:`runs`), or only run ``run``'s.
        """
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        with self._connect(read_only=True) as connection:
            return connection.sql(
                "SELECT step, pair_id, reason, raw FROM failures WHERE dataset = ? AND version = ? "
                "AND (?::INTEGER IS NULL OR run = ?) ORDER BY run, step, pair_id",
                params=[info.name, info.version, run, run],
            ).to_arrow_table().cast(FAILURE_SCHEMA)

    def quarantined(self, ref: str | VersionInfo, run: int | None = None) -> pa.Table:
        """Rows an ingest quarantined for this version, of every run or only run ``run``."""
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        with self._connect(read_only=True) as connection:
            return connection.sql(
                "SELECT file, line, field, reason, raw FROM quarantine WHERE dataset = ? AND version = ? "
                "AND (?::INTEGER IS NULL OR run = ?) ORDER BY run, file, line",
                params=[info.name, info.version, run, run],
            ).to_arrow_table()

    def datasets(self) -> list[dict[str, Any]]:
        with self._connect(read_only=True) as connection:
            rows = connection.execute(
                """
                SELECT v.dataset, count(*) AS versions, max(v.version) AS latest,
                       arg_max(v.rows, v.version) AS rows, max(v.created_at) AS updated_at,
                       (SELECT list(t.tag || '=' || t.version ORDER BY t.tag) FROM tags t
                        WHERE t.dataset = v.dataset) AS tags
                FROM versions v GROUP BY v.dataset ORDER BY v.dataset
                """
            ).fetchall()
        return [
            {"name": r[0], "versions": r[1], "latest": r[2], "rows": r[3],
             "updated_at": r[4].isoformat(timespec="seconds") + "Z", "tags": r[5] or []}
            for r in rows
        ]

    def log(self, name: str) -> list[VersionInfo]:
        check_name(name)
        with self._connect(read_only=True) as connection:
            versions = [
                r[0]
                for r in connection.execute(
                    "SELECT version FROM versions WHERE dataset = ? ORDER BY version DESC", [name]
                ).fetchall()
            ]
            if not versions:
                raise RefError(f"no dataset named {name!r} in the catalog")
            return [self._resolve(connection, Ref(name, version=v)) for v in versions]

    # ---- models --------------------------------------------------------------------------

    def register_model(
        self,
        name: str,
        path: str | Path,
        data_ref: str,
        metrics: dict[str, Any],
        params: dict[str, Any],
        *,
        exclude: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Record the model folder ``path`` as the next version of ``name``.

        On the home catalog the folder stays where it is (its path is stored relative to
        the home). On a lake another host cannot see this home, so the folder is copied to
        ``<data path>/models/<name>/v<version>/``, each file hashed on the way; the catalog
        keeps the path relative to the data path and the sha256 of every file
        (``manifest``), which :meth:`checked_model_path` checks before a model is loaded.
        ``exclude`` names entries of the folder not to copy (the trainer's ``checkpoint``,
        which it removes once the version is registered).
        """
        check_name(name, "model name")
        data = self.resolve(data_ref)
        path = Path(path).resolve()
        try:
            stored_path = str(path.relative_to(self.home.resolve()))
        except ValueError:
            stored_path = str(path)
        incoming, manifest = self._share_model(name, path, exclude) if self.lake is not None else (None, None)

        def record(connection: duckdb.DuckDBPyConnection) -> int:
            version = connection.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM models WHERE name = ?", [name]
            ).fetchone()[0]
            relpath = f"{MODELS}/{name}/v{version}" if incoming is not None else stored_path
            connection.execute(
                "INSERT INTO models (name, version, relpath, dataset, dataset_version, metrics, params, created_at"
                + (", manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)" if incoming else ") VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                [name, version, relpath, data.name, data.version, json.dumps(metrics, default=str),
                 json.dumps(params, default=str), _now(), *([json.dumps(manifest)] if incoming else [])],
            )
            return version

        try:
            version = self._write(record)
        except BaseException:
            if incoming is not None:
                shutil.rmtree(incoming, ignore_errors=True)
            raise
        if incoming is not None:
            # Versions are unique once committed, so nothing else is ever moved to this name.
            incoming.rename(self.data_root / MODELS / name / f"v{version}")
        return self.get_model(f"{name}@{version}")

    def _share_model(self, name: str, folder: Path, exclude: Sequence[str]) -> tuple[Path, dict[str, str]]:
        """``folder`` copied under the lake's data path (a fresh hidden folder, renamed once
        the version is recorded) and its manifest: each file's path inside it -> sha256."""
        if not folder.is_dir():
            raise PrefabError(f"cannot register model {name!r}: {folder} is not a folder")
        incoming = self.data_root / MODELS / name / f"{INCOMING_MODEL}{uuid.uuid4().hex}"
        manifest: dict[str, str] = {}
        try:
            for source in sorted(p for p in folder.rglob("*") if p.is_file()):
                relpath = source.relative_to(folder).as_posix()
                if relpath.split("/")[0] in exclude:
                    continue
                manifest[relpath] = _copy_hashing(source, incoming / relpath)
        except BaseException:
            shutil.rmtree(incoming, ignore_errors=True)
            raise
        return incoming, manifest

    def next_model_version(self, name: str) -> int:
        with self._connect(read_only=True) as connection:
            return connection.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM models WHERE name = ?", [name]
            ).fetchone()[0]

    def get_model(self, ref: str) -> dict[str, Any]:
        row, manifest = self._model_row(ref)
        # a lake's model is on its data path; the home's (or one migrated from a home) where it was
        root = self.data_root if manifest is not None else self.home
        return {
            "name": row[0], "version": row[1], "path": str(root / row[2]),
            "dataset": f"{row[3]}@{row[4]}", "metrics": json.loads(row[5]),
            "params": json.loads(row[6]), "created_at": row[7].isoformat(timespec="seconds") + "Z",
        }

    def _model_row(self, ref: str) -> tuple[tuple[Any, ...], dict[str, str] | None]:
        parsed = parse_ref(ref)
        if parsed.tag is not None:
            raise RefError(f"models are referenced as NAME or NAME@N, not {ref!r}")
        manifest = ", manifest" if self.lake is not None else ", NULL"
        with self._connect(read_only=True) as connection:
            row = connection.execute(
                f"SELECT name, version, relpath, dataset, dataset_version, metrics, params, created_at{manifest} "
                "FROM models WHERE name = ? AND (? IS NULL OR version = ?) "
                "ORDER BY version DESC LIMIT 1",
                [parsed.name, parsed.version, parsed.version],
            ).fetchone()
        if row is None:
            raise RefError(f"no model {ref!r} in the catalog")
        return row[:8], (json.loads(row[8]) if row[8] is not None else None)

    def checked_model_path(self, ref: str) -> Path:
        """A registered model's folder, each of its files checked against the sha256 recorded
        when it was registered (on a lake; once per file per process, as data files are).

        A missing or changed file raises :class:`DataFileError` naming the model version.
        """
        row, manifest = self._model_row(ref)
        entry = self.get_model(f"{row[0]}@{row[1]}")
        folder = Path(entry["path"])
        for relpath, sha256 in (manifest or {}).items():
            what = f"model {row[0]}@{row[1]}: its file {row[2]}/{relpath}"
            _check_file(folder / relpath, sha256, self.store, what)
        return folder

    def models(self) -> list[dict[str, Any]]:
        with self._connect(read_only=True) as connection:
            names = connection.execute(
                "SELECT name, max(version) FROM models GROUP BY name ORDER BY name"
            ).fetchall()
        return [self.get_model(f"{n}@{v}") for n, v in names]


# Files whose sha256 this process has checked: (path, size, mtime, inode) -> sha256.
_VERIFIED: dict[tuple[str, int, int, int], str] = {}

MODELS = "models"  # a lake's model folders, under its data path: models/<name>/v<version>/
INCOMING_MODEL = ".incoming-"  # a model folder being copied there, not yet registered


def _check_file(path: Path, sha256: str, store: ObjectStore, what: str) -> None:
    """``path``'s bytes hash to ``sha256`` (checked once per process while the file is unchanged)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise DataFileError(f"{what} is missing; run `prefab catalog verify` to list every damaged "
                            "version") from None
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if _VERIFIED.get(key) != sha256:
        actual = store.hash_file(path)
        if actual != sha256:
            raise DataFileError(f"{what} is corrupted (sha256 {actual[:12]}, recorded {sha256[:12]}); "
                                "run `prefab catalog verify` to list every damaged version")
        _VERIFIED[key] = sha256


def _copy_hashing(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` (made durable), returning the sha256 of the bytes copied."""
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("wb") as writer:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
            writer.write(chunk)
        writer.flush()
        os.fsync(writer.fileno())
    return digest.hexdigest()


def _batches_of(data: Data, rows: int = ROW_GROUP_ROWS) -> Iterator[pa.Table]:
    """Any accepted input as tables of at most ``rows`` rows each (bounded memory)."""
    if isinstance(data, pa.Table | pa.RecordBatch):
        data = [data]
    for item in data:
        for batch in item.to_batches(max_chunksize=rows) if isinstance(item, pa.Table) else [item]:
            for start in range(0, max(batch.num_rows, 1), rows):  # an empty batch still brings its schema
                yield pa.Table.from_batches([batch.slice(start, rows)])


def _with_id_columns(table: pa.Table) -> pa.Table:
    """Absent id columns become nulls, which the id check fills in from content."""
    for name in ("pair_id", "prompt_id"):
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table


def _with_checked_ids(table: pa.Table, offset: int) -> pa.Table:
    """Recompute each row's ids from its content; fill the missing, refuse the wrong.

    ``offset`` is the rows already streamed, so an error names the row in the whole input.
    """
    for name in ("prompt", "chosen", "rejected", "tie"):
        column = table.column(name)
        if column.null_count:
            row = pc.index(pc.is_null(column), True).as_py()
            raise PrefabError(f"commit refused: row {offset + row + 1} has no {name!r} (null)")
    messages = pc.list_flatten(table.column("prompt"))
    for part in ("role", "content"):
        if pc.struct_field(messages, part).null_count:
            nulls = pc.list_parent_indices(table.column("prompt")).filter(pc.is_null(pc.struct_field(messages, part)))
            row = pc.min(nulls).as_py()
            raise PrefabError(f"commit refused: row {offset + row + 1} has a prompt message with no {part!r} (null)")
    pair_ids, prompt_ids = content_ids(table)
    for name, expected in (("pair_id", pair_ids), ("prompt_id", prompt_ids)):
        given = table.column(name).combine_chunks()
        wrong = pc.and_kleene(pc.is_valid(given), pc.not_equal(given, expected))
        if pc.any(wrong).as_py():
            row = pc.index(wrong, True).as_py()
            raise PrefabError(
                f"commit refused: row {offset + row + 1} has {name} {given[row].as_py()!r}, but its "
                f"content hashes to {expected[row].as_py()!r} ({name} is a content hash: "
                f"schemas.pairs.{name}_of; leave it null to have it computed)"
            )
        if given.null_count:
            position = table.schema.get_field_index(name)
            table = table.set_column(position, table.schema.field(name), pc.coalesce(given, expected))
    return table


def _aligned(table: pa.Table, schema: pa.Schema, offset: int) -> pa.Table:
    """``table`` in ``schema``: columns it lacks become nulls; a column of another type is cast."""
    columns = []
    for schema_field in schema:
        if schema_field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, schema_field.type))
            continue
        column = table.column(schema_field.name)
        try:
            columns.append(column.cast(schema_field.type) if column.type != schema_field.type else column)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise PrefabError(f"column {schema_field.name!r} changes type from {schema_field.type} to "
                              f"{column.type} at row {offset + 1}; every batch needs the same columns") from None
    extra = [c for c in table.column_names if c not in schema.names]
    if extra:
        raise PrefabError(f"column(s) {', '.join(map(repr, extra))} appear at row {offset + 1} but not in "
                          "the first batch; every batch needs the same columns")
    return pa.Table.from_arrays(columns, schema=schema)


def _unmatched(dropped: list[pa.Array], kept: list[pa.Array]) -> pa.BooleanArray:
    """For each dropped key, whether no kept row has it."""
    dropped_keys = pa.concat_arrays(dropped) if dropped else pa.array([], pa.string())
    kept_keys = pa.concat_arrays(kept) if kept else pa.array([], pa.string())
    return pc.invert(pc.is_in(dropped_keys, value_set=kept_keys))


def _merged_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """Canonical columns, then every input's extra columns (first-seen order)."""
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise PrefabError(f"cannot merge: inputs disagree on a column's type ({exc})") from None
    extras = [f for f in unified if f.name not in PAIR_SCHEMA.names]
    return pa.schema(list(PAIR_SCHEMA) + extras)


def _conform_failures(failures: pa.Table | None) -> pa.Table | None:
    if failures is None:
        return None
    if "reason" not in failures.column_names:
        raise PrefabError("failures table needs a 'reason' column (and step, pair_id, raw)")
    unknown = [c for c in failures.column_names if c not in FAILURE_SCHEMA.names]
    if unknown:
        raise PrefabError(f"failures table has unknown column(s) {unknown} (expected {FAILURE_SCHEMA.names})")
    columns = []
    for schema_field in FAILURE_SCHEMA:
        if schema_field.name in failures.column_names:
            columns.append(failures.column(schema_field.name).cast(pa.string()))
        else:
            columns.append(pa.nulls(failures.num_rows, pa.string()))
    if columns[FAILURE_SCHEMA.get_field_index("reason")].null_count:
        raise PrefabError("failures table: every row needs a reason")
    return pa.Table.from_arrays(columns, schema=FAILURE_SCHEMA)


def load(ref: str, home: str | Path | None = None, *, progress: bool = False) -> Any:
    """A catalog version as a `datasets.Dataset` (memory-mapped, not copied into RAM).

    Its Arrow copy lives under the home (``cache/datasets``, cleaned by ``catalog gc``),
    never in the `datasets` cache; ``progress`` shows a bar while that copy is first made.
    """
    from factory.catalog.exporters import to_hf_dataset

    return to_hf_dataset(Catalog(home), ref, progress=progress)
