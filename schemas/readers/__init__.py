"""Read external preference data into canonical pair tables, with row-level validation.

``read_path(path, format="auto")`` returns a :class:`ReadResult`: the pairs, the rows it
quarantined with their reasons, what it coerced and warned about, and counts that add up:
``rows_in == rows_out + quarantined``. ``stream_path`` is the same read as a
:class:`ReadStream` of record batches, for inputs too big to hold (ingest uses it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)

from schemas.errors import InputError
from schemas.pairs import PAIR_SCHEMA
from schemas.readers import columns, hh_rlhf, llmbar, pandalm  # noqa: F401  (registers readers)
from schemas.readers.base import QUARANTINE_SCHEMA, Record, RowContext, raw_text
from schemas.readers.columns import COLUMN_FIELDS
from schemas.readers.containers import (
    container_of,
    first_value,
    iter_hf,
    iter_json_array,
    iter_jsonl,
    iter_parquet,
)
from schemas.readers.registry import READERS, ReaderSpec, register_reader

OnError = Literal["fail", "quarantine"]

# Sniffing order: the most specific shapes first (HH rows also have chosen/rejected).
_SNIFF_ORDER = ("pandalm", "llmbar", "hh-rlhf", "trl")

# Rows per record batch of a stream: a few MiB of text, converted to Arrow at once.
STREAM_BATCH_ROWS = 8192


@dataclass
class ReadResult:
    table: pa.Table
    quarantine: pa.Table
    format: str
    format_reason: str
    rows_in: int
    coerced: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    # Input columns the format does not define (kept in metadata), with how many rows had them.
    unknown_columns: Counter[str] = field(default_factory=Counter)

    @property
    def rows_out(self) -> int:
        return self.table.num_rows

    @property
    def quarantined(self) -> int:
        return self.quarantine.num_rows

    def summary(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "format_reason": self.format_reason,
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "quarantined": self.quarantined,
            "coerced": dict(self.coerced),
            "warnings": dict(self.warnings),
            "unknown_columns": dict(self.unknown_columns),
        }


class ReadStream:
    """A read in progress: iterate :meth:`batches` once; the counts are final after that.

    ``rows_in == rows_out + quarantined`` holds once the batches are consumed. With
    ``ids=False`` the rows' pair_id/prompt_id stay null (a catalog commit computes them a
    batch at a time, far faster than per row) and repeated pairs are not counted here.
    """

    def __init__(self, records: Iterable[Record], spec: ReaderSpec, *, file: str, on_error: OnError = "fail",
                 strict: bool = False, column_map: dict[str, str] | None = None, format_reason: str = "",
                 progress: bool = False, batch_rows: int = STREAM_BATCH_ROWS, ids: bool = True) -> None:
        self._records = records
        self.spec = spec
        self.format = spec.name
        self.format_reason = format_reason
        self.file = file
        self.on_error = on_error
        self.column_map = column_map
        self.progress = progress
        self.batch_rows = batch_rows
        self.ids = ids
        self.context = RowContext(file=file, strict=strict)
        self.rows_in = 0
        self.rows_out = 0
        self.bad: list[dict[str, Any]] = []
        self._pair_ids: list[pa.Array] = []
        self._consumed = False

    @property
    def coerced(self) -> Counter[str]:
        return self.context.coerced

    @property
    def warnings(self) -> Counter[str]:
        return self.context.warnings

    @property
    def unknown_columns(self) -> Counter[str]:
        return self.context.unknown_columns

    @property
    def quarantined(self) -> int:
        return len(self.bad)

    @property
    def quarantine(self) -> pa.Table:
        return pa.Table.from_pylist(self.bad, schema=QUARANTINE_SCHEMA)

    def batches(self) -> Iterator[pa.RecordBatch]:
        """Canonical pairs, ``batch_rows`` at a time (memory stays at about one batch)."""
        from tqdm import tqdm

        if self._consumed:
            raise RuntimeError("a ReadStream can be iterated once")
        self._consumed = True
        spec, ctx = self.spec, self.context
        rows: list[dict[str, Any]] = []
        # disable=None: tqdm shows the bar only on a terminal, so logs and pipes stay clean.
        with tqdm(desc=f"read {spec.name}", unit=" rows", disable=None if self.progress else True,
                  mininterval=0.5, leave=False) as bar:
            for record in _renamed(self._records, self.column_map):
                self.rows_in += 1
                bar.update()
                try:
                    if isinstance(record.value, InputError):
                        raise record.value
                    pair = spec.parse(record, ctx)
                except InputError as error:
                    if self.on_error == "fail":
                        raise
                    self.bad.append({"file": error.file or record.file, "line": error.line or record.line,
                                     "field": error.field, "reason": error.reason,
                                     "raw": record.raw if record.raw is not None else raw_text(record.value)})
                    continue
                if pair.provenance.step is None:  # a re-read prefab export keeps the step that made it
                    pair.provenance.step = f"read:{spec.name}"
                rows.append(pair.to_row(ids=self.ids))
                if len(rows) >= self.batch_rows:
                    yield self._batch(rows)
                    rows = []
        if rows:
            yield self._batch(rows)
        repeated = self._count_repeated_pairs()
        if repeated:
            ctx.warnings["repeated_pair"] += repeated

    def _batch(self, rows: list[dict[str, Any]]) -> pa.RecordBatch:
        batch = pa.RecordBatch.from_pylist(rows, schema=PAIR_SCHEMA)
        self.rows_out += batch.num_rows
        if self.ids:
            self._pair_ids.append(batch.column("pair_id"))
        return batch

    def _count_repeated_pairs(self) -> int:
        """Rows whose pair_id an earlier row already has.

        They stay: in human data a repeat is a separate judgment (PandaLM rates the same two
        outputs once per model pair that produced them), and dropping one is a filter's decision.
        """
        if not self._pair_ids:
            return 0
        ids = pa.chunked_array(self._pair_ids, pa.string())
        return len(ids) - pa.compute.count_distinct(ids).as_py()

    def result(self, table: pa.Table) -> ReadResult:
        return ReadResult(table=table, quarantine=self.quarantine, format=self.format,
                          format_reason=self.format_reason, rows_in=self.rows_in, coerced=self.coerced,
                          warnings=self.warnings, unknown_columns=self.unknown_columns)


def detect_format(path: str | Path) -> tuple[str, str]:
    """Pick a reader from the file's container and its first record; say why."""
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", file=str(path))
    container = container_of(path)
    if container == "hf":
        return "hf", "a folder saved with datasets' save_to_disk"
    value = first_value(path)
    if value is None:
        raise InputError("no readable record to detect the format from", file=str(path))
    for name in _SNIFF_ORDER:
        spec = READERS[name]
        if container in spec.containers and spec.sniff is not None and spec.sniff(value):
            keys = ", ".join(sorted(value)[:6]) if isinstance(value, dict) else ""
            return name, f"{container} records with fields {keys}"
    if container == "parquet":
        return "parquet", "a Parquet file"
    fallback = "jsonl" if container == "jsonl" else "trl"
    return fallback, f"{container} records of no known preference format (use --map to name columns)"


