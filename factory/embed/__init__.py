"""The shared embedding service: one MiniLM encoder and one on-disk cache per process.

Generators (hard negatives, contrast instructions), filters (dedup) and the trainer's
head mode all embed through here, so a text is encoded once per home folder, ever:

- :func:`embed_texts` -- L2-normalised float32 vectors of plain texts from the chosen
  embedder (:data:`EMBEDDERS`: ``minilm`` the bundled MiniLM on torch, ``minilm-onnx`` the
  same model through ONNX Runtime, ``static`` model2vec vectors distilled from it), cached
  under ``$PREFAB_HOME/embeddings`` in one folder per embedder. A progress bar shows on a
  terminal; Ctrl+C stops after saving the completed batches (a rerun computes only the rest) and raises
  :class:`EmbeddingInterrupted`, a :class:`KeyboardInterrupt`.
- :func:`top_k_neighbours` -- cosine kNN: exact in tiles (never an n-by-n matrix) below 20k
  corpus rows, through an IVF index above (recall@10 >= 0.95), with an optional similarity band;
- :func:`best_earlier_match` -- for each row, the earlier row most similar in every part
  (the lowest of the part cosines), over all earlier rows.

``import factory.embed`` is cheap (numpy only); torch and transformers load on the first
:func:`embed_texts` call, and the encoder then stays loaded for the process.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

from factory.embed.cache import EmbeddingCache, EmbeddingInterrupted, ids_key, open_cache, text_key
from factory.embed.knn import best_earlier_match, top_k_neighbours
from factory.home import resolve_home
from schemas.errors import PrefabError

if TYPE_CHECKING:
    from factory.embed.encoder import MeanPoolEncoder
    from factory.embed.onnx import OnnxMeanPoolEncoder

EMBED_DIM = 384  # all-MiniLM-L6-v2
MAX_TOKENS = 256  # its training length; longer texts are cut on the right, as sentence-transformers does

# Who embeds (a step parameter ``embedder`` of type Embedder is validated by its choices):
# - minilm: all-MiniLM-L6-v2 on torch, the reference;
# - minilm-onnx: the same model exported to ONNX Runtime (cosine >= 0.999 to minilm);
# - static: model2vec token vectors distilled from it (256 dims; far faster, other neighbours).
Embedder = Literal["minilm", "minilm-onnx", "static"]
EMBEDDERS: tuple[str, ...] = get_args(Embedder)
DEFAULT_EMBEDDER = "minilm"

__all__ = [
    "DEFAULT_EMBEDDER",
    "EMBEDDERS",
    "EMBED_DIM",
    "MAX_TOKENS",
    "Embedder",
    "EmbeddingInterrupted",
    "UnknownEmbedderError",
    "best_earlier_match",
    "embed_texts",
    "embed_token_ids",
    "top_k_neighbours",
]


class UnknownEmbedderError(PrefabError, ValueError):
    """An embedder name that is none of :data:`EMBEDDERS`."""


def check_embedder(name: str) -> str:
    """``name`` if it is a known embedder, else a one-line error naming the choices."""
    if name not in EMBEDDERS:
        raise UnknownEmbedderError(
            f"unknown embedder {name!r}: choose one of {', '.join(EMBEDDERS)} (--set embedder=...)")
    return name


def cache_root(home: str | Path | None) -> Path:
    """Where embeddings are cached: ``<home>/embeddings``."""
    return resolve_home(home) / "embeddings"


def encoder_cache(encoder: MeanPoolEncoder | OnnxMeanPoolEncoder, root: str | Path | None) -> EmbeddingCache:
    """The cache of ``encoder`` under ``root`` (``None``: in memory, this process only)."""
    from factory.embed.cache import model_key

    return open_cache(root, model_key(encoder.path, encoder.cache_variant))


def embed_texts(
    texts: Sequence[str],
    *,
    home: str | Path | None = None,
    batch_size: int = 64,
    progress: bool | None = None,
    keep: Literal["start", "end"] = "start",
    embedder: str = DEFAULT_EMBEDDER,
) -> np.ndarray:
    """L2-normalised embeddings of ``texts`` by ``embedder``, float32 (n, dim).

    ``minilm`` (default) and ``minilm-onnx`` give all-MiniLM-L6-v2's 384 dimensions, each
    runtime with its own cache folder (their vectors agree to cosine >= 0.999, not bit for
    bit); ``static`` gives model2vec's 256 (see :mod:`factory.embed.static`: cut after 512
    tokens, not cached, since computing is faster than reading a cache back).

    Identical texts are encoded once, and never again under the same home
    (``home`` or ``$PREFAB_HOME`` or ``./.prefab``; cache in ``<home>/embeddings``). Texts
    longer than 256 tokens are cut on the right, as ``SentenceTransformer.encode`` does,
    whose output this matches; ``keep="end"`` cuts them on the left instead (the end of a
    long conversation or context; a text that fits gives the same vector either way).
    ``progress=None`` shows a bar only when stderr is a terminal. On Ctrl+C (or SIGTERM)
    the completed batches are saved and :class:`EmbeddingInterrupted` (a
    KeyboardInterrupt) is raised.
    """
    check_embedder(embedder)
    if keep not in ("start", "end"):
        raise ValueError(f"keep must be 'start' or 'end', got {keep!r}")
    if not _lazy_texts(texts):
        texts = [str(t) for t in texts]
    if embedder == "static":
        from factory.embed.static import embed_static

        return embed_static(texts, home=home, keep=keep)
    encoder = _transformer(embedder, home)
    cache = encoder_cache(encoder, cache_root(home))
    if keep == "end":
        return _embed_tails(list(texts), encoder, cache, batch_size, progress)

    def compute(batch: list[str]) -> np.ndarray:
        return encoder.embed_ids(encoder.tokenize_plain(batch, MAX_TOKENS), batch_size)

    keys = [text_key(t, MAX_TOKENS) for t in texts]
    return cache.get_or_compute(keys, texts, compute, dim=encoder.dim, batch_size=batch_size,
                                progress=progress, desc="embed texts")


def _lazy_texts(texts: Sequence[str]) -> bool:
    """Texts in Arrow that need no ``str()`` (no nulls): kept lazy, read a chunk at a time."""
    import pyarrow as pa

    from factory.columns import ArrowColumn

    return isinstance(texts, ArrowColumn) and texts.null_count == 0 and (
        pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type))


def _transformer(embedder: str, home: str | Path | None) -> MeanPoolEncoder | OnnxMeanPoolEncoder:
    if embedder == "minilm-onnx":
        from factory.embed.onnx import get_onnx_encoder

        return get_onnx_encoder(home)
    from factory.embed.encoder import get_encoder

    return get_encoder()


# Prefix of the cache key of a text cut on the left (a text that fits shares its plain key;
# no text a caller embeds starts with a NUL byte).
_TAIL_KEY = "\x00keep=end\x00"


def _embed_tails(texts: list[str], encoder: MeanPoolEncoder | OnnxMeanPoolEncoder, cache: EmbeddingCache, batch_size: int,
                 progress: bool | None) -> np.ndarray:
    ids, cut = encoder.tokenize_tail(texts, MAX_TOKENS)
    keys = [text_key(_TAIL_KEY + t if was_cut else t, MAX_TOKENS)
            for t, was_cut in zip(texts, cut, strict=True)]

    def compute(batch: list[np.ndarray]) -> np.ndarray:
        return encoder.embed_ids(batch, batch_size)

    return cache.get_or_compute(keys, ids, compute, dim=encoder.dim, batch_size=batch_size,
                                progress=progress, desc="embed texts")


def embed_token_ids(
    sequences: Sequence[np.ndarray],
    *,
    encoder: MeanPoolEncoder,
    cache: EmbeddingCache,
    batch_size: int = 64,
    progress: bool | None = None,
    desc: str = "embed",
) -> np.ndarray:
    """Embeddings of sequences already tokenised (and truncated) by the caller.

    The trainer's path: its own rendering and truncation decide the ids, so the cache is
    keyed by the exact ids. Same encoder, same cache folder, same interrupt handling as
    :func:`embed_texts`.
    """

    def compute(batch: list[np.ndarray]) -> np.ndarray:
        return encoder.embed_ids(batch, batch_size)

    keys = [ids_key(s) for s in sequences]
    return cache.get_or_compute(keys, list(sequences), compute, dim=encoder.dim,
                                batch_size=batch_size, progress=progress, desc=desc)
