"""The ingest and catalog commands end to end, in-process and through the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from tests.conftest import DEMO_SEEDS


def test_ingest_demo_seeds_counts_add_up(cli):
    result = cli("ingest", DEMO_SEEDS, "--name", "demo", "--json")
    assert result.code == 0, result.stderr
    payload = result.json()
    assert payload["format"] == "trl"
    assert payload["rows_in"] == payload["committed"] + payload["quarantined"] == 320
    assert payload["ties"] == 30
    assert payload["ref"] == "demo@1"


def test_human_output_says_format_and_counts(cli):
    result = cli("ingest", DEMO_SEEDS, "--name", "demo")
    assert "as trl (" in result.stdout
    assert "320 rows in = 320 committed + 0 quarantined" in result.stdout


def test_round_trip_through_trl_export_keeps_pair_ids_of_the_preferences(cli, tmp_path):
    cli("ingest", DEMO_SEEDS, "--name", "demo")
    out = tmp_path / "demo.trl.jsonl"
    exported = cli("catalog", "export", "demo", "--format", "trl", "--out", out, "--json").json()
    # TRL has no ties: the 30 tie pairs are left out and counted, not written as preferences.
    assert (exported["rows"], exported["ties_skipped"]) == (290, 30)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["chosen"][0]["role"] == "assistant" and isinstance(first["prompt"], list)
    again = cli("ingest", out, "--name", "again", "--json").json()
    assert again["committed"] == 290 and again["ties"] == 0
    from factory.catalog import Catalog

    catalog = Catalog()
    demo = catalog.read_table("demo")
    before = demo.filter(pa.compute.invert(demo["tie"])).column("pair_id").to_pylist()
    after = catalog.read_table("again").column("pair_id").to_pylist()
    assert before == after


def test_exports_in_every_format_read_back(cli, tmp_path):
    import datasets

    cli("ingest", DEMO_SEEDS, "--name", "demo")
    for fmt, name in (("parquet", "d.parquet"), ("jsonl", "d.jsonl"), ("hf", "d_hf")):
        result = cli("catalog", "export", "demo@1", "--format", fmt, "--out", tmp_path / name)
        assert result.code == 0, result.stderr
    assert pq.read_table(tmp_path / "d.parquet").num_rows == 320
    assert len((tmp_path / "d.jsonl").read_text().splitlines()) == 320
    assert datasets.load_from_disk(str(tmp_path / "d_hf")).num_rows == 320
    again = cli("ingest", tmp_path / "d.jsonl", "--name", "fromjsonl", "--json").json()
    assert again["committed"] == 320
    from factory.catalog import Catalog

    labels = ["pair_id", "prompt", "chosen", "rejected", "tie", "margin", "votes", "weight",
              "attribute", "attribute_scores", "task", "metadata"]
    catalog = Catalog()
    assert catalog.read_table("fromjsonl").select(labels) == catalog.read_table("demo").select(labels)


def test_load_returns_a_datasets_object(cli):
    from factory.catalog import load

    cli("ingest", DEMO_SEEDS, "--name", "demo")
    dataset = load("demo")
    assert dataset.num_rows == 320
    assert set(dataset.column_names) >= {"pair_id", "prompt", "chosen", "rejected", "tie"}


def test_list_log_show(cli, tmp_path):
    cli("ingest", DEMO_SEEDS, "--name", "demo", "-m", "first")
    changed = tmp_path / "changed.jsonl"
    changed.write_text(DEMO_SEEDS.read_text().replace("?", "??", 1))
    cli("ingest", changed, "--name", "demo", "-m", "second")
    listed = cli("catalog", "list", "--json").json()["datasets"]
    assert [(d["name"], d["latest"], d["rows"]) for d in listed] == [("demo", 2, 320)]
    log = cli("catalog", "log", "demo", "--json").json()["versions"]
    assert [v["message"] for v in log] == ["second", "first"]
    assert log[0]["lineage"]["command"] == "ingest" and log[0]["lineage"]["rows_in"] == 320
    shown = cli("catalog", "show", "demo@1", "--json", "--sample", "2").json()
    assert shown["version"] == 1 and len(shown["sample"]) == 2
    text = cli("catalog", "show", "demo").stdout
    assert "demo@2" in text and "chosen:" in text


def test_quarantine_is_stored_and_listed(cli, tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{oops\n'
                    '{"prompt": "q", "chosen": "", "rejected": ""}\n')
    failed = cli("ingest", path, "--name", "mixed")
    assert failed.code == 1 and "line 2: invalid JSON" in failed.stderr
    assert failed.stderr.count("\n") == 1
    ok = cli("ingest", path, "--name", "mixed", "--on-error", "quarantine", "--json").json()
    assert (ok["rows_in"], ok["committed"], ok["quarantined"]) == (3, 1, 2)
    rows = cli("catalog", "quarantine", "mixed", "--json").json()["rows"]
    assert [(r["line"], r["reason"]) for r in rows] == [(2, rows[0]["reason"]), (3, "both responses are empty")]


def test_errors_are_one_line_with_nonzero_exit(cli):
    cli("ingest", DEMO_SEEDS, "--name", "demo")
    missing = cli("catalog", "show", "nothing")
    assert missing.code == 1 and missing.stderr == "prefab: error: no dataset named 'nothing' in the catalog\n"
    assert "has no version 9 (latest is 1)" in cli("catalog", "show", "demo@9").stderr
    assert "no tag 'gold'" in cli("catalog", "show", "demo@gold").stderr


def test_console_script_broken_line_3(tmp_path):
    path = tmp_path / "broken.jsonl"
    good = '{"prompt": "q", "chosen": "a", "rejected": "b"}'
    path.write_text(f"{good}\n{good}\n{{not json\n{good}\n")
    env = {**os.environ, "PREFAB_HOME": str(tmp_path / "home")}
    process = subprocess.run([sys.executable, "-m", "factory", "ingest", str(path), "--name", "x"],
                             capture_output=True, text=True, env=env)
    assert process.returncode == 1
    assert process.stderr.strip().endswith("broken.jsonl, line 3: invalid JSON (Expecting property name enclosed in double quotes at column 2)")
    assert process.stdout == ""


def test_split_of_a_saved_datasetdict(cli, tmp_path):
    import datasets

    rows = [{"prompt": "q", "chosen": f"a{i}", "rejected": "b"} for i in range(5)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dd"))
    ambiguous = cli("ingest", tmp_path / "dd", "--name", "dd")
    assert ambiguous.code == 1 and "choose one with --split" in ambiguous.stderr
    assert cli("ingest", tmp_path / "dd", "--name", "dd", "--split", "test", "--json").json()["committed"] == 2
    misplaced = cli("ingest", DEMO_SEEDS, "--name", "demo", "--split", "test")
    assert misplaced.code == 1 and "--split applies to a saved DatasetDict" in misplaced.stderr