def stream_path(
    path: str | Path,
    format: str = "auto",
    *,
    on_error: OnError = "fail",
    strict: bool = False,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    progress: bool = False,
    batch_rows: int = STREAM_BATCH_ROWS,
    ids: bool = True,
) -> ReadStream:
    """Open a file or folder for a streamed read (see :class:`ReadStream`)."""
    path = Path(path)
    if format == "auto":
        format, reason = detect_format(path)
    else:
        if not path.exists():
            raise InputError("no such file or folder", file=str(path))
        reason = "chosen with --format"
    spec = _spec(format, column_map)
    container = container_of(path)
    if container not in spec.containers:
        raise InputError(f"format {format!r} cannot be read from a {container} container", file=str(path))
    if split is not None and container != "hf":
        raise InputError("--split applies to a saved DatasetDict folder only", file=str(path))
    records: Iterable[Record] = {
        "jsonl": iter_jsonl,
        "json": iter_json_array,
        "parquet": iter_parquet,
        "hf": lambda p: iter_hf(p, split),
    }[container](path)
    return ReadStream(records, spec, file=str(path), on_error=on_error, strict=strict, column_map=column_map,
                      format_reason=reason, progress=progress, batch_rows=batch_rows, ids=ids)


def read_path(
    path: str | Path,
    format: str = "auto",
    *,
    on_error: OnError = "fail",
    strict: bool = False,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    progress: bool = False,
) -> ReadResult:
    """Read a file or folder. With ``on_error="fail"`` the first bad row raises InputError."""
    stream = stream_path(path, format, on_error=on_error, strict=strict, column_map=column_map,
                         split=split, progress=progress)
    return _collect(stream)


