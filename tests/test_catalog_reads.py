"""Reading a version back (review issue 8): checked files, TRL export of ties and margins, the
streamed `datasets` export, and the CLI's tag history, merge, failures and home checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from factory.catalog import Catalog, export
from schemas import Message, Pair, PrefabError, pairs_to_table
from tests.conftest import REPO
from tests.test_catalog import make_pairs


@pytest.fixture
def catalog(home: Path) -> Catalog:
    return Catalog(home)


def _labelled() -> pa.Table:
    pairs = [Pair(prompt=[Message("user", f"q{i}")], chosen=f"good {i}", rejected=f"bad {i}",
                  tie=i % 3 == 0, margin=float(i)) for i in range(6)]
    return pairs_to_table(pairs)


# ---- 1. TRL export -------------------------------------------------------------------------------


def test_trl_export_leaves_ties_out_and_writes_margin_only_when_every_row_has_one(catalog, tmp_path):
    catalog.commit("d", _labelled())
    result = export(catalog, "d", "trl", tmp_path / "all.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert (result["rows"], result["ties_skipped"], result["margin_written"]) == (4, 2, True)
    assert [r["margin"] for r in rows] == [1.0, 2.0, 4.0, 5.0]
    assert all(set(r) == {"prompt", "chosen", "rejected", "margin"} for r in rows)

    table = _labelled()
    margins = table.column("margin").to_pylist()
    margins[1] = None
    catalog.commit("d", table.set_column(6, table.schema.field("margin"), pa.array(margins, pa.float64())))
    partial = export(catalog, "d@2", "trl", tmp_path / "partial.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "partial.jsonl").read_text().splitlines()]
    assert not partial["margin_written"] and partial["margin_missing"] == 1
    assert all("margin" not in r and "tie" not in r for r in rows)


def test_trl_export_is_what_trls_reward_collator_accepts(catalog, tmp_path):
    trainer = pytest.importorskip("trl.trainer.reward_trainer")
    import datasets

    catalog.commit("d", _labelled())
    export(catalog, "d", "trl", tmp_path / "d.jsonl")
    dataset = datasets.load_dataset("json", data_files=str(tmp_path / "d.jsonl"), split="train")
    collator = trainer.DataCollatorForPreference(pad_token_id=0)
    examples = [{"chosen_ids": [1, 2], "rejected_ids": [3], "margin": row["margin"]} for row in dataset]
    assert collator(examples)["margin"].tolist() == [1.0, 2.0, 4.0, 5.0]


# ---- 3. reads check the files' sha256 ------------------------------------------------------------


def test_a_corrupted_or_missing_file_fails_reads_in_one_line(catalog, cli, tmp_path):
    info = catalog.commit("d", make_pairs(50))
    path = catalog.paths(info)[0]
    assert catalog.read_table("d").num_rows == 50
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    for read in (lambda: catalog.read_table("d"), lambda: list(catalog.batches("d")),
                 lambda: export(catalog, "d", "jsonl", tmp_path / "x.jsonl")):
        with pytest.raises(PrefabError, match=r"d@1: its data file objects/.* is corrupted .*prefab catalog verify"):
            read()
    for fmt in ("parquet", "jsonl", "trl", "hf"):
        failed = cli("catalog", "export", "d", "--format", fmt, "--out", tmp_path / f"out.{fmt}")
        assert failed.code == 1 and failed.stderr.count("\n") == 1, failed.stderr
        assert "d@1" in failed.stderr and "prefab catalog verify" in failed.stderr
    path.unlink()
    missing = cli("catalog", "export", "d", "--format", "jsonl", "--out", tmp_path / "y.jsonl")
    assert missing.code == 1 and "d@1: its data file" in missing.stderr and "is missing" in missing.stderr
    from factory.trainer.api import _load_data

    with pytest.raises(PrefabError, match="is missing"):
        _load_data("d", catalog.home)
    path.write_bytes(original)
    assert catalog.read_table("d").num_rows == 50


def test_a_checked_file_is_hashed_once_per_process(catalog, monkeypatch):
    catalog.commit("d", make_pairs(10))
    calls = []
    real = catalog.store.hash_file
    monkeypatch.setattr(catalog.store, "hash_file", lambda path: calls.append(path) or real(path))
    for _ in range(3):
        catalog.read_table("d")
    assert len(calls) <= 1


# ---- 4. the `datasets` export streams ------------------------------------------------------------


def test_hf_export_streams_batches_into_a_loadable_folder(catalog, tmp_path, monkeypatch):
    import datasets

    catalog.commit("d", make_pairs(40))
    # The old export built the whole dataset through from_parquet's cache first.
    monkeypatch.setattr(datasets.Dataset, "from_parquet", None)
    (tmp_path / "out").mkdir()
    result = export(catalog, "d", "hf", tmp_path / "out")
    loaded = datasets.load_from_disk(str(tmp_path / "out"))
    assert result["rows"] == loaded.num_rows == 40
    assert loaded[0]["pair_id"] == catalog.read_table("d").column("pair_id")[0].as_py()
    export(catalog, "d", "hf", tmp_path / "out")  # an earlier export is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(PrefabError, match="not empty"):
        export(catalog, "d", "hf", tmp_path / "other")


@pytest.mark.slow
def test_ingest_and_hf_export_memory_stays_flat(tmp_path):
    """Peak RSS of whole CLI processes for 100k vs 300k rows: the difference stays small.

    (Below one row group, 64k rows, the write buffers are not yet full, so both sizes are above.)
    """
    import polars as pl

    sys.path.insert(0, str(REPO))
    from benchmarks.catalog import synthetic_pairs

    def peak(argv: list[str]) -> float:
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from this (big) process.
        code = ("import runpy, sys; sys.argv = ['prefab', *sys.argv[1:]]\n"
                "try:\n    runpy.run_module('factory', run_name='__main__')\n"
                "except SystemExit:\n    pass\n"
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
                "print(int(hwm.split()[1]) / 1024)")
        out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "PREFAB_HOME": str(tmp_path / "home")}, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    peaks = {}
    for rows in (100_000, 300_000):
        source = tmp_path / f"{rows}.jsonl"
        pl.from_arrow(synthetic_pairs(rows).select(["prompt", "chosen", "rejected"])).write_ndjson(source)
        peaks[rows] = (peak(["ingest", str(source), "--name", f"n{rows}", "--no-progress"]),
                       peak(["catalog", "export", f"n{rows}", "--format", "hf", "--out", str(tmp_path / f"hf{rows}")]))
    # 200k more rows are ~240 MiB of JSON; holding them would add a GiB or more.
    assert peaks[300_000][0] - peaks[100_000][0] < 100, peaks
    assert peaks[300_000][1] - peaks[100_000][1] < 100, peaks


# ---- 7. tag history ------------------------------------------------------------------------------


def test_log_and_show_list_tag_moves(cli, catalog):
    catalog.commit("d", make_pairs(2))
    catalog.commit("d", make_pairs(3))
    catalog.tag("d@1", "release")
    catalog.tag("d@2", "release", force=True)
    history = cli("catalog", "log", "d", "--json").json()["tag_history"]
    assert [(e["tag"], e["from_version"], e["to_version"]) for e in history] == [("release", None, 1),
                                                                                  ("release", 1, 2)]
    assert "release moved from version 1 to 2" in cli("catalog", "log", "d").stdout
    shown = cli("catalog", "show", "d@1", "--json").json()["tag_history"]
    assert [(e["from_version"], e["to_version"]) for e in shown] == [(None, 1), (1, 2)]
    assert "tag history:" in cli("catalog", "show", "d@1").stdout


# ---- 8 and 11. merge and failures on the command line -------------------------------------------


def test_merge_and_failures_commands(cli, catalog):
    catalog.commit("a", make_pairs(4))
    catalog.commit("b", make_pairs(4, start=2), failures=pa.table({"step": ["gen"], "reason": ["timeout"]}))
    merged = cli("catalog", "merge", "a", "b", "--name", "m", "-m", "both", "--json")
    assert merged.code == 0, merged.stderr
    payload = merged.json()
    assert payload["ref"] == "m@1" and not payload["unchanged"]
    assert payload["lineage"]["parents"] == ["a@1", "b@1"] and payload["lineage"]["duplicates_dropped"] == 2
    text = cli("catalog", "merge", "a", "b", "--name", "m").stdout
    assert "unchanged" in text and "m@1" in text
    failures = cli("catalog", "failures", "b", "--json").json()
    assert failures["count"] == 1 and failures["rows"][0]["reason"] == "timeout"
    assert "[gen]: timeout" in cli("catalog", "failures", "b").stdout
    assert "rows_failed: 1" in cli("catalog", "show", "b").stdout


# ---- 9. one-line errors for a bad home or lock timeout -------------------------------------------


def test_read_only_commands_refuse_a_home_that_does_not_exist(cli, tmp_path):
    typo = tmp_path / "typo" / "path"
    for args in (["list"], ["log", "d"], ["show", "d"], ["export", "d", "--format", "jsonl", "--out",
                 str(tmp_path / "x.jsonl")], ["diff", "d", "d"], ["verify"], ["failures", "d"]):
        result = cli("catalog", *args, "--home", typo)
        assert result.code == 1, args
        assert result.stderr == f"prefab: error: no catalog at {typo}: the folder does not exist " \
                                "(check --home or PREFAB_HOME)\n"
    assert not typo.exists() and not typo.parent.exists()


def test_a_bad_lock_timeout_is_one_line(cli, monkeypatch, catalog):
    monkeypatch.setenv("PREFAB_LOCK_TIMEOUT", "abc")
    result = cli("catalog", "list")
    assert result.code == 1
    assert result.stderr == "prefab: error: PREFAB_LOCK_TIMEOUT must be a number of seconds >= 0, got 'abc'\n"
