"""Evaluation metrics on hand-made cases: strict accuracy, ties, breakdowns, probes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from factory.trainer.data import pair_data
from factory.trainer.evaluate import pairwise_metrics
from factory.trainer.robustness import MASTER_KEYS, contrast_consistency, master_key_fpr
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


class _LengthModel:
    """Stub reward model: longer responses score higher."""

    device = torch.device("cpu")
    featurizer = None

    def reward(self, prompts, responses, batch_size: int = 64) -> np.ndarray:
        return np.array([len(r) / 10 for r in responses], dtype=np.float64)


def test_master_key_false_positive_rate():
    data = pair_data(_table([(f"q{i}", "good answer", "bad", "s", False, None) for i in range(3)]))
    out = master_key_fpr(_LengthModel(), data, r_rejected=np.full(3, 0.5))
    # keys longer than 5 characters beat a rejected reward of 0.5
    long_keys = [k for k in MASTER_KEYS if len(k) > 5]
    assert out["fpr"] == pytest.approx(len(long_keys) / len(MASTER_KEYS))
    assert out["comparisons"] == 3 * len(MASTER_KEYS) and out["prompts"] == 3
    assert out["by_key"]["Solution"] == 1.0 and out["by_key"][":"] == 0.0


class _OverlapModel:
    """Stub reward model: words shared by the instruction and the response."""

    device = torch.device("cpu")
    featurizer = None

    def reward(self, prompts, responses, batch_size: int = 64) -> np.ndarray:
        return np.array([len(set(p[-1]["content"].split()) & set(r.split()))
                         for p, r in zip(prompts, responses, strict=True)], dtype=np.float64)


class _BagOfWords:
    def embed_plain(self, texts):
        vocab = sorted({w for t in texts for w in t.split()})
        x = np.array([[t.split().count(w) for w in vocab] for t in texts], dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_contrast_instruction_consistency_on_mined_pairs():
    data = pair_data(_table([
        ("how to cook rice", "boil rice in water", "no", "s", False, None),
        ("how to cook pasta", "boil pasta in salted water", "no", "s", False, None),
        ("capital of peru", "Lima", "no", "s", False, None),
        ("capital of chile", "Santiago", "no", "s", False, None),
    ]))
    out = contrast_consistency(_OverlapModel(), data, encoder=_BagOfWords(), threshold=0.6)
    assert out["contrast_pairs"] == 2  # rice/pasta and peru/chile; no cross pairs
    # rice/pasta answers name their dish (consistent both ways); Lima/Santiago share no
    # word with either instruction, so they tie under both: equal rewards are not consistent
    assert out["consistency"] == 0.5 and out["both_consistent"] == 0.5
