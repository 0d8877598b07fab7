"""Exact cosine k-nearest neighbours, computed in tiles so memory stays flat.

A query block of ``block_rows`` rows meets the corpus ``block_rows // 2`` columns at a
time and only a running top-k per row is kept: the largest temporaries are one tile of
similarities (32 MiB at the default 4096) and its argpartition indices (64 MiB), whatever
the corpus size. An n-by-n matrix for 100,000 texts would take 40 GB.

:func:`best_earlier_match` answers "which earlier row is most like this one in every part"
(dedup's near duplicates) over all earlier rows, in tiles of the lower triangle.

Both search exactly below :data:`factory.embed.index.EXACT_BELOW` corpus rows and through
a faiss IVF index above (``exact=`` overrides): every kNN user of the factory (dedup,
hard_negatives, the noise filter, the trainer's robustness probe) goes through here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from factory.embed.index import use_index

# Out-of-band similarities are pushed below every cosine (into [-9, -7]) rather than set to
# -inf: argpartition over a row of mostly equal values is ten times slower.
_SHIFT = np.float32(8.0)
_FLOOR = np.float32(-2.0)  # anything below is disqualified


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    # A zero vector is similar to nothing (cosine 0), not NaN.
    return (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)


def _matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} hold NaN or infinite values")
    return x


def top_k_neighbours(
    queries: np.ndarray,
    corpus: np.ndarray | None = None,
    k: int = 10,
    *,
    exclude_self: bool = True,
    block_rows: int = 4096,
    min_similarity: float | None = None,
    max_similarity: float | None = None,
    exact: bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most cosine-similar corpus rows of each query row.

    Returns ``(indices, similarities)``, both (n_queries, k): int64 corpus row numbers and
    float32 cosines, best first (equal similarities in any order). Where fewer than ``k``
    rows qualify the rest is ``-1`` / NaN. With ``corpus=None`` the queries are their own
    corpus and ``exclude_self`` skips each row itself (not its duplicates: an identical
    text elsewhere is a neighbour at 1.0). A separate corpus is never assumed to share
    rows with the queries. Only similarities in ``[min_similarity, max_similarity]``
    qualify, e.g. a band of look-alikes that are not near-duplicates. Inputs need not be
    normalised.

    ``exact=None`` searches exactly below :data:`factory.embed.index.EXACT_BELOW` corpus rows
    and through an approximate IVF index (recall@10 >= 0.95, see :mod:`factory.embed.index`)
    from there on; ``True`` / ``False`` force one way. Both give the same results for the
    same input, every time.
    """
    q = _matrix(queries, "queries")
    self_mode = corpus is None
    c = q if self_mode else _matrix(corpus, "corpus")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]}, corpus {c.shape[1]}")
    if k < 0 or block_rows < 1:
        raise ValueError("k must be >= 0 and block_rows >= 1")
    if min(k, len(c)) > 0 and len(q) > 0 and use_index(len(c), exact):
        from factory.embed.index import approximate_top_k, unit_rows

        units = unit_rows(q)
        return approximate_top_k(units, units if self_mode else unit_rows(c), k,
                                 self_mode=self_mode, exclude_self=exclude_self,
                                 min_similarity=min_similarity, max_similarity=max_similarity)
    self_index = np.arange(len(q)) if self_mode and exclude_self else None
    return exact_top_k(q, c, k, self_index=self_index, block_rows=block_rows,
                       min_similarity=min_similarity, max_similarity=max_similarity)


