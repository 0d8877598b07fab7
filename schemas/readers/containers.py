"""Containers: iterate the located records of a JSONL, JSON-array, Parquet or `datasets` file.

A record that cannot be decoded at all (broken JSON, bad UTF-8) comes out as a record whose
value is an :class:`InputError`, so the driver can quarantine it like any other bad row.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from schemas.errors import InputError
from schemas.readers.base import Record

_decoder = json.JSONDecoder()


def open_stream(path: Path) -> BinaryIO:
    """The file's bytes, decompressed on the fly for ``.gz``."""
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def open_bytes(path: Path) -> bytes:
    try:
        with open_stream(path) as stream:
            return stream.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"not a readable file ({exc})", file=str(path)) from None


def container_of(path: Path) -> str:
    """'hf', 'parquet', 'json' (one array) or 'jsonl', from the path and first bytes."""
    if path.is_dir():
        return "hf"
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        return "parquet"
    try:
        with open_stream(path) as stream:
            head = stream.read(4096).lstrip()
    except (OSError, EOFError) as exc:
        raise InputError(f"not a readable file ({exc})", file=str(path)) from None
    return "json" if head.startswith(b"[") else "jsonl"


def iter_jsonl(path: Path) -> Iterator[Record]:
    """One record per line, streamed: memory stays at one line whatever the file size."""
    file = str(path)
    with open_stream(path) as stream:
        try:
            yield from _jsonl_records(file, stream)
        except (OSError, EOFError) as exc:
            raise InputError(f"not a readable file ({exc})", file=file) from None


def _jsonl_records(file: str, stream: BinaryIO) -> Iterator[Record]:
    for number, raw_line in enumerate(stream, start=1):
        line = raw_line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            error = InputError(f"undecodable text (invalid UTF-8 at byte {exc.start})", file=file, line=number)
            yield Record(file, number, error, line.decode("utf-8", "replace"))
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            error = InputError(f"invalid JSON ({exc.msg} at column {exc.colno})", file=file, line=number)
            yield Record(file, number, error, text)
            continue
        yield Record(file, number, value, text)


def iter_json_array(path: Path) -> Iterator[Record]:
    """Elements of a top-level JSON array, each with the line it starts on.

    A syntax error inside the array cannot be skipped (the rest cannot be re-synchronised),
    so it stops the read with the line and column.
    """
    file = str(path)
    try:
        text = open_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        line = open_bytes(path)[: exc.start].count(b"\n") + 1
        raise InputError(f"undecodable text (invalid UTF-8 at byte {exc.start})", file=file, line=line) from None
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        raise InputError("expected a JSON array", file=file, line=text.count("\n", 0, position) + 1)
    position = _skip_space(text, position + 1)
    line = 1 + text.count("\n", 0, position)
    last = position
    if text.startswith("]", position):
        return
    while True:
        line += text.count("\n", last, position)
        last = position
        try:
            value, end = _decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise InputError(f"invalid JSON ({exc.msg} at column {exc.colno})", file=file, line=exc.lineno) from None
        yield Record(file, line, value, text[position:end][:10_000])
        position = _skip_space(text, end)
        if text.startswith(",", position):
            position = _skip_space(text, position + 1)
        elif text.startswith("]", position):
            return
        else:
            bad_line = text.count("\n", 0, position) + 1
            raise InputError("invalid JSON (expected ',' or ']' between elements)", file=file, line=bad_line)


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def iter_parquet(path: Path, batch_size: int = 10_000) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        parquet_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise InputError(f"not a readable Parquet file ({exc})", file=str(path)) from None
    number = 0
    for batch in parquet_file.iter_batches(batch_size=batch_size):
        for row in batch.to_pylist():
            number += 1
            yield Record(str(path), number, row)


def iter_hf(source: Any, split: str | None = None, label: str = "<datasets.Dataset>") -> Iterator[Record]:
    """Rows of a `datasets.Dataset`, a `DatasetDict` split, or a folder saved with save_to_disk."""
    import datasets

    if isinstance(source, str | Path):
        label = str(source)
        try:
            source = datasets.load_from_disk(str(source))
        except Exception as exc:  # datasets raises FileNotFoundError and its own types
            raise InputError(f"not a `datasets` folder saved with save_to_disk ({exc})", file=label) from None
    if isinstance(source, datasets.DatasetDict):
        if split is None:
            if len(source) != 1:
                raise InputError(f"holds splits {sorted(source)}: choose one with --split", file=label)
            split = next(iter(source))
        if split not in source:
            raise InputError(f"has no split {split!r} (splits: {sorted(source)})", file=label)
        source = source[split]
    for number, row in enumerate(source, start=1):
        yield Record(label, number, row)


def first_value(path: Path) -> Any:
    """The first decodable record, for format detection."""
    container = container_of(path)
    iterator = {"jsonl": iter_jsonl, "json": iter_json_array, "parquet": iter_parquet, "hf": iter_hf}[container]
    for record in iterator(path):
        if not isinstance(record.value, InputError):
            return record.value
    return None
