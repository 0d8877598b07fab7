"""A whole-table generator's output in bounded memory: made pairs merged and capped across
the whole seed table, then given out a chunk of rows at a time.

The steps make their pairs a chunk of seeds at a time and hand each chunk to a
:class:`PairAssembly`. What it keeps for the whole table is small per made pair (about
100 bytes: rows, codes, a 16-byte digest of the pair's text, where each text is); the texts
themselves stay where they are: a text equal to its seed's chosen or rejected answer is
read again from the (memory-mapped) seed table when its output chunk is made, any other
(a rewrite, a key) is written once to a spill file on disk and memory-mapped back.
Merging repeats and capping per seed then run on those small columns, over the whole
table, so the result does not depend on chunk boundaries.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from generators._text import chunks, column_or, prompt_ids_of, take_rows, uniforms

# Output rows materialised at once (their texts, taken from the seeds and the spill).
OUTPUT_ROWS = 16_384

# Where a pair's text is: its seed's chosen answer, its seed's rejected answer, or the spill.
_SEED_CHOSEN, _SEED_REJECTED, _SPILLED = 0, 1, 2
_CODED = ("attribute", "method", "generated", "task")
_SPILL_SCHEMA = pa.schema([("text", pa.string())])
_OUTPUT_TYPES = {"chosen": pa.string(), "rejected": pa.string(), "tie": pa.bool_(), "attribute": pa.string(),
                 "task": pa.string(), "parent_ids": pa.list_(pa.string()), "generated": pa.string(),
                 "method": pa.string()}


def pair_digest(prompt_id: str, chosen: str, rejected: str, ordered: bool) -> bytes:
    """16 bytes that stand for (prompt, chosen, rejected): equal pairs, equal digests.

    Unordered (``ordered`` False), a pair and its swap are the same pair."""
    if not ordered and chosen > rejected:
        chosen, rejected = rejected, chosen
    payload = f"{prompt_id}\x00{len(chosen)}\x00{chosen}{rejected}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(payload, digest_size=16).digest()


class PairAssembly:
    """The pairs made from a whole seed table: capped per seed, repeats merged.

    Two seeds that share a prompt and an answer (common: one chosen answer against several
    rejected ones, or a seed repeated anywhere in the table) yield the same pair; it is kept
    once with every seed in ``parent_ids`` rather than emitted twice under one ``pair_id``.
    Which copy is kept is fixed by content (the least seed id, then rule), so the output
    does not depend on row order; rows come out in the order of their first seed.

    ``ordered``: a pair and its swap (chosen and rejected exchanged) are different pairs;
    otherwise they are one. ``max_per_seed`` (with ``row_uniform`` and ``salt``) keeps that
    many of each seed's pairs, drawn by seed id and method.

    Memory: about 100 bytes per made pair and 16 per seed, plus one chunk of texts; the
    spilled texts are on disk, under ``home``'s ``steps`` folder (where ``catalog gc`` finds
    what a killed run left) or, without a home, the system's temporary folder.
    """

    def __init__(self, seeds: pa.Table, *, ordered: bool = False, max_per_seed: int = 0,
                 row_uniform: Callable[[Sequence[str], str], np.ndarray] | None = None, salt: str = "cap",
                 home: str | Path | None = None) -> None:
        if max_per_seed and row_uniform is None:
            raise ValueError("max_per_seed needs row_uniform to draw which pairs a seed keeps")
        self.seeds = seeds
        self.ordered, self.max_per_seed, self.row_uniform, self.salt = ordered, max_per_seed, row_uniform, salt
        self.made = 0
        self.counts: dict[str, int] = {"capped": 0, "duplicates_merged": 0}
        self._prompt_ids = prompt_ids_of(seeds)
        self._seed_texts = (seeds.column("chosen"), column_or(seeds, "rejected"))
        self._columns: dict[str, list[np.ndarray]] = {}
        self._values: dict[str, dict[Any, int]] = {name: {} for name in _CODED}
        spill_dir = None if home is None else Path(home) / "steps"
        if spill_dir is not None:
            spill_dir.mkdir(parents=True, exist_ok=True)
        self._folder = tempfile.TemporaryDirectory(prefix="spill-", dir=spill_dir)
        self._spill_path = Path(self._folder.name) / "texts.arrow"
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._spilled = 0
        self._map: mmap.mmap | None = None
        self._spill: pa.ChunkedArray | None = None
        self._merged: pl.DataFrame | None = None

    # ---- taking made pairs in --------------------------------------------------------------

    def add(self, part: pa.Table) -> None:
        """A chunk of made pairs (:data:`~generators._text.MADE_SCHEMA`, rows in seed positions)."""
        if self._merged is not None:
            raise RuntimeError("pairs added after the assembly was finished")
        n = part.num_rows
        if not n:
            return
        rows = part.column("row").to_numpy()
        prompt_rows = part.column("prompt_row").to_numpy()
        chosen = part.column("chosen").combine_chunks()
        rejected = part.column("rejected").combine_chunks()
        chosen_at = self._place(chosen, take_rows(self._seed_texts[0], rows), _SEED_CHOSEN, rows)
        rejected_at = self._place(rejected, take_rows(self._seed_texts[1], rows), _SEED_REJECTED, rows)
        prompt_ids = take_rows(self._prompt_ids, prompt_rows).to_pylist()
        digests = b"".join(pair_digest(p, c, r, self.ordered) for p, c, r in
                           zip(prompt_ids, chosen.to_pylist(), rejected.to_pylist(), strict=True))
        digest = np.frombuffer(digests, dtype=np.uint64).reshape(n, 2)
        columns = {
            "row": rows.astype(np.int64), "prompt_row": prompt_rows.astype(np.int64),
            "rule": part.column("rule").to_numpy().astype(np.int32),
            "tie": pc.fill_null(part.column("tie"), False).to_numpy(zero_copy_only=False),
            "chosen_src": chosen_at[0], "chosen_at": chosen_at[1],
            "rejected_src": rejected_at[0], "rejected_at": rejected_at[1],
            "digest_a": digest[:, 0].copy(), "digest_b": digest[:, 1].copy(),
            **{name: self._codes(name, part.column(name)) for name in _CODED},
        }
        if self.max_per_seed:
            seed_ids = take_rows(self.seeds.column("pair_id"), rows).to_pylist()
            methods = part.column("method").to_pylist()
            keys = pa.array([f"{s}\x00{m}" for s, m in zip(seed_ids, methods, strict=True)], pa.string())
            columns["draw"] = uniforms(keys, self.row_uniform, self.salt)
        for name, values in columns.items():
            self._columns.setdefault(name, []).append(values)
        self.made += n

    def _place(self, texts: pa.Array, seed_texts: pa.Array, source: int,
               rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, position) of each text: its seed's own where equal, else spilled now."""
        same = pc.fill_null(pc.equal(texts, seed_texts), False).to_numpy(zero_copy_only=False)
        spill = ~same
        where = np.where(same, source, _SPILLED).astype(np.int8)
        at = rows.astype(np.int64).copy()
        count = int(spill.sum())
        if count:
            at[spill] = self._spilled + np.arange(count, dtype=np.int64)
            if self._writer is None:
                self._writer = pa.ipc.new_file(str(self._spill_path), _SPILL_SCHEMA)
            self._writer.write_batch(pa.record_batch([texts.filter(pa.array(spill))], schema=_SPILL_SCHEMA))
            self._spilled += count
        return where, at

    def _codes(self, name: str, column: pa.ChunkedArray | pa.Array) -> np.ndarray:
        """Small integer codes for a low-cardinality column (attribute, method, task…)."""
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        encoded = pc.dictionary_encode(column.cast(pa.string()), null_encoding="encode")
        known = self._values[name]
        lookup = np.array([known.setdefault(v, len(known)) for v in encoded.dictionary.to_pylist()] or [0],
                          dtype=np.int32)
        return lookup[encoded.indices.to_numpy(zero_copy_only=False)]

    # ---- merging over the whole table -------------------------------------------------------

    def finish(self) -> dict[str, int]:
        """Cap and merge over everything added; returns ``capped`` and ``duplicates_merged``."""
        if self._merged is not None:
            return self.counts
        if self._writer is not None:
            self._writer.close()
            with open(self._spill_path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._spill = pa.ipc.open_file(pa.py_buffer(self._map)).read_all().column("text")
        else:
            self._spill = pa.chunked_array([], pa.string())
        made = pl.DataFrame({name: np.concatenate(parts) for name, parts in self._columns.items()})
        self._columns.clear()
        if not made.height:
            self._merged = made
            return self.counts
        # The least seed id first: its dense rank among the seeds' ids, a small integer per row.
        ranks = pl.from_arrow(self.seeds.column("pair_id")).rank("dense").to_numpy().astype(np.int64) - 1
        self._rank_row = np.empty(int(ranks.max()) + 1, dtype=np.int64)
        self._rank_row[ranks] = np.arange(len(ranks), dtype=np.int64)
        made = made.with_columns(pl.Series("seed", ranks[made["row"].to_numpy()]))
        before = made.height
        if self.max_per_seed:
            made = made.filter(pl.col("draw").rank("ordinal").over("row") <= self.max_per_seed).drop("draw")
        firsts = ["prompt_row", "chosen_src", "chosen_at", "rejected_src", "rejected_at", "tie", *_CODED, "rule"]
        self._merged = (made.sort(["seed", "rule", "row"])
                        .group_by(["digest_a", "digest_b"], maintain_order=True)
                        .agg(pl.col(firsts).first(), pl.col("seed").unique(maintain_order=True).alias("parents"),
                             pl.col("row").min().alias("first_row"))
                        .sort(["first_row", "rule"], maintain_order=True)
                        .drop("digest_a", "digest_b"))
        self.counts = {"capped": before - made.height, "duplicates_merged": made.height - self._merged.height}
        return self.counts

    @property
    def rows(self) -> int:
        """Output rows (after :meth:`finish`)."""
        return self._finished().height

    def value_counts(self, name: str) -> dict[str, int]:
        """``{value: output rows}`` of a coded column (attribute, method…), in order of first row."""
        merged = self._finished()
        if not merged.height:
            return {}
        codes = merged[name].to_numpy()
        values = list(self._values[name])
        found, first = np.unique(codes, return_index=True)
        counts = np.bincount(codes, minlength=len(values))
        return {values[c]: int(counts[c]) for c in found[np.argsort(first, kind="stable")].tolist()}

    def _finished(self) -> pl.DataFrame:
        self.finish()
        assert self._merged is not None
        return self._merged

    # ---- the output, a chunk at a time ------------------------------------------------------

    def tables(self, rows: int | None = None) -> Iterator[pa.Table]:
        """The output pairs in chunks of ``rows`` (default :data:`OUTPUT_ROWS`): the columns a
        generator returns. The spill is removed when the last chunk has been read."""
        merged = self._finished()
        try:
            if not merged.height:  # no pairs, still in the output's columns
                yield pa.table({"prompt": self.seeds.column("prompt").slice(0, 0),
                                **{name: pa.array([], kind) for name, kind in _OUTPUT_TYPES.items()}})
            for start, stop in chunks(merged.height, rows or OUTPUT_ROWS):
                yield self._table(merged.slice(start, stop - start))
                if self._map is not None:
                    # Pages already read need not count against this process: the file keeps them.
                    self._map.madvise(mmap.MADV_DONTNEED)
        finally:
            self.close()

    def _table(self, part: pl.DataFrame) -> pa.Table:
        parents = part["parents"]
        offsets = np.concatenate([[0], np.cumsum(parents.list.len().to_numpy())]).astype(np.int32)
        parent_rows = self._rank_row[parents.explode().to_numpy()]
        parent_ids = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                              take_rows(self.seeds.column("pair_id"), parent_rows))
        return pa.table({
            "prompt": take_rows(self.seeds.column("prompt"), part["prompt_row"].to_numpy()),
            "chosen": self._texts(part["chosen_src"].to_numpy(), part["chosen_at"].to_numpy()),
            "rejected": self._texts(part["rejected_src"].to_numpy(), part["rejected_at"].to_numpy()),
            "tie": pa.array(part["tie"].to_numpy(), pa.bool_()),
            "attribute": self._decoded("attribute", part),
            "task": self._decoded("task", part),
            "parent_ids": parent_ids.cast(pa.list_(pa.string())),
            "generated": self._decoded("generated", part),
            "method": self._decoded("method", part),
        })

    def _texts(self, sources: np.ndarray, at: np.ndarray) -> pa.Array:
        columns = {_SEED_CHOSEN: self._seed_texts[0], _SEED_REJECTED: self._seed_texts[1], _SPILLED: self._spill}
        order = np.argsort(sources, kind="stable")
        parts = []
        for source, column in columns.items():
            members = order[sources[order] == source]
            if len(members):
                parts.append(take_rows(column, at[members]).cast(pa.string()))
        if not parts:
            return pa.array([], pa.string())
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.concat_arrays(parts).take(pa.array(inverse, pa.int64()))

    def _decoded(self, name: str, part: pl.DataFrame) -> pa.Array:
        values = pa.array(list(self._values[name]) or [None], pa.string())
        return values.take(pa.array(part[name].to_numpy(), pa.int32()))

    def close(self) -> None:
        """Remove the spill (the assembly gives no more output)."""
        if self._writer is not None and self._map is None:
            self._writer.close()
        self._spill = None
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a slice is still held: the collector closes it
                self._map.close()
            self._map = None
        self._folder.cleanup()
