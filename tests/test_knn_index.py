"""Neighbours through the faiss IVF index agree with exact search, deterministically."""

from __future__ import annotations

import numpy as np
import pytest

import factory.embed.index as index_module
from factory.embed import best_earlier_match, top_k_neighbours


def _clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around random centres, like embeddings of texts on a few topics."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def test_index_neighbours_agree_with_exact_and_exclude_self() -> None:
    x = _clustered(3000)
    exact_i, exact_s = top_k_neighbours(x, k=10, exact=True)
    approx_i, approx_s = top_k_neighbours(x, k=10, exact=False)
    assert approx_i.shape == (3000, 10) and approx_i.dtype == np.int64 and approx_s.dtype == np.float32
    assert _recall(approx_i, exact_i) >= 0.95
    assert not (approx_i == np.arange(3000)[:, None]).any()  # self-matches excluded as today
    # similarities are the exact cosines of the pairs returned, best first
    rows = np.arange(3000)[:, None]
    np.testing.assert_allclose(approx_s, np.einsum("rd,rkd->rk", x[rows[:, 0]], x[approx_i]), atol=1e-5)
    assert (np.diff(approx_s, axis=1) <= 1e-6).all()
    assert np.isclose(approx_s[:, 0], exact_s[:, 0], atol=1e-5).mean() >= 0.95


def test_index_search_is_deterministic() -> None:
    x = _clustered(2500, seed=1)
    first = top_k_neighbours(x, k=10, exact=False)
    second = top_k_neighbours(x.copy(), k=10, exact=False)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_index_respects_a_similarity_band_and_a_separate_corpus() -> None:
    x = _clustered(1500, seed=2)
    q = _clustered(200, seed=3)
    lo, hi = 0.2, 0.6  # a band: the nearest (above 0.6) must be skipped, searched deeper
    exact_i, exact_s = top_k_neighbours(x, k=5, min_similarity=lo, max_similarity=hi, exact=True)
    approx_i, approx_s = top_k_neighbours(x, k=5, min_similarity=lo, max_similarity=hi, exact=False)
    inside = ~np.isnan(approx_s)
    assert ((approx_s[inside] >= lo) & (approx_s[inside] <= hi)).all()
    assert (approx_i[~inside] == -1).all()
    assert _recall(approx_i, exact_i) >= 0.95
    # a ceiling below every neighbour: each row's closest under it is still found (k=1)
    _, under = top_k_neighbours(x, k=1, max_similarity=0.3, exact=False)
    _, under_exact = top_k_neighbours(x, k=1, max_similarity=0.3, exact=True)
    assert np.isclose(under, under_exact, atol=1e-5).mean() >= 0.95
    # a separate corpus of queries from other topics: no self exclusion, calibrated on them
    sep_exact, _ = top_k_neighbours(q, x, k=10, exact=True)
    sep_approx, _ = top_k_neighbours(q, x, k=10, exact=False)
    assert _recall(sep_approx, sep_exact) >= 0.95


def test_size_decides_the_path(monkeypatch) -> None:
    x = _clustered(1000, seed=4)
    calls: list[int] = []
    real = index_module.NeighbourIndex

    class Counting(real):
        def __init__(self, units: np.ndarray, **kwargs) -> None:
            calls.append(len(units))
            super().__init__(units, **kwargs)

    monkeypatch.setattr(index_module, "NeighbourIndex", Counting)
    top_k_neighbours(x, k=5)
    assert calls == []  # below EXACT_BELOW: exact
    monkeypatch.setattr(index_module, "EXACT_BELOW", 500)
    top_k_neighbours(x, k=5)
    assert calls == [1000]
    top_k_neighbours(x, k=5, exact=True)  # the override wins
    assert calls == [1000]


def test_best_earlier_match_through_the_index_matches_exact() -> None:
    parts = [_clustered(2000, seed=s) for s in (5, 6)]
    rng = np.random.default_rng(7)
    later = rng.choice(np.arange(1000, 2000), size=100, replace=False)
    source = rng.integers(0, 1000, size=100)
    for p in parts:  # planted near duplicates of earlier rows
        noisy = p[source] + 0.05 * rng.normal(size=p[source].shape).astype(np.float32)
        p[later] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    exact_i, exact_s = best_earlier_match(parts, exact=True)
    approx_i, approx_s = best_earlier_match(parts, exact=False)
    assert approx_i[0] == -1 and np.isnan(approx_s[0])
    assert (approx_i[1:] < np.arange(1, 2000)).all() and (approx_i[1:] >= 0).all()  # earlier only
    assert (approx_i[later] == exact_i[later]).all()  # every planted duplicate found
    # rows without a near duplicate may get a lesser earlier match (documented), never a better one
    near = exact_s >= 0.8
    assert near.sum() >= 100 and (approx_i[near] == exact_i[near]).all()
    np.testing.assert_allclose(approx_s[1:], np.min([np.einsum("rd,rd->r", p[1:], p[approx_i[1:]])
                                                     for p in parts], axis=0), atol=1e-5)
    assert (approx_s[1:] <= exact_s[1:] + 1e-5).all()  # never better than the true best


