"""Neighbours benchmark: exact blocked kNN (before issue 19) against the faiss IVF index.

Data: clustered unit vectors in 384 dimensions, like MiniLM embeddings of texts on many
topics: 1,000 topic centres of uneven size and spread in a 48-dimensional latent space mapped
into 384 dimensions plus a little isotropic noise (text embeddings have a low intrinsic
dimension; isotropic 384-d noise would make every in-topic point equidistant), fixed seed. For each n, every row's k=10 nearest other rows (``top_k_neighbours`` on the
rows themselves, self excluded) are searched:

- exact: ``top_k_neighbours(..., exact=True)``, the blocked matmul. At sizes where that takes
  too long on 2 cores (``--exact-sample``), it runs on a fixed sample of query rows against
  the whole corpus and the full time is projected linearly (exact cost is linear in the
  number of queries), marked "projected";
- index: ``NeighbourIndex`` build (k-means training, adding, nprobe calibration) and the
  search of all n rows; recall@10 against the exact neighbours of the sampled rows.

Then dedup's ``best_earlier_match`` over 3 correlated parts with 1% planted near duplicates
at the largest n through the index: planted duplicates found, and agreement with the exact
answer (decision at dedup's 0.85 and the match itself) on sampled rows.

    python benchmarks/neighbours.py                  # n = 10k and 100k
    python benchmarks/neighbours.py --sizes 10000    # one size
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from factory.embed import best_earlier_match, top_k_neighbours
from factory.embed.index import NeighbourIndex, approximate_top_k, unit_rows
from factory.embed.knn import exact_top_k

DIM = 384
K = 10


def clustered(n: int, seed: int = 0, topics: int = 1000, latent: int = 48) -> np.ndarray:
    """Unit vectors of low intrinsic dimension, as text embeddings are: points around uneven
    topic centres (Zipf-like sizes, spreads 0.3-1.0) in a ``latent``-dimensional space, mapped
    into 384 dimensions, plus a little isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(topics, latent)).astype(np.float32)
    weights = 1.0 / np.arange(1, topics + 1) ** 0.8
    topic = rng.choice(topics, size=n, p=weights / weights.sum())
    spread = rng.uniform(0.3, 1.0, size=topics).astype(np.float32)
    z = centres[topic] + spread[topic, None] * rng.normal(size=(n, latent)).astype(np.float32)
    mapping = rng.normal(size=(latent, DIM)).astype(np.float32) / np.sqrt(latent)
    x = z @ mapping + 0.1 * rng.normal(size=(n, DIM)).astype(np.float32)
    return unit_rows(x)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True))
    return hits / max(1, int((truth >= 0).sum()))


def exact_neighbours(x: np.ndarray, sample: int) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Exact top-k of ``rows`` (all, or a fixed sample) and the (projected) time for all n."""
    n = len(x)
    if sample >= n:
        start = time.perf_counter()
        idx, _ = top_k_neighbours(x, k=K, exact=True)
        return np.arange(n), idx, time.perf_counter() - start, False
    rows = np.sort(np.random.default_rng(7).choice(n, size=sample, replace=False))
    start = time.perf_counter()
    idx, _ = exact_top_k(x[rows], x, K, self_index=rows)
    return rows, idx, (time.perf_counter() - start) * n / sample, True


def index_neighbours(x: np.ndarray) -> tuple[np.ndarray, float, float, NeighbourIndex]:
    start = time.perf_counter()
    index = NeighbourIndex(x)
    build = time.perf_counter() - start
    start = time.perf_counter()
    idx, _ = approximate_top_k(x, x, K, self_mode=True, exclude_self=True, min_similarity=None,
                               max_similarity=None, index=index)
    return idx, build, time.perf_counter() - start, index


def dedup_row(n: int, sample: int, threshold: float = 0.85) -> str:
    """best_earlier_match over 3 parts of a pair (prompt, chosen, rejected: same topic, so
    correlated) with 1% planted near duplicates of earlier pairs, through the index."""
    rng = np.random.default_rng(9)
    base = clustered(n, seed=11)
    parts = [unit_rows(base + 0.5 * rng.normal(size=base.shape).astype(np.float32) / np.sqrt(DIM))
             for _ in range(3)]
    planted = np.sort(rng.choice(np.arange(n // 2, n), size=n // 100, replace=False))
    source = rng.integers(0, n // 2, size=len(planted))
    for p in parts:
        p[planted] = unit_rows(p[source] + 0.02 * rng.normal(size=(len(planted), DIM))
                               .astype(np.float32) / np.sqrt(DIM))
    start = time.perf_counter()
    approx_i, approx_s = best_earlier_match(parts, exact=False)
    seconds = time.perf_counter() - start
    rows = np.sort(rng.choice(np.arange(1, n), size=min(sample, n - 1), replace=False))
    same = decided_alike = 0
    for row in rows:  # the exact best earlier match of the sampled rows
        sim = np.min([p[:row] @ p[row] for p in parts], axis=0)
        same += int(np.argmax(sim) == approx_i[row])
        decided_alike += int((sim.max() >= threshold) == (approx_s[row] >= threshold))
    found = int((approx_s[planted] >= threshold).sum())
    return (f"best_earlier_match (dedup), 3 parts, n={n:,}, index: {seconds:.1f} s "
            f"(exact: O(n^2), as the 'exact' column). Planted near duplicates found at "
            f">= {threshold}: {found}/{len(planted)}; on {len(rows)} sampled rows the near-duplicate "
            f"decision agrees with exact on {decided_alike}, the very same best match on {same} "
            f"(rows without a near duplicate may get a lesser earlier match)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--exact-sample", type=int, default=10_000,
                        help="above this many rows exact search is timed on this many queries "
                             "and projected (default 10000)")
    parser.add_argument("--no-dedup", action="store_true", help="skip the best_earlier_match row")
    args = parser.parse_args()
    header = (f"| n | exact s | index build s | index query s | index total s | speedup "
              f"| recall@{K} | nlist / nprobe |")
    lines = [header, "|" + "---|" * 8]
    for n in args.sizes:
        x = clustered(n)
        rows, truth, exact_s, projected = exact_neighbours(x, args.exact_sample)
        found, build_s, query_s, index = index_neighbours(x)
        total = build_s + query_s
        lines.append(f"| {n:,} | {exact_s:.1f}{' (projected)' if projected else ''} | {build_s:.1f} "
                     f"| {query_s:.1f} | {total:.1f} | {exact_s / total:.1f}x "
                     f"| {recall(found[rows], truth):.3f} | {index.nlist} / {index.nprobe} |")
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))
    if not args.no_dedup:
        print()
        print(dedup_row(max(args.sizes), 300))


if __name__ == "__main__":
    main()
