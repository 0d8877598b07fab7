"""Embedders benchmark: the bundled MiniLM against the static embedder distilled from it.

Texts: the turns of ../shared/data's HH-RLHF harmless test transcripts (every human and
assistant turn of ``chosen``, the last assistant turn of ``rejected``), distinct, shuffled
with a fixed seed; without ../shared/data, the prompts and answers of
examples/seeds/demo_pairs.jsonl. The first ``--texts`` form the corpus, the next
``--planted`` texts are held out.

Per embedder, all on the same texts:

- texts/s embedding the corpus (MiniLM through ``factory.embed.embed_texts`` into a fresh
  temporary home, so nothing is cached; the encoder is loaded before timing; the static
  model is distilled before timing, its one-off distillation time is printed apart);
- overlap@10: mean share of each corpus text's 10 nearest neighbours (exact search) that
  MiniLM's 10 nearest also are;
- dedup on planted near duplicates: ``--planted`` corpus texts of 8+ words get a small
  edit (one word dropped and two neighbouring words swapped) and are searched against the
  corpus, beside as many held-out texts that have no planted twin. A query is called a
  duplicate when its nearest corpus text is at cosine >= t; a call is right only if that
  text is the edited one's source. Precision and recall at the t of best F1 per embedder.

Measured (2 busy cores, default run, ~1 min): MiniLM 144 texts/s; static 25,460 texts/s
(177x), overlap@10 0.166, dedup P/R 0.985/0.965 at t=0.950 (MiniLM 0.946/0.965 at 0.792);
distillation 15 s once per home. Other recipes on 3,000 texts: no PCA 0.127, no SIF 0.101,
PCA 'auto' 0.157 overlap@10, so the default (PCA 256, SIF 1e-4) stays. The static embedder
fits dedup; its neighbours are not MiniLM's (neighbour mining should keep MiniLM).

    python benchmarks/embedders.py                 # 5,000 texts, 200 planted
    python benchmarks/embedders.py --texts 20000
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from factory.embed import embed_texts, top_k_neighbours
from factory.embed.static import embed_static

REPO = Path(__file__).resolve().parent.parent
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
DEMO = REPO / "examples" / "seeds" / "demo_pairs.jsonl"
TURN = re.compile(r"\n\n(?:Human|Assistant): ")
K = 10


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


def timed(embed, texts: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    vectors = embed(texts)
    return vectors, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=5000, help="corpus size")
    parser.add_argument("--planted", type=int, default=200, help="near duplicates planted")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    texts, source = load_texts(args.seed)
    corpus, held_out = texts[: args.texts], texts[args.texts:]
    queries, truth = planted_queries(corpus, held_out, args.planted,
                                     np.random.default_rng(args.seed + 1))
    print(f"{len(corpus)} corpus texts from {source} "
          f"(mean {np.mean([len(t.split()) for t in corpus]):.0f} words), "
          f"{int((truth >= 0).sum())} planted near duplicates + {int((truth < 0).sum())} "
          "held-out texts as dedup queries")

    with tempfile.TemporaryDirectory() as tmp:
        homes = {name: Path(tmp) / name for name in ("warm", "minilm", "static")}
        embed_texts(["load the encoder"], home=homes["warm"], progress=False)
        start = time.perf_counter()
        embed_static(["distil the static model"], home=homes["static"])
        distill_s = time.perf_counter() - start
        embedders = {
            "MiniLM (embed_texts)": lambda xs: embed_texts(xs, home=homes["minilm"], progress=False),
            "static (model2vec)": lambda xs: embed_static(xs, home=homes["static"]),
        }
        rows, reference = [], None
        for name, embed in embedders.items():
            vectors, seconds = timed(embed, corpus)
            neighbours, _ = top_k_neighbours(vectors, k=K, exact=True)
            if reference is None:
                reference, minilm_seconds = neighbours, seconds
            overlap = np.mean([len(np.intersect1d(a, b)) / K
                               for a, b in zip(neighbours, reference, strict=True)])
            best, score = top_k_neighbours(embed(queries), vectors, k=1, exact=True)
            threshold, precision, recall = best_f1(best[:, 0], score[:, 0], truth)
            rows.append((name, len(corpus) / seconds, minilm_seconds / seconds, overlap,
                         threshold, precision, recall))

    print(f"static distillation (once per home): {distill_s:.1f} s")
    header = ("embedder", "texts/s", "speedup", "overlap@10", "dedup t", "precision", "recall")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, rate, speedup, overlap, threshold, precision, recall in rows:
        print(f"{name} | {rate:,.0f} | {speedup:.1f}x | {overlap:.3f} | {threshold:.3f} | "
              f"{precision:.3f} | {recall:.3f}")


if __name__ == "__main__":
    main()
