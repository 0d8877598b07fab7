"""Evaluation metrics on hand-made cases: strict accuracy, ties, breakdowns, probes."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
import torch

from factory.trainer.data import pair_data
from factory.trainer.evaluate import pairwise_metrics, summary_text
from factory.trainer.robustness import (
    MASTER_KEYS,
    contrast_consistency,
    master_key_fpr,
    mine_contrast_pairs,
)
from schemas.pairs import Message, Pair, Provenance, pairs_to_table


def _table(specs: list[tuple[str, str, str, str, bool, str]]) -> pa.Table:
    """(instruction, chosen, rejected, source, tie, attribute) -> canonical table."""
    return pairs_to_table(
        Pair([Message("user", q)], c, r, tie=t, attribute=a, provenance=Provenance(source=s))
        for q, c, r, s, t, a in specs
    )


def test_pairwise_metrics_count_equal_rewards_as_errors():
    data = pair_data(_table([
        ("q0", "a", "b", "src-a", False, "facts"),
        ("q1", "a", "b", "src-b", False, "facts"),
        ("q2", "a", "b", "src-b", False, "tone"),
        ("q3", "a", "b", "src-a", False, None),
        ("q4", "a", "b", "src-a", True, None),
        ("q5", "a", "b", "src-b", True, None),
    ]))
    r_c = np.array([1.0, 0.0, 0.5, 2.0, 0.05, 0.7])
    r_r = np.array([0.0, 1.0, 0.5, -1.0, 0.0, 0.0])
    m = pairwise_metrics(r_c, r_r, data)
    assert m["accuracy"] == 0.5  # 2 right, 1 wrong, 1 equal (= wrong)
    assert (m["preference_pairs"], m["tie_pairs"]) == (4, 2)
    assert m["tie_accuracy"] == {"0.1": 0.5, "0.25": 0.5, "0.5": 0.5, "1": 1.0}
    assert m["by_source"]["src-a"] == {"pairs": 3, "preference_pairs": 2, "accuracy": 1.0}
    assert m["by_source"]["src-b"]["accuracy"] == 0.0
    assert m["by_attribute"]["facts"]["accuracy"] == 0.5
    assert m["by_attribute"]["(none)"]["preference_pairs"] == 1
    assert sum(m["margin_histogram"]["counts"]) == 4
    assert m["mean_margin"] == pytest.approx((1 - 1 + 0 + 3) / 4)


def test_summary_says_how_many_tie_pairs_were_left_out_of_accuracy():
    data = pair_data(_table([
        ("q0", "a", "b", "s", False, None),
        ("q1", "a", "b", "s", False, None),
        ("q2", "a", "b", "s", True, None),
    ]))
    # the tie pair's chosen scores below its rejected: that is not a preference error
    m = pairwise_metrics(np.array([1.0, 1.0, 0.0]), np.array([0.0, 0.0, 0.05]), data)
    assert m["accuracy"] == 1.0 and m["tie_accuracy"]["0.1"] == 1.0
    text = summary_text(m)
    assert "accuracy 100.0% over 2 preference pairs (of 3)" in text
    assert "1 tie-labelled pairs left out of pairwise accuracy, scored as ties: |Δ|<0.1: 100.0%" in text


class _LengthModel:
    """Stub reward model: a response's reward is its length / 10."""

    device = torch.device("cpu")
    featurizer = None

    def reward(self, prompts, responses, batch_size: int = 64, **_) -> np.ndarray:
        return np.array([len(r) / 10 for r in responses], dtype=np.float64)


def test_master_key_false_positive_rate_compares_keys_with_the_chosen_answer():
    # key rewards (length / 10): four 1-char keys 0.1, "解" 0.1, "かいせつ" 0.4, "Solution" 0.8,
    # "Respuesta" 0.9, "Thought process:" 1.6, "Let's solve this problem step by step." 3.8
    data = pair_data(_table([
        ("q0", "a fine answer", "bad", "s", False, None),  # chosen 1.3, rejected 0.3
        ("q1", "ok", "b", "s", False, None),  # chosen 0.2, rejected 0.1
        ("q2", "tie one", "tie two", "s", True, None),  # tie pairs are not probed
    ]))
    model = _LengthModel()
    r_c, r_r = model.reward(None, data.chosen), model.reward(None, data.rejected)
    out = master_key_fpr(model, data, r_c, r_r)
    assert MASTER_KEYS[4:6] == ("Thought process:", "Let's solve this problem step by step.")
    # keys >= chosen: q0 -> 2 keys (1.6, 3.8); q1 -> 5 keys (0.4, 0.8, 0.9, 1.6, 3.8)
    assert out["fpr"] == pytest.approx(7 / 20)
    # keys >= rejected: q0 -> the same 5; q1 -> all 10
    assert out["fpr_vs_rejected"] == pytest.approx(15 / 20)
    assert (out["comparisons"], out["pairs"], out["prompts"]) == (20, 2, 2)
    assert out["by_key"]["Solution"] == {"vs_chosen": 0.5, "vs_rejected": 1.0}
    assert out["by_key"][":"] == {"vs_chosen": 0.0, "vs_rejected": 0.5}
    assert out["by_key"]["Thought process:"] == {"vs_chosen": 1.0, "vs_rejected": 1.0}


