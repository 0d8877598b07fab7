"""The ratings generator: per-attribute absolute ratings and the pairs derived from them."""

from __future__ import annotations

import pytest

from factory.catalog import Catalog
from factory.steps import ParamError
from factory.steps.runner import prepare
from tests.test_llm_steps_script import schema_name, spec, start, write_seeds

# The scripted rater gives 5 to an answer that says "good", 2 to one that says "bad", 3
# otherwise (complexity 2, verbosity by length).
SEEDS = [
    {"prompt": "Q1?", "chosen": "A good answer.", "rejected": "A bad answer."},  # agrees with the label
    {"prompt": "Q2?", "chosen": "A bad answer.", "rejected": "A good answer."},  # the ratings disagree
    {"prompt": "Q3?", "chosen": "Plain one.", "rejected": "Plain two."},  # equal ratings: a tie
    {"prompt": "Q4?", "chosen": "A good one MISSATTR.", "rejected": "Fine."},  # an attribute left out
    {"prompt": "Q5?", "chosen": "", "rejected": "Empty chosen."},
]


@pytest.fixture
def server():
    srv, script = start()
    srv.script = script
    yield srv
    srv.stop()


@pytest.fixture
def seeds(cli, tmp_path):
    assert cli("ingest", write_seeds(tmp_path / "seeds.jsonl", SEEDS), "--name", "seeds").code == 0
    return "seeds"


def _by_prompt(home, ref: str) -> dict[str, dict]:
    return {r["prompt"][0]["content"]: r for r in Catalog(home).read_table(ref).to_pylist()}


def test_ratings_give_attribute_scores_margins_ties_and_flips(cli, seeds, server, home) -> None:
    result = cli("generate", "ratings", "--from", seeds, "--name", "rated", "--backend", spec(server), "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["rows_in"] == report["seeds_used"] + report["seeds_without_output"] + report["seeds_failed"]
    assert report["seeds_failed"] == 2 and report["rows_generated"] == 3
    rows = _by_prompt(home, "rated")

    agree = rows["Q1?"]
    assert agree["chosen"] == "A good answer." and not agree["tie"]
    scores = {s["attribute"]: (s["chosen"], s["rejected"]) for s in agree["attribute_scores"]}
    assert list(scores) == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]
    assert scores["helpfulness"] == (5.0, 2.0) and scores["complexity"] == (2.0, 2.0)
    # mean gap over helpfulness, correctness, coherence (3 points) as a share of the 1..5 range
    assert agree["margin"] == pytest.approx(3.0 / 4)
    assert agree["provenance"]["method"] == "ratings:agree"

    flipped = rows["Q2?"]
    assert flipped["chosen"] == "A good answer." and flipped["provenance"]["method"] == "ratings:flipped"
    assert {s["attribute"]: s["chosen"] for s in flipped["attribute_scores"]}["helpfulness"] == 5.0
    assert flipped["pair_id"] == Catalog(home).read_table("seeds").to_pylist()[1]["pair_id"]  # same pair, relabelled

    tie = rows["Q3?"]
    assert tie["tie"] and tie["margin"] == 0.0 and tie["provenance"]["method"] == "ratings:tie"

    reasons = [r["reason"] for r in cli("catalog", "failures", "rated", "--json").json()["rows"]]
    assert any("no rating for verbosity (chosen answer)" in r for r in reasons)
    assert any("non-empty chosen and rejected" in r for r in reasons)
    # one request per answer (never both in one prompt: no position effect), each with its own limit
    assert len(server.script.bodies) == 2 * 4 and {schema_name(b) for b in server.script.bodies} == {"ratings_rate"}
    assert all(b["max_tokens"] == 512 for b in server.script.bodies)
    assert Catalog(home).resolve("rated").lineage["judges"] == ["openai:test-model"]


def test_custom_attributes_drop_disagreements_and_average_samples(cli, seeds, server, home) -> None:
    result = cli("generate", "ratings", "--from", seeds, "--name", "custom", "--backend", spec(server),
                 "--set", "attributes=helpfulness,harmlessness", "--set", "disagree=drop", "--set", "samples=2",
                 "--json")
    assert result.code == 0, result.stderr
    rows = _by_prompt(home, "custom")
    assert "Q2?" not in rows and result.json()["stats"]["dropped_disagree"] == 1
    assert [s["attribute"] for s in rows["Q1?"]["attribute_scores"]] == ["helpfulness", "harmlessness"]
    asked = server.script.bodies[0]["messages"][-1]["content"]
    assert "- harmlessness: the response’s harmlessness" in asked and "verbosity" not in asked
    assert sorted({b["seed"] for b in server.script.bodies}) == [0, 1]


def test_margins_are_the_rating_gap_as_a_share_of_the_scale(cli, seeds, server, home) -> None:
    # a 3-point gap on a 1..10 scale, and the widest gap scaled to 2 logits
    result = cli("generate", "ratings", "--from", seeds, "--name", "ten", "--backend", spec(server),
                 "--set", "scale=10", "--set", "max_margin=2", "--json")
    assert result.code == 0, result.stderr
    assert _by_prompt(home, "ten")["Q1?"]["margin"] == pytest.approx(3.0 / 9 * 2)


def test_parameters_are_checked_before_any_work() -> None:
    with pytest.raises(ParamError, match="'overall'"):
        prepare("generator", "ratings", {"overall": "style"}, backend=None)
    with pytest.raises(ParamError, match="twice"):
        prepare("generator", "ratings", {"attributes": "a,A"}, backend=None)
