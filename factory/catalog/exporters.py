"""Export a catalog version: Parquet, JSONL, TRL JSONL or a `datasets` folder.

Every writer streams record batches from :meth:`Catalog.batches` (which checks each file's
sha256 first), so memory stays bounded by one batch whatever the version's size (TRL reads
the version twice: its label columns to count ties and margins, then the rows). A Parquet
export of a one-file version is a copy of that file. Measured at 1M pairs (~0.5 kB of text
each): peak RSS 0.2 GiB (parquet), 0.35-0.4 GiB (jsonl, trl, hf).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
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
# A `datasets` folder is cut into Arrow shards of about this size, as save_to_disk does.
HF_SHARD_BYTES = 500 * 2**20


def export(catalog: Catalog, ref: str, format: ExportFormat, out: str | Path) -> dict[str, Any]:
    info = catalog.resolve(ref)
    out = Path(out)
    if format not in EXPORT_FORMATS:
        raise PrefabError(f"unknown export format {format!r} (known: {', '.join(EXPORT_FORMATS)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = {"parquet": _parquet, "jsonl": _jsonl, "trl": _trl, "hf": _hf}[format]
    extra = writer(catalog, info, out) or {}
    return {"ref": info.ref, "format": format, "out": str(out), "rows": info.rows, **extra}


def _parquet(catalog: Catalog, info: VersionInfo, out: Path) -> None:
    paths = catalog.checked_paths(info)
    if len(paths) == 1:
        shutil.copyfile(paths[0], out)
        return
    with pq.ParquetWriter(out, catalog.schema(info), **PARQUET_OPTIONS) as writer:
        for batch in catalog.batches(info, batch_rows=BATCH_ROWS):
            writer.write_batch(batch)


def _jsonl(catalog: Catalog, info: VersionInfo, out: Path) -> None:
    with open(out, "wb") as handle:
        for batch in catalog.batches(info, batch_rows=BATCH_ROWS):
            pl.from_arrow(batch).write_ndjson(handle)


def _trl(catalog: Catalog, info: VersionInfo, out: Path) -> dict[str, Any]:
    """TRL's conversational preference format: prompt, chosen, rejected and maybe `margin`.

    Tie pairs are left out: TRL has no ties, and writing one as chosen/rejected would
    teach a preference the annotators did not express; they are counted in
    ``ties_skipped``. TRL's RewardTrainer turns a `margin` column into a tensor, so it
    is written only when every exported row has a margin (``margin_written``); with
    some rows lacking one it is left out and ``margin_missing`` says how many lack it.
    Extra (non-canonical) columns are not exported.
    """
    ties, preferences, missing = _label_counts(catalog, info)
    with_margin = preferences > 0 and missing == 0
    columns = ["prompt", "chosen", "rejected"] + (["margin"] if with_margin else [])
    written = 0
    with open(out, "wb") as handle:
        for batch in catalog.batches(info, columns=[*columns, "tie"], batch_rows=BATCH_ROWS):
            frame = pl.from_arrow(batch).filter(~pl.col("tie")).select(columns).with_columns(
                pl.concat_list(pl.struct(role=pl.lit("assistant"), content=pl.col(side))).alias(side)
                for side in ("chosen", "rejected")
            )
            frame.write_ndjson(handle)
            written += frame.height
    result: dict[str, Any] = {"rows": written, "ties_skipped": ties, "margin_written": with_margin}
    if missing and preferences > missing:
        result["margin_missing"] = missing
    return result


def _label_counts(catalog: Catalog, info: VersionInfo) -> tuple[int, int, int]:
    """Ties, non-tie pairs and non-tie pairs without a margin: a first pass over the two
    label columns, a batch at a time."""
    ties = preferences = missing = 0
    for batch in catalog.batches(info, columns=["tie", "margin"], batch_rows=BATCH_ROWS):
        tie = pc.fill_null(batch.column("tie"), False)
        ties += int(pc.sum(tie).as_py() or 0)
        margins = pc.filter(batch.column("margin"), pc.invert(tie))
        preferences += len(margins)
        missing += margins.null_count
    return ties, preferences, missing


# `load` keeps one Arrow copy per version here (memory-mapped; `catalog gc` cleans it) and
# never writes to the `datasets` cache outside the home.
LOAD_CACHE = Path("cache") / "datasets"


def load_cache_path(catalog: Catalog, info: VersionInfo) -> Path:
    """Where ``load`` keeps ``info``'s rows as Arrow: named by the version's data files' sha256."""
    key = hashlib.sha256(" ".join(info.file_sha256).encode()).hexdigest()
    return catalog.home / LOAD_CACHE / f"{key}.arrow"


