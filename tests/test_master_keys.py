"""The master_keys generator (One Token to Fool) on demo seeds and real PandaLM pairs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.steps import StepContext
from factory.steps.runner import execute, prepare, stamp_generated
from generators.master_keys import DEFAULT_KEYS, first_sentence, key_family
from schemas.readers import read_path
from tests.conftest import DEMO_SEEDS


def _run(table: pa.Table, settings: dict | None = None, seed: int = 0) -> tuple[pa.Table, object]:
    prepared = prepare("generator", "master_keys", settings or {})
    ctx = StepContext("master_keys", prepared.params, seed=seed, run_id="t")
    result = execute(prepared, table, ctx)
    return stamp_generated(result.table, table, pa.array(["src@1"] * table.num_rows), prepared, ctx), result


def test_key_families_and_first_sentence() -> None:
    assert [key_family(k) for k in DEFAULT_KEYS] == [
        "blank", "punctuation", "punctuation", "punctuation",
        "reasoning_opener", "reasoning_opener", "reasoning_opener",
        "multilingual", "multilingual", "multilingual",
    ]
    assert first_sentence("First we add 2 and 3. Then we get 5.") == "First we add 2 and 3."
    assert first_sentence("Step 1: read\nStep 2: write") == "Step 1: read"
    assert first_sentence("Only one sentence.") is None


def test_every_non_tie_seed_gets_every_key_against_its_chosen_answer() -> None:
    seeds = read_path(DEMO_SEEDS, "auto").table
    out, result = _run(seeds)
    usable = seeds.filter(pc.invert(seeds["tie"]))
    rows = out.to_pylist()
    keyed = [r for r in rows if r["provenance"]["method"] != "first_sentence"]
    distinct = {(p, c) for p, c in zip(usable["prompt_id"].to_pylist(), usable["chosen"].to_pylist(), strict=True)}
    assert len(keyed) == len(distinct) * len(DEFAULT_KEYS)  # repeated seeds make each pair once
    assert len(out["pair_id"].to_pylist()) == len(set(out["pair_id"].to_pylist()))
    parents = {p for r in rows for p in r["provenance"]["parent_ids"]}
    assert parents == set(usable["pair_id"].to_pylist())  # every usable seed is a parent
    assert result.stats["skipped_ties"] == seeds.num_rows - usable.num_rows
    chosen_by_seed = dict(zip(seeds["pair_id"].to_pylist(), seeds["chosen"].to_pylist(), strict=True))
    for row in rows:
        parent = row["provenance"]["parent_ids"][0]
        assert all(chosen_by_seed[p] == row["chosen"] for p in row["provenance"]["parent_ids"])  # the chosen answer is the seed's, untouched
        assert row["provenance"]["generated"] == "rejected" and not row["tie"]
        if row["provenance"]["method"] == "first_sentence":
            assert row["attribute"] == "master_key:first_sentence"
            assert chosen_by_seed[parent].strip().startswith(row["rejected"]) and row["rejected"] != row["chosen"]
        else:
            assert row["rejected"] in DEFAULT_KEYS
            assert row["attribute"] == f"master_key:{key_family(row['rejected'])}"


def test_keys_per_pair_is_deterministic_given_the_seed() -> None:
    seeds = read_path(DEMO_SEEDS, "auto").table.slice(0, 60)
    settings = {"keys_per_pair": "2", "first_sentence": "false"}
    first, _ = _run(seeds, settings, seed=1)
    again, _ = _run(seeds, settings, seed=1)
    other, _ = _run(seeds, settings, seed=2)
    assert first["pair_id"].to_pylist() == again["pair_id"].to_pylist()
    assert first["pair_id"].to_pylist() != other["pair_id"].to_pylist()
    per_seed = pc.value_counts(pc.list_flatten(first["provenance"].combine_chunks().field("parent_ids")))
    assert set(per_seed.field("counts").to_pylist()) == {2}


def test_custom_keys_with_commas_and_an_empty_chosen_answer_fails_that_row() -> None:
    seeds = read_path(DEMO_SEEDS, "auto").table.slice(0, 5)
    chosen = seeds["chosen"].to_pylist()
    chosen[2] = "   "
    seeds = seeds.set_column(seeds.schema.get_field_index("chosen"), "chosen", pa.array(chosen))
    out, result = _run(seeds, {"keys": '[",", "Answer:"]', "first_sentence": "false", "include_ties": "true"})
    assert set(out["rejected"].to_pylist()) == {",", "Answer:"}
    assert result.failed.column("row").to_pylist() == [2]
    assert "empty" in result.failed.column("reason")[0].as_py()


@pytest.mark.realdata
def test_master_keys_on_real_pandalm_pairs(shared_data) -> None:
    seeds = read_path(shared_data / "pandalm-testset-v1.json", "auto").table
    out, result = _run(seeds, {"keys_per_pair": "3"})
    non_tie = seeds.filter(pc.invert(seeds["tie"]))
    keyed = out.filter(pc.not_equal(out["provenance"].combine_chunks().field("method"), "first_sentence"))
    # PandaLM repeats comparisons: 893 usable seeds hold far fewer distinct (prompt, chosen)
    distinct = {(p, c) for p, c in zip(non_tie["prompt_id"].to_pylist(), non_tie["chosen"].to_pylist(), strict=True)
                if c.strip()}
    assert len(distinct) < non_tie.num_rows
    # keys are drawn per seed, so a repeated (prompt, chosen) may get more than 3 distinct keys
    assert 3 * len(distinct) <= keyed.num_rows <= 3 * (non_tie.num_rows - result.failed.num_rows)
    assert result.stats["duplicates_merged"] > 0
    assert result.stats["first_sentence"] > 100
    assert set(pc.unique(out["task"]).to_pylist()) == set(pc.unique(non_tie["task"]).to_pylist())


def test_length_matched_keys_are_as_long_as_the_answer_and_say_nothing() -> None:
    from generators.master_keys import FILLER

    seeds = read_path(DEMO_SEEDS, "auto").table
    out, result = _run(seeds, {"length_matched": "1.0", "first_sentence": "false"})
    rows = out.to_pylist()
    assert rows and result.stats["length_matched"] == len(rows)
    for row in rows:
        key, method = row["provenance"]["method"].split(":", 1)[1], row["provenance"]["method"]
        assert method.startswith("length_matched:master_key:")
        assert len(row["rejected"]) >= len(row["chosen"].strip()) or row["rejected"] in DEFAULT_KEYS
        filler = row["rejected"].removeprefix(eval(key.split(":", 1)[1]).strip()).strip()
        leftover = filler
        for sentence in FILLER:
            leftover = leftover.replace(sentence, "")
        assert leftover.strip() == "", row["rejected"]  # nothing but the key and filler
        assert row["attribute"].startswith("master_key:")
    half, _ = _run(seeds, {"length_matched": "0.5", "first_sentence": "false"})
    again, _ = _run(seeds, {"length_matched": "0.5", "first_sentence": "false"})
    share = pc.mean(pc.starts_with(half.column("provenance").combine_chunks().field("method"), "length_matched")).as_py()
    assert 0.35 < share < 0.65
    assert half["pair_id"].to_pylist() == again["pair_id"].to_pylist()
