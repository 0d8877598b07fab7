"""Static embeddings distilled from the bundled MiniLM with ``model2vec``: a text's vector is
the (SIF-weighted) mean of per-token vectors, so embedding costs a tokenisation and a table
lookup -- orders of magnitude faster than a transformer pass on CPU, at some loss of fidelity
(``benchmarks/embedders.py`` measures both).

Distillation runs offline from the packaged weights, once per home: the static model is saved
under ``<home>/embeddings/static-<digest>/``, where the digest covers the source model's
files (their bytes), the distillation settings and the model2vec version, so a changed source
or recipe gets a new folder and never a stale model. ``catalog gc`` treats the folder like
any other embedding cache (a redoable unit); each load marks it used.

:class:`StaticIdsEncoder` is the same model read through MiniLM's own tokenizer, for callers
that render and truncate token ids themselves (the reward heads' ``base="static"``, see
:class:`factory.trainer.model.HeadFeaturizer`): the static vocabulary is MiniLM's WordPiece
vocabulary less its unused slots, so MiniLM's ids map onto static rows one to one and a
text's vector is exactly what :func:`embed_static` gives it (up to where each cuts).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from factory.home import resolve_home

if TYPE_CHECKING:
    from model2vec import StaticModel

# 256 of MiniLM's 384 dimensions keep nearly all of the token table's variance (PCA) and
# make the table a third smaller; model2vec's own default.
PCA_DIMS = 256
# SIF weighting down-weights frequent tokens ("the", "of") as in model2vec's default recipe.
SIF_COEFFICIENT = 1e-4
# Static cost is linear in tokens, so it can afford twice MiniLM's 256-token window.
MAX_TOKENS = 512
# Texts per model2vec call: bounds the Python strings and token lists held at once.
ENCODE_CHUNK = 16384
LAST_USED = "last-used"  # same marker name as the embedding cache (factory.embed.cache)

_models: dict[Path, StaticModel] = {}
_models_lock = threading.Lock()


def embed_static(texts: Sequence[str], home: str | Path | None = None,
                 keep: Literal["start", "end"] = "start") -> np.ndarray:
    """L2-normalised static embeddings of ``texts``, float32 (n, 256).

    The static model is distilled from the bundled all-MiniLM-L6-v2 on first use under this
    home (``home`` or ``$PREFAB_HOME`` or ``./.prefab``) and loaded from there afterwards.
    Texts are cut after 512 tokens; ``keep="end"`` keeps a long text's end instead (cut in
    characters, as model2vec itself pre-cuts: 512 x the table's median token length). A
    text with no known token (the empty string) gets the zero vector, which has no
    direction to normalise.
    """
    model = static_model(home)
    if not len(texts):
        return np.zeros((0, model.dim), dtype=np.float32)
    room = MAX_TOKENS * model.median_token_length
    out = np.empty((len(texts), model.dim), dtype=np.float32)
    # A chunk of texts at a time (each text's vector is its own, so chunking changes
    # nothing): a lazy column is never turned into one list of every text.
    for start in range(0, len(texts), ENCODE_CHUNK):
        part = list(texts[start : start + ENCODE_CHUNK])
        if keep == "end":
            part = [t[-room:] for t in part]
        # One process on purpose: model2vec's multiprocessing above 10k texts oversubscribes
        # small machines, and a single pass is already far faster than the transformer.
        vectors = model.encode(part, max_length=MAX_TOKENS, normalize=False, use_multiprocessing=False)
        out[start : start + len(part)] = np.asarray(vectors, dtype=np.float32)
    return _l2_normalise(out)


def static_model(home: str | Path | None = None) -> StaticModel:
    """The static model of this home, distilled on first use and loaded once per process."""
    return static_model_at(static_model_dir(home))


def static_model_at(folder: Path) -> StaticModel:
    """The static model in ``folder`` (:func:`static_model_folder`), distilled there first if absent."""
    with _models_lock:
        model = _models.get(folder)
        if model is None:
            if not (folder / "config.json").is_file():
                _distill_into(folder)
            model = _load(folder)
            _models[folder] = model
    (folder / LAST_USED).touch()
    return model


def static_model_dir(home: str | Path | None = None) -> Path:
    """``<home>/embeddings/static-<digest of source model files and distillation settings>``."""
    return static_model_folder(resolve_home(home) / "embeddings")


def static_model_folder(root: str | Path) -> Path:
    """``<root>/static-<digest>``: ``root`` is the embedding folder (``<home>/embeddings``)."""
    # Imported before model2vec (hence huggingface_hub) loads: it sets HF_HUB_OFFLINE.
    from factory.embed.encoder import minilm_path

    return Path(root) / f"static-{_recipe_digest(minilm_path())}"


def _recipe_digest(source: str) -> str:
    import model2vec

    parts = [_folder_digest(source, *_folder_stamp(source)), f"pca={PCA_DIMS}",
             f"sif={SIF_COEFFICIENT}", f"model2vec={model2vec.__version__}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _folder_stamp(folder: str) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and mtimes: what decides whether the memoised content digest still holds."""
    stamp = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            stat = path.stat()
            stamp.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return tuple(stamp)


