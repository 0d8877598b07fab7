"""Catalog guarantees: versions, tags, time travel, diff, integrity, gc, concurrency, crashes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pytest

from factory.catalog import Catalog, CatalogBusy, RefError, diff, gc, verify
from schemas import Message, Pair, pairs_to_table


def make_pairs(n: int, *, start: int = 0, flip: set[int] = frozenset()) -> pa.Table:
    pairs = []
    for i in range(start, start + n):
        good, bad = f"answer {i} is right", f"answer {i} is wrong"
        if i in flip:
            good, bad = bad, good
        pairs.append(Pair(prompt=[Message("user", f"question {i}")], chosen=good, rejected=bad))
    return pairs_to_table(pairs)


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "home")


def test_versions_are_numbered_immutable_and_time_travel(catalog):
    first = catalog.commit("d", make_pairs(3), message="one")
    second = catalog.commit("d", make_pairs(5), message="two", parents=["d@1"])
    assert (first.version, second.version) == (1, 2)
    assert catalog.read_table("d@1").num_rows == 3
    assert catalog.read_table("d").num_rows == 5
    assert catalog.resolve("d@2").lineage["parents"] == ["d@1"]
    catalog.tag("d@1", "gold")
    assert catalog.resolve("d@gold").version == 1
    assert [v.version for v in catalog.log("d")] == [2, 1]


def test_tags_are_immutable_unless_forced_and_moves_are_logged(catalog):
    catalog.commit("d", make_pairs(2))
    catalog.commit("d", make_pairs(3))
    catalog.tag("d@1", "release")
    assert catalog.tag("d@1", "release")["moved_from"] == 1  # re-tagging the same version is a no-op
    with pytest.raises(RefError, match="immutable"):
        catalog.tag("d@2", "release")
    moved = catalog.tag("d@2", "release", force=True)
    assert moved["moved_from"] == 1 and catalog.resolve("d@release").version == 2
    with catalog._connect(read_only=True) as connection:
        events = connection.execute("SELECT old_version, new_version FROM tag_events ORDER BY moved_at").fetchall()
    assert events == [(None, 1), (1, 2)]
    with pytest.raises(RefError, match="cannot be a number"):
        catalog.tag("d@1", "7")


def test_diff_counts_added_removed_relabelled_and_edited(catalog):
    base = make_pairs(10)
    catalog.commit("d", base)
    # v2: drop pairs 0-1, add 10-12, flip the label of 5, and edit the rejected answer of 7.
    rows = [r for r in make_pairs(10, flip={5}).to_pylist() if r["chosen"] not in ("answer 0 is right", "answer 1 is right")]
    table = pa.Table.from_pylist(rows, schema=base.schema)
    edited = make_pairs(13).to_pylist()
    edited_row = Pair(prompt=[Message("user", "question 7")], chosen="answer 7 is right", rejected="totally new").to_row()
    table = pa.concat_tables([
        table.filter(pa.compute.invert(pa.compute.equal(table["chosen"], "answer 7 is right"))),
        pa.Table.from_pylist([edited_row] + edited[10:], schema=base.schema),
    ])
    catalog.commit("d", table)
    result = diff(catalog, "d@1", "d@2", sample=3)
    assert (result["added"], result["removed"], result["relabelled"], result["responses_changed"]) == (3, 2, 1, 1)
    assert result["changed"] == 2 and result["unchanged"] == 6
    assert len(result["sample"]["added"]) == 3
    assert diff(catalog, "d@2", "d@2")["unchanged"] == 11


def test_diff_falls_back_to_data_files_when_indexes_come_from_another_hasher(catalog, monkeypatch):
    import factory.catalog.compare as diff_module

    catalog.commit("d", make_pairs(6))
    catalog.commit("d", make_pairs(7, flip={2}))
    with_index = diff(catalog, "d@1", "d@2")
    monkeypatch.setattr(diff_module, "HASHER", b"another-engine")
    assert diff(catalog, "d@1", "d@2") == with_index
    assert (with_index["added"], with_index["relabelled"], with_index["unchanged"]) == (1, 1, 5)


def test_verify_finds_a_corrupted_file_and_names_the_version(catalog):
    catalog.commit("d", make_pairs(4))
    second = catalog.commit("e", make_pairs(6))
    assert verify(catalog)["ok"]
    path = catalog.paths(second)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify(catalog)
    assert not report["ok"] and report["broken_versions"] == ["e@1"]
    assert "sha256 mismatch" in report["problems"][0]["problem"]


def test_gc_deletes_only_unreferenced_files_past_grace(catalog):
    catalog.commit("d", make_pairs(4))
    orphan = catalog.store.write_table(make_pairs(2, start=50))
    assert gc(catalog, dry_run=True)["files"] == []  # younger than the grace period
    report = gc(catalog, dry_run=True, grace_seconds=0)
    assert report["files"] == [str(orphan.path.relative_to(catalog.home))]
    assert orphan.path.exists()
    gc(catalog, dry_run=False, grace_seconds=0)
    assert not orphan.path.exists()
    assert verify(catalog)["ok"] and catalog.read_table("d").num_rows == 4


def test_same_content_is_stored_once(catalog):
    a = catalog.commit("d", make_pairs(4))
    b = catalog.commit("other", make_pairs(4))
    assert a.files == b.files


def test_busy_catalog_fails_clearly_after_bounded_wait(catalog):
    from factory.catalog.db import connect

    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            c = duckdb.connect({str(catalog.db_path)!r})
            print("held", flush=True)
            time.sleep(30)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(CatalogBusy, match="catalog busy"), connect(catalog.db_path, timeout=0.5):
            pass
        assert time.monotonic() - started < 5
    finally:
        holder.kill()
        holder.wait()


COMMITTER = """
import sys
from factory.catalog import Catalog
from tests.test_catalog import make_pairs
catalog = Catalog(sys.argv[1])
worker = int(sys.argv[2])
for i in range(int(sys.argv[3])):
    catalog.commit("shared", make_pairs(20, start=worker * 1000 + i * 20), message=f"w{worker} c{i}")
