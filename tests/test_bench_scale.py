"""benchmarks/scale.py: the pair maker and the harness at a tiny size (2 cheap steps)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import _scale_data  # noqa: E402
import scale  # noqa: E402


def test_sizes_parse_and_print() -> None:
    assert [scale.parse_size(s) for s in ("10k", "100K", "1M", "2500")] == [10_000, 100_000, 1_000_000, 2500]
    assert [scale.size_label(n) for n in (10_000, 1_000_000, 2500)] == ["10k", "1M", "2500"]


def test_clearing_caches_keeps_only_the_distilled_static_model(tmp_path: Path) -> None:
    embeddings = tmp_path / "embeddings"
    for folder in ("static-abc", "model-123", ".static-abc.1f.tmp"):
        (embeddings / folder).mkdir(parents=True)
        (embeddings / folder / "x.npz").write_bytes(b"x")
    (embeddings / "last-used").touch()
    (tmp_path / "noise").mkdir()
    scale.clear_cache(embeddings)
    scale.clear_cache(tmp_path / "noise")
    scale.clear_cache(tmp_path / "tokens")  # absent: nothing to do
    assert [p.name for p in embeddings.iterdir()] == ["static-abc"]
    assert not (tmp_path / "noise").exists()


def test_rows_out_found_in_nested_reports() -> None:
    assert scale.rows_out_of({"dataset": "x", "committed": 12}) == 12
    assert scale.rows_out_of({"result": {"rows_out": 7}}) == 7
    assert scale.rows_out_of({"ok": True}) is None


@pytest.mark.realdata
def test_pairs_distinct_labels_kept_and_chunking_free(shared_data: Path, tmp_path: Path) -> None:
    base = _scale_data.base_pairs(shared_data)
    rows = base.num_rows * 2 + 10  # every base pair twice, and a third copy of a few
    one = pq.read_table(_scale_data.write_pairs(tmp_path / "one.parquet", rows, data=shared_data))
    chunked = pq.read_table(_scale_data.write_pairs(tmp_path / "chunked.parquet", rows, data=shared_data,
                                                    chunk_rows=1_000))
    assert one.equals(chunked)  # seeded by row index: the chunk size changes nothing
    assert one.num_rows == rows
    prompts = [p[-1]["content"] for p in one["prompt"].to_pylist()]
    assert len(set(prompts)) == rows  # every prompt distinct, so every pair is
    n = base.num_rows
    first, second = one.slice(0, n), one.slice(n, n)
    # Copies keep the label: ties and votes are the base row's, chosen and rejected perturbed.
    assert first["tie"].equals(second["tie"]) and first["votes"].equals(second["votes"])
    assert first["task"].equals(base["task"])
    changed = pc.mean(pc.cast(pc.not_equal(first["chosen"], second["chosen"]), "int8")).as_py()
    assert changed > 0.8
    # Identical answers (real HH noise) stay identical in every copy.
    same = pc.equal(base["chosen"], base["rejected"])
    assert pc.all(pc.equal(pc.filter(first["chosen"], same), pc.filter(first["rejected"], same))).as_py()


@pytest.mark.realdata
def test_harness_prints_a_row_per_step_and_projects_over_budget(
        shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "results.json"
    code = scale.main(["--sizes", "100,200", "--steps", "export_trl", "--no-targets", "--budget-s", "0.001",
                       "--step-timeout-s", "300",
                       "--workdir", str(tmp_path / "work"), "--data", str(shared_data), "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for column in ("step", "100 s", "100 CPU s", "100 rows/s", "100 peak RSS MiB", "200 s", "100->200 time",
                   "100->200 RSS", "projected"):
        assert column in header
    rows = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("| ")
            and not line.startswith("| measure")}
    assert {"ingest", "export_trl"} <= set(rows)
    # ingest always runs; the export at 200 is over the tiny budget, so projected, marked ~.
    export = dict(zip(header, [c.strip() for c in rows["export_trl"].strip().strip("|").split("|")],
                      strict=True))
    assert export["200 s"].startswith("~") and export["projected"] == "200"
    assert float(export["100 peak RSS MiB"].replace(",", "")) > 50
    figures = json.loads(out.read_text())["results"]
    measured = [r for r in figures if r["status"] == "measured"]
    assert {(r["step"], r["size"]) for r in measured} == {("ingest", 100), ("ingest", 200), ("export_trl", 100)}
    assert all(r["rows_out"] == r["size"] for r in measured if r["step"] == "ingest")
    # TRL has no ties: the export leaves the tie pairs out.
    assert all(0 < r["rows_out"] <= r["size"] for r in measured if r["step"] == "export_trl")
    # The saved figures print the same tables again without running anything.
    assert scale.main(["--table-from", str(out)]) == 0
    assert capsys.readouterr().out == printed


def test_saved_runs_merge_into_one_table_projecting_missing_sizes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(size: int, steps: list[str]) -> dict:
        results = [{"step": s, "engine": "local", "size": size, "status": "measured", "rows_in": size,
                    "rows_out": size, "seconds": size / 100, "peak_rss_mib": 300.0, "cpu_s": 1.0}
                   for s in steps]
        return {"sizes": [size], "results": results, "targets": {}, "note": f"run {size}"}

    small, large = tmp_path / "small.json", tmp_path / "large.json"
    small.write_text(json.dumps(run(1000, ["ingest", "noise"])))
    large.write_text(json.dumps(run(10_000, ["ingest"])))
    assert scale.main(["--table-from", str(small), str(large)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {c[0]: dict(zip(header, c, strict=True)) for c in
            ([x.strip() for x in line.strip().strip("|").split("|")] for line in lines[2:4])}
    assert rows["ingest"]["1k->10k time"] == "10.0x"
    # noise ran only at 1k: its 10k time is projected from 100 rows/s and marked.
    assert rows["noise"]["10k s"] == "~100.0" and rows["noise"]["projected"] == "10k"
    assert rows["noise"]["10k peak RSS MiB"] == "-"
