"""Integrity checks and garbage collection for a catalog home.

``verify`` re-hashes every data file a version needs and names the versions a bad file
breaks. ``gc`` deletes only objects no version references, and only once they are older
than a grace period, so a commit that has written its files but not yet taken the
database lock never loses them; it also cleans the home's caches (resume folders, noise
and embedding caches, load copies) that no recent run used.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from factory.catalog.catalog import Catalog
from factory.catalog.housekeeping import DEFAULT_CACHE_GRACE_SECONDS, clean_caches, llm_cache_report

DEFAULT_GRACE_SECONDS = 3600.0


def verify(catalog: Catalog) -> dict[str, Any]:
    with catalog._connect(read_only=True) as connection:
        files = connection.execute(
            "SELECT f.sha256, f.relpath, f.bytes, list(DISTINCT v.dataset || '@' || v.version) "
            "FROM files f JOIN version_files v USING (sha256) GROUP BY ALL ORDER BY f.relpath"
        ).fetchall()
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
    broken = sorted({v for p in problems for v in p["versions"]})
    return {"ok": not problems, "files_checked": len(files), "problems": problems, "broken_versions": broken}


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
                         "kept_bytes": sum(p.stat().st_size for p in candidates if p not in doomed)}}
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
