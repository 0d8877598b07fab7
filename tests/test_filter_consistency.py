"""The consistency filter: judge agreement with the label, k order-swapped draws voted,
rubric-conditioned and generative judges, a reward model as the judge."""

from __future__ import annotations

import pyarrow as pa
import pytest

from factory.catalog import Catalog
from factory.llm.testing import LoopbackServer
from filters.consistency import agreement_of
from schemas.pairs import Message, Pair, pairs_to_table
from schemas.rows import RUBRIC_ITEM_TYPE
from tests.test_llm_steps_script import (
    ScriptedLLM,
    biased_judge,
    length_judge,
    schema_name,
    sections,
    spec,
    start,
    write_seeds,
)

# Answers of about the same length (the biased judge then picks whatever is shown first)...
AMBIGUOUS = [("Capital of Peru?", "Lima is the capital.", "Cusco is the capital."),
             ("Largest ocean?", "The Pacific Ocean.", "The Atlantic Ocean."),
             ("Boiling point of water?", "It is 100 C at sea level.", "It is 90 C at sea level."),
             ("Author of Hamlet?", "William Shakespeare.", "Christopher Marlowe.")]
# ...and answers where one is clearly longer (what both judges prefer).
CLEAR = [("Explain gravity.", "Masses attract each other in proportion to their mass.", "Magic."),
         ("Explain rain.", "Vapour condenses into droplets that fall when heavy.", "Clouds cry.")]


def _rows(items, flip: bool = False) -> list[dict]:
    return [{"prompt": p, "chosen": b if flip else a, "rejected": a if flip else b} for p, a, b in items]


@pytest.fixture
def ingest(cli, tmp_path):
    def run(name: str, rows: list[dict]) -> str:
        assert cli("ingest", write_seeds(tmp_path / f"{name}.jsonl", rows), "--name", name).code == 0
        return name

    return run


def _agreement(home, ref: str) -> dict[str, float]:
    info = Catalog(home).resolve(ref)
    _, scores = Catalog(home).find_scores(info.lineage["score_key"])
    return dict(zip(scores["pair_id"].to_pylist(), scores["consistency_agreement"].to_pylist(), strict=True))


def test_swapping_the_order_cancels_a_position_biased_judge(cli, ingest, home) -> None:
    forward = ingest("forward", _rows(AMBIGUOUS))
    backward = ingest("backward", _rows(AMBIGUOUS, flip=True))  # the same pairs, labelled the other way
    srv, script = start(biased_judge)
    try:
        backend = spec(srv)
        for ref in (forward, backward):
            unswapped = cli("filter", "consistency", "--from", ref, "--name", f"{ref}-noswap", "--backend", backend,
                            "--set", "swap=false", "--json")
            assert unswapped.code == 0, unswapped.stderr
            swapped = cli("filter", "consistency", "--from", ref, "--name", f"{ref}-swap", "--backend", backend,
                          "--json")
            assert swapped.code == 0, swapped.stderr
    finally:
        srv.stop()
    # Without swapping, the judge "agrees" with both labellings of every pair: its position
    # preference passes for confidence. With swapping, the two labellings share the votes.
    fwd, bwd = _agreement(home, "forward-noswap"), _agreement(home, "backward-noswap")
    assert set(fwd.values()) == {1.0} and set(bwd.values()) == {1.0}
    fwd, bwd = _agreement(home, "forward-swap"), _agreement(home, "backward-swap")
    assert fwd.keys() == bwd.keys() and all(fwd[p] + bwd[p] == 1.0 for p in fwd)
    assert set(fwd.values()) == {0.5}
    _, scores = Catalog(home).find_scores(Catalog(home).resolve("forward-swap").lineage["score_key"])
    assert set(scores["consistency_swapped"].to_pylist()) == {1}  # one of the two draws per pair, exactly
    # every pair reached the judge in both orders
    shown = {(s["response a"], s["response b"]) for s in (sections(b["messages"][-1]["content"]) for b in script.bodies)}
    assert all((b, a) in shown for a, b in shown)


