"""What ``catalog gc`` cleans besides unreferenced objects: the home's caches and leftovers.

Each area holds work that can be redone, so its unit (a folder or a file) goes once nothing
has used it for ``cache_grace`` seconds; a unit used more recently belongs to a recent run
and stays. "Used" is the newest modification time in the unit, or access time of a file in
it (the embedding cache and ``load`` also mark each use explicitly):

- ``steps/<key>/``      finished batches of an interrupted step run (a rerun resumes from
                        them; a finished run removes its own folder);
- ``staging/<key>/``    on a lake only, under its data path (not the home): the same, written
                        by Ray workers on any host (area ``staging``, paths relative to the
                        data path);
- ``noise/*.npz``       the noise filter's trained-head outputs, keyed by data and params;
- ``embeddings/<model>/`` the frozen encoder's vectors, one folder per encoder;
- ``tokens/<key>/``     full mode's memory-mapped token ids, one folder per (texts, tokenizer, length);
- ``cache/datasets/``   the Arrow copies ``factory.catalog.load`` maps, and `datasets` cache
                        files made next to them; a copy of content no version has goes after
                        ``grace`` like an unreferenced object.

Area ``incoming`` (paths relative to the data path, the home's or a lake's) holds what a killed
write left half-made: a model folder being copied to ``models/<name>/.incoming-<uuid>/`` before
its registration renames it, and a file being placed beside an object (``objects/ab/.<...>``,
``catalog migrate``). A writer may be mid-copy, so a unit goes only after ``grace`` with no
change in it, like an unreferenced object. One exception: a model copy whose registration
committed but whose rename never happened (the process died in between) is exactly the
missing folder of a registered version; it is renamed into place (``restored``), not removed.

The LLM request cache (``llm_cache.duckdb``) stores paid answers whose entries record when
they were made, not when last used, so it is only reported unless ``llm_cache_grace`` is
given: then entries made longer ago than that are deleted.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from factory.catalog.catalog import INCOMING_MODEL, MODELS, Catalog

STAGING = "staging"  # under a lake's data path (see factory.steps.runner.run_work_dir)
DEFAULT_CACHE_GRACE_SECONDS = 7 * 24 * 3600.0


@dataclass
class AreaReport:
    removed: list[str] = field(default_factory=list)
    bytes: int = 0
    kept: int = 0
    kept_bytes: int = 0
    restored: list[str] = field(default_factory=list)  # "<unit> -> <its place>", area incoming only

    def as_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "bytes": self.bytes, "kept": self.kept, "kept_bytes": self.kept_bytes,
                "restored": self.restored}


def clean_caches(catalog: Catalog, *, dry_run: bool, grace_seconds: float,
                 cache_grace_seconds: float) -> dict[str, AreaReport]:
    """Remove (unless ``dry_run``) every cache unit unused for ``cache_grace_seconds``."""
    now = time.time()
    live_copies = _live_load_copies(catalog)
    reports: dict[str, AreaReport] = {}
    areas = [("steps", catalog.home, _children(catalog.home / "steps")),
             ("noise", catalog.home, _children(catalog.home / "noise")),
             ("embeddings", catalog.home, _children(catalog.home / "embeddings")),
             ("tokens", catalog.home, _children(catalog.home / "tokens")),
             ("datasets", catalog.home, _children(catalog.home / "cache" / "datasets"))]
    if catalog.lake is not None:  # Ray workers' batches of interrupted runs, on the shared path
        areas.append(("staging", catalog.data_root, _children(catalog.data_root / STAGING)))
    areas.append(("incoming", catalog.data_root, _incoming_leftovers(catalog.data_root)))
    lost = _lost_model_folders(catalog)
    for area, root, units in areas:
        report = reports[area] = AreaReport()
        for unit in units:
            # A half-made copy ages by its writes only: gc's own hashing (below) reads it.
            idle = now - _last_use(unit, reads=area != "incoming")
            orphan = area == "datasets" and _is_load_copy(unit) and unit.stem not in live_copies
            size = _size(unit)
            grace = grace_seconds if area == "incoming" else cache_grace_seconds
            place = _place_of(catalog, unit, lost) if area == "incoming" and idle >= grace else None
            if place is not None:
                report.restored.append(f"{unit.relative_to(root)} -> {place.relative_to(root)}")
                if not dry_run:
                    unit.rename(place)
                continue
            if idle >= grace or (orphan and idle >= grace_seconds):
                report.removed.append(str(unit.relative_to(root)))
                report.bytes += size
                if not dry_run:
                    _remove(unit)
            else:
                report.kept += 1
                report.kept_bytes += size
    return reports


def _live_load_copies(catalog: Catalog) -> set[str]:
    """Names (without ``.arrow``) of the load copies some version's content still has."""
    with catalog._connect(read_only=True) as connection:
        rows = connection.execute(
            "SELECT string_agg(sha256, ' ' ORDER BY ordinal) FROM version_files WHERE role = 'data' "
            "GROUP BY dataset, version"
        ).fetchall()
    return {hashlib.sha256(row[0].encode()).hexdigest() for row in rows if row[0]}


