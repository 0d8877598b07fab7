"""Token cache: the truncated token ids of (prompt, response) sequences, memory-mapped.

Full mode trains on token ids. Holding them as one numpy array per sequence costs about
20 GB at a million pairs; here they live on disk instead, as one flat ``int32`` array
(``ids.bin``, read through ``numpy.memmap``) plus ``offsets.npy`` (``int64``, one more
than the sequences: sequence ``i`` is ``ids[offsets[i]:offsets[i + 1]]``) and
``truncated.npy`` (``bool``, one per sequence). A batch slices the sequences it needs and
pads only itself (:func:`factory.embed.encoder.pad_batch`).

The ids are the ones :func:`factory.trainer.backbones.encode_pairs` gives -- the same
rendering and truncation (prompt cut from the left keeping the last user turn, response
keeping its opening and its end) -- written a chunk of
:data:`~factory.trainer.backbones.ENCODE_CHUNK` sequences at a time.

Entries are content-addressed under ``<home>/tokens/<key>/``, where ``key`` hashes the
text of every (prompt, response) in order, the tokenizer's identity (``name_or_path``,
vocabulary size and a hash of the files ``save_pretrained`` writes: vocabulary, merges,
normaliser, special tokens, chat template), ``max_length`` and
:data:`TRUNCATION_VERSION`. A second run on the same texts reuses the entry without
calling the tokenizer; another tokenizer or length makes another entry. An entry is
written into a hidden folder and renamed into place once complete, so an interrupted
run leaves no half entry behind (``meta.json`` is written last and marks it complete).

Memory bound: while writing, one chunk's untruncated token lists (``ENCODE_CHUNK``
sequences × their untokenised length, as Python ints) plus 9 bytes per sequence (offset
and truncation flag); once written, 9 bytes per sequence for the offsets, flags and
lengths the trainer keeps -- the ids themselves are pages of a memory map that the OS
reads in and drops as batches touch them, never a Python object per sequence.
Measured (MiniLM tokenizer, chosen and rejected, ~450-token answers cut to max_length 256):
peak RSS above the texts 174 MiB at 5k pairs, 176 MiB at 50k, 191 MiB at 200k -- flat,
where one array per sequence grew (235 MiB at 20k, 369 MiB at 50k, 999 MiB at 200k).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from factory.trainer import backbones

# Bump whenever rendering, special tokens or budget_truncate change the ids a pair gets:
# entries made under another version are never read again.
TRUNCATION_VERSION = 1
IDS_FILE, OFFSETS_FILE, TRUNCATED_FILE, META_FILE = "ids.bin", "offsets.npy", "truncated.npy", "meta.json"


class TokenIds:
    """Memory-mapped token ids of ``n`` sequences; ``tokens[i]`` is sequence ``i`` (int32)."""

    def __init__(self, folder: Path, temporary: Path | None = None):
        self.folder = folder
        if temporary is not None:  # an uncached entry: removed with the last reference to it
            weakref.finalize(self, shutil.rmtree, temporary, ignore_errors=True)
        self.offsets = np.load(folder / OFFSETS_FILE, mmap_mode="r")
        self.truncated = np.load(folder / TRUNCATED_FILE)
        total = int(self.offsets[-1])
        # numpy cannot map an empty file: an all-empty entry has nothing to map anyway.
        self.ids = (np.memmap(folder / IDS_FILE, dtype="<i4", mode="r", shape=(total,))
                    if total else np.zeros(0, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i = i % len(self)
        return self.ids[int(self.offsets[i]) : int(self.offsets[i + 1])]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Tokens in each sequence (int64)."""
        return np.diff(np.asarray(self.offsets))


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What decides a tokenizer's ids: its name, vocabulary size and the files it saves."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if path.is_file():
                digest.update(path.relative_to(tmp).as_posix().encode() + b"\0")
                digest.update(_identity_bytes(path))
    return {"name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "vocab_size": len(tokenizer), "files": digest.hexdigest()}


def _identity_bytes(path: Path) -> bytes:
    """A saved tokenizer file, less the padding and truncation a fast tokenizer's
    ``tokenizer.json`` records: call-time settings (each call sets its own, and the first
    call changes them), not what the ids are."""
    if path.name != "tokenizer.json":
        return path.read_bytes()
    saved = json.loads(path.read_text())
    saved.pop("padding", None)
    saved.pop("truncation", None)
    return json.dumps(saved, sort_keys=True).encode()


def content_hash(prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str]) -> str:
    """Hash of every (prompt, response) in order; each part is length-prefixed so that no
    two different lists of texts hash alike by shifting text between parts."""
    digest = hashlib.sha256()

    def feed(tag: bytes, text: str) -> None:
        data = text.encode()
        digest.update(tag + len(data).to_bytes(8, "little") + data)

    for messages, response in zip(prompts, responses, strict=True):
        for message in messages:
            feed(b"o", message["role"])
            feed(b"c", message["content"])
        feed(b"r", response)
    return digest.hexdigest()


