"""What a step receives besides its table (the context) and what it returns (the result).

The context is plain data plus lazy handles (backend, encoder), so the same step runs
in-process or in a Ray worker. Randomness is derived from the run seed and each row's own
key, never from a shared generator, so a row's outcome does not depend on how the table
was split into batches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import pyarrow as pa

from schemas.errors import PrefabError

P = TypeVar("P")


class MissingBackendError(PrefabError):
    """An LLM step ran with no backend configured."""


@dataclass
class StepContext(Generic[P]):
    step: str
    params: P
    seed: int = 0
    run_id: str = ""
    home: Path | None = None
    backend: Any = None  # factory.llm.Backend when the step uses an LLM
    progress: bool | None = None

    def require_backend(self, what: str = "an LLM") -> Any:
        if self.backend is None:
            raise MissingBackendError(
                f"{self.step} needs {what}: pass --backend, e.g. "
                "--backend 'openai:gpt-4o-mini' or --backend 'openai:MODEL?base_url=http://localhost:8000/v1'"
            )
        return self.backend

    def embed(self, texts: Sequence[str], embedder: str = "minilm") -> np.ndarray:
        """L2-normalised embeddings by ``embedder`` (see factory.embed.EMBEDDERS), cached
        under the home folder."""
        from factory.embed import embed_texts

        # A sequence (a lazy Arrow column too) goes as it is: embed_texts reads it in chunks.
        texts = texts if isinstance(texts, Sequence) else list(texts)
        return embed_texts(texts, home=self.home, progress=self.progress, embedder=embedder)

    def read_pairs(self, source: str) -> tuple[pa.Table, str]:
        """Pairs from a catalog ref (``name@N``) or a file any reader knows, and their label.

        A name that is both a local path and a catalog dataset is refused, naming both."""
        from factory.catalog import Catalog
        from factory.steps.sources import resolve_source

        catalog = Catalog(self.home)
        resolved = resolve_source(source, catalog)
        if resolved.path is not None:
            from schemas.readers import read_path

            return read_path(str(resolved.path), "auto").table, source
        info = catalog.resolve(resolved.ref)
        return catalog.read_table(info), info.ref

    def row_uniform(self, keys: Sequence[str], salt: str = "") -> np.ndarray:
        """One float in [0, 1) per key, fixed by (seed, salt, key) and nothing else."""
        out = np.empty(len(keys), dtype=np.float64)
        prefix = f"{self.seed}\x00{self.step}\x00{salt}\x00".encode()
        for i, key in enumerate(keys):
            digest = hashlib.blake2b(prefix + key.encode("utf-8"), digest_size=8).digest()
            out[i] = int.from_bytes(digest, "little") / 2**64
        return out

    def row_choice(self, keys: Sequence[str], n_options: int, salt: str = "") -> np.ndarray:
        """One index in ``range(n_options)`` per key, deterministic like :meth:`row_uniform`."""
        return np.minimum((self.row_uniform(keys, salt) * n_options).astype(np.int64), n_options - 1)


@dataclass
class StepResult:
    """A step's output.

    Generators: ``table`` holds the new pairs in canonical columns (``pair_id`` and
    ``prompt_id`` may be left out: the runner computes them) plus ``parent_ids`` (list of
    the seed pair ids each row came from), ``generated`` (which response was written:
    ``chosen``, ``rejected``, ``both`` or ``none`` for a re-pairing) and ``method`` (how).
    The runner folds those three into provenance.

    A whole-table generator may give ``table`` as an iterator of such tables (chunks of its
    output, in order): the runner writes each chunk to the run's work folder as it comes,
    so the step never holds its whole output. ``failed``, ``stats`` and ``usage`` are final
    when the step returns.

    Filters: ``table`` holds one row of scores per input row, in input order.

    ``failed`` lists input rows the step could not handle: ``row`` (position in the
    input table) and ``reason``; the runner stores them in the catalog's side table.
    """

    table: pa.Table | Iterator[pa.Table]
    failed: pa.Table | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)  # models, judges, tokens, cost


# What a generator returns: canonical pair columns (ids are computed by the runner) plus
# the lineage columns the runner folds into provenance. Other canonical columns may be added.
GENERATED_SCHEMA = pa.schema([
    pa.field("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
    pa.field("chosen", pa.string()),
    pa.field("rejected", pa.string()),
    pa.field("tie", pa.bool_()),
    pa.field("attribute", pa.string()),
    pa.field("task", pa.string()),
    pa.field("parent_ids", pa.list_(pa.string())),
    pa.field("generated", pa.string()),
    pa.field("method", pa.string()),
])

FAILED_SCHEMA = pa.schema([pa.field("row", pa.int64()), pa.field("reason", pa.string())])


def failed_rows(rows: Sequence[int], reasons: Sequence[str]) -> pa.Table:
    return pa.table({"row": pa.array(rows, pa.int64()), "reason": pa.array(reasons, pa.string())})


ACTIONS = ("keep", "drop", "flip", "weight")


@dataclass
class Decision:
    """A filter's verdict per input row: an action, an optional new weight and a reason."""

    action: pa.Array  # strings from ACTIONS
    reason: pa.Array  # why the row was flagged (null when kept unflagged)
    weight: pa.Array | None = None  # the weight for rows whose action is "weight"

    def slice(self, start: int, length: int) -> Decision:
        """The verdicts of rows ``start`` to ``start + length`` (a batch of the input)."""
        weight = None if self.weight is None else self.weight.slice(start, length)
        return Decision(self.action.slice(start, length), self.reason.slice(start, length), weight)