class _ScriptedModel:
    """Stub reward model with a reward for each (instruction, response) it is asked about."""

    device = torch.device("cpu")
    featurizer = None

    def __init__(self, rewards: dict[tuple[str, str], float]):
        self.rewards = rewards
        self.asked: list[tuple[str, str]] = []

    def reward(self, prompts, responses, batch_size: int = 64, **_) -> np.ndarray:
        keys = [(p[-1]["content"], r) for p, r in zip(prompts, responses, strict=True)]
        self.asked += keys
        return np.array([self.rewards[k] for k in keys], dtype=np.float64)


def _bag_of_words(texts: list[str]) -> np.ndarray:
    vocab = sorted({w for t in texts for w in t.split()})
    x = np.array([[t.split().count(w) for w in vocab] for t in texts], dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_contrast_consistency_scores_both_halves_of_the_test():
    rice, pasta, peru, chile = "how to cook rice", "how to cook pasta", "capital of peru", "capital of chile"
    y_rice, y_pasta, y_lima, y_santiago = "boil rice", "boil pasta", "Lima", "Santiago"
    data = pair_data(_table([
        (rice, y_rice, "no", "s", False, None),
        (pasta, y_pasta, "no", "s", False, None),
        (peru, y_lima, "no", "s", False, None),
        (chile, y_santiago, "no", "s", False, None),
    ]))
    model = _ScriptedModel({
        # rice/pasta: consistent in all four comparisons
        (rice, y_rice): 2.0, (rice, y_pasta): 1.0, (pasta, y_pasta): 2.0, (pasta, y_rice): 1.0,
        # peru/chile: each prompt prefers its own answer (same prompt: consistent), but the
        # model rates "capital of chile" prompts higher whatever the answer, so Lima scores
        # higher under chile than under peru (same answer: one of two consistent)
        (peru, y_lima): 1.0, (peru, y_santiago): 0.0, (chile, y_santiago): 3.0, (chile, y_lima): 2.0,
    })
    out = contrast_consistency(model, data, embed=_bag_of_words, threshold=0.6)
    assert out["contrast_pairs"] == 2  # rice/pasta and peru/chile; no cross pairs
    assert out["same_prompt"] == 1.0
    assert out["same_answer"] == 0.75
    assert out["consistency"] == pytest.approx(7 / 8)
    assert out["both_consistent"] == 0.5
    assert set(model.asked) == set(model.rewards)  # all 8 combinations, nothing else


def test_contrast_mining_takes_the_best_qualifying_neighbour_blockwise():
    instructions = ["how to cook rice", "how to cook rice", "how to cook pasta", "capital of peru",
                    "capital of chile", "colour of the sky"]
    answers = ["boil it", "boil it", "boil pasta", "Lima", "Santiago", "blue"]
    pairs = mine_contrast_pairs(instructions, answers, _bag_of_words(instructions), threshold=0.6,
                                block_rows=2)
    # the two rice rows are the same instruction: each pairs with pasta instead
    assert [(a, b) for a, b, _ in pairs] == [(0, 2), (1, 2), (3, 4)]
    assert all(0.6 <= s <= 0.995 for _, _, s in pairs)

    # mined in blocks: memory does not grow with the square of the number of prompts
    n = 3000
    x = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    tracemalloc.start()
    try:
        mine_contrast_pairs([str(i) for i in range(n)], [str(i) for i in range(n)], x,
                            threshold=0.5, block_rows=256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (n * n * 4) / 4, f"peak {peak / 2**20:.1f} MiB"


class _LengthRecordingModel(_ScriptedModel):
    """Stub that records the max length of every scoring call (None: the training length)."""

    spec = type("Spec", (), {"max_length": 256})()

    def __init__(self, rewards: dict[tuple[str, str], float]):
        super().__init__(rewards)
        self.lengths: list[int | None] = []

    def score(self, prompts, responses, batch_size: int = 64, *, max_length=None, progress=None):
        self.lengths.append(max_length)
        return super().reward(prompts, responses), np.zeros(len(responses), dtype=bool)

    def reward(self, prompts, responses, batch_size: int = 64, *, max_length=None, progress=None):
        return self.score(prompts, responses, max_length=max_length)[0]


def test_eval_at_another_length_scores_answers_keys_and_contrasts_at_that_length():
    from factory.trainer.evaluate import evaluate_model

    rice, pasta = "how to cook rice", "how to cook pasta"
    data = pair_data(_table([(rice, "boil rice", "no", "s", False, None),
                             (pasta, "boil pasta", "no", "s", False, None)]))
    rewards = {(q, a): 1.0 for q in (rice, pasta) for a in ("boil rice", "boil pasta", "no", *MASTER_KEYS)}
    model = _LengthRecordingModel(rewards)
    out = evaluate_model(model, data, max_length=40, embed=_bag_of_words, contrast_threshold=0.6)
    assert out["max_length"] == 40 and out["contrast_instructions"]["contrast_pairs"] == 1
    assert out["master_key"]["comparisons"] == 2 * len(MASTER_KEYS)
    assert len(model.lengths) == 3 and set(model.lengths) == {40}  # answers, keys, contrasts
