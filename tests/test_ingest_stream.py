"""Ingest from review issue 8: streamed reads, canonical round trips, unknown columns,
empty inputs and unchanged content."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from factory.catalog import Catalog
from schemas.errors import InputError
from tests.conftest import DEMO_SEEDS

LABELS = ["pair_id", "prompt_id", "prompt", "chosen", "rejected", "tie", "margin", "votes", "weight",
          "attribute", "attribute_scores", "task", "metadata"]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- 4. ingest streams --------------------------------------------------------------------------


def test_ingest_holds_one_batch_of_rows_not_the_whole_file(tmp_path, monkeypatch):
    import schemas.readers as readers
    from factory.ingest import ingest

    rows = [{"prompt": f"question {i}", "chosen": f"a good answer {i}", "rejected": f"a bad one {i}"}
            for i in range(12_000)]
    source = _write_jsonl(tmp_path / "many.jsonl", rows)
    monkeypatch.setattr(readers, "STREAM_BATCH_ROWS", 500)
    stream_path = readers.stream_path
    monkeypatch.setattr("factory.ingest.stream_path",
                        lambda *a, **k: stream_path(*a, **{**k, "batch_rows": 500}))
    Catalog(tmp_path / "home")  # the catalog's own setup is not the ingest's memory
    tracemalloc.start()
    try:
        result = ingest(source, "many", home=tmp_path / "home")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["committed"] == 12_000
    # 12k parsed rows held as Python dicts take ~15 MiB; one 500-row batch well under 3 MiB.
    assert peak < 6 * 2**20, f"peak {peak / 2**20:.1f} MiB of Python objects"


# ---- 5. canonical exports read back whole; unknown columns are kept ------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_reingesting_a_canonical_export_keeps_provenance_and_labels(cli, tmp_path, fmt):
    cli("ingest", DEMO_SEEDS, "--name", "demo")
    out = tmp_path / f"demo.{fmt}"
    assert cli("catalog", "export", "demo", "--format", fmt, "--out", out).code == 0
    again = cli("ingest", out, "--name", "again", "--json")
    assert again.code == 0, again.stderr
    payload = again.json()
    assert payload["committed"] == 320 and payload["warnings"] == {} and payload["unknown_columns"] == {}
    catalog = Catalog()
    before, after = catalog.read_table("demo"), catalog.read_table("again")
    assert after.select(LABELS) == before.select(LABELS)
    assert after.column("provenance") == before.column("provenance")
    assert after.column("provenance")[0]["source"].as_py() == "demo"


def test_unknown_columns_go_to_metadata_and_are_counted(cli, tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "annotator": "x7", "metadata": {"k": 1}},
            {"prompt": "q2", "chosen": "c", "rejected": "d", "annotator": "x8", "score": 0.5},
            {"prompt": "q3", "chosen": "e", "rejected": "f"}]
    result = cli("ingest", _write_jsonl(tmp_path / "extra.jsonl", rows), "--name", "extra", "--json").json()
    assert result["warnings"] == {"unknown_columns_kept": 2}
    assert result["unknown_columns"] == {"annotator": 2, "score": 1}
    metadata = [json.loads(m) if m else None for m in Catalog().read_table("extra").column("metadata").to_pylist()]
    assert metadata == [{"annotator": "x7", "k": 1}, {"annotator": "x8", "score": 0.5}, None]
    text = cli("ingest", tmp_path / "extra.jsonl", "--name", "extra2").stdout
    assert "unknown columns kept in metadata: annotator (2 rows), score (1 rows)" in text


def test_mapped_source_columns_are_not_unknown(cli, tmp_path):
    rows = [{"question": "q", "good": "a", "bad": "b"}]
    source = _write_jsonl(tmp_path / "mapped.jsonl", rows)
    result = cli("ingest", source, "--name", "m", "--map", "prompt=question", "--map", "chosen=good",
                 "--map", "rejected=bad", "--json").json()
    assert result["committed"] == 1 and result["unknown_columns"] == {}


def test_an_unknown_canonical_field_in_map_fails_in_one_line(cli, tmp_path):
    source = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "chosen": "a", "rejected": "b"}])
    result = cli("ingest", source, "--name", "x", "--map", "promt=question")
    assert result.code == 1 and result.stderr.count("\n") == 1
    assert "unknown canonical field 'promt'" in result.stderr and "prompt" in result.stderr


def test_other_readers_keep_unknown_columns_too(tmp_path):
    from schemas.readers import read_path

    path = _write_jsonl(tmp_path / "llmbar.jsonl",
                        [{"input": "Q?", "output_1": "good", "output_2": "bad", "label": 1, "source": "mt"}])
    result = read_path(path, "llmbar")
    assert json.loads(result.table.column("metadata")[0].as_py()) == {"source": "mt"}
    assert result.warnings["unknown_columns_kept"] == 1


# ---- 6. empty inputs and unchanged content -------------------------------------------------------


def test_an_empty_input_is_refused(cli, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    result = cli("ingest", tmp_path / "empty.jsonl", "--name", "e", "--format", "trl")
    assert result.code == 1 and result.stderr.count("\n") == 1
    assert "empty.jsonl: no rows to ingest" in result.stderr
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "", "rejected": ""}])
    quarantined = cli("ingest", bad, "--name", "e", "--on-error", "quarantine")
    assert quarantined.code == 1 and "all 1 rows are bad" in quarantined.stderr
    assert cli("catalog", "list", "--json").json()["datasets"] == []
    with pytest.raises(InputError, match="no rows"):
        from factory.ingest import ingest

        ingest(tmp_path / "empty.jsonl", "e", format="jsonl")


def test_ingesting_the_same_content_again_makes_no_new_version(cli):
    first = cli("ingest", DEMO_SEEDS, "--name", "demo", "--json").json()
    assert first["ref"] == "demo@1" and not first["unchanged"]
    again = cli("ingest", DEMO_SEEDS, "--name", "demo", "--json").json()
    assert again["unchanged"] and again["ref"] == "demo@1"
    text = cli("ingest", DEMO_SEEDS, "--name", "demo").stdout
    assert "unchanged: content equals demo@1, no new version" in text
    assert [v["version"] for v in cli("catalog", "log", "demo", "--json").json()["versions"]] == [1]


def test_parquet_export_reads_back_with_ids_unchanged(cli, tmp_path):
    cli("ingest", DEMO_SEEDS, "--name", "demo")
    cli("catalog", "export", "demo", "--format", "parquet", "--out", tmp_path / "d.parquet")
    table = pq.read_table(tmp_path / "d.parquet")
    rows = table.to_pylist()
    rows[0]["chosen"] = rows[0]["chosen"] + " (edited)"
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = cli("ingest", edited, "--name", "edited", "--json").json()
    # The edited row's id is recomputed from its new content, and that is reported.
    assert result["warnings"] == {"pair_id_recomputed": 1}
