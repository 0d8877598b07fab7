"""Why a reward model on frozen embeddings does not learn neutral invariances on unseen answers.

    python benchmarks/tie_geometry.py [--suite hh|shared] [--pool-pairs 1000] [--home H]

For every style transform of the ``neutral`` generator (the augmentation benchmark's
``STYLE_TRANSFORMS``), rewrites the pool's chosen answers and measures how each rewrite moves
the answer's MiniLM embedding:

- |d|: mean length of the move (next to the mean distance between two unrelated answers);
- coherence: length of the mean unit move (1: every answer moves the same way, so one
  direction can be ignored; near 0: each answer moves its own way);
- explained: share of held-out answers' moves (second half) inside the top-k principal
  directions of the first half's moves -- what a head that learnt to ignore those
  directions on training answers would ignore on new ones.

Prints one table. Reads ../shared/data in place; embeddings are cached under the home.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import augment  # noqa: E402

from factory.embed import embed_texts  # noqa: E402
from factory.home import resolve_home  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["hh", "shared"], default="hh")
    parser.add_argument("--pool-pairs", type=int, default=1000)
    parser.add_argument("--home", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    home = resolve_home(args.home)
    if args.suite == "hh":
        pool = augment.read("hh-rlhf-harmless-base-test.jsonl.gz", task="harmless")
    else:
        pool = augment.concat([augment.read("pandalm-testset-v1.json"), augment.read("llmbar/processed-faireval.json"),
                               augment.read("llmbar/processed-llmeval22.json")])
    pool = augment.sample(pool, args.pool_pairs, args.seed)
    rewrites = augment.generate("neutral", pool, {"transforms": augment.STYLE_TRANSFORMS, "max_per_seed": 0},
                                args.seed, home)
    methods = np.array([m.split(":", 1)[0] for m in
                        rewrites.column("provenance").combine_chunks().field("method").to_pylist()])
    before = embed_texts(rewrites.column("chosen").to_pylist(), home=home, progress=False)
    after = embed_texts(rewrites.column("rejected").to_pylist(), home=home, progress=False)
    moves = after - before
    lengths = np.linalg.norm(moves, axis=1)
    unrelated = np.linalg.norm(before[np.random.default_rng(args.seed).permutation(len(before))] - before, axis=1)
    print(f"{args.suite}: {len(rewrites):,} rewrites of {pool.num_rows:,} pairs' chosen answers; "
          f"two unrelated answers are {unrelated.mean():.2f} apart\n")
    print("| transform | rewrites | mean move | coherence | explained k=1 | k=8 | k=32 |")
    print("|---|---|---|---|---|---|---|")
    for transform in sorted(set(methods)):
        rows = np.flatnonzero(methods == transform)
        if len(rows) < 20:
            continue
        move, length = moves[rows], lengths[rows]
        moved = length > 1e-3  # float noise, not a move
        coherence = np.linalg.norm((move[moved] / length[moved, None]).mean(axis=0)) if moved.any() else 0.0
        first, second = move[: len(move) // 2], move[len(move) // 2:]
        _, _, directions = np.linalg.svd(first, full_matrices=False)
        total = max(float((second ** 2).sum()), 1e-12)
        explained = [float(((second @ directions[:k].T) ** 2).sum()) / total for k in (1, 8, 32)]
        print(f"| {transform} | {len(rows):,} | {length.mean():.3f} | {coherence:.2f} | "
              + " | ".join(f"{e:.2f}" for e in explained) + " |")


if __name__ == "__main__":
    main()