def to_hf_dataset(catalog: Catalog, ref: str, progress: bool = False) -> Any:
    """A version as a memory-mapped `datasets.Dataset` over an Arrow file under the home.

    The Parquet rows are streamed once into ``home/cache/datasets/<key>.arrow`` (later loads
    of the same content reuse it); no progress bar unless ``progress``.
    """
    import datasets

    info = catalog.resolve(ref)
    path = load_cache_path(catalog, info)
    if path.is_file():
        os.utime(path)  # its last use, which `catalog gc` measures the grace period from
    else:
        _write_arrow_stream(catalog, info, path, progress)
    return datasets.Dataset.from_file(str(path), in_memory=False)


def _write_arrow_stream(catalog: Catalog, info: VersionInfo, path: Path, progress: bool) -> None:
    """The version's rows as an Arrow IPC stream (the layout `Dataset.from_file` maps), atomically."""
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.arrow.tmp")
    try:
        with tqdm(total=info.rows, desc=f"load {info.ref}", unit="row", disable=not progress) as bar, \
                pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, catalog.schema(info)) as writer:
            for batch in catalog.batches(info, batch_rows=BATCH_ROWS):
                writer.write_batch(batch)
                bar.update(batch.num_rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clear_hf_folder(out: Path) -> None:
    """Make ``out`` an empty folder, replacing an earlier export but never other files."""
    if out.exists() and not out.is_dir():
        raise PrefabError(f"{out} exists and is not a folder (an hf export writes a folder)")
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if p.name in ("state.json", "dataset_info.json")
            or (p.name.startswith("data-") and p.suffix == ".arrow")]
    others = [p.name for p in out.iterdir() if p not in ours]
    if others:
        raise PrefabError(f"{out} is not empty and not an earlier hf export (holds {', '.join(sorted(others)[:3])}); "
                          "choose a new folder")
    for path in ours:
        path.unlink()


def _hf(catalog: Catalog, info: VersionInfo, out: Path) -> dict[str, Any]:
    """A folder `datasets.load_from_disk` opens, written shard by shard from streamed batches.

    It is the layout `Dataset.save_to_disk` makes (Arrow shards, state.json,
    dataset_info.json), written with `datasets`' own ArrowWriter, without first building
    the whole dataset in a cache (which held the version in memory).
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    features = datasets.Features.from_arrow_schema(catalog.schema(info))
    _clear_hf_folder(out)
    shards: list[Path] = []
    writer: ArrowWriter | None = None
    shard_bytes = 0
    try:
        for batch in catalog.batches(info, batch_rows=BATCH_ROWS):
            if writer is None or shard_bytes >= HF_SHARD_BYTES:
                if writer is not None:
                    writer.finalize()
                    writer.close()
                shards.append(out / f"shard-{len(shards)}.arrow.tmp")
                writer = ArrowWriter(features=features, path=str(shards[-1]))
                shard_bytes = 0
            writer.write_table(pa.Table.from_batches([batch]))
            shard_bytes += batch.nbytes
        if writer is None:  # an empty version still makes one (empty) shard
            shards.append(out / "shard-0.arrow.tmp")
            writer = ArrowWriter(features=features, path=str(shards[-1]))
        writer.finalize()
        writer.close()
    except BaseException:
        for shard in shards:
            shard.unlink(missing_ok=True)
        raise
    names = [f"data-{i:05d}-of-{len(shards):05d}.arrow" for i in range(len(shards))]
    for shard, name in zip(shards, names, strict=True):
        shard.rename(out / name)
    state = {
        "_data_files": [{"filename": name} for name in names],
        # The content's identity: the data files' sha256, so equal versions get equal fingerprints.
        "_fingerprint": hashlib.sha256(" ".join(info.file_sha256).encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    datasets.DatasetInfo(features=features).write_to_directory(str(out))
    return {"shards": len(shards)}