def test_agreement_threshold_keeps_drops_and_rethreshold_flips_without_new_requests(cli, ingest, home) -> None:
    ref = ingest("mixed", _rows(CLEAR) + _rows([(p + " (2)", a, b) for p, a, b in CLEAR], flip=True))
    srv, _ = start(length_judge)
    try:
        first = cli("filter", "consistency", "--from", ref, "--name", "judged", "--backend", spec(srv), "--json")
        assert first.code == 0, first.stderr
        report = first.json()
        assert (report["rows_kept"], report["rows_dropped"]) == (2, 2)
        assert report["rows_in"] == report["rows_kept"] + report["rows_dropped"] + report["rows_failed"]
        sent = srv.stats()["total"]
        assert sent == 8
        again = cli("filter", "consistency", "--from", ref, "--name", "judged", "--backend", spec(srv),
                    "--set", "flip_below=0.0", "--json").json()
        assert again["scores_reused"] and srv.stats()["total"] == sent  # a new threshold sends nothing
        assert again["rows_flipped"] == 2 and again["rows_kept"] == 4
    finally:
        srv.stop()
    table = Catalog(home).read_table("judged").to_pylist()
    assert all(len(r["chosen"]) > len(r["rejected"]) for r in table)  # flipped to the judge's side
    assert all(r["consistency_votes"] in ([1, 1], [-1, -1]) for r in table)
    lineage = Catalog(home).resolve("judged@1").lineage
    assert lineage["judges"] == ["openai:test-model"] and lineage["usage"]["requests_sent"] == 8


def test_the_judge_grades_with_the_pair_rubric_when_there_is_one(cli, home) -> None:
    pairs = pairs_to_table([Pair([Message("user", p)], a, b) for p, a, b in CLEAR])
    rubric = [[{"kind": "hard_rule", "text": "The response must answer in English.", "weight": 1.0},
               {"kind": "principle", "text": "The response should explain the mechanism.", "weight": 1.0}]] * 2
    Catalog(home).commit("ruled", pairs.append_column("rubric", pa.array(rubric, pa.list_(RUBRIC_ITEM_TYPE))))
    srv, script = start(length_judge)
    try:
        assert cli("filter", "consistency", "--from", "ruled", "--name", "r1", "--backend", spec(srv)).code == 0
        texts = [b["messages"][-1]["content"] for b in script.bodies]
        assert len(texts) == 4 and all("Grade with this rubric" in t and "explain the mechanism" in t for t in texts)
        script.bodies.clear()
        assert cli("filter", "consistency", "--from", "ruled", "--name", "r2", "--backend", spec(srv),
                   "--set", "rubric=false").code == 0
        assert script.bodies and not any("rubric" in b["messages"][-1]["content"] for b in script.bodies)
    finally:
        srv.stop()
    assert "rubric" in Catalog(home).read_table("r1").column_names  # the rubric stays with the kept pairs


def test_generative_judge_writes_principles_and_critique_then_votes(cli, ingest, home) -> None:
    ref = ingest("gen", _rows(CLEAR))
    srv, script = start(length_judge)
    try:
        result = cli("filter", "consistency", "--from", ref, "--name", "grm", "--backend", spec(srv),
                     "--set", "style=generative", "--set", "samples=3", "--json")
        assert result.code == 0, result.stderr
    finally:
        srv.stop()
    assert {schema_name(b) for b in script.bodies} == {"consistency_generative"}
    body = script.bodies[0]
    assert body["temperature"] == 0.7 and body["max_tokens"] == 1024
    assert list(body["response_format"]["json_schema"]["schema"]["properties"]) == ["principles", "critique", "verdict"]
    assert sorted(b["seed"] for b in script.bodies) == [0, 0, 1, 1, 2, 2]  # 3 distinct draws per pair
    votes = Catalog(home).read_table("grm")["consistency_votes"].to_pylist()
    assert votes == [[1, 1, 1], [1, 1, 1]]