def _is_load_copy(path: Path) -> bool:
    """A ``load`` copy is named by a sha256; other files there are `datasets`' own caches."""
    return path.suffix == ".arrow" and len(path.stem) == 64 and all(c in "0123456789abcdef" for c in path.stem)


def _incoming_leftovers(data_root: Path) -> list[Path]:
    """Half-made model copies and object placements under ``data_root`` (see the module doc).

    Objects are named ``<sha256>.parquet``; a hidden entry beside them is always a placement.
    """
    models = [p for folder in _children(data_root / MODELS) if folder.is_dir()
              for p in folder.glob(f"{INCOMING_MODEL}*")]
    placements = [p for folder in _children(data_root / "objects") if folder.is_dir() and len(folder.name) == 2
                  for p in folder.glob(".*")]
    return sorted(models + placements)


def _lost_model_folders(catalog: Catalog) -> dict[str, list[tuple[Path, dict[str, str]]]]:
    """Per model name, the folders (and manifests) of its registered versions that are missing."""
    if catalog.lake is None:  # a home's models are where they were trained: nothing copies them
        return {}
    with catalog._connect(read_only=True) as connection:
        rows = connection.execute(
            "SELECT name, relpath, manifest FROM models WHERE manifest IS NOT NULL ORDER BY name, version").fetchall()
    lost: dict[str, list[tuple[Path, dict[str, str]]]] = {}
    for name, relpath, manifest in rows:
        if not (catalog.data_root / relpath).exists():
            lost.setdefault(name, []).append((catalog.data_root / relpath, json.loads(manifest)))
    return lost


def _place_of(catalog: Catalog, unit: Path, lost: dict[str, list[tuple[Path, dict[str, str]]]]) -> Path | None:
    """The missing version folder whose recorded files ``unit`` holds exactly, if any."""
    candidates = lost.get(unit.parent.name, []) if unit.parent.parent.name == MODELS and unit.is_dir() else []
    if not candidates:
        return None
    held = {p.relative_to(unit).as_posix(): catalog.store.hash_file(p) for p in sorted(unit.rglob("*"))
            if p.is_file()}
    for index, (place, manifest) in enumerate(candidates):
        if held == manifest:
            del candidates[index]  # one copy per version
            return place
    return None


def _children(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _walk(unit: Path) -> Iterator[Path]:
    yield unit
    if unit.is_dir():
        yield from unit.rglob("*")


def _last_use(unit: Path, *, reads: bool = True) -> float:
    """The newest modification time in the unit, or (with ``reads``) access time of a file in
    it (a cache read).

    A folder's access time is not a use: listing it (as gc itself does) sets it.
    """
    newest = 0.0
    for path in _walk(unit):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed meanwhile (a run finishing)
            continue
        newest = max(newest, stat.st_mtime, 0.0 if path.is_dir() or not reads else stat.st_atime)
    return newest


def _size(unit: Path) -> int:
    total = 0
    for path in _walk(unit):
        try:
            if path.is_file():
                total += path.stat().st_size
        except FileNotFoundError:
            continue
    return total


def _remove(unit: Path) -> None:
    if unit.is_dir():
        shutil.rmtree(unit, ignore_errors=True)
    else:
        unit.unlink(missing_ok=True)


def llm_cache_report(catalog: Catalog, *, dry_run: bool, older_than_seconds: float | None) -> dict[str, Any]:
    """Size of the home's LLM request cache; with ``older_than_seconds``, its older entries go."""
    from factory.catalog.db import lock_timeout_seconds
    from factory.dbwait import connect_waiting
    from factory.llm.cache import CACHE_FILENAME
    from schemas.errors import PrefabError

    path = catalog.home / CACHE_FILENAME
    if not path.is_file():
        return {"path": CACHE_FILENAME, "exists": False, "entries": 0, "bytes": 0, "removed_entries": 0,
                "bytes_freed": 0}
    before = path.stat().st_size
    timeout = lock_timeout_seconds()
    connection = connect_waiting(
        path, timeout=timeout, read_only=dry_run or older_than_seconds is None,
        on_timeout=lambda: PrefabError(f"LLM cache {path} is held by another process for over {timeout:.0f} s "
                                       "(set PREFAB_LOCK_TIMEOUT to wait longer)"))
    try:
        entries = connection.execute("SELECT count(*) FROM llm_cache").fetchone()[0]
        doomed = 0
        if older_than_seconds is not None:
            # created_at is naive UTC (factory.llm.cache writes it so)
            cutoff = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=older_than_seconds)
            doomed = connection.execute("SELECT count(*) FROM llm_cache WHERE created_at < ?",
                                        [cutoff]).fetchone()[0]
            if doomed and not dry_run:
                connection.execute("DELETE FROM llm_cache WHERE created_at < ?", [cutoff])
                connection.execute("CHECKPOINT")
    finally:
        connection.close()
    after = path.stat().st_size
    return {"path": CACHE_FILENAME, "exists": True, "entries": entries, "bytes": before,
            "removed_entries": doomed, "bytes_freed": max(before - after, 0)}
