"""The rubrics generator (OpenRubrics): rubric writing, the specificity test, label
consistency, and the rubric committed with its pair."""

from __future__ import annotations

import pyarrow as pa
import pytest

from factory.catalog import Catalog
from generators.rubrics import distinctive_terms, rubric_rows, specific_terms
from schemas.rows import RUBRIC_SCHEMA
from tests.test_llm_steps_script import (
    length_judge,
    schema_name,
    sections,
    spec,
    start,
    write_seeds,
)

# The scripted judge prefers the longer answer, so the label is "recovered" where the
# chosen answer is the longer one; the last two seeds are labelled the other way.
SEEDS = [
    {"prompt": "Explain photosynthesis briefly.", "chosen": "Plants turn light, water and CO2 into sugar and oxygen.",
     "rejected": "Plants eat soil."},
    {"prompt": "Explain photosynthesis briefly.", "chosen": "Light energy drives sugar synthesis in chloroplasts.",
     "rejected": "It is breathing."},
    {"prompt": "What causes earthquakes?", "chosen": "Tectonic plates slip along faults and release energy.",
     "rejected": "Angry gods."},
    {"prompt": "Describe volcanoes.", "chosen": "Hot.", "rejected": "Openings where magma, ash and gas escape."},
    {"prompt": "Summarise the novel Dune.", "chosen": "Sand.", "rejected": "A noble family fights for a desert planet."},
    {"prompt": "Tie seed.", "chosen": "Same.", "rejected": "Same.", "tie": True},
    {"prompt": "TRUNCATE this one.", "chosen": "A long enough answer here.", "rejected": "Short."},
]


@pytest.fixture
def server():
    srv, script = start(length_judge)
    srv.script = script
    yield srv
    srv.stop()


@pytest.fixture
def seeds(cli, tmp_path):
    assert cli("ingest", write_seeds(tmp_path / "seeds.jsonl", SEEDS), "--name", "seeds").code == 0
    return "seeds"


def test_the_lexical_test_flags_items_that_name_the_topic_or_a_response() -> None:
    prompt = distinctive_terms("Explain photosynthesis in plants, in under 50 words.")
    responses = distinctive_terms("Chloroplasts capture light to make glucose.")
    assert specific_terms("The response should explain photosynthesis accurately.", "principle", prompt, responses) \
        == ["photosynthesi"]
    assert specific_terms("The response should mention chloroplasts.", "principle", prompt, responses)
    assert specific_terms("The response should give the correct final result in clear steps.", "principle",
                          prompt, responses) == []
    # a hard rule restates the prompt's constraints (its words are allowed), not the responses'
    assert specific_terms("The response must be about photosynthesis and under 50 words.", "hard_rule",
                          prompt, responses) == []
    assert specific_terms("The response must name glucose.", "hard_rule", prompt, responses) == ["glucose"]