@pytest.mark.parametrize("exact", [True, False])
def test_tiny_inputs_take_either_path(exact: bool) -> None:
    x = _clustered(5, seed=8)
    idx, sims = top_k_neighbours(x, k=10, exact=exact)
    assert (idx[:, 4:] == -1).all() and np.isnan(sims[:, 4:]).all()
    assert sorted(idx[0, :4].tolist()) == [1, 2, 3, 4]


def _planted_parts(n: int, dims: tuple[int, ...], seed: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Clustered parts with near duplicates of earlier rows planted at ``later``."""
    parts = [_clustered(n, dim=d, seed=seed + i) for i, d in enumerate(dims)]
    rng = np.random.default_rng(seed)
    later = rng.choice(np.arange(n // 2, n), size=n // 20, replace=False)
    source = rng.integers(0, n // 2, size=len(later))
    for p in parts:
        noisy = p[source] + 0.05 * rng.normal(size=p[source].shape).astype(np.float32)
        p[later] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return parts, later, source


def test_float16_memory_maps_give_the_matches_of_float32_parts_through_the_index(tmp_path, monkeypatch) -> None:
    # Above EXACT_BELOW (lowered to keep it fast), read a chunk at a time (READ_ROWS lowered):
    # the float16 maps are never converted whole, and find what float32 parts find.
    monkeypatch.setattr(index_module, "EXACT_BELOW", 1000)
    monkeypatch.setattr(index_module, "READ_ROWS", 700)
    parts, later, _ = _planted_parts(3000, (32, 24, 32), seed=11)
    maps = []
    for number, part in enumerate(parts):
        path = tmp_path / f"part{number}.npy"
        np.save(path, part.astype(np.float16))
        maps.append(np.load(path, mmap_mode="r"))
    i32, s32 = best_earlier_match(parts)
    i16, s16 = best_earlier_match(maps)
    assert i16.dtype == np.int64 and s16.dtype == np.float32
    assert i16[0] == -1 and np.isnan(s16[0]) and (i16[1:] < np.arange(1, 3000)).all()
    assert (i16[later] == i32[later]).all()  # every planted near duplicate, the same source
    near = s32 >= 0.8
    assert near.sum() >= len(later) and (i16[near] == i32[near]).mean() >= 0.99
    np.testing.assert_allclose(s16[near], s32[near], atol=2e-3)
    # the similarities are the float32 cosines of the renormalised float16 rows
    units = [p.astype(np.float16).astype(np.float32) for p in parts]
    units = [u / np.linalg.norm(u, axis=1, keepdims=True) for u in units]
    np.testing.assert_allclose(s16[1:], np.min([np.einsum("rd,rd->r", u[1:], u[i16[1:]]) for u in units], axis=0),
                               atol=1e-5)


def test_float16_parts_on_the_exact_path_are_within_rounding_of_float32() -> None:
    parts, later, _ = _planted_parts(600, (16, 16), seed=12)
    i32, s32 = best_earlier_match(parts, exact=True)
    i16, s16 = best_earlier_match([p.astype(np.float16) for p in parts], exact=True)
    assert (i16[later] == i32[later]).all()
    np.testing.assert_allclose(s16[1:], s32[1:], atol=2e-3)
    assert best_earlier_match(parts, exact=True)[0].tolist() == i32.tolist()  # float32 unchanged


def test_rows_without_an_earlier_candidate_are_compared_with_every_earlier_row() -> None:
    parts, _, _ = _planted_parts(400, (8, 8), seed=13)
    best_i = np.full(400, -1, dtype=np.int64)
    best_s = np.full(400, np.nan, dtype=np.float32)
    rows = np.array([1, 5, 77, 399])
    index_module._best_earlier_exactly([p.astype(np.float16) for p in parts], rows, best_i, best_s,
                                       block=3, columns=50)
    exact_i, exact_s = best_earlier_match([p.astype(np.float16) for p in parts], exact=True)
    assert best_i[rows].tolist() == exact_i[rows].tolist()
    np.testing.assert_allclose(best_s[rows], exact_s[rows], atol=1e-5)
