"""Content-addressed Parquet objects: a file's name is the sha256 of its bytes.

A file is written under a temporary name, hashed while it is written, fsynced and then
renamed into place, so a reader never sees half a file and equal data is stored once.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

# zstd keeps text-heavy pairs small at close to snappy's write speed.
PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 1, "row_group_size": 64 * 1024}


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


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def path_of(self, sha256: str) -> Path:
        return self.root / sha256[:2] / f"{sha256}.parquet"

    def write_table(self, table: pa.Table) -> StoredObject:
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp_path = self.tmp / f"{uuid.uuid4().hex}.parquet.tmp"
        try:
            with open(tmp_path, "wb") as raw:
                sink = _HashingWriter(raw)
                pq.write_table(table, pa.PythonFile(sink, mode="w"), **PARQUET_OPTIONS)
                raw.flush()
                os.fsync(raw.fileno())
            sha256 = sink.digest.hexdigest()
            final = self.path_of(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_path, final)
        finally:
            tmp_path.unlink(missing_ok=True)
        _fsync_dir(final.parent)
        return StoredObject(sha256, final, sink.size, table.num_rows)

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
