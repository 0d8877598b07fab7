"""Embedders benchmark: the bundled MiniLM on torch, the same model through ONNX Runtime, and
the static embedder distilled from it (model2vec), on the same texts, for each use.

Texts: the turns of ../shared/data's HH-RLHF harmless test transcripts (every human and
assistant turn of ``chosen``, the last assistant turn of ``rejected``), distinct, shuffled
with a fixed seed; without ../shared/data, the prompts and answers of
examples/seeds/demo_pairs.jsonl. The first ``--texts`` form the corpus, the next
``--planted`` texts are held out.

Per embedder (``factory.embed.embed_texts(..., embedder=NAME)``), all on the same texts:

- texts/s embedding the corpus, each embedder into a fresh temporary home (nothing cached;
  the encoders are loaded, the ONNX graph exported and the static model distilled before
  timing: those one-off costs are printed apart). The corpus is timed in chunks of
  ``--chunk`` texts, the embedders taking turns on each chunk, so a busy shared machine
  slows all of them alike; MiniLM on torch is today's path (length-sorted batches of 64).
- cos: mean cosine of each text's vector with MiniLM torch's (same dimensions only);
- overlap@10: mean share of each corpus text's 10 nearest neighbours (exact search) that
  MiniLM torch's 10 nearest also are;
- dedup on planted near duplicates: ``--planted`` corpus texts of 8+ words get a small
  edit (one word dropped and two neighbouring words swapped) and are searched against the
  corpus, beside as many held-out texts that have no planted twin. A query is called a
  duplicate when its nearest corpus text is at cosine >= t; a call is right only if that
  text is the edited one's source. Precision and recall at the t of best F1 per embedder,
  and at dedup's shipped ``near_threshold`` (0.85);
- noise AUROC: the noise filter (``filters.noise``, ``embedder=NAME``: the response-alone
  view, which the reward heads and the neighbourhood-agreement signal read beside the
  prompt+response features) on ``--noise-pairs`` HH-RLHF pairs with 20% of labels flipped
  (``benchmarks/noise.py``'s injection and AUROC), small settings (3 folds, 1 seed, 2
  synthetic copies): the combined suspicion's detection AUROC, and the k=10 neighbour
  signal's alone.

Measured (2 cores under a load average of ~15 from other jobs, so absolute rates are low;
the turn-taking keeps the ratios fair), ``--texts 1500 --planted 100 --noise-pairs 400``:
MiniLM torch 25 texts/s, ONNX 30 (1.2x, cosine 1.000, identical neighbours, dedup and noise
figures), static 5,804 (236x; overlap@10 0.160, dedup P/R 0.98/0.98 at its best t=0.941
but P 0.769 at the shipped 0.85, noise AUROC 0.647 vs 0.638, knn signal 0.583 vs 0.595).
So every default stays ``minilm``: dedup's and hard_negatives' thresholds are MiniLM
cosines (static needs ``near_threshold`` ~0.94), and ONNX's gain did not pay for a new core
dependency; ``--set embedder=static --set near_threshold=0.94`` is the fast dedup at scale.

    python benchmarks/embedders.py                  # 5,000 texts, 200 planted, 600 noise pairs
    python benchmarks/embedders.py --texts 20000 --noise-pairs 0   # no noise column
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from factory.embed import EMBEDDERS, embed_texts, top_k_neighbours

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
DEMO = REPO / "examples" / "seeds" / "demo_pairs.jsonl"
TURN = re.compile(r"\n\n(?:Human|Assistant): ")
K = 10
SHIPPED_THRESHOLD = 0.85  # filters.dedup.NEAR_DUPLICATE_THRESHOLD
NAMES = {"minilm": "MiniLM torch (length-sorted)", "minilm-onnx": "MiniLM ONNX Runtime",
         "static": "static (model2vec)"}


def hh_texts(path: Path) -> list[str]:
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            texts.extend(TURN.split(row["chosen"])[1:])
            texts.append(TURN.split(row["rejected"])[-1])
    return texts


def demo_texts(path: Path) -> list[str]:
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        texts.extend(m["content"] for m in row["prompt"])
        texts.extend([row["chosen"], row["rejected"]])
    return texts


def load_texts(seed: int) -> tuple[list[str], str]:
    raw, source = (hh_texts(HH), HH.name) if HH.is_file() else (demo_texts(DEMO), DEMO.name)
    distinct = sorted({t.strip() for t in raw if len(t.strip()) >= 3})
    order = np.random.default_rng(seed).permutation(len(distinct))
    return [distinct[i] for i in order], source


def small_edit(text: str, rng: np.random.Generator) -> str:
    """Drop one word and swap two neighbouring words: a near duplicate dedup should catch."""
    words = text.split()
    del words[int(rng.integers(len(words)))]
    i = int(rng.integers(len(words) - 1))
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def planted_queries(corpus: list[str], held_out: list[str], n: int,
                    rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
    """``n`` edited corpus texts (their source row) and ``n`` held-out texts (source -1)."""
    eligible = [i for i, t in enumerate(corpus) if 8 <= len(t.split()) <= 300]
    sources = rng.choice(eligible, size=min(n, len(eligible)), replace=False)
    edits = [small_edit(corpus[i], rng) for i in sources]
    negatives = held_out[: len(edits)]
    truth = np.concatenate([sources, np.full(len(negatives), -1)])
    return edits + negatives, truth


def best_f1(best: np.ndarray, score: np.ndarray, truth: np.ndarray) -> tuple[float, float, float]:
    """(threshold, precision, recall) at the cosine threshold of best F1."""
    positives = int((truth >= 0).sum())
    best_row = (0.0, 0.0, 0.0, -1.0)
    for t in np.unique(score):
        called = score >= t
        right = int((called & (best == truth)).sum())
        precision = right / max(1, int(called.sum()))
        recall = right / max(1, positives)
        f1 = 2 * precision * recall / max(1e-12, precision + recall)
        if f1 > best_row[3]:
            best_row = (float(t), precision, recall, f1)
    return best_row[:3]


def at_threshold(best: np.ndarray, score: np.ndarray, truth: np.ndarray,
                 threshold: float) -> tuple[float, float]:
    """(precision, recall) calling a duplicate at cosine >= ``threshold``."""
    called = score >= threshold
    right = int((called & (best == truth)).sum())
    return right / max(1, int(called.sum())), right / max(1, int((truth >= 0).sum()))


def interleaved_seconds(embedders: dict[str, Callable[[list[str]], np.ndarray]], corpus: list[str],
                        chunk: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each embedder's vectors of ``corpus`` and its total seconds, the embedders taking turns
    chunk by chunk (the first to go rotates), so machine load falls on all of them alike."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in embedders}
    seconds = dict.fromkeys(embedders, 0.0)
    names = list(embedders)
    for number, start in enumerate(range(0, len(corpus), chunk)):
        texts = corpus[start : start + chunk]
        for name in names[number % len(names):] + names[: number % len(names)]:
            began = time.perf_counter()
            parts[name].append(embedders[name](texts))
            seconds[name] += time.perf_counter() - began
    return {name: np.concatenate(p) for name, p in parts.items()}, seconds


def noise_auroc(embedder: str, pairs: int, home: Path, seed: int) -> tuple[float, float, float]:
    """(suspicion AUROC, k=10 neighbour-signal AUROC, seconds) of the noise filter with
    ``embedder`` on ``pairs`` HH-RLHF pairs with 20% of labels flipped."""
    import pyarrow as pa

    from benchmarks.noise import inject, read_set, run_filter
    from filters._noise_signals import auroc

    table = read_set("hh")
    rows = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=min(pairs, table.num_rows),
                                                      replace=False))
    noisy, flips = inject(table.take(pa.array(rows)), 0.2, seed)
    scores, _, seconds = run_filter(noisy, home, embedder=embedder, folds=3, seeds=1,
                                    synthetic_copies=2)
    return (auroc(scores.column("suspicion").to_numpy(), flips),
            auroc(-scores.column("knn_agreement").to_numpy(), flips), seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=5000, help="corpus size")
    parser.add_argument("--planted", type=int, default=200, help="near duplicates planted")
    parser.add_argument("--chunk", type=int, default=500, help="texts per timing turn")
    parser.add_argument("--noise-pairs", type=int, default=600,
                        help="HH-RLHF pairs for the noise AUROC column (0: skip it)")
    parser.add_argument("--embedders", default=",".join(EMBEDDERS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    chosen = args.embedders.split(",")
    if chosen[0] != "minilm":
        parser.error("--embedders must start with minilm (the reference of cos and overlap@10)")

    texts, source = load_texts(args.seed)
    corpus, held_out = texts[: args.texts], texts[args.texts:]
    queries, truth = planted_queries(corpus, held_out, args.planted,
                                     np.random.default_rng(args.seed + 1))
    print(f"{len(corpus)} corpus texts from {source} "
          f"(mean {np.mean([len(t.split()) for t in corpus]):.0f} words), "
          f"{int((truth >= 0).sum())} planted near duplicates + {int((truth < 0).sum())} "
          "held-out texts as dedup queries", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        homes = {name: Path(tmp) / name for name in chosen}
        setup = {}
        for name in chosen:  # load, export or distil: once per home, not timed below
            began = time.perf_counter()
            embed_texts(["warm up"], home=homes[name], embedder=name, progress=False)
            setup[name] = time.perf_counter() - began

        def embed(name: str, xs: list[str]) -> np.ndarray:
            return embed_texts(xs, home=homes[name], embedder=name, progress=False)

        vectors, seconds = interleaved_seconds(
            {name: (lambda xs, name=name: embed(name, xs)) for name in chosen}, corpus, args.chunk)
        reference = vectors["minilm"]
        ref_neighbours, _ = top_k_neighbours(reference, k=K, exact=True)
        rows = []
        for name in chosen:
            neighbours, _ = top_k_neighbours(vectors[name], k=K, exact=True)
            overlap = np.mean([len(np.intersect1d(a, b)) / K
                               for a, b in zip(neighbours, ref_neighbours, strict=True)])
            same_dim = vectors[name].shape == reference.shape
            cos = float((vectors[name] * reference).sum(1).mean()) if same_dim else float("nan")
            best, score = top_k_neighbours(embed(name, queries), vectors[name], k=1, exact=True)
            threshold, precision, recall = best_f1(best[:, 0], score[:, 0], truth)
            shipped = at_threshold(best[:, 0], score[:, 0], truth, SHIPPED_THRESHOLD)
            noise = (noise_auroc(name, args.noise_pairs, Path(tmp) / "noise", args.seed)
                     if args.noise_pairs and HH.is_file() else (float("nan"),) * 3)
            print(f"{name}: {len(corpus) / seconds[name]:,.0f} texts/s; noise run {noise[2]:.0f} s",
                  file=sys.stderr, flush=True)
            rows.append((NAMES[name], len(corpus) / seconds[name], seconds["minilm"] / seconds[name],
                         cos, overlap, threshold, precision, recall, *shipped, *noise[:2]))

    print("one-off setup per home (load / export / distil): "
          + ", ".join(f"{NAMES[n]} {s:.1f} s" for n, s in setup.items()))
    header = ("embedder", "texts/s", "speedup", "cos", "overlap@10", "dedup best t", "P", "R",
              f"P@{SHIPPED_THRESHOLD}", f"R@{SHIPPED_THRESHOLD}", "noise AUROC", "knn AUROC")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, rate, speedup, *numbers in rows:
        cells = ["-" if not np.isfinite(v) else f"{v:.3f}" for v in numbers]
        print(f"| {name} | {rate:,.0f} | {speedup:.1f}x | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
