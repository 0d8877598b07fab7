"""Splits by prompt, k-folds, batch orders and the truncation that keeps the response."""

from __future__ import annotations

import numpy as np

from factory.trainer.backbones import budget_truncate, encode_pairs, load_tokenizer, minilm_path
from factory.trainer.data import epoch_batches, kfold_by_prompt, pair_data, split_by_prompt
from factory.trainer.toy import toy_pairs


def test_split_never_shares_a_prompt_and_is_seeded():
    prompt_ids = [f"p{i % 17}" for i in range(200)]  # many rows per prompt
    train, val = split_by_prompt(prompt_ids, 0.25, seed=3)
    assert len(train) + len(val) == 200 and len(val) > 0
    assert not {prompt_ids[i] for i in train} & {prompt_ids[i] for i in val}
    again = split_by_prompt(prompt_ids, 0.25, seed=3)
    assert np.array_equal(train, again[0])
    other = split_by_prompt(prompt_ids, 0.25, seed=4)
    assert not np.array_equal(val, other[1])


def test_kfold_keeps_each_prompt_in_one_fold():
    prompt_ids = [f"p{i % 23}" for i in range(150)]
    folds = kfold_by_prompt(prompt_ids, 5, seed=0)
    assert set(folds.tolist()) == set(range(5))
    for p in set(prompt_ids):
        assert len({int(f) for f, q in zip(folds, prompt_ids, strict=True) if q == p}) == 1


def test_epoch_batches_replay_and_bucket_by_length():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    a = epoch_batches(1000, 16, seed=1, epoch=2, lengths=lengths)
    b = epoch_batches(1000, 16, seed=1, epoch=2, lengths=lengths)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert sorted(np.concatenate(a).tolist()) == list(range(1000))

    def padded(batches: list[np.ndarray]) -> int:
        return sum(int(lengths[x].max()) * len(x) for x in batches)

    plain = [np.random.default_rng(0).permutation(1000)[i : i + 16] for i in range(0, 1000, 16)]
    assert padded(a) < 0.7 * padded(plain)  # far less padding than random batches


def test_budget_truncation_keeps_prompt_tail_and_response_head():
    prompt, response = list(range(100)), list(range(1000, 1300))
    out = budget_truncate(prompt, response, 64)
    assert len(out) == 64
    assert out[:32] == prompt[-32:] and out[32:] == response[:32]
    assert budget_truncate([1, 2], [3], 10) == [1, 2, 3]
    assert budget_truncate(list(range(50)), [7, 8], 10) == [42, 43, 44, 45, 46, 47, 48, 49, 7, 8]


def test_long_dialogue_keeps_the_response_inside_max_length():
    tok = load_tokenizer(minilm_path())
    prompt = [{"role": "user", "content": "word " * 600}]
    ids = encode_pairs(tok, [prompt], ["the final answer is forty two"], max_length=64)[0]
    text = tok.decode(ids)
    assert len(ids) == 64 and text.startswith("[CLS]") and text.endswith("[SEP]")
    assert "assistant : the final answer is forty two" in text


def test_pair_data_reads_defaults_from_the_canonical_table():
    table = toy_pairs(6, ties=2)
    data = pair_data(table)
    assert len(data) == 8 and data.tie.sum() == 2
    assert (data.weight == 1.0).all() and (data.margin == 0.0).all()
    assert data.sources[0] == "toy" and data.sources[1] == "toy-b"
