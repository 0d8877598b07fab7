"""Move a home's catalog into a DuckLake: every version, run, tag (and its history), lineage
row, quarantined and failed row, registered model and id unchanged.

Objects are copied (hard-linked where the filesystems allow) to the same relative paths
under the lake's data path and re-hashed on arrival. Each registered model's folder is
copied to ``<data path>/models/<name>/v<N>/`` with the sha256 of every file, exactly as
``register_model`` does on a lake, so any host can load and verify it; a model whose folder
is gone from the home keeps its home path (it loads nowhere, as before) and the report names
it. Versions then go in one lake transaction each, oldest first, so each is its own snapshot
and a plain DuckDB client can time-travel to it; tags, tag history and models follow in a
last transaction. The source is only read. A lake that already holds versions is refused,
so a migration interrupted midway is redone into a fresh lake.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb

from factory.catalog import lake
from factory.catalog.catalog import MODELS, Catalog
from schemas.errors import PrefabError

# Tables whose rows belong to one version (and its runs), copied with it.
PER_VERSION = ("versions", "version_parents", "version_files", "runs", "quarantine", "failures")
# Tables copied whole at the end.
WHOLE = ("datasets", "tags", "tag_events")
SOURCE = "prefab_migration_source"
# Left in a home's model folder only by a run killed between registering and cleaning up: the
# trainer's resume state, which it never copies to a lake either.
TRAINER_STATE = ("checkpoint",)


def migrate(source: Catalog, target: Catalog) -> dict[str, Any]:
    """Copy ``source`` (a home catalog) into ``target`` (an empty lake); returns counts."""
    if source.lake is not None or target.lake is None:
        raise PrefabError("migrate moves a home's catalog into a DuckLake: name the lake with --to "
                          "and leave PREFAB_CATALOG unset for the source")
    spec = target.lake
    with target._connect(read_only=True) as connection:
        if connection.execute("SELECT count(*) FROM versions").fetchone()[0]:
            raise PrefabError(f"{spec.url} already holds versions; migrate into an empty lake")
    with source._connect(read_only=True) as connection:
        files = connection.execute("SELECT sha256, relpath FROM files ORDER BY relpath").fetchall()
        versions = connection.execute(
            "SELECT dataset, version FROM versions ORDER BY created_at, dataset, version").fetchall()
        models = connection.execute("SELECT name, version, relpath FROM models ORDER BY name, version").fetchall()
    for sha256, relpath in files:
        _copy_checked(source.data_root / relpath, target.data_root / relpath, sha256, target)
    for name, version, _ in models:
        final = target.data_root / MODELS / name / f"v{version}"
        if final.exists():
            raise PrefabError(f"cannot migrate model {name}@{version}: {final} already exists (left by an "
                              "interrupted migration?); migrate into a fresh lake or remove that folder")
    shared: dict[tuple[str, int], tuple[Path, dict[str, str]]] = {}
    left_behind: list[dict[str, str]] = []
    def copy_version(name: str, version: int) -> Callable[[duckdb.DuckDBPyConnection], None]:
        def body(connection: duckdb.DuckDBPyConnection) -> None:
            for table in PER_VERSION:
                connection.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {SOURCE}.{table} "
                                   "WHERE dataset = ? AND version = ?", [name, version])
            connection.execute(
                f"INSERT INTO files BY NAME SELECT * FROM {SOURCE}.files WHERE sha256 IN "
                f"(SELECT sha256 FROM {SOURCE}.version_files WHERE dataset = ? AND version = ?) "
                "AND sha256 NOT IN (SELECT sha256 FROM files)", [name, version])
            data = connection.execute(
                f"SELECT f.relpath FROM {SOURCE}.version_files v JOIN {SOURCE}.files f USING (sha256) "
                "WHERE v.dataset = ? AND v.version = ? AND v.role = 'data' AND v.run = 0 ORDER BY v.ordinal",
                [name, version]).fetchall()
            lake.publish(connection, spec, name, version, [target.data_root / r[0] for r in data])
        return body

    def copy_rest(connection: duckdb.DuckDBPyConnection) -> None:
        for table in WHOLE:
            connection.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {SOURCE}.{table}")
        for name, version, _ in models:
            if (name, version) in shared:
                connection.execute(
                    f"INSERT INTO models BY NAME SELECT * REPLACE (? AS relpath), ? AS manifest "
                    f"FROM {SOURCE}.models WHERE name = ? AND version = ?",
                    [f"{MODELS}/{name}/v{version}", json.dumps(shared[name, version][1]), name, version])
            else:
                connection.execute(f"INSERT INTO models BY NAME SELECT * FROM {SOURCE}.models "
                                   "WHERE name = ? AND version = ?", [name, version])

    try:
        for name, version, relpath in models:
            folder = source.home / relpath  # relative to the home, or absolute when registered from elsewhere
            if folder.is_dir():
                shared[name, version] = target._share_model(name, folder, TRAINER_STATE)
            else:
                left_behind.append({"model": f"{name}@{version}", "path": str(folder)})
        # Held throughout: the source stays attached to this process's DuckDB for every transaction.
        with target._connect() as connection:
            connection.execute(f"ATTACH '{source.db_path}' AS {SOURCE} (READ_ONLY)")
            try:
                for name, version in versions:
                    target._write(copy_version(name, version))
                target._write(copy_rest)
            finally:
                connection.execute(f"DETACH {SOURCE}")
    except BaseException:
        for incoming, _ in shared.values():
            shutil.rmtree(incoming, ignore_errors=True)
        raise
    for (name, version), (incoming, _) in shared.items():
        incoming.rename(target.data_root / MODELS / name / f"v{version}")  # checked free above
    return {"from": str(source.home), "to": spec.url, "versions": len(versions), "files": len(files),
            "models": len(shared), "models_left_behind": left_behind}


def _copy_checked(source: Path, target: Path, sha256: str, catalog: Catalog) -> None:
    """``source`` at ``target`` (a hard link when possible), its sha256 checked there."""
    if not source.is_file():
        raise PrefabError(f"cannot migrate: {source} is missing (run `prefab catalog verify` on the source)")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        staging.unlink(missing_ok=True)
        try:
            os.link(source, staging)
        except OSError:
            shutil.copyfile(source, staging)
        os.replace(staging, target)
    if catalog.store.hash_file(target) != sha256:
        raise PrefabError(f"cannot migrate: {source} does not match its recorded sha256 {sha256[:12]} "
                          "(run `prefab catalog verify` on the source)")
