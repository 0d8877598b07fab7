"""Read external preference data into canonical pair tables, with row-level validation.

``read_path(path, format="auto")`` returns a :class:`ReadResult`: the pairs, the rows it
quarantined with their reasons, what it coerced and warned about, and counts that add up:
``rows_in == rows_out + quarantined``.
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


@dataclass
class ReadResult:
    table: pa.Table
    quarantine: pa.Table
    format: str
    format_reason: str
    rows_in: int
    coerced: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)

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
        }


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
    return read_records(records, spec, file=str(path), on_error=on_error, strict=strict,
                        column_map=column_map, format_reason=reason, progress=progress)


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
    from tqdm import tqdm

    ctx = RowContext(file=file, strict=strict)
    rows: list[dict[str, Any]] = []
    bad: list[dict[str, Any]] = []
    rows_in = 0
    # disable=None: tqdm shows the bar only on a terminal, so logs and pipes stay clean.
    with tqdm(desc=f"read {spec.name}", unit=" rows", disable=None if progress else True,
              mininterval=0.5, leave=False) as bar:
        for record in _renamed(records, column_map):
            rows_in += 1
            bar.update()
            try:
                if isinstance(record.value, InputError):
                    raise record.value
                pair = spec.parse(record, ctx)
            except InputError as error:
                if on_error == "fail":
                    raise
                bad.append({"file": error.file or record.file, "line": error.line or record.line,
                            "field": error.field, "reason": error.reason,
                            "raw": record.raw if record.raw is not None else raw_text(record.value)})
                continue
            pair.provenance.step = f"read:{spec.name}"
            rows.append(pair.to_row())
    table = pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)
    repeated = _count_repeated_pairs(table)
    if repeated:
        ctx.warnings["repeated_pair"] += repeated
    return ReadResult(
        table=table,
        quarantine=pa.Table.from_pylist(bad, schema=QUARANTINE_SCHEMA),
        format=spec.name,
        format_reason=format_reason,
        rows_in=rows_in,
        coerced=ctx.coerced,
        warnings=ctx.warnings,
    )


def _spec(format: str, column_map: dict[str, str] | None) -> ReaderSpec:
    if format not in READERS:
        raise InputError(f"unknown format {format!r} (known: auto, {', '.join(sorted(READERS))})")
    spec = READERS[format]
    if column_map and not spec.accepts_column_map:
        raise InputError(f"--map applies to column formats (trl, jsonl, parquet, hf), not {format!r}")
    return spec


def _renamed(records: Iterable[Record], column_map: dict[str, str] | None) -> Iterator[Record]:
    if not column_map:
        yield from records
        return
    for record in records:
        value = record.value
        if isinstance(value, dict):
            missing = [source for source in column_map.values() if source not in value]
            if missing:
                value = InputError(f"missing mapped column {missing[0]!r}", file=record.file,
                                   line=record.line, field=missing[0])
            else:
                value = {**value, **{canonical: value[source] for canonical, source in column_map.items()}}
        yield Record(record.file, record.line, value, record.raw)


def _count_repeated_pairs(table: pa.Table) -> int:
    """Rows whose pair_id an earlier row already has.

    They stay: in human data a repeat is a separate judgment (PandaLM rates the same two
    outputs once per model pair that produced them), and dropping one is a filter's decision.
    """
    return table.num_rows - pa.compute.count_distinct(table.column("pair_id")).as_py()


__all__ = [
    "READERS",
    "ReadResult",
    "ReaderSpec",
    "detect_format",
    "read_dataset",
    "read_path",
    "read_records",
    "register_reader",
]
