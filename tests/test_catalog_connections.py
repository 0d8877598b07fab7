"""Issue 18: read-only and read-write use of one catalog in one process (threads, notebooks)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from factory.catalog import Catalog, verify
from tests.test_catalog import make_pairs


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "home")


def test_a_reader_joins_an_open_writer_and_a_writer_waits_for_open_readers(catalog):
    catalog.commit("d", make_pairs(3))
    with catalog._connect() as writer:  # a read-write connection is open in this process
        assert catalog.resolve("d").rows == 3  # a read-only request joins it
        writer.execute("SELECT count(*) FROM versions").fetchone()

    reading, release = threading.Event(), threading.Event()

    def hold_a_reader() -> int:
        with catalog._connect(read_only=True) as reader:
            reading.set()
            release.wait(10)
            return reader.execute("SELECT count(*) FROM versions").fetchone()[0]

    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(hold_a_reader)
        assert reading.wait(10)
        committed = pool.submit(catalog.commit, "d", make_pairs(4))  # waits for the reader
        release.set()
        assert held.result(timeout=30) == 1
        assert committed.result(timeout=30).version == 2


def test_a_thread_pool_reads_and_writes_one_catalog(catalog):
    catalog.commit("base", make_pairs(5))

    def work(worker: int) -> tuple[int, int]:
        mine = Catalog(catalog.home)
        info = mine.commit(f"w{worker}", make_pairs(3, start=worker * 10))
        return mine.read_table("base").num_rows, mine.resolve(info.ref).rows

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(work, range(12)))
    assert results == [(5, 3)] * 12
    assert len(catalog.datasets()) == 13 and verify(catalog)["ok"]


def test_a_foreign_connection_in_another_mode_is_waited_for_then_named(catalog):
    import duckdb

    from factory.catalog import CatalogBusy
    from factory.catalog.db import connect

    notebook = duckdb.connect(str(catalog.db_path), read_only=True)  # a user's own SQL session
    try:
        with pytest.raises(CatalogBusy, match="PREFAB_LOCK_TIMEOUT"), connect(catalog.db_path, timeout=0.2):
            pass
    finally:
        notebook.close()
    assert catalog.commit("d", make_pairs(2)).version == 1  # free again once it is closed
