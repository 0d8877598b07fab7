"""The shared embedding service: blockwise kNN, the on-disk cache, Ctrl+C, progress."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from factory.embed import (
    EMBED_DIM,
    EmbeddingInterrupted,
    best_earlier_match,
    embed_texts,
    top_k_neighbours,
)
from factory.embed.cache import EmbeddingCache, text_key
from factory.embed.encoder import get_encoder

# --------------------------------------------------------------------------- kNN


def _brute(q: np.ndarray, c: np.ndarray, k: int, *, self_mode: bool, exclude_self: bool,
           lo: float = -np.inf, hi: float = np.inf) -> list[list[tuple[int, float]]]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    sim = (qn.astype(np.float64) @ cn.T.astype(np.float64))
    out = []
    for i, row in enumerate(sim):
        cand = [(j, s) for j, s in enumerate(row)
                if lo <= s <= hi and not (self_mode and exclude_self and i == j)]
        cand.sort(key=lambda t: -t[1])
        out.append(cand[:k])
    return out


def _check(idx: np.ndarray, sims: np.ndarray, expected: list[list[tuple[int, float]]], k: int) -> None:
    assert idx.shape == sims.shape == (len(expected), k)
    assert idx.dtype == np.int64 and sims.dtype == np.float32
    for i, want in enumerate(expected):
        n = len(want)
        assert idx[i, :n].tolist() == [j for j, _ in want]
        np.testing.assert_allclose(sims[i, :n], [s for _, s in want], atol=1e-5)
        assert (idx[i, n:] == -1).all() and np.isnan(sims[i, n:]).all()


@pytest.mark.parametrize("block_rows", [1, 7, 4096])
def test_top_k_matches_brute_force_self_corpus(block_rows):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(53, 12)).astype(np.float32) * rng.uniform(0.5, 3, size=(53, 1)).astype(np.float32)
    idx, sims = top_k_neighbours(x, k=5, block_rows=block_rows)
    _check(idx, sims, _brute(x, x, 5, self_mode=True, exclude_self=True), 5)
    # without exclude_self each row is its own best neighbour at cosine 1
    idx, sims = top_k_neighbours(x, k=3, exclude_self=False, block_rows=block_rows)
    assert idx[:, 0].tolist() == list(range(53))
    _check(idx, sims, _brute(x, x, 3, self_mode=True, exclude_self=False), 3)


@pytest.mark.parametrize("block_rows", [4, 4096])
def test_top_k_similarity_window_and_separate_corpus(block_rows):
    rng = np.random.default_rng(1)
    q, c = rng.normal(size=(30, 6)).astype(np.float32), rng.normal(size=(25, 6)).astype(np.float32)
    idx, sims = top_k_neighbours(q, c, k=6, block_rows=block_rows, min_similarity=0.3, max_similarity=0.7)
    expected = _brute(q, c, 6, self_mode=False, exclude_self=True, lo=0.3, hi=0.7)
    # the band leaves some rows short (-1 padding) and fills others
    assert {len(e) < 6 for e in expected} == {True, False}
    _check(idx, sims, expected, 6)
    # a separate corpus never excludes "self": row 0 of q found in c at position 5
    c2 = c.copy()
    c2[5] = q[0]
    idx, _ = top_k_neighbours(q, c2, k=1, block_rows=block_rows)
    assert idx[0, 0] == 5
    # k larger than the corpus
    idx, sims = top_k_neighbours(q[:2], c[:3], k=5, block_rows=block_rows)
    assert (idx[:, 3:] == -1).all() and sorted(idx[0, :3].tolist()) == [0, 1, 2]


def test_top_k_memory_stays_blockwise():
    n = 2400  # an n x n float32 matrix would be 23 MB
    x = np.random.default_rng(2).normal(size=(n, 32)).astype(np.float32)
    tracemalloc.start()
    try:
        idx, _ = top_k_neighbours(x, k=4, block_rows=300)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MiB"
    assert idx.shape == (n, 4) and (idx >= 0).all()


@pytest.mark.parametrize("block_rows", [1, 5, 2048])
def test_best_earlier_match_is_the_brute_force_min_over_parts(block_rows):
    rng = np.random.default_rng(3)
    parts = [rng.normal(size=(37, 8)).astype(np.float32) for _ in range(3)]
    parts[1][20] = parts[1][4]  # row 20 shares part 1 with row 4 only: not alike overall
    for p in parts:  # row 30 repeats row 9 in every part, row 31 too (its best is 9, the first)
        p[30] = p[9] * 2.0
        p[31] = p[9]
    unit = [p / np.linalg.norm(p, axis=1, keepdims=True) for p in parts]
    sim = np.min([u.astype(np.float64) @ u.T.astype(np.float64) for u in unit], axis=0)
    idx, sims = best_earlier_match(parts, block_rows=block_rows)
    assert idx[0] == -1 and np.isnan(sims[0])
    for i in range(1, 37):
        want = int(np.argmax(sim[i, :i]))
        assert idx[i] == want, i
        np.testing.assert_allclose(sims[i], sim[i, want], atol=1e-5)
    assert idx[30] == 9 and idx[31] == 9 and sims[31] == pytest.approx(1.0)
    assert idx[20] != 4 or sims[20] < 0.9
    # a single part is plain cosine
    idx1, _ = best_earlier_match(parts[1:2], block_rows=block_rows)
    assert idx1[20] == 4


# --------------------------------------------------------------------------- cache


class _Counter:
    """A fake encoder: vector i of a text is a hash of it; counts texts it embeds."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[int] = []
        self.fail_on_call = fail_on_call

    def __call__(self, batch: list[str]) -> np.ndarray:
        self.calls.append(len(batch))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # as Ctrl+C arriving during this batch
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=4) for t in batch]).astype(np.float32)


