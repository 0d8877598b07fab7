"""Integrity checks and garbage collection for a catalog home.

``verify`` re-hashes every data file a version needs and names the versions a bad file
breaks. ``gc`` deletes only objects no version references, and only once they are older
than a grace period, so a commit that has written its files but not yet taken the
database lock never loses them; it also cleans the home's caches (resume folders, noise
and embedding caches, load copies) that no recent run used.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from factory.catalog.catalog import Catalog
from factory.catalog.housekeeping import DEFAULT_CACHE_GRACE_SECONDS, clean_caches, llm_cache_report
from factory.catalog.refs import Ref
from schemas.errors import PrefabError

DEFAULT_GRACE_SECONDS = 3600.0


REPAIR_TABLES = "prefab catalog verify --repair"


def verify(catalog: Catalog, *, repair: bool = False) -> dict[str, Any]:
    """Re-hash every file a version needs; on a lake also check each dataset's plain-SQL
    table ``main."pairs_<dataset>"`` holds exactly its latest version (see
    :func:`factory.catalog.lake.check_published`). With ``repair`` a wrong table is
    re-published from the version's (verified) files in one lake transaction, then checked again.
    """
    with catalog._connect(read_only=True) as connection:
        files = connection.execute(
            "SELECT f.sha256, f.relpath, f.bytes, list(DISTINCT v.dataset || '@' || v.version) "
            "FROM files f JOIN version_files v USING (sha256) GROUP BY ALL ORDER BY f.relpath"
        ).fetchall()
        tables = _table_problems(catalog, connection) if catalog.lake is not None else []
        models = connection.execute(
            "SELECT name, version, relpath, manifest FROM models WHERE manifest IS NOT NULL ORDER BY name, version"
        ).fetchall() if catalog.lake is not None else []
    problems = []
    for sha256, relpath, size, versions in files:
        path = catalog.data_root / relpath
        if not path.exists():
            problem = "missing"
        elif path.stat().st_size != size:
            problem = f"size {path.stat().st_size} bytes, recorded {size}"
        elif catalog.store.hash_file(path) != sha256:
            problem = "sha256 mismatch (file content changed)"
        else:
            continue
        problems.append({"file": relpath, "problem": problem, "versions": sorted(versions)})
    for name, version, relpath, manifest in models:  # a lake's shared model folders
        for inner, sha256 in json.loads(manifest).items():
            path = catalog.data_root / relpath / inner
            if not path.exists():
                problem = "missing"
            elif catalog.store.hash_file(path) != sha256:
                problem = "sha256 mismatch (file content changed)"
            else:
                continue
            problems.append({"file": f"{relpath}/{inner}", "problem": problem, "versions": [],
                             "models": [f"{name}@{version}"]})
    broken = sorted({v for p in problems for v in p["versions"]})
    report: dict[str, Any] = {"ok": not problems and not tables, "files_checked": len(files),
                              "problems": problems, "broken_versions": broken}
    if models:
        report["model_files_checked"] = sum(len(json.loads(m[3])) for m in models)
        report["broken_models"] = sorted({m for p in problems for m in p.get("models", [])})
    if catalog.lake is not None:
        report["tables_checked"] = len(catalog.datasets())
        report["tables"] = tables
        if repair and tables:
            unrepairable = {p["dataset"] for p in tables if f"{p['dataset']}@{p['version']}" in broken}
            if unrepairable:  # its files are damaged: a table over them would be too
                raise PrefabError(f"cannot repair the table of {', '.join(sorted(unrepairable))}: its latest "
                                  "version's files are damaged (see the file problems)")
            _republish(catalog, tables)
            report["repaired"] = [p["table"] for p in tables]
            again = verify(catalog)
            report.update(ok=again["ok"], tables=again["tables"])
    return report


def _table_problems(catalog: Catalog, connection: Any) -> list[dict[str, Any]]:
    """One entry per dataset whose ``pairs_<dataset>`` table is not its latest version."""
    from factory.catalog import lake

    assert catalog.lake is not None
    latest = connection.execute(
        "SELECT dataset, max(version) FROM versions GROUP BY dataset ORDER BY dataset").fetchall()
    problems = []
    for name, version in latest:
        info = catalog._resolve(connection, Ref(name, version=version))
        problem = lake.check_published(connection, catalog.lake, name, version, info.rows, catalog.paths(info))
        if problem:
            problems.append({"table": f'main."pairs_{name}"', "dataset": name, "version": version,
                             "problem": problem,
                             "repair": f"{REPAIR_TABLES} (re-makes it from {name}@{version}'s files)"})
    return problems


def _republish(catalog: Catalog, tables: list[dict[str, Any]]) -> None:
    from factory.catalog import lake

    assert catalog.lake is not None
    paths = {p["dataset"]: (p["version"], catalog.checked_paths(f"{p['dataset']}@{p['version']}")) for p in tables}

    def republish(connection: Any) -> None:
        for name, (version, files) in paths.items():
            lake.publish(connection, catalog.lake, name, version, files, repair=True)

    catalog._write(republish)


def gc(catalog: Catalog, *, dry_run: bool = True, grace_seconds: float = DEFAULT_GRACE_SECONDS,
       cache_grace_seconds: float = DEFAULT_CACHE_GRACE_SECONDS,
       llm_cache_grace_seconds: float | None = None) -> dict[str, Any]:
    """Remove what nothing needs: unreferenced objects older than ``grace_seconds``, and cache
    units of the home unused for ``cache_grace_seconds`` (see :mod:`factory.catalog.housekeeping`).

    The LLM request cache is only measured, unless ``llm_cache_grace_seconds`` is given.
    The report says, per area, what goes (or would go, with ``dry_run``) and its bytes.
    """
    now = time.time()
    with catalog._connect() as connection:
        needed = {r[0] for r in connection.execute("SELECT DISTINCT sha256 FROM version_files").fetchall()}
        candidates: list[Path] = [
            p for p in catalog.store.all_objects() if p.stem not in needed
        ] + catalog.store.temporary_files()
        doomed = [p for p in candidates if now - p.stat().st_mtime >= grace_seconds]
        kept_young = len(candidates) - len(doomed)
        freed = sum(p.stat().st_size for p in doomed)
        if not dry_run:
            for path in doomed:
                path.unlink(missing_ok=True)
            catalog._write(lambda writer: writer.execute(
                "DELETE FROM files WHERE sha256 NOT IN (SELECT sha256 FROM version_files)"))
    objects = [str(p.relative_to(catalog.data_root)) for p in doomed]
    areas = {"objects": {"removed": objects, "bytes": freed, "kept": kept_young,
                         "kept_bytes": sum(p.stat().st_size for p in candidates if p not in doomed),
                         "restored": []}}
    caches = clean_caches(catalog, dry_run=dry_run, grace_seconds=grace_seconds,
                          cache_grace_seconds=cache_grace_seconds)
    areas.update({area: report.as_dict() for area, report in caches.items()})
    llm = llm_cache_report(catalog, dry_run=dry_run, older_than_seconds=llm_cache_grace_seconds)
    return {
        "dry_run": dry_run,
        "files": [path for report in areas.values() for path in report["removed"]],
        "bytes": sum(report["bytes"] for report in areas.values()) + llm["bytes_freed"],
        "skipped_younger_than_grace": kept_young,
        "grace_seconds": grace_seconds,
        "cache_grace_seconds": cache_grace_seconds,
        "areas": areas,
        "llm_cache": llm,
    }