def test_failed_draws_fail_the_pair_with_a_reason_unless_min_valid_allows(cli, ingest, home) -> None:
    ref = ingest("faulty", _rows(CLEAR) + [{"prompt": "MALFORMED question", "chosen": "Long answer here.",
                                            "rejected": "No."},
                                           {"prompt": "PARTIAL question", "chosen": "Long answer here.",
                                            "rejected": "No."}])
    script = ScriptedLLM(length_judge)

    def handler(body, attempt):
        if "PARTIAL" in body["messages"][-1]["content"] and body.get("seed") == 1:
            return "I'm sorry, but I can't judge this."
        return script(body, attempt)

    with LoopbackServer(handler=handler) as srv:
        strict = cli("filter", "consistency", "--from", ref, "--name", "strict", "--backend",
                     spec(srv, parse_retries=0), "--json")
        assert strict.code == 0, strict.stderr
        assert strict.json()["rows_failed"] == 2
        reasons = [r["reason"] for r in cli("catalog", "failures", "strict", "--json").json()["rows"]]
        assert any("0 of 2 judge draws valid" in r and "unparseable" in r for r in reasons)
        assert any("1 of 2 judge draws valid" in r and "refused" in r for r in reasons)
        lenient = cli("filter", "consistency", "--from", ref, "--name", "lenient", "--backend",
                      spec(srv, parse_retries=0), "--set", "min_valid=1", "--json").json()
        assert lenient["rows_failed"] == 1 and lenient["rows_kept"] == 3


def test_a_reward_model_can_be_the_judge(ingest, home, monkeypatch) -> None:
    import factory
    import factory.trainer

    ref = ingest("rm", _rows(CLEAR) + _rows(AMBIGUOUS[:1]))
    catalog = Catalog(home)
    catalog.register_model("my-rm", home / "models" / "my-rm" / "v1", ref, {}, {})
    scored_with = []

    def fake_score(model, table, *, home=None, **_):
        scored_with.append(model)
        rewards = [float(len(c)) / 10 for c in table["chosen"].to_pylist()]
        return table.append_column("reward_chosen", pa.array(rewards)).append_column(
            "reward_rejected", pa.array([float(len(r)) / 10 for r in table["rejected"].to_pylist()]))

    monkeypatch.setattr(factory.trainer, "score", fake_score)
    settings = {"judge": "rm", "model": "my-rm", "threshold": 0.6}
    result = factory.filter("consistency", ref, "rm-judged", settings=settings, home=home)
    assert result["rows_kept"] == 2 and result["rows_dropped"] == 1
    assert scored_with == ["my-rm@1"]  # the name is pinned to the version it meant
    lineage = Catalog(home).resolve("rm-judged").lineage
    assert lineage["judges"] == ["rm:my-rm@1"] and lineage["models"] == []
    again = factory.filter("consistency", ref, "rm-judged-again", settings=settings, home=home)
    assert again["scores_reused"]  # the same model version: its scores are reused
    assert scored_with == ["my-rm@1"]


def test_a_new_version_of_the_judge_model_recomputes_the_scores(ingest, home, monkeypatch) -> None:
    import factory
    import factory.trainer

    ref = ingest("rm2", _rows(CLEAR))
    catalog = Catalog(home)
    catalog.register_model("my-rm", home / "models" / "my-rm" / "v1", ref, {}, {})
    scored_with = []

    def fake_score(model, table, *, home=None, **_):
        scored_with.append(model)
        sign = 1.0 if model == "my-rm@1" else -1.0  # version 2 prefers the rejected answers
        rewards = [sign * len(c) for c in table["chosen"].to_pylist()]
        return table.append_column("reward_chosen", pa.array(rewards)).append_column(
            "reward_rejected", pa.array([sign * len(r) for r in table["rejected"].to_pylist()]))

    monkeypatch.setattr(factory.trainer, "score", fake_score)
    settings = {"judge": "rm", "model": "my-rm", "flip_below": 0.4}
    first = factory.filter("consistency", ref, "by-rm", settings=settings, home=home)
    assert first["rows_kept"] == 2 and first["rows_flipped"] == 0
    catalog.register_model("my-rm", home / "models" / "my-rm" / "v2", ref, {}, {})  # retrained
    second = factory.filter("consistency", ref, "by-rm", settings=settings, home=home)
    assert not second["scores_reused"] and scored_with == ["my-rm@1", "my-rm@2"]
    assert second["rows_flipped"] == 2  # version 2's verdicts, not version 1's
    assert Catalog(home).resolve("by-rm").lineage["judges"] == ["rm:my-rm@2"]


def test_agreement_of_labels_and_ties() -> None:
    assert agreement_of([1, 1], tie=False) == 1.0 and agreement_of([1, -1], tie=False) == 0.5
    assert agreement_of([0, 1], tie=False) == 0.75 and agreement_of([1, -1], tie=True) == 1.0
    assert agreement_of([1, 1], tie=True) == 0.0
