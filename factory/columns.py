"""Lazy text columns: a pair table's texts kept in Arrow, turned into Python a chunk at a time.

A million pairs hold about 2.5-3 GB of Python ``str`` and ``dict`` objects once every
prompt, answer and id is a list entry; the same texts in Arrow buffers take the size of
their UTF-8 bytes. :class:`ArrowColumn` is a read-only :class:`~collections.abc.Sequence`
over one Arrow column: ``col[i]`` converts one value, ``col[a:b]``, ``col[indices]`` and
``col + other`` give new lazy columns (Arrow slices, row numbers into the same Arrow values
and chunk lists: no copy of the texts, in Arrow or in Python), and iteration converts
:data:`CHUNK_ROWS` values at a time.
Consumers (tokenizers, hashers, embedders) therefore see the same Python values as
before, in the same order, but never all of them at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

T = TypeVar("T")

# Values converted to Python per step of an iteration: large enough that Arrow's per-call
# cost vanishes, small enough that a chunk of long texts stays a few MiB.
CHUNK_ROWS = 4096


def _identity(values: list[Any]) -> list[Any]:
    return values


def as_messages(values: list[Any]) -> list[list[dict[str, str]]]:
    """Prompt values (lists of role/content structs) as chat messages; a null content is
    an empty string and a null prompt no messages, as the trainer always read them."""
    return [[{"role": m["role"], "content": m["content"] or ""} for m in p or []] for p in values]


class ArrowColumn(Sequence[T]):
    """A read-only sequence over an Arrow array, converted to Python values lazily.

    ``convert`` maps a list of ``to_pylist()`` values to the Python values callers see
    (module-level functions only, so that a column pickles); it must not depend on a
    value's neighbours, so that any chunking gives the same values. ``rows`` (int64), when
    given, picks the rows of ``values`` this column holds, in order: a ``take`` or a
    subset then costs 8 bytes per row, never a copy of the texts."""

    def __init__(
        self,
        values: pa.Array | pa.ChunkedArray,
        convert: Callable[[list[Any]], list[T]] = _identity,
        *,
        rows: np.ndarray | None = None,
        chunk_rows: int | None = None,
    ):
        chunk_rows = CHUNK_ROWS if chunk_rows is None else chunk_rows  # read now: tests lower it
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self._values = values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])
        self._rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self._convert = convert
        self.chunk_rows = chunk_rows

    @classmethod
    def of(cls, values: Sequence[Any], type: pa.DataType | None = None,
           convert: Callable[[list[Any]], list[T]] = _identity) -> ArrowColumn[T]:
        """A column holding Python ``values`` (tests, and small columns built in Python)."""
        return cls(pa.array(list(values), type=type), convert)

    @property
    def arrow(self) -> pa.ChunkedArray:
        """This column's Arrow values (before ``convert``; taken from the source when the
        column picks rows of it, which copies them)."""
        if self._rows is None:
            return self._values
        return pa.chunked_array([self._take(self._rows)], type=self.type)

    @property
    def null_count(self) -> int:
        """Nulls among this column's values (counted without copying them)."""
        if self._rows is None or not self._values.null_count:
            return self._values.null_count
        valid = pc.is_valid(self._values).to_numpy(zero_copy_only=False)
        return int((~valid[self._rows]).sum())

    @property
    def type(self) -> pa.DataType:
        return self._values.type

    def __len__(self) -> int:
        return len(self._values) if self._rows is None else len(self._rows)

    @overload
    def __getitem__(self, key: int) -> T: ...

    @overload
    def __getitem__(self, key: slice | Sequence[int] | np.ndarray) -> ArrowColumn[T]: ...

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, (int, np.integer)):
            n = len(self)
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for a column of {n}")
            i %= n
            row = i if self._rows is None else int(self._rows[i])
            return self._convert([self._values[row].as_py()])[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self.take(np.arange(start, stop, step))
            stop = max(start, stop)
            if self._rows is not None:
                return self._derive(self._values, self._rows[start:stop])
            return self._derive(self._values.slice(start, stop - start))
        return self.take(key)

    def take(self, indices: Sequence[int] | np.ndarray) -> ArrowColumn[T]:
        """The values at ``indices`` (ints, negatives from the end, or a boolean mask); the
        texts are not copied: the new column picks rows of the same Arrow values."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if len(idx) != len(self):
                raise IndexError(f"boolean mask of {len(idx)} for a column of {len(self)}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64, copy=False).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for a column of {n}")
        idx = np.where(idx < 0, idx + n, idx)
        return self._derive(self._values, idx if self._rows is None else self._rows[idx])

    def __iter__(self) -> Iterator[T]:
        for start in range(0, len(self), self.chunk_rows):
            if self._rows is None:
                part = self._values.slice(start, self.chunk_rows)
            else:
                part = self._take(self._rows[start : start + self.chunk_rows])
            yield from self._convert(part.to_pylist())

    def __add__(self, other: Sequence[T]) -> ArrowColumn[T]:
        """Concatenation, as ``list + list`` (the Arrow chunks are shared, not copied)."""
        if isinstance(other, ArrowColumn):
            if other._convert is not self._convert:
                return NotImplemented
            right = other
            if other.type != self.type:
                right = ArrowColumn(other._values.cast(self.type), other._convert, rows=other._rows)
        elif isinstance(other, (list, tuple)):
            right = ArrowColumn(pa.array(list(other), type=self.type), self._convert)
        else:
            return NotImplemented
        return self._concat(self, right)

    def __radd__(self, other: Sequence[T]) -> ArrowColumn[T]:
        if isinstance(other, (list, tuple)):
            return self._concat(ArrowColumn(pa.array(list(other), type=self.type), self._convert), self)
        return NotImplemented

    def _concat(self, left: ArrowColumn[T], right: ArrowColumn[T]) -> ArrowColumn[T]:
        values = pa.chunked_array(left._values.chunks + right._values.chunks, type=self.type)
        if left._rows is None and right._rows is None:
            return self._derive(values)
        rows = np.concatenate([left._row_numbers(), right._row_numbers() + len(left._values)])
        return self._derive(values, rows)

    def _row_numbers(self) -> np.ndarray:
        return np.arange(len(self._values), dtype=np.int64) if self._rows is None else self._rows

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str) or len(other) != len(self):
            return False
        return all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]  # mutable-like sequence semantics, as list

    def __repr__(self) -> str:
        return f"ArrowColumn({len(self)} × {self.type})"

    def lengths(self) -> np.ndarray:
        """Characters (code points, as Python's ``len``) of each string, int64; null -> 0."""
        if not (pa.types.is_string(self.type) or pa.types.is_large_string(self.type)):
            raise TypeError(f"lengths of a {self.type} column: only string columns have them")
        counts = pc.fill_null(pc.utf8_length(self._values), 0)
        lengths = np.asarray(counts.to_numpy(), dtype=np.int64)
        return lengths if self._rows is None else lengths[self._rows]

    def _take(self, rows: np.ndarray) -> pa.Array:
        """The values at ``rows``, taken chunk by chunk: ``ChunkedArray.take`` first joins
        every chunk into one array (a copy of the whole column for each call)."""
        chunks = self._values.chunks
        if len(chunks) == 1:
            return chunks[0].take(pa.array(rows, type=pa.int64()))
        if not len(rows):
            return pa.array([], type=self.type)
        starts = np.cumsum([0] + [len(c) for c in chunks[:-1]], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(which[order])) + 1)
        gathered = pa.concat_arrays([chunks[which[g[0]]].take(pa.array(rows[g] - starts[which[g[0]]], type=pa.int64()))
                                     for g in groups])
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return gathered.take(pa.array(back, type=pa.int64()))

    def _derive(self, values: pa.ChunkedArray, rows: np.ndarray | None = None) -> ArrowColumn[T]:
        return ArrowColumn(values, self._convert, rows=rows, chunk_rows=self.chunk_rows)


def take(values: Sequence[T], indices: np.ndarray) -> Sequence[T]:
    """``values`` at ``indices``: an Arrow ``take`` for a lazy column, else a new list."""
    if isinstance(values, ArrowColumn):
        return values.take(indices)
    return [values[int(i)] for i in np.asarray(indices, dtype=np.int64)]


def text_lengths(values: Sequence[str]) -> np.ndarray:
    """Characters of each text (int64): Arrow's count for a lazy column, no Python strings."""
    if isinstance(values, ArrowColumn):
        return values.lengths()
    return np.fromiter((len(t) for t in values), dtype=np.int64, count=len(values))
