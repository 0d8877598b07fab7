"""Hidden-state cache: a frozen encoder's per-token hidden states, float16, memory-mapped.

The ``tokens`` and ``top-k`` modes train on the hidden states a frozen encoder gives each
token -- the last layer's output (``tokens``), or what enters the last N layers
(``top-k``). The frozen part runs once per distinct token sequence, ever: states are
content-addressed by the sequence's exact token ids (which the trainer's rendering and
truncation of the text decide), the encoder (its folder and the size and time of its
weights, as :func:`factory.embed.cache.model_key`), the layer and ``max_length``, so folds,
seeds and later runs on the same texts read them back, and another model, layer or length
is another folder.

Layout under ``root/<model_key>/``: shards of up to :data:`SHARD_SEQUENCES` sequences,
each ``<shard>.bin`` (float16, ``tokens × dim``, read through ``numpy.memmap``),
``<shard>.offsets.npy`` (int64, one more than its sequences) and ``<shard>.keys.npy``
(uint64 digests of the token ids). The keys file is written last and marks the shard
complete; a shard is written under a hidden name and renamed, so Ctrl+C or a crash loses
at most the shard being written and leaves nothing torn. Processes filling one folder at
once write distinct shards (a duplicate key is harmless: the first found is read).

Memory bound: the index keeps 24 bytes per cached sequence (key, shard, start, length as
numpy arrays, no Python object per sequence); while filling, one chunk of
:data:`FILL_CHUNK` sequences' states (``FILL_CHUNK × max_length × dim`` floats) is in RAM;
states are read a batch at a time from the memory maps.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from factory.embed.cache import model_key
from factory.embed.encoder import pad_batch
from factory.trainer.progress import bar

# Bump when what a state means changes (dtype, which layer's output): old folders are ignored.
FORMAT_VERSION = 1
SHARD_SEQUENCES = 4096
FILL_CHUNK = 256  # sequences per chunk written (sorted by length inside, for little padding)
FORWARD_BATCH = 32


def sequence_keys(sequences: Sequence[np.ndarray]) -> np.ndarray:
    """uint64 digest of each sequence's token ids (as int32, so int32 and int64 ids agree)."""
    out = np.empty(len(sequences), dtype=np.uint64)
    for i, seq in enumerate(sequences):
        data = np.ascontiguousarray(seq, dtype="<i4").tobytes()
        out[i] = int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"prefab-hid").digest(), "little")
    return out


class FrozenStates:
    """The frozen part of an encoder: hidden states entering layer ``layer`` (0: the
    embeddings' output; the number of layers: the last layer's output)."""

    def __init__(self, model: Any, pad_id: int, layer: int, device: torch.device):
        self.model = model
        self.pad_id = pad_id
        self.layer = layer
        self.device = device
        self.dim = int(model.config.hidden_size)
        self.forwards = 0  # encoder forward passes run (tests count them)

    @torch.inference_mode()
    def __call__(self, sequences: Sequence[np.ndarray]) -> list[np.ndarray]:
        """float16 states of each sequence, (its length, dim)."""
        ids, mask = pad_batch(sequences, self.pad_id, self.device)
        self.forwards += 1
        out = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        states = out.hidden_states[self.layer].to(torch.float16).cpu().numpy()
        return [states[i, : len(seq)] for i, seq in enumerate(sequences)]


