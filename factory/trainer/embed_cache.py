"""On-disk embedding cache: the frozen encoder runs once per distinct input, ever.

Layout: ``home/embeddings/<model_key>/<shard>.npz``, each shard holding ``keys`` (16-byte
digests of the exact token ids embedded) and ``vectors`` (float32). Keying by token ids
rather than raw text means a change of truncation or template is a miss, never a stale hit.
Shards are written to a temporary name and renamed, so a crash leaves no torn shard, and
two processes filling the cache at once write distinct shards (duplicates are harmless).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

KEY_BYTES = 16


def model_key(model_path: str, extra: str = "") -> str:
    """Stable folder name for an encoder: its name plus a hash of its weights' identity."""
    path = Path(model_path)
    ident = [str(path.resolve())]
    for name in ("model.safetensors", "pytorch_model.bin", "config.json"):
        f = path / name
        if f.is_file():
            stat = f.stat()
            ident.append(f"{name}:{stat.st_size}:{int(stat.st_mtime)}")
    ident.append(extra)
    digest = hashlib.sha256("|".join(ident).encode()).hexdigest()[:16]
    return f"{path.name or 'model'}-{digest}"


def ids_key(ids: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=KEY_BYTES).digest()


class EmbeddingCache:
    def __init__(self, root: str | Path, key: str):
        self.folder = Path(root) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        self._index: dict[bytes, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        self._load()

    def _load(self) -> None:
        for shard in sorted(self.folder.glob("*.npz")):
            try:
                with np.load(shard) as data:
                    keys, vectors = data["keys"], data["vectors"]
            except (OSError, ValueError, KeyError):
                continue  # an unreadable shard is only lost work: recompute those rows
            for raw, vec in zip(keys, vectors, strict=True):
                self._index[bytes(raw)] = vec

    def __len__(self) -> int:
        return len(self._index)

    def get_or_compute(
        self,
        sequences: Sequence[np.ndarray],
        compute: Callable[[Sequence[np.ndarray]], np.ndarray],
    ) -> np.ndarray:
        keys = [ids_key(s) for s in sequences]
        missing: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self._index and k not in missing:
                missing[k] = i
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            vectors = np.asarray(compute([sequences[i] for i in missing.values()]), dtype=np.float32)
            self._write(list(missing), vectors)
            for k, vec in zip(missing, vectors, strict=True):
                self._index[k] = vec
        return np.stack([self._index[k] for k in keys]) if keys else np.zeros((0, 0), np.float32)

    def _write(self, keys: list[bytes], vectors: np.ndarray) -> None:
        name = uuid.uuid4().hex
        tmp = self.folder / f".{name}.tmp.npz"
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
        np.savez(tmp, keys=key_array, vectors=vectors)
        os.replace(tmp, self.folder / f"{name}.npz")
