"""Issue 18: `catalog gc` cleans steps/, noise/, embeddings/, load copies and (on request) the LLM cache."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest

from factory.catalog import Catalog, gc, load
from tests.test_catalog import make_pairs

DAY = 24 * 3600.0


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "home")


def _file(path: Path, size: int, age: float = 0.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    _age(path, age)
    return path


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(item, (then, then))


def _home_caches(home: Path) -> dict[str, Path]:
    units = {
        "old_step": _file(home / "steps" / "k-old" / "batch-0.parquet", 100),
        "new_step": _file(home / "steps" / "k-new" / "batch-0.parquet", 10),
        "old_noise": _file(home / "noise" / "old.npz", 200),
        "new_noise": _file(home / "noise" / "new.npz", 20),
        "old_embeddings": _file(home / "embeddings" / "enc-old" / "shard.npz", 300),
        "new_embeddings": _file(home / "embeddings" / "enc-new" / "shard.npz", 30),
        "orphan_copy": _file(home / "cache" / "datasets" / f"{'ab' * 32}.arrow", 400),
    }
    for name in ("old_step", "old_noise", "old_embeddings"):
        _age(units[name].parent if units[name].parent.name.startswith(("k-", "enc-")) else units[name], 2 * DAY)
    _age(units["orphan_copy"], 2 * 3600)  # past the 1 h grace, within the cache grace
    return units


def test_gc_reports_and_removes_caches_no_recent_run_used(catalog):
    catalog.commit("d", make_pairs(3))
    load("d", catalog.home)
    live_copy = next((catalog.home / "cache" / "datasets").glob("*.arrow"))
    _age(live_copy, 2 * 3600)
    units = _home_caches(catalog.home)

    dry = gc(catalog, dry_run=True, cache_grace_seconds=DAY)
    areas = dry["areas"]
    assert areas["steps"]["removed"] == ["steps/k-old"] and areas["steps"]["bytes"] == 100
    assert areas["noise"]["removed"] == ["noise/old.npz"] and areas["noise"]["bytes"] == 200
    assert areas["embeddings"]["removed"] == ["embeddings/enc-old"] and areas["embeddings"]["bytes"] == 300
    assert areas["datasets"]["removed"] == [str(units["orphan_copy"].relative_to(catalog.home))]
    assert areas["datasets"]["kept"] == 1  # the copy of a version's content, used within the cache grace
    assert dry["bytes"] == 100 + 200 + 300 + 400
    assert all(path.exists() for path in units.values())  # a dry run deletes nothing

    done = gc(catalog, dry_run=False, cache_grace_seconds=DAY)
    assert done["files"] == dry["files"], (done["areas"], dry["areas"])
    assert done["bytes"] == dry["bytes"]
    gone = {"old_step", "old_noise", "old_embeddings", "orphan_copy"}
    assert {name for name, path in units.items() if not path.exists()} == gone
    assert not (catalog.home / "steps" / "k-old").exists() and (catalog.home / "embeddings" / "enc-new").is_dir()
    assert live_copy.exists() and load("d", catalog.home).num_rows == 3


def test_an_embedding_cache_in_use_is_kept(catalog):
    from factory.embed.cache import EmbeddingCache

    cache = EmbeddingCache(catalog.home / "embeddings", "enc")
    vectors = cache.get_or_compute([b"k" * 16], ["text"], lambda items: np.ones((len(items), 2)), dim=2)
    assert vectors.shape == (1, 2)
    _age(catalog.home / "embeddings" / "enc", 2 * DAY)
    assert gc(catalog, cache_grace_seconds=DAY)["areas"]["embeddings"]["removed"] == ["embeddings/enc"]
    EmbeddingCache(catalog.home / "embeddings", "enc").get_or_compute(
        [b"k" * 16], ["text"], lambda items: pytest.fail("a cache hit computes nothing"), dim=2)
    assert gc(catalog, cache_grace_seconds=DAY)["areas"]["embeddings"]["removed"] == []


def test_llm_cache_is_reported_and_pruned_by_entry_age_only_when_asked(catalog):
    from factory.llm.cache import _DDL, CACHE_FILENAME

    now = datetime.now(UTC).replace(tzinfo=None)
    with duckdb.connect(str(catalog.home / CACHE_FILENAME)) as connection:
        connection.execute(_DDL)
        for key, made in (("old", now - timedelta(days=40)), ("new", now - timedelta(hours=1))):
            connection.execute("INSERT INTO llm_cache (key, status, response, created_at) VALUES (?, 'ok', ?, ?)",
                               [key, "r" * 5000, made])
    kept = gc(catalog, dry_run=False)["llm_cache"]
    assert (kept["entries"], kept["removed_entries"]) == (2, 0) and kept["bytes"] > 0
    dry = gc(catalog, llm_cache_grace_seconds=30 * DAY)["llm_cache"]
    assert dry["removed_entries"] == 1
    gc(catalog, dry_run=False, llm_cache_grace_seconds=30 * DAY)
    with duckdb.connect(str(catalog.home / CACHE_FILENAME), read_only=True) as connection:
        assert connection.execute("SELECT list(key) FROM llm_cache").fetchone()[0] == ["new"]


def test_gc_cli_prints_bytes_per_area(cli, home):
    Catalog(home)
    _file(home / "noise" / "old.npz", 200, age=2 * DAY)
    text = cli("catalog", "gc", "--cache-grace", str(DAY)).stdout
    assert "noise: would delete 1 (200 bytes)" in text and "noise/old.npz" in text and "--yes" in text
    assert (home / "noise" / "old.npz").exists()
    done = cli("catalog", "gc", "--cache-grace", str(DAY), "--yes", "--json").json()
    assert done["areas"]["noise"]["bytes"] == 200 and not (home / "noise" / "old.npz").exists()
    with pytest.raises(SystemExit):
        cli("catalog", "gc", "--cache-grace", "-1")
