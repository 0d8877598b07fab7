"""Export a catalog version: Parquet, JSONL, TRL JSONL or a `datasets` folder.

Every writer streams record batches, so memory stays bounded by one batch whatever the
version's size.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.catalog.catalog import Catalog, VersionInfo
from factory.catalog.store import PARQUET_OPTIONS
from schemas.errors import PrefabError

ExportFormat = Literal["parquet", "jsonl", "trl", "hf"]
EXPORT_FORMATS: tuple[str, ...] = ("parquet", "jsonl", "trl", "hf")
BATCH_ROWS = 16_384


def export(catalog: Catalog, ref: str, format: ExportFormat, out: str | Path) -> dict[str, Any]:
    info = catalog.resolve(ref)
    out = Path(out)
    if format not in EXPORT_FORMATS:
        raise PrefabError(f"unknown export format {format!r} (known: {', '.join(EXPORT_FORMATS)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = {"parquet": _parquet, "jsonl": _jsonl, "trl": _trl, "hf": _hf}[format]
    extra = writer(catalog, info, out) or {}
    return {"ref": info.ref, "format": format, "out": str(out), "rows": info.rows, **extra}


def _batches(catalog: Catalog, info: VersionInfo, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """One batch at a time, file by file: no read-ahead, so memory stays at about a row group."""
    for path in catalog.paths(info):
        # pre_buffer would read whole row groups ahead (hundreds of MiB on big versions).
        reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        yield from reader.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _parquet(catalog: Catalog, info: VersionInfo, out: Path) -> None:
    paths = catalog.paths(info)
    if len(paths) == 1:
        shutil.copyfile(paths[0], out)
        return
    with pq.ParquetWriter(out, catalog.scanner(info).schema, **PARQUET_OPTIONS) as writer:
        for batch in _batches(catalog, info):
            writer.write_batch(batch)


def _jsonl(catalog: Catalog, info: VersionInfo, out: Path) -> None:
    with open(out, "wb") as handle:
        for batch in _batches(catalog, info):
            pl.from_arrow(batch).write_ndjson(handle)


def _trl(catalog: Catalog, info: VersionInfo, out: Path) -> dict[str, Any]:
    """TRL's conversational preference format, plus `margin` and `tie` columns when used.

    TRL's RewardTrainer reads `margin`; `tie` is prefab's own (TRL has no ties) and is
    written only when the version holds tie pairs, so tie labels survive a round trip.
    """
    labels = catalog.scanner(info).to_table(columns=["tie", "margin"])
    with_ties = bool(pc.any(labels["tie"]).as_py())
    with_margin = labels["margin"].null_count < labels.num_rows
    columns = ["prompt", "chosen", "rejected"] + (["margin"] if with_margin else []) + (["tie"] if with_ties else [])
    with open(out, "wb") as handle:
        for batch in _batches(catalog, info, columns):
            frame = pl.from_arrow(batch).with_columns(
                pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(side))).alias(side)
                for side in ("chosen", "rejected")
            )
            frame.write_ndjson(handle)
    return {"ties_written": with_ties, "margin_written": with_margin}


def to_hf_dataset(catalog: Catalog, ref: str) -> Any:
    import datasets

    return datasets.Dataset.from_parquet([str(p) for p in catalog.paths(ref)])


def _hf(catalog: Catalog, info: VersionInfo, out: Path) -> None:
    to_hf_dataset(catalog, info.ref).save_to_disk(str(out))
