"""The catalog: immutable, numbered dataset versions over content-addressed Parquet.

Layout of a home folder::

    catalog.duckdb        datasets, versions, lineage, tags, files, quarantine, models
    objects/ab/<sha256>.parquet
    models/<name>/<version>/

A commit writes its data files first and then records the version in one database
transaction; a crash at any point leaves the previous state and at most an unreferenced
object, which ``gc`` removes once it is older than its grace period.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from factory.catalog.db import connect, initialise
from factory.catalog.index import build_index
from factory.catalog.refs import Ref, RefError, check_name, check_tag, parse_ref
from factory.catalog.store import ObjectStore
from factory.home import resolve_home
from schemas.pairs import PAIR_SCHEMA, conform
from schemas.readers.base import QUARANTINE_SCHEMA


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"prefab {version('prefab')}"
    except PackageNotFoundError:
        return "prefab (not installed)"


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
            "lineage": self.lineage,
        }


class Catalog:
    def __init__(self, home: str | Path | None = None) -> None:
        self.home = resolve_home(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.db_path = self.home / "catalog.duckdb"
        self.store = ObjectStore(self.home / "objects")
        self.models_dir = self.home / "models"
        with self._connect() as connection:
            initialise(connection)

    def _connect(self, read_only: bool = False) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        return connect(self.db_path, read_only=read_only)

    # ---- writing -------------------------------------------------------------------------

    def commit(
        self,
        name: str,
        table: pa.Table,
        *,
        message: str = "",
        lineage: dict[str, Any] | None = None,
        parents: list[str] | tuple[str, ...] = (),
        quarantine: pa.Table | None = None,
    ) -> VersionInfo:
        """Record ``table`` as the next version of ``name``; returns the new version."""
        check_name(name)
        started = time.monotonic()
        table = conform(table)
        parent_infos = [self.resolve(parent) for parent in parents]
        _crash_point("before_files")
        # The index hashes responses while the data file compresses them; both release the GIL.
        with ThreadPoolExecutor(max_workers=1) as pool:
            index_job = pool.submit(lambda: self.store.write_table(build_index(table)))
            stored = self.store.write_table(table)
            index = index_job.result()
        _crash_point("after_files")
        record = {
            "code_version": code_version(),
            "parents": [p.ref for p in parent_infos],
            "rows_out": table.num_rows,
            "models": [],
            "judges": [],
            **(lineage or {}),
        }
        record.setdefault("rows_quarantined", quarantine.num_rows if quarantine is not None else 0)
        now = _now()
        with self._connect() as connection:
            if not stored.path.exists():  # a gc ran between our write and this lock
                stored = self.store.write_table(table)
            if not index.path.exists():
                index = self.store.write_table(build_index(table))
            connection.execute("BEGIN TRANSACTION")
            try:
                version = connection.execute(
                    "SELECT coalesce(max(version), 0) + 1 FROM versions WHERE dataset = ?", [name]
                ).fetchone()[0]
                record.setdefault("commit_seconds", round(time.monotonic() - started, 3))
                connection.execute(
                    "INSERT INTO datasets VALUES (?, ?) ON CONFLICT (name) DO NOTHING", [name, now]
                )
                for role, obj in (("data", stored), ("index", index)):
                    connection.execute(
                        "INSERT INTO files VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
                        [obj.sha256, str(obj.path.relative_to(self.home)), obj.bytes, obj.rows, now],
                    )
                    connection.execute(
                        "INSERT INTO version_files VALUES (?, ?, ?, 0, ?)", [name, version, role, obj.sha256]
                    )
                connection.execute(
                    "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                    [name, version, now, message, table.num_rows, json.dumps(record, default=str)],
                )
                for parent in parent_infos:
                    connection.execute(
                        "INSERT INTO version_parents VALUES (?, ?, ?, ?)",
                        [name, version, parent.name, parent.version],
                    )
                if quarantine is not None and quarantine.num_rows:
                    bad = quarantine.select(QUARANTINE_SCHEMA.names)  # noqa: F841 - read by SQL
                    connection.execute(
                        "INSERT INTO quarantine SELECT ?, ?, file, line, field, reason, raw FROM bad",
                        [name, version],
                    )
                _crash_point("in_transaction")
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                raise
        return self.resolve(Ref(name, version=version))

    def tag(self, ref: str, tag: str, *, force: bool = False) -> dict[str, Any]:
        """Name a version. Tags are immutable; moving one needs ``force`` and is logged."""
        check_tag(tag)
        target = self.resolve(ref)
        with self._connect() as connection:
            connection.execute("BEGIN TRANSACTION")
            row = connection.execute(
                "SELECT version FROM tags WHERE dataset = ? AND tag = ?", [target.name, tag]
            ).fetchone()
            old = row[0] if row else None
            if old is not None and old != target.version and not force:
                connection.execute("ROLLBACK")
                raise RefError(
                    f"tag {target.name}@{tag} already points to version {old}; "
                    "tags are immutable (use --force to move it)"
                )
            if old != target.version:
                connection.execute(
                    "INSERT OR REPLACE INTO tags VALUES (?, ?, ?, ?)",
                    [target.name, tag, target.version, _now()],
                )
                connection.execute(
                    "INSERT INTO tag_events VALUES (?, ?, ?, ?, ?)",
                    [target.name, tag, old, target.version, _now()],
                )
            connection.execute("COMMIT")
        return {"dataset": target.name, "tag": tag, "version": target.version, "moved_from": old}

    # ---- reading -------------------------------------------------------------------------

    def resolve(self, ref: str | Ref) -> VersionInfo:
        parsed = parse_ref(ref) if isinstance(ref, str) else ref
        with self._connect(read_only=True) as connection:
            return self._resolve(connection, parsed)

    def _resolve(self, connection: duckdb.DuckDBPyConnection, ref: Ref) -> VersionInfo:
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
        files: dict[str, list[str]] = {"data": [], "index": []}
        for role, relpath in connection.execute(
            "SELECT v.role, f.relpath FROM version_files v JOIN files f USING (sha256) "
            "WHERE v.dataset = ? AND v.version = ? ORDER BY v.ordinal",
            [ref.name, version],
        ).fetchall():
            files[role].append(relpath)
        tags = [
            r[0]
            for r in connection.execute(
                "SELECT tag FROM tags WHERE dataset = ? AND version = ? ORDER BY tag",
                [ref.name, version],
            ).fetchall()
        ]
        return VersionInfo(ref.name, version, row[0], row[1], row[2] or "", json.loads(row[3]),
                           files["data"], tags, files["index"])

    def paths(self, ref: str | VersionInfo, role: str = "data") -> list[Path]:
        info = ref if isinstance(ref, VersionInfo) else self.resolve(ref)
        return [self.home / relpath for relpath in (info.files if role == "data" else info.index_files)]

    def scanner(self, ref: str | VersionInfo) -> pads.Dataset:
        """A lazy Arrow dataset over a version's files, for streaming and SQL."""
        return pads.dataset([str(p) for p in self.paths(ref)], format="parquet", schema=PAIR_SCHEMA)

    def read_table(self, ref: str | VersionInfo, columns: list[str] | None = None) -> pa.Table:
        return self.scanner(ref).to_table(columns=columns)

    def quarantined(self, ref: str) -> pa.Table:
        info = self.resolve(ref)
        with self._connect(read_only=True) as connection:
            return connection.sql(
                "SELECT file, line, field, reason, raw FROM quarantine "
                "WHERE dataset = ? AND version = ? ORDER BY file, line",
                params=[info.name, info.version],
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
    ) -> dict[str, Any]:
        check_name(name, "model name")
        data = self.resolve(data_ref)
        path = Path(path).resolve()
        try:
            stored_path = str(path.relative_to(self.home.resolve()))
        except ValueError:
            stored_path = str(path)
        with self._connect() as connection:
            connection.execute("BEGIN TRANSACTION")
            version = connection.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM models WHERE name = ?", [name]
            ).fetchone()[0]
            connection.execute(
                "INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [name, version, stored_path, data.name, data.version,
                 json.dumps(metrics, default=str), json.dumps(params, default=str), _now()],
            )
            connection.execute("COMMIT")
        return self.get_model(f"{name}@{version}")

    def next_model_version(self, name: str) -> int:
        with self._connect(read_only=True) as connection:
            return connection.execute(
                "SELECT coalesce(max(version), 0) + 1 FROM models WHERE name = ?", [name]
            ).fetchone()[0]

    def get_model(self, ref: str) -> dict[str, Any]:
        parsed = parse_ref(ref)
        if parsed.tag is not None:
            raise RefError(f"models are referenced as NAME or NAME@N, not {ref!r}")
        with self._connect(read_only=True) as connection:
            row = connection.execute(
                "SELECT name, version, relpath, dataset, dataset_version, metrics, params, created_at "
                "FROM models WHERE name = ? AND (? IS NULL OR version = ?) "
                "ORDER BY version DESC LIMIT 1",
                [parsed.name, parsed.version, parsed.version],
            ).fetchone()
        if row is None:
            raise RefError(f"no model {ref!r} in the catalog")
        return {
            "name": row[0], "version": row[1], "path": str(self.home / row[2]),
            "dataset": f"{row[3]}@{row[4]}", "metrics": json.loads(row[5]),
            "params": json.loads(row[6]), "created_at": row[7].isoformat(timespec="seconds") + "Z",
        }

    def models(self) -> list[dict[str, Any]]:
        with self._connect(read_only=True) as connection:
            names = connection.execute(
                "SELECT name, max(version) FROM models GROUP BY name ORDER BY name"
            ).fetchall()
        return [self.get_model(f"{n}@{v}") for n, v in names]


def load(ref: str, home: str | Path | None = None) -> Any:
    """A catalog version as a `datasets.Dataset` (memory-mapped, not copied into RAM)."""
    from factory.catalog.exporters import to_hf_dataset

    return to_hf_dataset(Catalog(home), ref)