"""


def _python(*args: str, env: dict | None = None) -> subprocess.Popen:
    root = Path(__file__).resolve().parent.parent
    return subprocess.Popen([sys.executable, "-c", *args], cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_four_processes_commit_five_versions_each(catalog):
    workers = [_python(COMMITTER, str(catalog.home), str(w), "5") for w in range(4)]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err
    versions = catalog.log("shared")
    assert sorted(v.version for v in versions) == list(range(1, 21))
    assert sorted(v.message for v in versions) == sorted(f"w{w} c{i}" for w in range(4) for i in range(5))
    assert all(catalog.read_table(v).num_rows == 20 for v in versions)
    assert verify(catalog)["ok"]


@pytest.mark.parametrize("point", ["before_files", "after_files", "in_transaction"])
def test_sigkill_during_commit_leaves_catalog_unchanged(catalog, point):
    catalog.commit("d", make_pairs(5))
    before = catalog.resolve("d")
    process = _python(COMMITTER.replace('"shared"', '"d"'), str(catalog.home), "1", "1",
                      env={"PREFAB_TEST_CRASH_AT": point})
    process.communicate(timeout=60)
    assert process.returncode == -9
    after = Catalog(catalog.home)
    assert after.resolve("d").as_dict() == before.as_dict()
    assert [v.version for v in after.log("d")] == [1]
    assert verify(after)["ok"]
    assert after.commit("d", make_pairs(2)).version == 2  # and the catalog still takes commits


def test_sigkill_at_random_instants_never_leaves_a_half_version(catalog):
    for delay in (0.3, 0.6, 0.9, 1.2):
        process = _python(COMMITTER.replace('"shared"', '"d"'), str(catalog.home), "2", "50")
        time.sleep(delay)
        process.kill()
        process.communicate()
        report = verify(Catalog(catalog.home))
        assert report["ok"], report
        for info in Catalog(catalog.home).log("d") if catalog.datasets() else []:
            assert catalog.read_table(info).num_rows == info.rows == 20