def entry_key(
    tokenizer: Any, prompts: Sequence[Sequence[dict[str, str]]], responses: Sequence[str],
    max_length: int,
) -> str:
    parts = {"texts": content_hash(prompts, responses), "tokenizer": tokenizer_identity(tokenizer),
             "max_length": int(max_length), "truncation": TRUNCATION_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def encode_cached(
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    responses: Sequence[str],
    max_length: int,
    root: str | Path | None,
    *,
    progress: bool | None = False,
    desc: str = "tokenize",
) -> TokenIds:
    """The ids :func:`~factory.trainer.backbones.encode_pairs` gives, memory-mapped from the
    entry under ``root`` (normally ``<home>/tokens``), tokenised into it first if it is
    missing. ``root`` None: written to a temporary folder that lives as long as the result."""
    from factory.trainer.progress import note

    if len(responses) != len(prompts):
        raise ValueError("prompts and responses differ in length")
    if root is None:
        tmp = Path(tempfile.mkdtemp(prefix="prefab-tokens-"))
        try:
            _write_entry(tmp / "entry", tokenizer, prompts, responses, max_length, progress, desc)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return TokenIds(tmp / "entry", temporary=tmp)
    folder = Path(root) / entry_key(tokenizer, prompts, responses, max_length)
    if _complete(folder):
        note(f"{desc}: token ids reused from {folder}", progress)
        os.utime(folder / META_FILE)  # a use, for `prefab gc`'s idle time
        return TokenIds(folder)
    Path(root).mkdir(parents=True, exist_ok=True)
    staging = Path(root) / f".{folder.name}.{uuid.uuid4().hex[:8]}"
    try:
        _write_entry(staging, tokenizer, prompts, responses, max_length, progress, desc)
        if folder.exists():  # an incomplete entry (an old crash) or a concurrent writer's
            if _complete(folder):
                return TokenIds(folder)
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TokenIds(folder)


def _complete(folder: Path) -> bool:
    """An entry whose meta was written and whose ids file holds every token it lists."""
    try:
        meta = json.loads((folder / META_FILE).read_text())
        return (folder / IDS_FILE).stat().st_size == 4 * int(meta["tokens"])
    except (OSError, ValueError, KeyError):
        return False


def _write_entry(
    folder: Path,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    responses: Sequence[str],
    max_length: int,
    progress: bool | None,
    desc: str,
) -> None:
    from factory.trainer.progress import bar

    folder.mkdir(parents=True)
    n = len(responses)
    offsets = np.zeros(n + 1, dtype=np.int64)
    truncated = np.zeros(n, dtype=bool)
    shown = bar(n, desc, progress)
    try:
        with open(folder / IDS_FILE, "wb") as out:
            for start in range(0, n, backbones.ENCODE_CHUNK):
                stop = min(n, start + backbones.ENCODE_CHUNK)
                part = backbones.encode_chunk(tokenizer, prompts[start:stop], responses[start:stop],
                                              max_length)
                lengths = np.fromiter((len(s) for s in part.ids), np.int64, stop - start)
                offsets[start + 1 : stop + 1] = offsets[start] + np.cumsum(lengths)
                truncated[start:stop] = part.truncated
                if part.ids:
                    out.write(np.concatenate(part.ids).astype("<i4").tobytes())
                shown.update(stop - start)
    finally:
        shown.close()
    np.save(folder / OFFSETS_FILE, offsets)
    np.save(folder / TRUNCATED_FILE, truncated)
    meta = {"sequences": n, "tokens": int(offsets[-1]), "max_length": int(max_length),
            "truncation": TRUNCATION_VERSION, "tokenizer": str(getattr(tokenizer, "name_or_path", ""))}
    (folder / META_FILE).write_text(json.dumps(meta))  # last: marks the entry complete