def _collect(stream: ReadStream) -> ReadResult:
    return stream.result(pa.Table.from_batches(list(stream.batches()), schema=PAIR_SCHEMA))


def check_column_map(column_map: dict[str, str] | None) -> None:
    """``--map canonical=source``: the canonical side must be a field the column reader knows."""
    for canonical in column_map or {}:
        if canonical not in COLUMN_FIELDS:
            raise InputError(f"--map {canonical}=...: unknown canonical field {canonical!r} "
                             f"(known: {', '.join(sorted(COLUMN_FIELDS))})")


def read_dataset(
    dataset: Any,
    *,
    split: str | None = None,
    on_error: OnError = "fail",
    strict: bool = False,
    column_map: dict[str, str] | None = None,
) -> ReadResult:
    """Read an in-memory `datasets.Dataset` or `DatasetDict` with the column reader."""
    records = iter_hf(dataset, split)
    return read_records(records, _spec("hf", column_map), file="<datasets.Dataset>",
                        on_error=on_error, strict=strict, column_map=column_map,
                        format_reason="a datasets object")


def read_records(
    records: Iterable[Record],
    spec: ReaderSpec,
    *,
    file: str,
    on_error: OnError = "fail",
    strict: bool = False,
    column_map: dict[str, str] | None = None,
    format_reason: str = "",
    progress: bool = False,
) -> ReadResult:
    return _collect(ReadStream(records, spec, file=file, on_error=on_error, strict=strict,
                               column_map=column_map, format_reason=format_reason, progress=progress))


def _spec(format: str, column_map: dict[str, str] | None) -> ReaderSpec:
    if format not in READERS:
        raise InputError(f"unknown format {format!r} (known: auto, {', '.join(sorted(READERS))})")
    spec = READERS[format]
    if column_map and not spec.accepts_column_map:
        raise InputError(f"--map applies to column formats (trl, jsonl, parquet, hf), not {format!r}")
    check_column_map(column_map)
    return spec


def _renamed(records: Iterable[Record], column_map: dict[str, str] | None) -> Iterator[Record]:
    if not column_map:
        yield from records
        return
    sources = set(column_map.values()) - set(column_map)
    for record in records:
        value = record.value
        if isinstance(value, dict):
            missing = [source for source in column_map.values() if source not in value]
            if missing:
                value = InputError(f"missing mapped column {missing[0]!r}", file=record.file,
                                   line=record.line, field=missing[0])
            else:
                # A mapped source column is the canonical one now, not an unknown extra.
                renamed = {canonical: value[source] for canonical, source in column_map.items()}
                value = {**{k: v for k, v in value.items() if k not in sources}, **renamed}
        yield Record(record.file, record.line, value, record.raw)


__all__ = [
    "READERS",
    "ReadResult",
    "ReadStream",
    "ReaderSpec",
    "check_column_map",
    "detect_format",
    "read_dataset",
    "read_path",
    "read_records",
    "register_reader",
    "stream_path",
]
