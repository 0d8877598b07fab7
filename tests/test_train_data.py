"""Splits by prompt, k-folds, batch orders and the truncation that keeps the response."""

from __future__ import annotations

import numpy as np

from factory.trainer.backbones import budget_truncate, encode_pairs, load_tokenizer, minilm_path
from factory.trainer.data import epoch_batches, kfold_by_prompt, pair_data, split_by_prompt
from tests.toy import toy_pairs


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


def test_budget_truncation_keeps_the_question_and_the_end_of_the_response():
    prompt, response = list(range(100)), list(range(1000, 1300))
    # the last user turn is the prompt's final 10 tokens: the prompt keeps exactly those,
    # the response its first 54 // 4 = 13 tokens and its last 41
    out = budget_truncate(prompt, response, 64, prompt_floor=10)
    assert out == prompt[-10:] + response[:13] + response[-41:]
    # a long question keeps at most half the budget, from its end
    out = budget_truncate(prompt, response, 64, prompt_floor=90)
    assert out == prompt[-32:] + response[:8] + response[-24:]
    # a short response is never cut: older prompt tokens go first
    assert budget_truncate(list(range(50)), [7, 8], 10) == [42, 43, 44, 45, 46, 47, 48, 49, 7, 8]
    assert budget_truncate([1, 2], [3], 10) == [1, 2, 3]
    # a long response keeps its opening (at most 64 tokens) and its end
    out = budget_truncate([1], list(range(2000)), 1000, prompt_floor=1)
    assert out == [1, *range(64), *range(2000 - 935, 2000)]


def test_long_pair_keeps_last_question_and_final_answer_at_256_tokens():
    tok = load_tokenizer(minilm_path())
    prompt = [
        {"role": "user", "content": "tell me about history " * 100},
        {"role": "assistant", "content": "history is long " * 100},
        {"role": "user", "content": "what is six times seven?"},
    ]
    response = "let me think step by step. " * 80 + "so the final answer is forty two"
    encoded = encode_pairs(tok, [prompt, prompt], [response, "forty two"], max_length=256)
    text = tok.decode(encoded.ids[0])
    assert len(encoded.ids[0]) == 256 and text.startswith("[CLS]") and text.endswith("[SEP]")
    assert "user : what is six times seven? assistant : let me think step by step." in text
    assert text.endswith("so the final answer is forty two [SEP]")
    assert "tell me about history" not in text  # the oldest turn went first
    assert encoded.truncated.tolist() == [True, True]  # the second: its prompt is cut
    short = encode_pairs(tok, [[{"role": "user", "content": "hi"}]], ["hello"], max_length=256)
    assert short.truncated.tolist() == [False]
    assert tok.decode(short.ids[0]) == "[CLS] user : hi assistant : hello [SEP]"


def test_pair_data_reads_defaults_from_the_canonical_table():
    table = toy_pairs(6, ties=2)
    data = pair_data(table)
    assert len(data) == 8 and data.tie.sum() == 2
    assert (data.weight == 1.0).all() and (data.margin == 0.0).all()
    assert data.sources[0] == "toy" and data.sources[1] == "toy-b"