def exact_top_k(
    q: np.ndarray,
    c: np.ndarray,
    k: int,
    *,
    self_index: np.ndarray | None = None,
    block_rows: int = 4096,
    min_similarity: float | None = None,
    max_similarity: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact :func:`top_k_neighbours` of float32 ``q`` in ``c``, in tiles; ``self_index[i]``
    (if given) is the corpus row that query ``i`` must not be matched with."""
    n, m = len(q), len(c)
    indices = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), np.nan, dtype=np.float32)
    keep = min(k, m)
    if keep == 0 or n == 0:
        return indices, sims
    q_inv = _inverse_norms(q)
    c_inv = q_inv if c is q else _inverse_norms(c)
    columns = max(1, block_rows // 2)
    for qs in range(0, n, block_rows):
        qe = min(qs + block_rows, n)
        qb = q[qs:qe] * q_inv[qs:qe, None]
        own_col = None if self_index is None else self_index[qs:qe]
        best_s = np.full((qe - qs, keep), -np.inf, dtype=np.float32)
        best_i = np.full((qe - qs, keep), -1, dtype=np.int64)
        for cs in range(0, m, columns):
            ce = min(cs + columns, m)
            tile = qb @ (c[cs:ce] * c_inv[cs:ce, None]).T
            # Disqualified entries sort last and are dropped below.
            if min_similarity is not None or max_similarity is not None:
                out_of_band = np.zeros(tile.shape, dtype=bool)
                if min_similarity is not None:
                    out_of_band |= tile < min_similarity
                if max_similarity is not None:
                    out_of_band |= tile > max_similarity
                np.subtract(tile, _SHIFT, out=tile, where=out_of_band)
            if own_col is not None:
                hit = np.flatnonzero((own_col >= cs) & (own_col < ce))
                tile[hit, own_col[hit] - cs] = -np.inf
            take = min(keep, ce - cs)
            if ce - cs > take:
                part = np.argpartition(tile, -take, axis=1)[:, -take:]
                tile_s = np.take_along_axis(tile, part, axis=1)
            else:
                part, tile_s = np.broadcast_to(np.arange(ce - cs), tile.shape), tile
            both_s = np.concatenate([best_s, tile_s], axis=1)
            both_i = np.concatenate([best_i, part + cs], axis=1)
            pick = np.argpartition(both_s, -keep, axis=1)[:, -keep:]
            best_s = np.take_along_axis(both_s, pick, axis=1)
            best_i = np.take_along_axis(both_i, pick, axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        best_s = np.take_along_axis(best_s, order, axis=1)
        best_i = np.take_along_axis(best_i, order, axis=1)
        found = best_s > _FLOOR
        indices[qs:qe, :keep] = np.where(found, best_i, -1)
        sims[qs:qe, :keep] = np.where(found, best_s, np.nan)
    return indices, sims


def best_earlier_match(
    parts: Sequence[np.ndarray], *, block_rows: int = 2048, exact: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """For each row, the earlier row most similar in *every* part, exactly.

    ``parts`` are P arrays (n, dim_p) describing the same n rows (e.g. a pair's prompt and
    its two answers). Two rows' similarity is the lowest of their P part cosines, so rows
    that share one part but differ in another are not alike. Returns ``(indices,
    similarities)``, each (n,): for row i the earlier row j < i with the highest
    similarity (the first such j on ties) and that similarity; ``-1`` / NaN for row 0.

    Every earlier row is compared (no candidate window that a crowd of look-alikes could
    fill), in ``block_rows`` x ``block_rows`` tiles of the lower triangle, so memory stays
    at a few tiles whatever n. From :data:`factory.embed.index.EXACT_BELOW` rows on (or with
    ``exact=False``) the comparison is O(n^2) no more: candidates come from an IVF index per
    part and only they are compared exactly (see
    :func:`factory.embed.index.approximate_best_earlier` for what may be missed).

    Parts of any float dtype are normalised here (they need not be unit rows). float16
    parts, e.g. memory maps (``np.load(..., mmap_mode="r")``), are never copied whole: the
    index path reads them a chunk at a time, in float32, renormalised (see
    :func:`factory.embed.index.float32_rows`), so its memory is that of one part's index and
    the candidates, not of the vectors. The exact path converts every part to float32 unit
    rows as it does any input (P x n x dim x 4 bytes: it runs below EXACT_BELOW rows unless
    forced). Either way float16 parts give the float32 answer for the rounded vectors, which
    differs from the unrounded ones' by ~1e-3 in similarity; other dtypes give the same
    answer as before float16 was accepted (normalised float32 copies of all parts).
    """
    if not parts:
        raise ValueError("best_earlier_match needs at least one part")
    parts = [part if isinstance(part, np.ndarray) else np.asarray(part) for part in parts]
    for number, part in enumerate(parts):
        if np.ndim(part) != 2:
            raise ValueError(f"part {number} must be a 2-D array (n, dim), got shape {np.shape(part)}")
    n = len(parts[0])
    if any(len(p) != n for p in parts):
        raise ValueError(f"parts have different row counts: {[len(p) for p in parts]}")
    if block_rows < 1:
        raise ValueError("block_rows must be >= 1")
    if n > 1 and use_index(n, exact):
        from factory.embed.index import READ_ROWS, approximate_best_earlier, release

        ready = []
        for number, part in enumerate(parts):
            if part.dtype == np.float16:  # read in chunks, renormalised on the fly
                for start in range(0, n, READ_ROWS):
                    _matrix(part[start:start + READ_ROWS], f"part {number}")
                release(part)
                ready.append(part)
            else:
                x = _matrix(part, f"part {number}")
                ready.append(np.ascontiguousarray(x * _inverse_norms(x)[:, None]))
        return approximate_best_earlier(ready)
    units = []
    for number, part in enumerate(parts):
        x = _matrix(part, f"part {number}")
        units.append(x * _inverse_norms(x)[:, None])
    best_i = np.full(n, -1, dtype=np.int64)
    best_s = np.full(n, -np.inf, dtype=np.float32)
    for qs in range(0, n, block_rows):
        qe = min(qs + block_rows, n)
        rows = np.arange(qs, qe)
        for cs in range(0, qe, block_rows):  # only columns left of the block's last row
            ce = min(cs + block_rows, qe)
            tile = units[0][qs:qe] @ units[0][cs:ce].T
            for unit in units[1:]:
                np.minimum(tile, unit[qs:qe] @ unit[cs:ce].T, out=tile)
            if ce > qs:  # the diagonal tile: mask the row itself and later rows
                tile[np.arange(cs, ce)[None, :] >= rows[:, None]] = -np.inf
            pick = np.argmax(tile, axis=1)  # the first column on ties
            found = tile[np.arange(qe - qs), pick]
            better = found > best_s[qs:qe]  # strictly: an earlier tile keeps its tie
            best_s[qs:qe][better] = found[better]
            best_i[qs:qe][better] = pick[better] + cs
    sims = np.where(best_i >= 0, best_s, np.nan).astype(np.float32)
    return best_i, sims