@lru_cache(maxsize=4)
def _folder_digest(folder: str, *stamp: tuple[str, int, int]) -> str:
    """sha256 over every file's name and bytes (~90 MB for MiniLM: hashed once per process)."""
    digest = hashlib.sha256()
    for name, _size, _mtime in stamp:
        digest.update(name.encode() + b"\x00")
        with open(Path(folder) / name, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _distill_into(folder: Path) -> None:
    """Distil into a private temporary folder, then rename it into place, so a crash leaves
    no half-written model and two processes distilling at once both end with a whole one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = folder.parent / f".{folder.name}.{uuid.uuid4().hex}.tmp"
    try:
        _distill().save_pretrained(str(scratch))
        try:
            os.rename(scratch, folder)
        except OSError:
            if not (folder / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _distill() -> StaticModel:
    from model2vec.distill import distill

    # static_model_dir imported factory.embed.encoder first, which set HF_HUB_OFFLINE.
    from factory.embed.encoder import minilm_path, quiet_hf

    with quiet_hf():
        # On CPU whatever the machine has, so every home distils the same table.
        return distill(minilm_path(), pca_dims=PCA_DIMS, sif_coefficient=SIF_COEFFICIENT,
                       device="cpu", quantize_to="float32")


def _load(folder: Path) -> Any:
    from model2vec import StaticModel

    return StaticModel.from_pretrained(str(folder), force_download=False)


# Sequences pooled per call: bounds the concatenated ids (~256 x 8 B each) to a few MiB.
_POOL_SEQUENCES = 8192


class StaticIdsEncoder:
    """The static model behind MiniLM's tokenizer: vectors of token ids a caller rendered and
    cut with that tokenizer (special tokens and unused slots carry no vector, as in
    model2vec's own encoding), L2-normalised, float32 (n, 256).

    Duck-types the parts of :class:`factory.embed.encoder.MeanPoolEncoder` the head
    featurizer reads (``tokenizer``, ``dim``, ``max_positions``, ``path``, ``embed_ids``).
    ``path`` is the content-addressed model folder, so anything keyed by it changes with
    the source weights or the distillation recipe.
    """

    def __init__(self, root: str | Path):
        from factory.embed.encoder import load_tokenizer, minilm_path

        folder = static_model_folder(root)
        model = static_model_at(folder)
        self.path = str(folder)
        self.tokenizer = load_tokenizer(minilm_path())
        self.dim = int(model.dim)
        # A static vector has no position table: the limit is only the cost, linear in tokens.
        self.max_positions = MAX_TOKENS
        self.cache_variant = "static-ids"
        self._table = np.asarray(model.embedding, dtype=np.float32)
        self._rows = self._row_of_id(model, len(self._table))  # len(table): no vector

    def _row_of_id(self, model: StaticModel, none: int) -> np.ndarray:
        static_vocab = model.tokenizer.get_vocab()
        skip = set(self.tokenizer.all_special_tokens)
        rows = np.full(len(self.tokenizer), none, dtype=np.int64)
        for token, token_id in self.tokenizer.get_vocab().items():
            row = static_vocab.get(token)
            if row is not None and token not in skip and row != model.unk_token_id:
                rows[token_id] = row
        return rows

    def embed_ids(self, sequences: Sequence[np.ndarray], batch_size: int = 0) -> np.ndarray:
        """The mean of each sequence's token vectors, normalised (``batch_size``: unused, a
        lookup has no batch to fill)."""
        out = np.zeros((len(sequences), self.dim), dtype=np.float32)
        for start in range(0, len(sequences), _POOL_SEQUENCES):
            out[start:start + _POOL_SEQUENCES] = self._summed(sequences[start:start + _POOL_SEQUENCES])
        return _l2_normalise(out)

    def _summed(self, sequences: Sequence[np.ndarray]) -> np.ndarray:
        """Sums of each sequence's token vectors (the mean's direction: normalised next)."""
        import torch

        if not len(sequences):
            return np.zeros((0, self.dim), dtype=np.float32)
        rows = self._rows[np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])]
        owner = np.repeat(np.arange(len(sequences)), [len(s) for s in sequences])
        kept = rows < len(self._table)
        counts = np.bincount(owner[kept], minlength=len(sequences))
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        # embedding_bag: one gather-and-sum in C++, never the (tokens x dim) block numpy
        # would build first (20x faster on 2 cores); an empty bag sums to zero.
        summed = torch.nn.functional.embedding_bag(
            torch.from_numpy(rows[kept]), torch.from_numpy(self._table), torch.from_numpy(offsets), mode="sum")
        return summed.numpy()


def _l2_normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0)