@dataclass
class HiddenStates:
    """States of ``n`` sequences: where each lies in the store's shards."""

    store: HiddenStore
    shard: np.ndarray  # int32 per sequence
    start: np.ndarray  # int64 row of its first token in the shard
    length: np.ndarray  # int32 tokens

    def __len__(self) -> int:
        return len(self.length)

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(states float32 (B, T, dim), mask bool (B, T)) of ``rows``, right-padded."""
        width = int(self.length[rows].max()) if len(rows) else 0
        x = np.zeros((len(rows), width, self.store.dim), dtype=np.float32)
        mask = np.zeros((len(rows), width), dtype=bool)
        for b, i in enumerate(rows):
            n = int(self.length[i])
            x[b, :n] = self.store.shard_map(int(self.shard[i]))[int(self.start[i]) : int(self.start[i]) + n]
            mask[b, :n] = True
        return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)


class HiddenStore:
    """Per-sequence states under ``root/<model_key>`` (``root`` None: a temporary folder
    that lives as long as the store)."""

    def __init__(self, root: str | Path | None, frozen: FrozenStates, model_path: str, max_length: int):
        self.frozen = frozen
        self.dim = frozen.dim
        extra = f"hidden-states|v{FORMAT_VERSION}|layer={frozen.layer}|max_length={int(max_length)}|fp16"
        key = model_key(model_path, extra)
        if root is None:
            tmp = Path(tempfile.mkdtemp(prefix="prefab-hidden-"))
            weakref.finalize(self, shutil.rmtree, tmp, ignore_errors=True)
            root = tmp
        self.folder = Path(root) / key
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.is_file():
            meta.write_text(json.dumps({"model": str(model_path), "layer": frozen.layer,
                                        "max_length": int(max_length), "dim": self.dim,
                                        "format": FORMAT_VERSION}))
        self._maps: dict[int, np.ndarray] = {}
        self._names: list[str] = []
        self._keys = np.zeros(0, dtype=np.uint64)
        self._shard = np.zeros(0, dtype=np.int32)
        self._start = np.zeros(0, dtype=np.int64)
        self._length = np.zeros(0, dtype=np.int32)
        self._load_index()

    # ---- index
    def _load_index(self) -> None:
        """Add the shards written since the last look (by this process or another) to the
        index. Shard numbers never change: states handed out earlier stay valid."""
        known = set(self._names)
        new = sorted(p.name[: -len(".keys.npy")] for p in self.folder.glob("*.keys.npy")
                     if not p.name.startswith(".") and p.name[: -len(".keys.npy")] not in known)
        keys, shard, start, length = [self._keys], [self._shard], [self._start], [self._length]
        for name in new:
            number = len(self._names)
            self._names.append(name)
            k = np.load(self.folder / f"{name}.keys.npy")
            offsets = np.load(self.folder / f"{name}.offsets.npy")
            keys.append(k)
            shard.append(np.full(len(k), number, dtype=np.int32))
            start.append(offsets[:-1].astype(np.int64))
            length.append(np.diff(offsets).astype(np.int32))
        if not new:
            return
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        self._keys = all_keys[order]
        self._shard = np.concatenate(shard)[order]
        self._start = np.concatenate(start)[order]
        self._length = np.concatenate(length)[order]

    def __len__(self) -> int:
        return len(self._keys)

    def _find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key in the index, -1 where absent."""
        if not len(self._keys):
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self._keys, keys)
        clipped = np.minimum(pos, len(self._keys) - 1)
        return np.where(self._keys[clipped] == keys, clipped, -1)

    def shard_map(self, number: int) -> np.ndarray:
        arr = self._maps.get(number)
        if arr is None:
            path = self.folder / f"{self._names[number]}.bin"
            tokens = path.stat().st_size // (2 * self.dim)
            arr = self._maps[number] = np.memmap(path, dtype="<f2", mode="r", shape=(tokens, self.dim))
        return arr

    # ---- lookup and fill
    def states(self, sequences: Sequence[np.ndarray], *, progress: bool | None = False,
               desc: str = "hidden states") -> HiddenStates:
        """States of ``sequences`` (token ids, special tokens included): cached ones found,
        the rest computed by the frozen encoder and written, a shard at a time."""
        keys = sequence_keys(sequences)
        found = self._find(keys)
        missing = np.flatnonzero(found < 0)
        if len(missing):
            _, first = np.unique(keys[missing], return_index=True)
            self._fill([sequences[i] for i in missing[np.sort(first)]], keys[missing[np.sort(first)]],
                       progress, desc)
            self._load_index()
            found = self._find(keys)
        return HiddenStates(self, self._shard[found], self._start[found], self._length[found])

    def _fill(self, sequences: list[np.ndarray], keys: np.ndarray, progress: bool | None, desc: str) -> None:
        shown = bar(len(sequences), desc, progress, unit="seq")
        try:
            for begin in range(0, len(sequences), SHARD_SEQUENCES):
                stop = min(len(sequences), begin + SHARD_SEQUENCES)
                self._write_shard(sequences[begin:stop], keys[begin:stop], shown)
        finally:
            shown.close()

    def _write_shard(self, sequences: list[np.ndarray], keys: np.ndarray, shown: Any) -> None:
        name = f"shard-{uuid.uuid4().hex[:12]}"
        staging = [self.folder / f".{name}{suffix}" for suffix in (".bin", ".offsets.npy", ".keys.npy")]
        lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        try:
            with open(staging[0], "wb") as out:
                for begin in range(0, len(sequences), FILL_CHUNK):
                    chunk = sequences[begin : begin + FILL_CHUNK]
                    order = np.argsort([len(s) for s in chunk], kind="stable")
                    computed: list[np.ndarray | None] = [None] * len(chunk)
                    for b in range(0, len(order), FORWARD_BATCH):
                        idx = order[b : b + FORWARD_BATCH]
                        for i, state in zip(idx, self.frozen([chunk[i] for i in idx]), strict=True):
                            computed[i] = state
                    for state in computed:  # in sequence order: the offsets say where each is
                        out.write(np.ascontiguousarray(state, dtype="<f2").tobytes())
                    shown.update(len(chunk))
            np.save(staging[1], offsets)
            np.save(staging[2], keys)
            for tmp, suffix in zip(staging, (".bin", ".offsets.npy", ".keys.npy"), strict=True):
                os.replace(tmp, self.folder / f"{name}{suffix}")  # keys last: the shard is complete
        finally:
            for tmp in staging:
                tmp.unlink(missing_ok=True)


__all__ = ["FrozenStates", "HiddenStates", "HiddenStore", "sequence_keys"]
