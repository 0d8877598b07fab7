"""Approximate nearest neighbours through an IVF index (faiss k-means, BLAS scans).

Exact kNN (:mod:`factory.embed.knn`) costs O(n^2 d): 100k x 384 takes minutes, 1M hours. Above
:data:`EXACT_BELOW` corpus rows :func:`factory.embed.top_k_neighbours` and
:func:`factory.embed.best_earlier_match` search an inverted-file index instead:

- vectors are L2-normalised float32 and compared by inner product (= cosine);
- ``nlist`` ~ 2 sqrt(n) k-means cells (faiss), trained on a fixed-seed sample with a fixed
  k-means seed, so the same input gives the same index and the same neighbours;
- ``nprobe`` (cells visited per query) is calibrated at build time: the fewest cells that
  give a fixed-seed sample of the queries a recall@10 against exact search of
  :data:`TARGET_RECALL` (0.97, a margin over the 0.95 promised).

What is approximate: a true neighbour lying in a cell that is not probed is missed (recall, not
precision: every similarity returned is the exact inner product of the two unit vectors).

Vectors may also come as float16 (e.g. dedup's memory-mapped parts, 2 bytes a dimension): they
are read :data:`READ_ROWS` rows at a time, converted to float32 and renormalised on the fly
(float16 rounding moves a unit norm by up to ~1e-3), never converted whole; see
:func:`float32_rows`.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np

EXACT_BELOW = 20_000  # corpus rows; below this the blocked exact matmul is fast enough
TARGET_RECALL = 0.97  # calibration target for nprobe (the promise is >= 0.95)
CALIBRATION_QUERIES = 512
SEED = 1234
EARLIER_CANDIDATES = 32  # per part, for best_earlier_match through the index
QUERY_CHUNK = 131_072  # queries scanned together: bigger chunks make bigger, faster products
# ... but never more than this many bytes of candidates (queries x nprobe x k scores and ids):
# a deep search (k=100, many cells) of 100k queries in one chunk asked for ~20 GiB.
CANDIDATE_BYTES = 256 << 20
CELLS_PER_SQRT_N = 2  # nlist = 2 sqrt(n)
TRAIN_PER_CELL = 40  # k-means training sample per cell (faiss asks for at least 39)
KMEANS_ITERATIONS = 10
READ_ROWS = 65_536  # rows of a float16 (memory-mapped) input converted to float32 at once


def use_index(corpus_rows: int, exact: bool | None) -> bool:
    """Whether a search over ``corpus_rows`` goes through the index (``exact`` overrides)."""
    if exact is not None:
        return not exact
    return corpus_rows >= EXACT_BELOW


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a zero row stays zero: similar to nothing), C-contiguous float32."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    return np.ascontiguousarray(x * (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)[:, None],
                                dtype=np.float32)


def float32_rows(x: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """``x[rows]`` as C-contiguous float32 unit rows for the index and its comparisons.

    float16 rows (a memory-mapped part) are converted and renormalised, since float16 rounding
    breaks unit norm slightly; rows of any other dtype are taken as the unit rows the caller
    promised (converted to float32 as they always were), so float32 input gives the same
    numbers as before float16 was accepted."""
    picked = x[rows]
    if picked.dtype == np.float16:
        return unit_rows(picked)
    return np.ascontiguousarray(picked, dtype=np.float32)


def _inverse_norms(x: np.ndarray) -> np.ndarray:
    """1 / the length of each row (float32; a zero row's is 1e12: similar to nothing), read
    :data:`READ_ROWS` rows at a time."""
    out = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), READ_ROWS):
        chunk = x[start:start + READ_ROWS]
        norms = np.sqrt(np.einsum("ij,ij->i", chunk, chunk, dtype=np.float64))
        out[start:start + len(chunk)] = 1.0 / np.maximum(norms, 1e-12)
    return out


def release(x: np.ndarray) -> None:
    """Let the kernel drop a memory-mapped array's pages from this process's resident memory
    (they stay in the page cache, so reading them again costs no disk); others are left as
    they are. Safe for shared mappings, read-only or written (writes live in the page cache)."""
    mapping = getattr(x, "_mmap", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class NeighbourIndex:
    """An inverted-file (IVF) inner-product index over unit vectors, nprobe calibrated for recall.

    faiss' k-means (fixed seed, spherical) splits the corpus into ``nlist`` cells; a query is
    compared with the rows of its ``nprobe`` nearest cells. The comparison runs per cell as
    one BLAS matrix product of all the queries probing that cell with its rows (faiss'
    IndexIVFFlat compares one query at a time, 5x slower here on 2 cores), the cell's rows
    stored contiguously. Memory: one reordered float32 copy of the corpus plus, per chunk of
    :data:`QUERY_CHUNK` queries, nprobe x k candidates each. A float16 (memory-mapped) corpus
    is read :data:`READ_ROWS` rows at a time (see :func:`float32_rows`): the float32 copy is
    the only whole one.
    """

    def __init__(self, units: np.ndarray, *, calibration_k: int = 10,
                 queries: np.ndarray | None = None) -> None:
        """Index ``units``; nprobe is calibrated on a sample of ``queries`` (default: of the
        corpus itself), since queries from elsewhere may need more cells for the same recall."""
        import faiss

        if units.dtype != np.float16:
            units = np.ascontiguousarray(units, dtype=np.float32)
        n, dim = units.shape
        # ~39 training points per cell keeps faiss' k-means well posed (and silent).
        self.nlist = max(1, min(int(CELLS_PER_SQRT_N * np.sqrt(n)), n // 39))
        size = min(n, self.nlist * TRAIN_PER_CELL)
        sample = np.sort(np.random.default_rng(SEED).choice(n, size=size, replace=False))
        kmeans = faiss.Kmeans(dim, self.nlist, niter=KMEANS_ITERATIONS, seed=SEED, spherical=True,
                              max_points_per_centroid=TRAIN_PER_CELL, verbose=False)
        kmeans.train(float32_rows(units, sample))
        self._quantizer = faiss.IndexFlatIP(dim)
        self._quantizer.add(kmeans.centroids)
        cell = np.empty(n, dtype=np.int64)
        for start in range(0, n, READ_ROWS):
            stop = min(start + READ_ROWS, n)
            cell[start:stop] = self._quantizer.search(float32_rows(units, slice(start, stop)), 1)[1][:, 0]
        self._members = np.argsort(cell, kind="stable")  # corpus rows, cell by cell
        self._bounds = np.searchsorted(cell[self._members], np.arange(self.nlist + 1))
        self._rows = np.empty((n, dim), dtype=np.float32)
        for start in range(0, n, READ_ROWS):
            members = self._members[start:start + READ_ROWS]
            self._rows[start:start + len(members)] = float32_rows(units, members)
        self.nprobe = self._calibrate(units if queries is None else queries,
                                      min(calibration_k, n), self_rows=queries is None)

    def _calibrate(self, queries: np.ndarray, k: int, self_rows: bool) -> int:
        """The fewest cells to probe for :data:`TARGET_RECALL` on a sample of the queries.

        A true neighbour is found exactly when its cell is among those probed, so the recall
        at every nprobe follows from the rank of each true neighbour's cell among the
        query's nearest centroids: nprobe is the TARGET_RECALL quantile of those ranks.
        """
        from factory.embed.knn import exact_top_k

        rng = np.random.default_rng(SEED + 1)
        rows = np.sort(rng.choice(len(queries), size=min(CALIBRATION_QUERIES, len(queries)),
                                  replace=False))
        sample = float32_rows(queries, rows)
        # Truth in the cell-ordered corpus; a corpus row used as its own query is left out.
        position = np.empty_like(self._members)
        position[self._members] = np.arange(len(self._members))
        truth, _ = exact_top_k(sample, self._rows, k,
                               self_index=position[rows] if self_rows else None)
        _, nearest_cells = self._quantizer.search(sample, self.nlist)
        rank_of_cell = np.empty_like(nearest_cells)
        np.put_along_axis(rank_of_cell, nearest_cells,
                          np.broadcast_to(np.arange(self.nlist), nearest_cells.shape), axis=1)
        found = truth >= 0
        if not found.any():
            return 1
        cells = np.searchsorted(self._bounds, truth[found], side="right") - 1
        ranks = np.sort(rank_of_cell[np.nonzero(found)[0], cells])
        needed = ranks[int(np.ceil(TARGET_RECALL * len(ranks))) - 1] + 1
        return int(min(max(needed, 1), self.nlist))

    def search(self, queries: np.ndarray, k: int,
               nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, indices)`` (n, k), best first; ``-1`` / ``-inf`` where the
        ``nprobe`` cells visited (default: the calibrated number) hold fewer than ``k`` rows."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        nprobe = min(nprobe or self.nprobe, self.nlist)
        sims = np.full((len(queries), k), -np.inf, dtype=np.float32)
        indices = np.full((len(queries), k), -1, dtype=np.int64)
        if k == 0 or len(queries) == 0:
            return sims, indices
        _, probes = self._quantizer.search(queries, nprobe)
        # per query: nprobe x k float32 scores and int64 ids, and their sort's order
        chunk = max(1, min(QUERY_CHUNK, CANDIDATE_BYTES // (nprobe * k * 20)))
        for start in range(0, len(queries), chunk):
            stop = min(start + chunk, len(queries))
            sims[start:stop], indices[start:stop] = self._scan(queries[start:stop],
                                                               probes[start:stop], k)
        return sims, indices

    def _scan(self, queries: np.ndarray, probes: np.ndarray,
              k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query against its probed cells: per cell one matrix product, its top k kept."""
        b, nprobe = probes.shape
        cand_s = np.full((b, nprobe, k), -np.inf, dtype=np.float32)
        cand_i = np.full((b, nprobe, k), -1, dtype=np.int64)
        flat = probes.ravel()
        by_cell = np.argsort(flat, kind="stable")
        edges = np.searchsorted(flat[by_cell], np.arange(self.nlist + 1))
        for cell in np.flatnonzero(np.diff(edges)):
            lo, hi = self._bounds[cell], self._bounds[cell + 1]
            if hi == lo:
                continue
            pairs = by_cell[edges[cell]:edges[cell + 1]]
            query, rank = pairs // nprobe, pairs % nprobe
            tile = queries[query] @ self._rows[lo:hi].T
            take = min(k, hi - lo)
            if hi - lo > take:
                part = np.argpartition(tile, -take, axis=1)[:, -take:]
                tile = np.take_along_axis(tile, part, axis=1)
            else:
                part = np.broadcast_to(np.arange(take), tile.shape)
            cand_s[query, rank, :take] = tile
            cand_i[query, rank, :take] = self._members[lo + part]
        cand_s, cand_i = cand_s.reshape(b, -1), cand_i.reshape(b, -1)
        if cand_s.shape[1] > k:
            pick = np.argpartition(cand_s, -k, axis=1)[:, -k:]
            cand_s = np.take_along_axis(cand_s, pick, axis=1)
            cand_i = np.take_along_axis(cand_i, pick, axis=1)
        order = np.argsort(-cand_s, axis=1, kind="stable")
        return np.take_along_axis(cand_s, order, axis=1), np.take_along_axis(cand_i, order, axis=1)


def _drop_self(idx: np.ndarray, sims: np.ndarray, self_index: np.ndarray,
               width: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's results without its own corpus row, cut to ``width`` (order kept)."""
    own = idx == self_index[:, None]
    # Rows whose own entry was not returned (crowded out by duplicates) lose their last entry.
    own[:, -1] |= ~own.any(axis=1)
    keep = np.argsort(own, axis=1, kind="stable")[:, :width]
    return np.take_along_axis(idx, keep, axis=1), np.take_along_axis(sims, keep, axis=1)


def approximate_top_k(q: np.ndarray, c: np.ndarray, k: int, *, self_mode: bool, exclude_self: bool,
                      min_similarity: float | None,
                      max_similarity: float | None,
                      index: NeighbourIndex | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`factory.embed.top_k_neighbours` through the index (inputs are unit rows); a
    prebuilt ``index`` of ``c`` is reused (built here when None).

    A similarity band is applied to the index's candidates; a row with fewer than ``k`` in the
    band whose candidates did not yet fall below the band's floor is searched again twice as
    deep in twice as many cells, and once the depth reaches 16 (k + 1) it is answered by exact
    search over the whole corpus (rows whose band is far from them cost an exact search).
    """
    from factory.embed.knn import exact_top_k

    n, m = len(q), len(c)
    keep = min(k, m)
    if index is None:
        index = NeighbourIndex(c, calibration_k=max(keep, 10), queries=None if self_mode else q)
    indices = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), np.nan, dtype=np.float32)
    drop_self = self_mode and exclude_self
    self_index = np.arange(n) if drop_self else None
    lo = -np.inf if min_similarity is None else np.float32(min_similarity)
    hi = np.inf if max_similarity is None else np.float32(max_similarity)
    pending = np.arange(n)
    depth, nprobe = keep + int(drop_self), index.nprobe
    while len(pending):
        if depth >= 16 * (keep + 1) or depth >= m:
            exact_i, exact_s = exact_top_k(
                q[pending], c, k, self_index=None if self_index is None else self_index[pending],
                min_similarity=min_similarity, max_similarity=max_similarity)
            indices[pending], sims[pending] = exact_i, exact_s
            break
        found_s, found_i = index.search(q[pending], depth, nprobe)
        cells_left = nprobe < index.nlist
        if drop_self:
            found_i, found_s = _drop_self(found_i, found_s, pending, depth - 1)
        in_band = (found_i >= 0) & (found_s >= lo) & (found_s <= hi)
        # Stable: in-band candidates first, best first, as the index returned them.
        order = np.argsort(~in_band, axis=1, kind="stable")[:, :keep]
        got_i = np.take_along_axis(np.where(in_band, found_i, -1), order, axis=1)
        got_s = np.take_along_axis(np.where(in_band, found_s, np.nan), order, axis=1)
        short = in_band.sum(axis=1) < keep
        # A short row can gain from a deeper search unless its candidates already fell below
        # the band (they come best first) or every cell was visited and nothing is left.
        valid = found_i >= 0
        lowest = np.where(valid, found_s, np.inf).min(axis=1)
        fell_below = valid.any(axis=1) & (lowest < lo)
        exhausted = ~valid[:, -1] & (not cells_left)
        deeper = short & ~fell_below & ~exhausted
        done = ~deeper
        indices[pending[done], :keep] = got_i[done]
        sims[pending[done], :keep] = got_s[done].astype(np.float32)
        pending = pending[deeper]
        depth, nprobe = 2 * depth, 2 * nprobe
    return indices, sims


def approximate_best_earlier(parts: Sequence[np.ndarray],
                             candidates: int = EARLIER_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """:func:`factory.embed.best_earlier_match` through one index per part.

    ``parts`` are float32 unit rows or float16 rows (memory maps welcome), read through
    :func:`float32_rows`. Candidates for row i are its ``candidates`` nearest rows in each part
    (from the index); the lowest part cosine is computed exactly for those that come before i,
    and the best (the first on ties) wins. Approximation: the true best earlier row j is
    missed only if, in every part, ``candidates`` rows are nearer to i than j is (or the index
    misses it), and j is alike in every part, so it ranks high in each; a row with no earlier
    candidate at all is compared exactly with every earlier row.

    One part at a time: its index is built, searched :data:`QUERY_CHUNK` rows at a time and
    freed before the next part's; then each part's cosines with every row's candidates are
    computed in blocks and the running minimum kept. Memory, n rows of dimension d, P parts
    of C = candidates + 1 each: the candidates (int32) and their running minimum (float32),
    8 P C bytes a row (3 parts: 792 B); one index (a float32 copy of one part, 4 d bytes a row,
    1.5 KiB at 384 dims); for float16 parts no other whole copy, and each part's mapped
    pages are let go (:func:`release`) once it is done.
    """
    n = len(parts[0])
    if n >= np.iinfo(np.int32).max:
        raise ValueError(f"{n} rows: candidates are stored as int32")
    width = min(candidates + 1, n)
    cand = np.empty((n, len(parts) * width), dtype=np.int32)
    for number, part in enumerate(parts):
        index = NeighbourIndex(part)
        for start in range(0, n, QUERY_CHUNK):
            stop = min(start + QUERY_CHUNK, n)
            _, found = index.search(float32_rows(part, slice(start, stop)), width)
            cand[start:stop, number * width:(number + 1) * width] = found
        del index, found
        release(part)
    sim = np.full(cand.shape, np.inf, dtype=np.float32)
    block = 512
    for part in parts:  # one part's pages at a time
        # float16 rows are compared as read and the dot products scaled by both rows' inverse
        # norms: the cosine of the renormalised rows, without renormalising every gathered row
        inverse = _inverse_norms(part) if part.dtype == np.float16 else None
        for start in range(0, n, block):
            stop = min(start + block, n)
            c = cand[start:stop]
            valid = (c >= 0) & (c < np.arange(start, stop)[:, None])
            safe = np.where(valid, c, 0)
            others = np.asarray(part[safe.ravel()], dtype=np.float32).reshape(*c.shape, -1)
            dots = np.einsum("rd,rcd->rc", np.asarray(part[start:stop], dtype=np.float32), others)
            if inverse is not None:
                dots *= inverse[start:stop, None] * inverse[safe]
            np.minimum(sim[start:stop], dots, out=sim[start:stop])
        release(part)
    best_i = np.full(n, -1, dtype=np.int64)
    best_s = np.full(n, np.nan, dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        rows = np.arange(start, stop)
        c, s = cand[start:stop], sim[start:stop]
        valid = (c >= 0) & (c < rows[:, None])
        s[~valid] = -np.inf
        top = s.max(axis=1)
        first = np.where(valid & (s == top[:, None]), c, n).min(axis=1)
        has = valid.any(axis=1)
        best_i[rows[has]] = first[has]
        best_s[rows[has]] = top[has]
    del cand, sim
    _best_earlier_exactly(parts, np.flatnonzero((best_i < 0) & (np.arange(n) > 0)), best_i, best_s)
    return best_i, best_s


def _best_earlier_exactly(parts: Sequence[np.ndarray], rows: np.ndarray, best_i: np.ndarray,
                          best_s: np.ndarray, block: int = 512, columns: int = 4096) -> None:
    """Fill in ``best_i`` / ``best_s`` of the ascending ``rows`` by comparing each with every
    earlier row: ``block`` rows against ``columns`` earlier rows at a time, in every part."""
    for start in range(0, len(rows), block):
        group = rows[start:start + block]
        queries = [float32_rows(part, group) for part in parts]
        top_s = np.full(len(group), -np.inf, dtype=np.float32)
        top_i = np.full(len(group), -1, dtype=np.int64)
        for cs in range(0, int(group[-1]), columns):
            ce = min(cs + columns, int(group[-1]))
            tile = queries[0] @ float32_rows(parts[0], slice(cs, ce)).T
            for q, part in zip(queries[1:], parts[1:], strict=True):
                np.minimum(tile, q @ float32_rows(part, slice(cs, ce)).T, out=tile)
            tile[np.arange(cs, ce)[None, :] >= group[:, None]] = -np.inf  # the row itself and later
            pick = np.argmax(tile, axis=1)  # the first column on ties
            found = tile[np.arange(len(group)), pick]
            better = found > top_s  # strictly: an earlier tile keeps its tie
            top_s[better], top_i[better] = found[better], pick[better] + cs
        best_i[group], best_s[group] = top_i, top_s
