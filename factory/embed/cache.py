"""On-disk embedding cache: the frozen encoder runs once per distinct input, ever.

Layout: ``home/embeddings/<model_key>/<shard>.npz``, each shard holding ``keys`` (16-byte
digests) and ``vectors`` (float32). Two kinds of key share one folder per encoder:

- :func:`ids_key` -- the exact token ids embedded. The trainer renders and truncates
  (prompt, response) itself, so a change of truncation or template is a miss, never a
  stale hit.
- :func:`text_key` -- a plain text and the token limit it was cut at
  (:func:`factory.embed.embed_texts`), so a cache hit costs no tokenisation.

Shards are flushed while the work goes on (every ``shard_rows`` rows or ``flush_seconds``)
and once more when it stops for any reason, Ctrl+C included, so an interrupted run keeps
what it computed and a rerun computes only the rest. Each shard is written to a hidden
temporary name and renamed, so a crash leaves no torn shard; processes filling one cache
at once write distinct shards (a duplicate key is harmless). Only the keys are read at
start-up; vectors are read from their shard when asked for, so a cache far larger than
memory costs little to open.
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

KEY_BYTES = 16
# Marker file whose mtime is the cache's last use (what `catalog gc` measures its grace from).
LAST_USED = "last-used"
SHARD_ROWS = 2048
FLUSH_SECONDS = 30.0

T = TypeVar("T")


class EmbeddingInterrupted(KeyboardInterrupt):
    """Embedding stopped (Ctrl+C, SIGTERM); what was computed is saved in the cache."""

    def __init__(self, saved: int, missing: int, folder: Path | None):
        self.saved = saved
        self.missing = missing
        self.folder = folder
        where = f" in {folder}" if folder is not None else ""
        super().__init__(
            f"embedding stopped: {saved} of {missing} new embeddings saved{where}; "
            "a rerun computes only the rest"
        )


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
    data = np.ascontiguousarray(ids, dtype=np.int64).tobytes()
    return hashlib.blake2b(data, digest_size=KEY_BYTES, person=b"prefab-ids").digest()


def text_key(text: str, max_tokens: int) -> bytes:
    data = f"{max_tokens}\x00{text}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(data, digest_size=KEY_BYTES, person=b"prefab-text").digest()


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """While embedding, SIGINT and SIGTERM raise KeyboardInterrupt in the main thread.

    Python does so for SIGINT already, unless the process inherited SIGINT ignored: a
    shell without job control (a script, ``cmd &``) starts background jobs that way, and
    a ``kill -INT`` was then silently dropped while the trainer embedded (a review
    finding). The training loop catches SIGINT in that case too, so embedding does the
    same. A handler some other part installed (e.g. the LLM runner's graceful stop) is
    left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    previous: dict[int, Any] = {}
    try:
        int_now = signal.getsignal(signal.SIGINT)
        if int_now in (signal.SIG_IGN, signal.SIG_DFL):
            previous[signal.SIGINT] = int_now
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            previous[signal.SIGTERM] = signal.SIG_DFL
            signal.signal(signal.SIGTERM, on_term)
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def show_progress(progress: bool | None) -> bool:
    """``None``: a bar only when stderr is a terminal, so logs and pipes stay clean."""
    if progress is None:
        return sys.stderr.isatty()
    return bool(progress)


class EmbeddingCache:
    """Vectors by 16-byte key, on disk under ``root/key`` (``root=None``: this process only)."""

    def __init__(self, root: str | Path | None, key: str, *, shard_rows: int = SHARD_ROWS,
                 flush_seconds: float = FLUSH_SECONDS):
        self.folder = Path(root) / key if root is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.shard_rows = shard_rows
        self.flush_seconds = flush_seconds
        self._lock = threading.RLock()
        self._shards: list[Path] = []
        self._shard_names: set[str] = set()
        self._index: dict[bytes, tuple[int, int]] = {}  # key -> (shard number, row)
        self._memory: dict[bytes, np.ndarray] = {}  # root=None only
        self.hits = 0
        self.misses = 0
        self._marked_at = -math.inf
        self.refresh()

    def _mark_used(self) -> None:
        """Touch ``last-used``: `prefab catalog gc` keeps a cache some recent run used."""
        if self.folder is None or time.monotonic() - self._marked_at < 60:
            return
        self._marked_at = time.monotonic()
        (self.folder / LAST_USED).touch()

    def refresh(self) -> None:
        """Index shards written since (by this or another process): their keys only."""
        if self.folder is None:
            return
        with self._lock:
            for shard in sorted(self.folder.glob("*.npz")):
                if shard.name.startswith(".") or shard.name in self._shard_names:
                    continue  # hidden: a temporary file still being written
                try:
                    with np.load(shard) as data:
                        keys = data["keys"]
                except (OSError, ValueError, KeyError):
                    continue  # an unreadable shard is only lost work: recompute those rows
                number = len(self._shards)
                self._shards.append(shard)
                self._shard_names.add(shard.name)
                for row, raw in enumerate(keys):
                    self._index.setdefault(bytes(raw), (number, row))

    def __len__(self) -> int:
        return len(self._index) + len(self._memory)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index or key in self._memory

    def _read(self, keys: Sequence[bytes], positions: np.ndarray, out: np.ndarray) -> None:
        """Fill ``out[positions[i]]`` with the stored vector of ``keys[i]``, shard by shard."""
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for key, pos in zip(keys, positions, strict=True):
            if key in self._memory:
                out[pos] = self._memory[key]
                continue
            number, row = self._index[key]
            by_shard.setdefault(number, []).append((int(pos), row))
        for number, wanted in by_shard.items():
            with np.load(self._shards[number]) as data:
                vectors = data["vectors"]
            dest, rows = zip(*wanted, strict=True)
            out[list(dest)] = vectors[list(rows)]

    def get_or_compute(
        self,
        keys: Sequence[bytes],
        items: Sequence[T],
        compute: Callable[[list[T]], np.ndarray],
        *,
        dim: int,
        batch_size: int = 64,
        progress: bool | None = None,
        desc: str = "embed",
    ) -> np.ndarray:
        """Vectors of ``items`` (n, dim): stored ones read back, the rest computed once each.

        ``compute`` gets one batch of at most ``batch_size`` distinct missing items at a
        time, shortest first (less padding). Completed batches reach the disk as shards
        along the way and when the work stops for any reason; a KeyboardInterrupt then
        propagates as :class:`EmbeddingInterrupted`.
        """
        if len(keys) != len(items):
            raise ValueError("keys and items differ in length")
        out = np.zeros((len(keys), dim), dtype=np.float32)
        if not keys:
            return out
        self.refresh()
        self._mark_used()
        missing: dict[bytes, int] = {}  # key -> first position
        for i, k in enumerate(keys):
            if k not in self and k not in missing:
                missing[k] = i
        hit_pos = np.asarray([i for i, k in enumerate(keys) if k not in missing], dtype=np.int64)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            computed = self._compute_missing(missing, items, compute, dim, batch_size, progress, desc)
            for k, vec in computed.items():
                out[missing[k]] = vec
            # Repeated keys inside this call take the vector of their first occurrence.
            for i, k in enumerate(keys):
                if k in missing and i != missing[k]:
                    out[i] = out[missing[k]]
        if len(hit_pos):
            with self._lock:
                self._read([keys[i] for i in hit_pos], hit_pos, out)
        return out

    def _compute_missing(self, missing: dict[bytes, int], items: Sequence[T],
                         compute: Callable[[list[T]], np.ndarray], dim: int, batch_size: int,
                         progress: bool | None, desc: str) -> dict[bytes, np.ndarray]:
        from tqdm.auto import tqdm

        todo = sorted(missing, key=_length_of(items, missing).__getitem__)
        done: dict[bytes, np.ndarray] = {}
        pending: list[bytes] = []
        last_flush = time.monotonic()

        def flush() -> None:
            nonlocal pending, last_flush
            if pending:
                self._write(pending, np.stack([done[k] for k in pending]))
                pending = []  # only once the shard is on disk: a failed write is retried
            last_flush = time.monotonic()

        bar = tqdm(total=len(todo), desc=desc, unit="text", dynamic_ncols=True,
                   disable=not show_progress(progress), smoothing=0.05)
        try:
            with interrupts_raise():
                for start in range(0, len(todo), batch_size):
                    batch = todo[start : start + batch_size]
                    vectors = np.asarray(compute(_gather(items, [missing[k] for k in batch])),
                                         dtype=np.float32)
                    if vectors.shape != (len(batch), dim):
                        raise ValueError(f"encoder returned {vectors.shape}, expected {(len(batch), dim)}")
                    done.update(zip(batch, vectors, strict=True))
                    pending += batch
                    bar.update(len(batch))
                    if len(pending) >= self.shard_rows or time.monotonic() - last_flush >= self.flush_seconds:
                        flush()
                flush()
        except KeyboardInterrupt as exc:
            with interrupts_raise():
                flush()  # keep what is complete (a second Ctrl+C here loses only this shard)
            if isinstance(exc, EmbeddingInterrupted):
                raise
            raise EmbeddingInterrupted(len(done), len(todo), self.folder) from exc
        except BaseException:
            flush()  # an encoder error in batch 90 still keeps batches 1 to 89
            raise
        finally:
            bar.close()
        return done

    def put(self, keys: Sequence[bytes], vectors: np.ndarray) -> int:
        """Store vectors computed elsewhere (Ray workers) as one shard; keys already here are
        skipped. Returns how many were new."""
        fresh = [i for i, k in enumerate(keys) if k not in self]
        if fresh:
            self._write([keys[i] for i in fresh], np.asarray(vectors, dtype=np.float32)[fresh])
        return len(fresh)

    def _write(self, keys: list[bytes], vectors: np.ndarray) -> None:
        with self._lock:
            if self.folder is None:
                for k, vec in zip(keys, vectors, strict=True):
                    self._memory[k] = vec
                return
            name = f"{uuid.uuid4().hex}.npz"
            tmp = self.folder / f".{name}.tmp.npz"
            key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), KEY_BYTES)
            try:
                np.savez(tmp, keys=key_array, vectors=np.asarray(vectors, dtype=np.float32))
                os.replace(tmp, self.folder / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            number = len(self._shards)
            self._shards.append(self.folder / name)
            self._shard_names.add(name)
            for row, k in enumerate(keys):
                self._index.setdefault(k, (number, row))


_CACHES: dict[Path, EmbeddingCache] = {}
_CACHES_LOCK = threading.Lock()


def open_cache(root: str | Path | None, key: str) -> EmbeddingCache:
    """One :class:`EmbeddingCache` per folder and process, so the index is read once."""
    if root is None:
        return EmbeddingCache(None, key)
    folder = (Path(root) / key).resolve()
    with _CACHES_LOCK:
        cache = _CACHES.get(folder)
        if cache is None or not folder.is_dir():
            cache = _CACHES[folder] = EmbeddingCache(root, key)
        return cache


def _length_of(items: Sequence[Any], positions: dict[bytes, int]) -> dict[bytes, int]:
    """The length of the item at each position (texts in Arrow: counted there, unconverted)."""
    import pyarrow as pa

    from factory.columns import ArrowColumn

    if isinstance(items, ArrowColumn) and (pa.types.is_string(items.type) or pa.types.is_large_string(items.type)):
        lengths = items.take(np.fromiter(positions.values(), np.int64, len(positions))).lengths()
        return dict(zip(positions, lengths.tolist(), strict=True))
    return {k: len(items[i]) for k, i in positions.items()}


def _gather(items: Sequence[T], positions: list[int]) -> list[T]:
    """The items at ``positions``: one Arrow take for a lazy column, else by index."""
    from factory.columns import ArrowColumn

    if isinstance(items, ArrowColumn):
        return list(items.take(np.asarray(positions, dtype=np.int64)))
    return [items[i] for i in positions]
