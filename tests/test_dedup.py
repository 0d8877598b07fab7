"""The dedup filter's scores and decision on planted exact, near and contaminated pairs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.steps import StepContext
from factory.steps.runner import execute, prepare
from filters.dedup import NEAR_DUPLICATE_THRESHOLD, ngrams, normalise
from schemas.pairs import Message, Pair, pairs_to_table

TOPICS = ["volcanoes", "tides", "photosynthesis", "the moon landing", "bread baking", "chess openings",
          "monsoon winds", "honey bees", "glaciers", "the printing press", "jazz", "coral reefs"]


def _pair(prompt: str, chosen: str, rejected: str) -> Pair:
    return Pair([Message("user", prompt)], chosen, rejected)


def _base() -> list[Pair]:
    return [_pair(f"Write a short explanation of {t} for a curious twelve year old reader.",
                  f"Here is how {t} work: a clear account with three concrete examples and a summary of {t}.",
                  f"{t} are a thing.") for t in TOPICS]


def _scores(pairs: list[Pair], tmp_path, **settings) -> tuple[pa.Table, object, object]:
    prepared = prepare("filter", "dedup", {k: str(v) for k, v in settings.items()})
    ctx = StepContext("dedup", prepared.params, home=tmp_path)
    table = pairs_to_table(pairs)
    result = execute(prepared, table, ctx)
    decision = prepared.spec.decide(result.table, prepared.params)
    return table, result, decision


def test_normalise_and_ngrams() -> None:
    assert normalise("  Hello,   WORLD!\n") == "hello world"
    assert ngrams(["a", "b", "c", "d"], 3) == ["a b c", "b c d"]
    assert ngrams(["a", "b"], 3) == ["a b"]


def test_planted_exact_and_near_duplicates_are_dropped_and_the_first_kept(tmp_path) -> None:
    pairs = _base()
    exact = _pair(pairs[3].prompt[0].content.upper() + "  ", pairs[3].chosen, pairs[3].rejected)  # same after normalising
    near_src = pairs[5]
    near = _pair(near_src.prompt[0].content, near_src.chosen + " Thanks!", near_src.rejected)
    rows = [*pairs, exact, near]
    table, result, decision = _scores(rows, tmp_path)
    scores = result.table.to_pylist()
    ids = table["pair_id"].to_pylist()
    assert scores[len(pairs)]["exact_of"] == ids[3]
    assert scores[len(pairs) + 1]["exact_of"] is None
    assert scores[len(pairs) + 1]["near_of"] == ids[5] and scores[len(pairs) + 1]["near_similarity"] >= 0.85
    actions = decision.action.to_pylist()
    assert actions == ["keep"] * len(pairs) + ["drop", "drop"]
    assert "exact duplicate of " + ids[3] == decision.reason[len(pairs)].as_py()
    assert decision.reason[len(pairs) + 1].as_py().startswith(f"near duplicate of {ids[5]}")
    # a stricter threshold than the planted similarity keeps the near duplicate, from the same scores
    stricter = prepare("filter", "dedup", {"near_threshold": "0.999"})
    assert stricter.spec.decide(result.table, stricter.params).action.to_pylist()[-1] == "keep"


def test_contamination_names_the_evaluation_pair(tmp_path) -> None:
    pairs = _base()
    eval_file = tmp_path / "eval.jsonl"
    leaked = pairs[7]
    rows = [{"prompt": leaked.prompt[0].content, "chosen": "x", "rejected": "y"},
            {"prompt": "An unrelated question about the history of maps?", "chosen": "a", "rejected": "b"}]
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table, result, decision = _scores(pairs, tmp_path, against=str(eval_file))
    contamination = result.table["contamination"].to_pylist()
    assert contamination[7] == 1.0
    assert max(c for i, c in enumerate(contamination) if i != 7) < 0.5
    assert result.table["contaminated_by"][7].as_py().startswith(f"{eval_file}:")
    assert pc.sum(pc.equal(decision.action, "drop")).as_py() == 1
    assert "contaminated" in decision.reason[7].as_py()


@pytest.mark.slow
def test_embedding_neighbours_find_a_paraphrased_pair(tmp_path) -> None:
    pairs = _base()
    source = pairs[2]
    paraphrase = _pair("For a curious 12-year-old, write a brief explanation of " + TOPICS[2] + ".",
                       source.chosen, source.rejected)
    table, result, decision = _scores([*pairs, paraphrase], tmp_path, near="embedding", near_threshold=0.9)
    last = result.table.to_pylist()[-1]
    assert last["near_of"] == table["pair_id"][2].as_py() and last["near_similarity"] >= 0.9
    assert decision.action.to_pylist() == ["keep"] * len(pairs) + ["drop"]
    # the first occurrence is never the one dropped: no earlier row names a later one
    assert all(row["near_of"] is None for row in result.table.to_pylist()[:1])


def _long_prompt() -> str:
    # ~700 tokens: a shared RAG-style context; everything that differs lies in the answers
    facts = [f"Fact {i}: the {t} section of the handbook lists {i + 3} numbered rules and a glossary."
             for i, t in enumerate(TOPICS * 3)]
    return "Read the handbook excerpt below, then answer the question.\n" + "\n".join(facts)


def test_embedding_pairs_sharing_a_long_prompt_with_unrelated_answers_are_kept(tmp_path) -> None:
    prompt = _long_prompt()
    pairs = [_pair(prompt, "Volcanoes erupt when magma pressure exceeds the strength of the crust.",
                   "I do not know anything about that."),
             _pair(prompt, "A sourdough starter needs flour, water and a warm kitchen for five days.",
                   "Bread is food."),
             _pair(prompt, "The Sicilian Defence answers 1.e4 with c5 and fights for d4 from the side.",
                   "Chess has pieces.")]
    _, result, decision = _scores(pairs, tmp_path, near="embedding")
    similarity = result.table["near_similarity"].to_pylist()
    assert max(similarity) < 0.6, similarity  # the prompt alone matches; the answers do not
    assert decision.action.to_pylist() == ["keep"] * 3


def test_embedding_long_prompts_that_open_alike_but_go_on_differently_are_kept(tmp_path) -> None:
    opening = _long_prompt()  # the first 256 tokens of both prompts are the same
    later = {t: " ".join(f"Turn {i}: tell me more about {t}, especially {t} in winter and {t} at night."
                         for i in range(25)) for t in ("glaciers", "jazz")}
    pairs = [_pair(opening + "\n" + later[t], "I'm sorry, I can't help with that.", "Sure.")
             for t in later]
    _, result, decision = _scores(pairs, tmp_path, near="embedding")
    assert result.table["near_similarity"][1].as_py() < NEAR_DUPLICATE_THRESHOLD
    assert decision.action.to_pylist() == ["keep", "keep"]


def test_embedding_near_duplicate_after_a_large_exact_cluster_is_found(tmp_path) -> None:
    pairs = _base()
    source = pairs[4]
    copies = [_pair(source.prompt[0].content, source.chosen, source.rejected) for _ in range(40)]
    near = _pair(source.prompt[0].content, source.chosen + " Thanks!", source.rejected)
    rows = [*pairs[:4], *copies, *pairs[5:], near]
    table, result, decision = _scores(rows, tmp_path, near="embedding")
    scores = result.table.to_pylist()
    ids = table["pair_id"].to_pylist()
    assert scores[-1]["exact_of"] is None
    assert scores[-1]["near_of"] == ids[4] and scores[-1]["near_similarity"] >= NEAR_DUPLICATE_THRESHOLD
    actions = decision.action.to_pylist()
    assert actions[4] == "keep" and actions[5:44] == ["drop"] * 39 and actions[-1] == "drop"
    assert actions.count("keep") == len(pairs)


def test_near_none_scores_exact_duplicates_only(tmp_path) -> None:
    pairs = _base()
    near = _pair(pairs[5].prompt[0].content, pairs[5].chosen + " Thanks!", pairs[5].rejected)
    table, result, decision = _scores([*pairs, pairs[3], near], tmp_path, near="none")
    assert result.table["near_similarity"].to_pylist() == [0.0] * (len(pairs) + 2)
    assert result.table["near_of"].null_count == len(pairs) + 2
    assert decision.action.to_pylist() == ["keep"] * len(pairs) + ["drop", "keep"]
    # a similarity of 0 with no earlier pair named is no near duplicate, even at threshold 0
    zero = prepare("filter", "dedup", {"near": "none", "near_threshold": "0"})
    assert zero.spec.decide(result.table, zero.params).action.to_pylist() == decision.action.to_pylist()


def test_near_duplicate_threshold_is_the_public_default() -> None:
    from filters.dedup import DedupParams

    assert DedupParams().near_threshold == NEAR_DUPLICATE_THRESHOLD == 0.85
