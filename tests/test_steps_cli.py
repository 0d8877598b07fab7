"""`prefab generate` / `prefab filter` end to end on a real catalog: provenance, lineage,
failed rows, stored scores and re-thresholding."""

from __future__ import annotations

import json

import pyarrow.compute as pc
import pytest

from factory.catalog import Catalog
from tests.conftest import DEMO_SEEDS


def _lines(path, n):
    with open(path) as handle:
        return [next(handle) for _ in range(n)]


@pytest.fixture
def demo(cli, tmp_path):
    assert cli("ingest", DEMO_SEEDS, "--name", "demo").code == 0
    evalset = tmp_path / "eval.jsonl"
    evalset.write_text("".join(_lines(DEMO_SEEDS, 20)))
    assert cli("ingest", evalset, "--name", "evalset").code == 0
    return "demo"


def test_help_lists_every_step_with_its_parameters(cli, capsys) -> None:
    from factory.cli import main

    for verb, step, parameter in (("generate", "master_keys", "keys_per_pair"), ("filter", "dedup", "near_threshold")):
        with pytest.raises(SystemExit) as exit_info:
            main([verb, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert step in text and parameter in text and "default" in text


def test_a_bad_setting_fails_in_one_line_before_any_work(cli, demo, home) -> None:
    for setting, named in (("colour=red", "'colour'"), ("keys_per_pair=two", "'keys_per_pair'")):
        result = cli("generate", "master_keys", "--from", demo, "--name", "mk", "--set", setting)
        assert result.code == 1
        assert named in result.stderr and result.stderr.count("\n") == 1
    missing = cli("generate", "master_keys", "--from", "nosuch", "--name", "mk")
    assert missing.code == 1 and "nosuch" in missing.stderr
    assert "mk" not in {d["name"] for d in Catalog(home).datasets()}


def test_generate_commits_rows_with_provenance_and_lineage(cli, demo, home) -> None:
    result = cli("generate", "master_keys", "--from", demo, "--name", "mk", "--set", "keys_per_pair=2",
                 "--seed", "3", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["ref"] == "mk@1" and report["inputs"] == ["demo@1"]
    assert report["rows_in"] == report["seeds_used"] + report["seeds_without_output"] + report["seeds_failed"]
    catalog = Catalog(home)
    info = catalog.resolve("mk")
    assert info.lineage["parents"] == ["demo@1"]
    assert info.lineage["step"]["name"] == "master_keys" and info.lineage["params"]["keys_per_pair"] == 2
    assert info.lineage["rows_generated"] == info.rows == report["rows_generated"]
    table = catalog.read_table(info)
    provenance = table["provenance"].combine_chunks()
    assert set(provenance.field("step").to_pylist()) == {"master_keys"}
    assert set(provenance.field("source").to_pylist()) == {"demo@1"}
    assert set(provenance.field("seed").to_pylist()) == {3}
    assert set(provenance.field("run_id").to_pylist()) == {report["run_id"]}
    demo_ids = set(catalog.read_table("demo")["pair_id"].to_pylist())
    assert all(ids[0] in demo_ids for ids in provenance.field("parent_ids").to_pylist())
    # the same command with the same seed makes the same pairs
    again = cli("generate", "master_keys", "--from", demo, "--name", "mk2", "--set", "keys_per_pair=2",
                "--seed", "3", "--json").json()
    assert sorted(catalog.read_table(again["ref"])["pair_id"].to_pylist()) == sorted(table["pair_id"].to_pylist())


def test_failed_rows_land_in_the_side_table(cli, home, tmp_path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}. Because.", "rejected": "No."} for i in range(5)]
    rows[1]["chosen"] = ""  # kept by ingest as a real-data quirk; master_keys cannot use it
    seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli("ingest", seeds, "--name", "seeds").code == 0
    result = cli("generate", "master_keys", "--from", "seeds", "--name", "mk", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["seeds_failed"] == 1 and report["rows_failed"] == 1
    failures = cli("catalog", "failures", "mk", "--json").json()
    (row,) = failures["rows"]
    assert row["step"] == "master_keys" and "empty" in row["reason"]
    assert json.loads(row["raw"])["rejected"] == "No." and row["pair_id"]
    assert Catalog(home).resolve("mk").lineage["rows_failed"] == 1


def test_filter_stores_scores_and_rethresholds_without_recomputing(cli, demo, home) -> None:
    first = cli("filter", "dedup", "--from", demo, "--name", "clean", "--set", "against=evalset", "--json")
    assert first.code == 0, first.stderr
    report = first.json()
    assert report["rows_in"] == report["rows_kept"] + report["rows_dropped"] + report["rows_failed"]
    assert report["rows_dropped"] >= 20 and not report["scores_reused"]
    catalog = Catalog(home)
    info = catalog.resolve("clean")
    assert info.lineage["params"]["against"] == ["evalset@1"]  # pinned to the exact version
    table = catalog.read_table(info)
    for column in ("dedup_exact_of", "dedup_near_similarity", "dedup_contamination", "dedup_action"):
        assert column in table.column_names
    assert table.num_rows == report["rows_kept"]
    eval_ids = set(catalog.read_table("evalset")["pair_id"].to_pylist())
    assert not eval_ids & set(table["pair_id"].to_pylist())
    _, scores = catalog.find_scores(info.lineage["score_key"])
    assert scores.num_rows == report["rows_in"]
    assert pc.sum(pc.equal(scores["dedup_action"], "drop")).as_py() == report["rows_dropped"]

    looser = cli("filter", "dedup", "--from", demo, "--name", "clean", "--set", "against=evalset",
                 "--set", "near_threshold=1.0", "--set", "contamination_threshold=1.0", "--json").json()
    assert looser["scores_reused"] and looser["ref"] == "clean@2"
    assert looser["rows_kept"] > report["rows_kept"]
    assert looser["rows_in"] == looser["rows_kept"] + looser["rows_dropped"] + looser["rows_failed"]


def test_python_api_runs_the_same_steps(demo, home) -> None:
    import factory

    made = factory.generate("master_keys", "demo", "mk", settings={"keys_per_pair": 1}, home=home)
    kept = factory.filter("dedup", made["ref"], "mk-dedup", home=home)
    assert kept["rows_in"] == made["rows_out"] == kept["rows_kept"] + kept["rows_dropped"] + kept["rows_failed"]
    assert Catalog(home).resolve("mk-dedup").lineage["parents"] == [made["ref"]]


@pytest.mark.realdata
@pytest.mark.slow
def test_issue_commands_on_real_pandalm(cli, shared_data, home) -> None:
    assert cli("ingest", shared_data / "pandalm-testset-v1.json", "--name", "panda").code == 0
    assert cli("ingest", shared_data / "llmbar" / "natural.json", "--name", "llmbar").code == 0
    made = cli("generate", "master_keys", "--from", "panda", "--name", "mk", "--json")
    assert made.code == 0, made.stderr
    kept = cli("filter", "dedup", "--from", "mk", "--name", "mk-dedup", "--set", "against=llmbar", "--json")
    assert kept.code == 0, kept.stderr
    report = kept.json()
    assert report["rows_in"] == made.json()["rows_out"]
    assert report["rows_in"] == report["rows_kept"] + report["rows_dropped"] + report["rows_failed"]
    info = Catalog(home).resolve("mk-dedup")
    assert info.lineage["parents"] == ["mk@1"]