def test_rubrics_keep_pairs_whose_label_the_judge_recovers(cli, seeds, server, home) -> None:
    result = cli("generate", "rubrics", "--from", seeds, "--name", "rubrics", "--backend", spec(server),
                 "--set", "judge_samples=2", "--no-progress", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["rows_in"] == report["seeds_used"] + report["seeds_without_output"] + report["seeds_failed"]
    stats = report["stats"]
    assert stats["skipped_no_contrast"] == 1 and stats["label_not_recovered"] == 2 and stats["kept"] == 3
    assert stats["items_stripped"] == {"principle": 5}  # each "describe <topic>" named its prompt's topic
    assert report["seeds_failed"] == 1
    failures = cli("catalog", "failures", "rubrics", "--json").json()["rows"]
    assert "truncated" in failures[0]["reason"]

    catalog = Catalog(home)
    table = catalog.read_table("rubrics")
    assert "rubric" in table.column_names and table.num_rows == 3
    seeds_by_id = {r["pair_id"]: r for r in catalog.read_table("seeds").to_pylist()}
    for row in table.to_pylist():
        assert row["pair_id"] in seeds_by_id  # the seed pair itself, unchanged, with its rubric
        kinds = [i["kind"] for i in row["rubric"]]
        assert kinds == ["hard_rule", "principle", "principle"]
        assert not any("photosynthesis" in i["text"].lower() for i in row["rubric"])
        assert row["provenance"]["step"] == "rubrics" and row["provenance"]["parent_ids"] == [row["pair_id"]]
    # the judge saw each pair in both orders: 2 draws, one of them swapped
    judged = [b for b in server.script.bodies if schema_name(b) == "rubric_judge"]
    assert len(judged) == 2 * 5 and all("Hard rules:" in b["messages"][-1]["content"] for b in judged)
    chosen_first = [sections(b["messages"][-1]["content"])["response a"] in {s["chosen"] for s in SEEDS}
                    for b in judged]
    assert sum(chosen_first) == 5
    lineage = catalog.resolve("rubrics").lineage
    assert lineage["judges"] == ["openai:test-model"] and lineage["step"]["template_hash"]

    rubrics = rubric_rows(table)
    assert rubrics.schema == RUBRIC_SCHEMA and rubrics.num_rows == 3
    assert rubrics.column("pair_id").to_pylist() == table.column("pair_id").to_pylist()

    sent = server.stats()["total"]
    again = cli("generate", "rubrics", "--from", seeds, "--name", "rubrics", "--backend", spec(server),
                "--set", "judge_samples=2", "--no-progress", "--json")
    assert again.code == 0 and server.stats()["total"] == sent  # all from the request cache
    assert catalog.read_table("rubrics@2")["rubric"].to_pylist() == table["rubric"].to_pylist()


def test_on_specific_fail_fails_the_seed_with_the_offending_item(cli, seeds, server) -> None:
    result = cli("generate", "rubrics", "--from", seeds, "--name", "strict", "--backend", spec(server),
                 "--set", "on_specific=fail", "--no-progress", "--json")
    assert result.code == 1 and "made no pairs" in result.stderr
    assert "names the specific topic" in result.stderr


def test_with_input_keeps_the_rubric_column(seeds, server, home) -> None:
    import factory

    made = factory.generate("rubrics", seeds, "both", backend=spec(server), with_input=True, home=home)
    table = Catalog(home).read_table(made["ref"])
    assert table.num_rows == len(SEEDS) + made["rows_generated"]
    rubric = table.column("rubric").to_pylist()
    assert rubric[: len(SEEDS)] == [None] * len(SEEDS) and all(rubric[len(SEEDS):])
    assert isinstance(table.schema.field("rubric").type, pa.ListType)


def test_group_accuracy_sees_every_pair_of_a_prompt_across_chunks(cli, server, home, tmp_path,
                                                                  monkeypatch) -> None:
    import factory
    import generators._text as text_helpers
    from factory.steps.registry import get_step

    # "Describe the moon." has one recovered pair (row 0) and one not (row 3): accuracy 0.5.
    seeds = [
        {"prompt": "Describe the moon.", "chosen": "A grey, cratered rock that circles the earth.",
         "rejected": "Cheese."},
        {"prompt": "What causes earthquakes?", "chosen": "Tectonic plates slip along faults and release energy.",
         "rejected": "Angry gods."},
        {"prompt": "Describe volcanoes.", "chosen": "Hot.", "rejected": "Openings where magma, ash and gas escape."},
        {"prompt": "Describe the moon.", "chosen": "Bright.", "rejected": "The earth's only natural satellite."},
    ]
    assert cli("ingest", write_seeds(tmp_path / "moon.jsonl", seeds), "--name", "moon").code == 0
    assert get_step("rubrics", "generator").batch_rows is None  # the runner never splits the prompt group
    monkeypatch.setattr(text_helpers, "CHUNK_ROWS", 2)  # rows 0 and 3 are written and judged in different chunks
    made = factory.generate("rubrics", "moon", "moon-rubrics", backend=spec(server), home=home,
                            settings={"min_group_accuracy": "0.6"})
    kept = Catalog(home).read_table(made["ref"])
    assert kept["chosen"].to_pylist() == [seeds[1]["chosen"]]
    assert made["stats"]["dropped_by_group_accuracy"] == 1 and made["stats"]["label_not_recovered"] == 2