def _get(cache: EmbeddingCache, texts: list[str], compute, **kw) -> np.ndarray:
    return cache.get_or_compute([text_key(t, 8) for t in texts], texts, compute, dim=4, **kw)


def test_cache_interrupt_keeps_completed_batches_and_rerun_computes_the_rest(tmp_path):
    texts = [f"text number {i}" for i in range(10)]
    failing = _Counter(fail_on_call=2)
    with pytest.raises(EmbeddingInterrupted) as stop:
        _get(EmbeddingCache(tmp_path, "enc"), texts, failing, batch_size=3, progress=False)
    assert failing.calls == [3, 3] and stop.value.saved == 3 and stop.value.missing == 10
    assert isinstance(stop.value, KeyboardInterrupt)
    fresh = EmbeddingCache(tmp_path, "enc")  # from disk, as a new process would
    assert len(fresh) == 3
    counter = _Counter()
    vectors = _get(fresh, texts + texts[:2], counter, batch_size=3, progress=False)
    assert sum(counter.calls) == 7 and fresh.hits == 2 + 3 and fresh.misses == 7
    np.testing.assert_array_equal(vectors[10:], vectors[:2])  # duplicates computed once
    again = _Counter()
    np.testing.assert_array_equal(_get(EmbeddingCache(tmp_path, "enc"), texts, again), vectors[:10])
    assert again.calls == []
    assert not list(tmp_path.glob("enc/.*"))  # no temporary files left behind


def test_cache_flushes_shards_as_it_goes(tmp_path):
    texts = [f"t{i}" for i in range(9)]
    cache = EmbeddingCache(tmp_path, "enc", shard_rows=4)
    seen_on_disk = []

    def compute(batch: list[str]) -> np.ndarray:
        seen_on_disk.append(len(list((tmp_path / "enc").glob("*.npz"))))
        return _Counter()(batch)

    _get(cache, texts, compute, batch_size=2, progress=False)
    # shards of >= 4 rows were on disk before the later batches ran
    assert seen_on_disk == [0, 0, 1, 1, 2]
    assert len(list((tmp_path / "enc").glob("*.npz"))) == 3


# --------------------------------------------------------------------------- embed_texts


def test_embed_texts_normalised_cached_and_interruptible(tmp_path, monkeypatch, capsys):
    encoder = get_encoder()
    real = encoder.embed_ids
    calls: list[int] = []

    def counting(seqs, batch_size=64):
        calls.append(len(seqs))
        if len(calls) == 2 and stop_on_second:
            raise KeyboardInterrupt
        return real(seqs, batch_size)

    monkeypatch.setattr(encoder, "embed_ids", counting)
    texts = ["a cat sat on the mat", "reward models", "a cat sat on the mat", "x", "prefab", "hello"]
    stop_on_second = True
    with pytest.raises(KeyboardInterrupt):
        embed_texts(texts, home=tmp_path, batch_size=2, progress=False)
    assert calls == [2, 2]  # 5 distinct texts: batch 1 done, Ctrl+C in batch 2
    stop_on_second = False
    calls.clear()
    vectors = embed_texts(texts, home=tmp_path, batch_size=2, progress=True)
    assert calls == [2, 1]  # only the three texts not yet cached
    assert "embed texts" in capsys.readouterr().err  # the progress bar
    assert vectors.shape == (6, EMBED_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(vectors[0], vectors[2])
    calls.clear()
    assert np.array_equal(embed_texts(texts[::-1], home=tmp_path, progress=False), vectors[::-1])
    assert calls == []
    assert embed_texts([], home=tmp_path).shape == (0, EMBED_DIM)


def test_embed_texts_matches_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(get_encoder().path, device="cpu")
    texts = ["A quick brown fox.", "Reward models score responses to prompts.", "word " * 400]
    np.testing.assert_allclose(embed_texts(texts, home=tmp_path), st.encode(texts), atol=1e-5)


def test_embed_texts_keep_end_reads_the_last_tokens(tmp_path):
    tail = " ".join(f"closing remark {i} about reward models" for i in range(80))  # > 256 tokens
    long_a, long_b = "Volcanoes erupt. " + tail, "Bread rises in a warm kitchen. " + tail
    short = "A quick brown fox."
    start = embed_texts([long_a, long_b, short], home=tmp_path)
    end = embed_texts([long_a, long_b, short], home=tmp_path, keep="end")
    # the starts differ, the last 256 tokens are the same text
    assert float(start[0] @ start[1]) < 0.99
    np.testing.assert_allclose(end[0], end[1], atol=1e-6)
    assert float(end[0] @ start[0]) < 0.99
    np.testing.assert_array_equal(end[2], start[2])  # a text that fits: one vector, one cache entry
    encoder = get_encoder()
    ids = encoder.tokenizer(tail, add_special_tokens=False)["input_ids"][-254:]
    cls, sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
    manual = encoder.embed_ids([np.asarray([cls, *ids, sep])])
    np.testing.assert_allclose(end[0], manual[0], atol=1e-5)
    with pytest.raises(ValueError, match="keep"):
        embed_texts([short], home=tmp_path, keep="middle")
