"""Distinct preference pairs at any size, made from the real human-labelled sets in ../shared/data.

The base is every pair of the shared sets read by prefab's own readers (HH-RLHF harmless,
PandaLM with its three annotators' votes and ties, the four LLMBar subsets: 3,877 pairs),
shuffled once with a fixed seed so a small size mixes the sets too. Row ``i`` of the output
copies base row ``i % B`` and perturbs it, seeded by ``i``:

- a share (``edit_rate``, default 0.25) of the plain lowercase words of the last prompt turn,
  the chosen and the rejected answer are replaced by words drawn from the base texts' own
  word frequencies; the word at a position gets the same edit in all three texts of a row
  (so identical answers stay identical and answers sharing an opening keep sharing it),
  punctuation, numbers, line breaks and markup are left alone. Two copies of one base pair
  then share few 3-word shingles (about (0.75²)³ ≈ 18% each way), so they are not near
  duplicates of each other;
- the last prompt turn ends with `` (#i)``, so every prompt and every pair is distinct.

Labels (chosen/rejected, ties, votes) are the base row's. ``task`` names the source set
(``hh-rlhf-harmless``, ``pandalm``, ``llmbar-...``), so the neutral generator treats the
HH rows as safety data as it would the real file.

Everything is columnar (pyarrow compute and numpy over a chunk of rows) and written a chunk
at a time with ``pq.ParquetWriter``: memory is one chunk (``chunk_rows``, default 20,000
pairs: a few hundred MiB at most), whatever the size.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
# (file under shared/data, task name written on its rows)
SOURCES = (
    ("hh-rlhf-harmless-base-test.jsonl.gz", "hh-rlhf-harmless"),
    ("pandalm-testset-v1.json", "pandalm"),
    ("llmbar/natural.json", "llmbar-natural"),
    ("llmbar/processed-mt-bench.json", "llmbar-mt-bench"),
    ("llmbar/processed-faireval.json", "llmbar-faireval"),
    ("llmbar/processed-llmeval22.json", "llmbar-llmeval22"),
)
COLUMNS = ("prompt", "chosen", "rejected", "tie", "votes", "task")
WORD = re.compile(r"^[a-z]+$")
POOL_SIZE = 1 << 16


@functools.lru_cache(maxsize=2)
def base_pairs(data: Path = SHARED_DATA, seed: int = 0) -> pa.Table:
    """Every pair of the shared sets (prefab's readers), with ``task`` naming its set, in a
    fixed shuffled order so any prefix mixes the sets (read once)."""
    from schemas.readers import read_path

    parts = []
    for name, task in SOURCES:
        path = data / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the scale benchmark draws its pairs from "
                                    f"../shared/data beside the repository")
        table = read_path(path, on_error="quarantine").table
        table = table.select(list(COLUMNS[:-1]))
        parts.append(table.append_column("task", pa.array([task] * table.num_rows, pa.string())))
    table = pa.concat_tables(parts).combine_chunks()
    return table.take(pa.array(np.random.default_rng(seed).permutation(table.num_rows)))


def word_pool(base: pa.Table, seed: int = 0) -> pa.Array:
    """Words drawn from the base answers' own word frequencies (a fixed-size pool)."""
    counts: Counter[str] = Counter()
    for column in ("chosen", "rejected"):
        words = pc.list_flatten(pc.split_pattern(base[column].combine_chunks(), " "))
        for word, n in zip(*np.unique(np.asarray(words.to_numpy(zero_copy_only=False), dtype=object)
                                       .astype(str), return_counts=True), strict=True):
            if WORD.match(word):
                counts[word] += int(n)
    vocabulary = np.array(list(counts))
    weights = np.array(list(counts.values()), dtype=np.float64)
    draw = np.random.default_rng(seed).choice(len(vocabulary), size=POOL_SIZE, p=weights / weights.sum())
    return pa.array(vocabulary[draw])


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread uint64 hash of each element."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def edit_words(texts: pa.Array, rows: np.ndarray, pool: pa.Array, edit_rate: float) -> pa.Array:
    """Replace about ``edit_rate`` of each text's plain lowercase words, seeded by (row, position)."""
    split = pc.split_pattern(texts, " ")
    words = pc.list_flatten(split)
    parent = np.asarray(pc.list_parent_indices(split))
    offsets = np.asarray(split.offsets)[:-1] - split.offsets[0].as_py()
    position = np.arange(len(words)) - offsets[parent]
    with np.errstate(over="ignore"):
        key = rows[parent].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + position.astype(np.uint64)
    h = _mix(key)
    chosen = (h & np.uint64(0xFFFF)) < np.uint64(int(edit_rate * 0x10000))
    plain = np.asarray(pc.match_substring_regex(words, WORD.pattern).fill_null(False))
    replace = pa.array(chosen & plain)
    replacement = pool.take(pa.array((h >> np.uint64(16)) % np.uint64(len(pool)), pa.int64()))
    edited = pc.if_else(replace, replacement, words)
    rebuilt = pa.ListArray.from_arrays(pa.array(offsets.tolist() + [len(words)], pa.int32()), edited)
    return pc.binary_join(rebuilt, " ")


def perturbed_chunk(base: pa.Table, pool: pa.Array, start: int, stop: int, edit_rate: float) -> pa.Table:
    """Rows ``start..stop`` of the output: base rows ``i % B``, each perturbed by its index."""
    rows = np.arange(start, stop, dtype=np.int64)
    chunk = base.take(pa.array(rows % base.num_rows))
    prompt = chunk["prompt"].combine_chunks()
    messages = pc.list_flatten(prompt)
    offsets = np.asarray(prompt.offsets)
    last = np.zeros(len(messages), dtype=bool)
    last[offsets[1:] - 1] = True
    content = messages.field("content")
    last_content = content.filter(pa.array(last))
    tagged = pc.binary_join_element_wise(
        edit_words(last_content, rows, pool, edit_rate),
        pa.array(np.char.mod(" (#%d)", rows)), "")
    new_content = pc.replace_with_mask(content, pa.array(last), tagged)
    new_messages = pa.StructArray.from_arrays([messages.field("role"), new_content], names=["role", "content"])
    new_prompt = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), new_messages)
    return pa.table({
        "prompt": new_prompt,
        "chosen": edit_words(chunk["chosen"].combine_chunks(), rows, pool, edit_rate),
        "rejected": edit_words(chunk["rejected"].combine_chunks(), rows, pool, edit_rate),
        "tie": chunk["tie"], "votes": chunk["votes"], "task": chunk["task"],
    })


def write_pairs(path: Path, rows: int, *, edit_rate: float = 0.25, chunk_rows: int = 20_000,
                data: Path = SHARED_DATA, seed: int = 0,
                progress: Callable[[int], None] | None = None) -> Path:
    """Write ``rows`` distinct pairs to the Parquet file ``path``, a chunk at a time."""
    base = base_pairs(data, seed)
    pool = word_pool(base, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    writer = None
    try:
        for start in range(0, rows, chunk_rows):
            table = perturbed_chunk(base, pool, start, min(rows, start + chunk_rows), edit_rate)
            if writer is None:
                writer = pq.ParquetWriter(partial, table.schema, compression="zstd")
            writer.write_table(table)
            if progress is not None:
                progress(min(rows, start + chunk_rows))
    finally:
        if writer is not None:
            writer.close()
    partial.replace(path)  # a file of this name is always whole
    return path
