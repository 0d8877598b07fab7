"""Lazy Arrow text columns: they behave as the lists they replace, and the trainer, the token
cache, the embedding cache and the noise filter's features give the same numbers on them."""

from __future__ import annotations

import pickle
from dataclasses import fields, replace

import numpy as np
import pyarrow as pa
import pytest
import torch

import factory.columns
from factory.columns import ArrowColumn, as_messages, take, text_lengths
from factory.embed.cache import EmbeddingCache, text_key
from factory.trainer import backbones
from factory.trainer.data import PairData, pair_data
from factory.trainer.loop import TrainConfig, fit
from factory.trainer.model import HeadFeaturizer
from factory.trainer.token_cache import encode_cached
from tests.toy import tiny_backbone, toy_pairs

TEXTS = ["", "a", "héllo wörld", "日本語のテキスト", "x" * 50, "tab\there", "emoji 🙂", "last", "z"]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Conversion chunks of 3 rows and tokenizer chunks of 7: every fixture spans several."""
    monkeypatch.setattr(factory.columns, "CHUNK_ROWS", 3)
    monkeypatch.setattr(backbones, "ENCODE_CHUNK", 7)


def _column(values: list, sizes: tuple[int, ...] = (2, 4, 3), **kw) -> ArrowColumn:
    """``values`` split over Arrow chunks of uneven ``sizes`` (the last takes the rest)."""
    bounds = np.cumsum((0, *sizes[:-1]))
    parts = [values[a:b] for a, b in zip(bounds, [*bounds[1:], len(values)], strict=True)]
    return ArrowColumn(pa.chunked_array([pa.array(p, pa.string()) for p in parts]), **kw)


def test_a_column_indexes_slices_and_takes_as_a_list(small_chunks):
    col = _column(TEXTS)
    n = len(TEXTS)
    assert len(col) == n and list(col) == TEXTS and col == TEXTS
    assert [col[i] for i in range(-n, n)] == TEXTS + TEXTS
    assert col[np.int64(4)] == TEXTS[4]
    for bad in (n, -n - 1):
        with pytest.raises(IndexError):
            col[bad]
    for key in (slice(None), slice(1, 7), slice(2, 3), slice(5, 2), slice(-4, None), slice(None, None, 2),
                slice(7, 1, -2), slice(None, None, -1), slice(100, 200)):
        part = col[key]
        assert isinstance(part, ArrowColumn) and list(part) == TEXTS[key]
    idx = [8, 0, 3, 3, -1, 5]
    assert list(col[idx]) == [TEXTS[i] for i in idx]
    assert list(col.take(np.asarray(idx))) == [TEXTS[i] for i in idx]
    mask = np.arange(n) % 3 == 1
    assert list(col[mask]) == [t for t, m in zip(TEXTS, mask, strict=True) if m]
    assert list(col[np.zeros(0, dtype=np.int64)]) == []
    with pytest.raises(IndexError):
        col.take([0, n])
    assert list(take(TEXTS, np.asarray(idx))) == list(take(col, np.asarray(idx)))
    assert text_lengths(col).tolist() == [len(t) for t in TEXTS] == text_lengths(TEXTS).tolist()
    assert TEXTS[3] in col and col.index("last") == 7 and list(reversed(col)) == TEXTS[::-1]


def test_concatenation_and_iteration_cross_chunk_boundaries(small_chunks):
    a, b = _column(TEXTS), _column(TEXTS[::-1], sizes=(5, 4))
    both = a + b
    assert isinstance(both, ArrowColumn) and list(both) == TEXTS + TEXTS[::-1]
    assert list(both[7:12]) == (TEXTS + TEXTS[::-1])[7:12]
    assert list(a + ["extra"]) == [*TEXTS, "extra"] and list(["first"] + a) == ["first", *TEXTS]
    large = ArrowColumn(pa.chunked_array([pa.array(["p"], pa.large_string())]))
    assert list(a + large) == [*TEXTS, "p"]  # another string type is cast, as lists would mix
    # Each step of an iteration converts at most chunk_rows values.
    seen: list[int] = []

    def counting(values: list) -> list:
        seen.append(len(values))
        return values

    assert list(ArrowColumn(both.arrow, counting)) == TEXTS + TEXTS[::-1]
    assert max(seen) == 3 and sum(seen) == 2 * len(TEXTS)
    assert pickle.loads(pickle.dumps(both)) == both


def test_taken_columns_pick_rows_and_compose(small_chunks):
    col = _column(TEXTS)
    idx = [8, 0, 3, 3, 5, 1, 7]
    expected = [TEXTS[i] for i in idx]
    picked = col.take(idx)  # row numbers into the same Arrow values
    assert list(picked) == expected and [picked[i] for i in range(-7, 7)] == expected + expected
    assert list(picked[2:6]) == expected[2:6] and list(picked[::-2]) == expected[::-2]
    assert list(picked.take([6, 0, 0])) == [expected[6], expected[0], expected[0]]
    assert list(picked[2:6].take([3, 1])) == [expected[5], expected[3]]
    assert list(picked + col) == expected + TEXTS and list(col + picked) == TEXTS + expected
    assert list(picked + picked[1:3]) == expected + expected[1:3] and list(["x"] + picked) == ["x", *expected]
    assert picked.lengths().tolist() == [len(t) for t in expected]
    assert picked.arrow.to_pylist() == expected and pickle.loads(pickle.dumps(picked)) == picked
    nullable = ArrowColumn(pa.array(["a", None, "b"])).take([0, 2, 2])
    assert nullable.null_count == 0 and nullable.take([0, 1]).null_count == 0
    assert ArrowColumn(pa.array(["a", None, "b"])).take([1, 1]).null_count == 2


def test_prompts_read_as_messages_with_null_contents_as_empty():
    prompt_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    values = [[{"role": "user", "content": "hi"}], None, [{"role": "system", "content": None},
                                                          {"role": "user", "content": "q"}]]
    col = ArrowColumn(pa.array(values, prompt_type), as_messages, chunk_rows=2)
    expected = [[{"role": "user", "content": "hi"}], [],
                [{"role": "system", "content": ""}, {"role": "user", "content": "q"}]]
    assert list(col) == expected and col[2] == expected[2] and list(col[[2, 0]]) == [expected[2], expected[0]]
    assert list(col + col) == expected + expected


def _chunked(table: pa.Table, rows: int = 5) -> pa.Table:
    """The same table in Arrow chunks of ``rows`` rows."""
    return pa.Table.from_batches(table.to_batches(max_chunksize=rows))


def _as_lists(data: PairData) -> PairData:
    """The same pairs with every text column a Python list (what pair_data used to give)."""
    return replace(data, **{f.name: list(getattr(data, f.name)) for f in fields(data)
                            if isinstance(getattr(data, f.name), ArrowColumn)})


def _old_pair_data_texts(table: pa.Table) -> dict[str, list]:
    """The text columns as the list-based reader made them (main before the lazy columns)."""
    rows = table.to_pylist()
    provenance = [r.get("provenance") or {} for r in rows]
    return {
        "prompts": [[{"role": m["role"], "content": m["content"] or ""} for m in r["prompt"] or []] for r in rows],
        "chosen": [r["chosen"] or "" for r in rows],
        "rejected": [r["rejected"] or "" for r in rows],
        "prompt_ids": [r["prompt_id"] for r in rows],
        "sources": [p.get("source") for p in provenance],
        "steps": [p.get("step") for p in provenance],
        "attributes": [r.get("attribute") for r in rows],
        "tasks": [r.get("task") for r in rows],
    }


def test_pair_data_from_arrow_reads_what_the_lists_held(small_chunks):
    table = _chunked(toy_pairs(23, seed=4, ties=3))
    data = pair_data(table)
    for name, expected in _old_pair_data_texts(table).items():
        column = getattr(data, name)
        assert isinstance(column, ArrowColumn) and list(column) == expected, name
    idx = np.asarray([22, 0, 7, 7, 13, 3])
    lazy, listed = data.subset(idx), _as_lists(data).subset(idx)
    for f in fields(PairData):
        a, b = getattr(lazy, f.name), getattr(listed, f.name)
        assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else list(a) == list(b)), f.name
    # Without a prompt_id column, ids are hashed from the prompts, chunk by chunk.
    hashed = pair_data(table.drop_columns(["prompt_id"]))
    from factory.trainer.data import _prompt_hash

    assert list(hashed.prompt_ids) == [_prompt_hash(p) for p in _old_pair_data_texts(table)["prompts"]]


def test_token_cache_gives_the_same_entry_and_ids_from_arrow(small_chunks, tmp_path):
    data = pair_data(_chunked(toy_pairs(30, seed=1)))
    listed = _as_lists(data)
    tok = backbones.load_tokenizer(backbones.minilm_path())
    lazy = encode_cached(tok, data.prompts + data.prompts, data.chosen + data.rejected, 64, tmp_path / "a")
    plain = encode_cached(tok, listed.prompts + listed.prompts, listed.chosen + listed.rejected, 64,
                          tmp_path / "b")
    assert lazy.folder.name == plain.folder.name  # the same cache key
    assert np.array_equal(lazy.offsets, plain.offsets) and np.array_equal(lazy.ids, plain.ids)
    assert np.array_equal(lazy.truncated, plain.truncated)


def test_embedding_cache_computes_the_same_batches_from_arrow(tmp_path):
    texts = TEXTS * 3
    batches: dict[str, list[list[str]]] = {"lazy": [], "list": []}

    def vectors(into: str):
        def compute(batch: list[str]) -> np.ndarray:
            batches[into].append(list(batch))
            return np.asarray([[len(t), sum(map(ord, t)) % 97] for t in batch], dtype=np.float32)
        return compute

    keys = [text_key(t, 256) for t in texts]
    lazy = EmbeddingCache(tmp_path, "a").get_or_compute(keys, _column(texts, sizes=(4, 10, 13)),
                                                         vectors("lazy"), dim=2, batch_size=4)
    plain = EmbeddingCache(tmp_path, "b").get_or_compute(keys, texts, vectors("list"), dim=2, batch_size=4)
    assert np.array_equal(lazy, plain) and batches["lazy"] == batches["list"]


def test_noise_features_interleave_as_the_list_code_did(small_chunks):
    data = pair_data(_chunked(toy_pairs(11, seed=2)))
    n = len(data)
    interleaved = np.arange(2 * n).reshape(2, n).T.reshape(-1)
    sides = take(data.chosen + data.rejected, interleaved)
    assert list(sides) == [r for pair in zip(data.chosen, data.rejected, strict=True) for r in pair]
    prompts = take(data.prompts, np.arange(n).repeat(2))
    assert list(prompts) == [p for p in data.prompts for _ in (0, 1)]


def test_head_training_on_arrow_columns_matches_lists(small_chunks, tmp_path):
    data = pair_data(_chunked(toy_pairs(24, seed=3)))
    featurizer = HeadFeaturizer("minilm", 64, None)
    lazy_x, lazy_cut = featurizer.featurize(data.prompts + data.prompts, data.chosen + data.rejected)
    listed = _as_lists(data)
    list_x, list_cut = featurizer.featurize(listed.prompts + listed.prompts, listed.chosen + listed.rejected)
    assert np.array_equal(lazy_x, list_x) and np.array_equal(lazy_cut, list_cut)
    cfg = TrainConfig(mode="head", epochs=3, batch_size=8, val_fraction=0.25, max_length=64,
                      progress=False, seed=0)
    a, b = fit(data, cfg, featurizer=featurizer), fit(listed, cfg, featurizer=featurizer)
    for p, q in zip(a.model.head.parameters(), b.model.head.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.history == b.history


def test_full_training_on_arrow_columns_matches_lists(small_chunks, tmp_path):
    base = tiny_backbone(tmp_path / "tiny-bert", "bert")
    data = pair_data(_chunked(toy_pairs(16, seed=5)))
    cfg = TrainConfig(mode="full", base=base, epochs=1, batch_size=4, val_fraction=0.25, max_length=48,
                      progress=False, seed=0)
    a = fit(data, cfg, tokens_root=tmp_path / "tok-a")
    b = fit(_as_lists(data), cfg, tokens_root=tmp_path / "tok-b")
    for p, q in zip(a.model.hf_model.parameters(), b.model.hf_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert a.history == b.history


def test_takes_across_many_chunks_and_empty_ones_keep_order(small_chunks):
    """Rows picked from several Arrow chunks (taken chunk by chunk, then put back in the
    asked order) read as the list would, through iteration, ``arrow`` and further takes."""
    rng = np.random.default_rng(0)
    chunks = [pa.array([f"t{i}-{j}" for j in range(n)], type=pa.string()) for i, n in enumerate([5, 0, 3, 7, 1])]
    column = ArrowColumn(pa.chunked_array(chunks))
    values = [v for chunk in chunks for v in chunk.to_pylist()]
    for _ in range(100):
        idx = rng.integers(-len(values), len(values), rng.integers(0, 40))
        expected = [values[i] for i in idx]
        taken = column.take(idx)
        assert list(taken) == expected and taken.arrow.to_pylist() == expected
        assert list(taken + column) == expected + values
        if expected:
            again = rng.integers(0, len(expected), 5)
            assert list(taken.take(again)) == [expected[k] for k in again]
