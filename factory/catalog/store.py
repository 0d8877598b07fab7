"""Content-addressed Parquet objects: a file's name is the sha256 of its bytes.

A file is written under a temporary name, hashed while it is written, fsynced and then
renamed into place, so a reader never sees half a file and equal data is stored once.
Writers take record batches one at a time (memory stays at about one row group) and cut
row groups at fixed row counts, so the same rows make the same bytes however they were
batched: equal content gets equal names.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

# zstd keeps text-heavy pairs small at close to snappy's write speed.
ROW_GROUP_ROWS = 64 * 1024
WRITE_BUFFER_BYTES = 8 * 1024 * 1024
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1, "row_group_size": ROW_GROUP_ROWS}


@dataclass(frozen=True)
class StoredObject:
    sha256: str
    path: Path
    bytes: int
    rows: int


class _HashingWriter:
    """A write-only file object that hashes every byte on its way to disk."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


class ObjectWriter:
    """Streams record batches into one content-addressed Parquet object.

    ``write`` buffers batches up to a row group and writes it; ``finish`` fsyncs, names
    the file by its sha256 and returns it; ``abort`` (or leaving a ``with`` block on an
    exception) deletes the temporary file.
    """

    def __init__(self, store: ObjectStore, schema: pa.Schema) -> None:
        self._store = store
        self.schema = schema
        store.tmp.mkdir(parents=True, exist_ok=True)
        self._tmp_path = store.tmp / f"{uuid.uuid4().hex}.parquet.tmp"
        self._raw = open(self._tmp_path, "wb")  # noqa: SIM115 - closed in finish/abort
        self._sink = _HashingWriter(self._raw)
        # Buffered, so Python's write() (which needs the GIL) runs once per few MiB rather
        # than once per page: the writer thread then barely competes with id hashing.
        self._stream = pa.BufferedOutputStream(pa.PythonFile(self._sink, mode="w"), WRITE_BUFFER_BYTES)
        self._writer = pq.ParquetWriter(self._stream, schema,
                                        compression=PARQUET_OPTIONS["compression"],
                                        compression_level=PARQUET_OPTIONS["compression_level"])
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows == 0:
            return
        if not batch.schema.equals(self.schema):
            batch = batch.cast(self.schema)
        batches = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
        for part in batches:
            self._pending.append(part)
            self._pending_rows += part.num_rows
            self.rows += part.num_rows
        while self._pending_rows >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        pending = pa.Table.from_batches(self._pending, schema=self.schema)
        # One contiguous chunk per row group: Parquet pages break at chunk boundaries, and
        # the bytes (so the object's name) must not depend on how the caller batched rows.
        self._writer.write_table(pending.slice(0, rows).combine_chunks(), row_group_size=rows)
        rest = pending.slice(rows)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows

    def finish(self) -> StoredObject:
        try:
            if self._pending_rows:
                self._flush(self._pending_rows)
            self._writer.close()
            self._stream.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            sha256 = self._sink.digest.hexdigest()
            final = self._store.path_of(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self._tmp_path, final)
        except BaseException:
            self.abort()
            raise
        _fsync_dir(final.parent)
        return StoredObject(sha256, final, self._sink.size, self.rows)

    def abort(self) -> None:
        # The file is being thrown away; the error that got us here is the one to report.
        with contextlib.suppress(Exception):
            self._writer.close()
        with contextlib.suppress(Exception):
            self._stream.close()
        self._raw.close()
        self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            self.abort()


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def path_of(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.parquet"

    def writer(self, schema: pa.Schema) -> ObjectWriter:
        return ObjectWriter(self, schema)

    def write_table(self, table: pa.Table) -> StoredObject:
        with self.writer(table.schema) as writer:
            writer.write(table)
            return writer.finish()

    def hash_file(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(8 * 1024 * 1024):
                digest.update(chunk)
        return digest.hexdigest()

    def all_objects(self) -> list[Path]:
        return sorted(p for p in self.root.glob("??/*.parquet"))

    def temporary_files(self) -> list[Path]:
        return sorted(self.tmp.glob("*.tmp")) if self.tmp.exists() else []


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
