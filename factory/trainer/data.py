"""Pair tables -> training arrays, prompt-grouped splits and length-bucketed batch orders."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.columns import ArrowColumn, as_messages, take
from schemas.errors import PrefabError
from schemas.pairs import generated_mask


@dataclass
class PairData:
    """Column views of a pair table that the trainer needs, in row order.

    Read from a table (:func:`pair_data`), the text columns are lazy :class:`ArrowColumn` objects:
    Arrow buffers converted to Python a chunk at a time, so that a million pairs never
    sit in memory as Python strings; any other sequence (a list) works too."""

    prompts: Sequence[list[dict[str, str]]]
    chosen: Sequence[str]
    rejected: Sequence[str]
    prompt_ids: Sequence[str]
    tie: np.ndarray  # bool
    margin: np.ndarray  # float32, 0 where null
    weight: np.ndarray  # float32, 1 where null
    sources: Sequence[str | None]
    attributes: Sequence[str | None]
    tasks: Sequence[str | None]
    # provenance.step of each row (for generated pairs, the generator's name) and whether a
    # generator made it from other pairs (its provenance names parent pairs). Empty: no
    # provenance, every row is real.
    steps: Sequence[str | None] = field(default_factory=list)
    derived: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    # A fixed reward gap added to the trained one in the loss (float32; empty: 0 for every
    # row). Residual training sets it to the base model's gap, so the loss sees base + residual.
    offset: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def generated(self) -> np.ndarray:
        """True for the rows a generator made (their provenance names parent pairs)."""
        if len(self.derived) != len(self):
            return np.zeros(len(self), dtype=bool)
        return self.derived

    @property
    def gap_offset(self) -> np.ndarray:
        """The fixed reward gap of each row (zeros when none is set)."""
        if len(self.offset) != len(self):
            return np.zeros(len(self), dtype=np.float32)
        return self.offset

    def subset(self, idx: Sequence[int] | np.ndarray) -> PairData:
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return PairData(
            prompts=take(self.prompts, idx),
            chosen=take(self.chosen, idx),
            rejected=take(self.rejected, idx),
            prompt_ids=take(self.prompt_ids, idx),
            tie=self.tie[idx],
            margin=self.margin[idx],
            weight=self.weight[idx],
            sources=take(self.sources, idx),
            attributes=take(self.attributes, idx),
            tasks=take(self.tasks, idx),
            steps=take(self.steps, idx) if len(self.steps) else [],
            derived=self.generated[idx],
            offset=self.gap_offset[idx],
        )


def _float_column(table: pa.Table, name: str, default: float) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, default, dtype=np.float32)
    col = table.column(name).cast(pa.float64()).fill_null(default)
    return col.to_numpy().astype(np.float32)


def _str_column(table: pa.Table, name: str) -> ArrowColumn[str | None]:
    if name not in table.column_names:
        return ArrowColumn(pa.nulls(table.num_rows, pa.string()))
    return ArrowColumn(table.column(name))


def _text_column(table: pa.Table, name: str) -> ArrowColumn[str]:
    """A required text column; a null reads as the empty string."""
    column = table.column(name)
    return ArrowColumn(pc.fill_null(column, "") if column.null_count else column)


def pair_data(table: pa.Table) -> PairData:
    """Read the columns of a canonical pair table (missing optional columns take defaults).

    The texts stay in ``table``'s Arrow buffers (see :class:`PairData`); the numeric
    columns become numpy arrays."""
    for required in ("prompt", "chosen", "rejected"):
        if required not in table.column_names:
            raise PrefabError(f"pair table lacks column {required!r}")
    prompts: ArrowColumn[list[dict[str, str]]] = ArrowColumn(table.column("prompt"), as_messages)
    if "prompt_id" in table.column_names:
        prompt_ids: ArrowColumn[str] = ArrowColumn(table.column("prompt_id"))
    else:
        prompt_ids = _prompt_hashes(prompts)
    if "tie" in table.column_names:
        tie = np.asarray(table.column("tie").fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    else:
        tie = np.zeros(table.num_rows, dtype=bool)
    weight = _float_column(table, "weight", 1.0)
    if (weight < 0).any() or not np.isfinite(weight).all():
        raise PrefabError("column 'weight' must hold finite values >= 0")
    sources: ArrowColumn[str | None] = ArrowColumn(pa.nulls(table.num_rows, pa.string()))
    steps: ArrowColumn[str | None] | list[str | None] = []
    derived = np.zeros(table.num_rows, dtype=bool)
    if "provenance" in table.column_names:
        provenance = table.column("provenance")
        sources, steps = (_provenance_field(provenance, name) for name in ("source", "step"))
        derived = generated_mask(table)
    return PairData(
        prompts=prompts,
        chosen=_text_column(table, "chosen"),
        rejected=_text_column(table, "rejected"),
        prompt_ids=prompt_ids,
        tie=tie,
        margin=_float_column(table, "margin", 0.0),
        weight=weight,
        sources=sources,
        attributes=_str_column(table, "attribute"),
        tasks=_str_column(table, "task"),
        steps=steps,
        derived=derived,
    )


def _provenance_field(provenance: pa.ChunkedArray, name: str) -> ArrowColumn[str | None]:
    """One string field of the provenance struct (null where the struct or field is)."""
    if name not in {f.name for f in provenance.type}:
        return ArrowColumn(pa.nulls(len(provenance), pa.string()))
    return ArrowColumn(pc.struct_field(provenance, name))


def _prompt_hashes(prompts: ArrowColumn[list[dict[str, str]]]) -> ArrowColumn[str]:
    """The prompt id of each prompt, hashed a chunk of prompts at a time."""
    chunks = []
    for start in range(0, len(prompts), prompts.chunk_rows):
        part = prompts[start : start + prompts.chunk_rows]
        chunks.append(pa.array([_prompt_hash(p) for p in part], type=pa.string()))
    return ArrowColumn(pa.chunked_array(chunks, type=pa.string()))


def _prompt_hash(prompt: list[dict[str, str]]) -> str:
    text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in prompt)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def split_by_prompt(
    prompt_ids: Sequence[str], val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of (train, validation), grouped so that no prompt is in both."""
    if not 0.0 <= val_fraction < 1.0:
        raise PrefabError(f"val fraction must be in [0, 1), got {val_fraction}")
    n = len(prompt_ids)
    if val_fraction == 0.0 or n == 0:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    unique = sorted(set(prompt_ids))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(unique))
    n_val = max(1, round(len(unique) * val_fraction)) if len(unique) > 1 else 0
    val_prompts = {unique[i] for i in order[:n_val]}
    is_val = np.fromiter((p in val_prompts for p in prompt_ids), dtype=bool, count=n)
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def kfold_by_prompt(prompt_ids: Sequence[str], k: int, seed: int) -> np.ndarray:
    """Fold number of each row; every prompt's rows share one fold."""
    if k < 2:
        raise PrefabError(f"k-fold needs k >= 2, got {k}")
    unique = sorted(set(prompt_ids))
    rng = np.random.default_rng(seed)
    fold_of = {p: int(i % k) for i, p in zip(rng.permutation(len(unique)), unique, strict=True)}
    return np.asarray([fold_of[p] for p in prompt_ids], dtype=np.int64)


def epoch_batches(
    n: int,
    batch_size: int,
    seed: int,
    epoch: int,
    lengths: np.ndarray | None = None,
    bucket_batches: int = 50,
) -> list[np.ndarray]:
    """The batch order of one epoch, a pure function of (seed, epoch) so resume can replay it.

    With ``lengths``, rows are shuffled, then sorted by length inside windows of
    ``bucket_batches`` batches, so each batch holds similar lengths (little padding) while
    the batch order stays random.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    if lengths is not None and n > batch_size:
        window = batch_size * bucket_batches
        chunks = []
        for start in range(0, n, window):
            part = perm[start : start + window]
            chunks.append(part[np.argsort(lengths[part], kind="stable")])
        perm = np.concatenate(chunks)
    batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    if lengths is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def balanced_weights(
    data: PairData, rows: np.ndarray, share: float | dict[str, float]
) -> np.ndarray:
    """Per-pair weights in which each generator's pairs, among ``rows``, weigh ``share``
    times the real pairs among them, whatever their number (balanced by generator).

    ``share`` is one number for every generator or a mapping from generator (the
    provenance step) to its share; generators a mapping leaves out keep their weights, and
    so do the real pairs. Without real pairs among ``rows`` nothing changes. Within a
    generator, the weight column's relative weights are kept.
    """
    weights = data.weight.astype(np.float64)
    rows = np.asarray(rows, dtype=np.int64)
    generated = data.generated
    if isinstance(share, dict):
        _check_generator_names(share, set(take(data.steps, np.flatnonzero(generated))))
    real_total = float(weights[rows[~generated[rows]]].sum())
    if real_total <= 0:
        return weights.astype(np.float32)
    members: dict[str, list[int]] = {}
    made = rows[generated[rows]]
    for i, step in zip(made.tolist(), take(data.steps, made), strict=True):
        members.setdefault(step or "", []).append(i)
    for step, idx in members.items():
        factor = share.get(step) if isinstance(share, dict) else share
        total = float(weights[idx].sum())
        if factor is None or total <= 0:
            continue
        if factor < 0:
            raise PrefabError(f"augment weight of {step!r} must be >= 0, got {factor}")
        weights[idx] *= factor * real_total / total
    return weights.astype(np.float32)


def _check_generator_names(share: dict[str, float], made_by: set[str | None]) -> None:
    """A name that is neither a registered generator nor a step that made pairs here is a
    misspelling: it would otherwise weigh nothing, silently."""
    from factory.steps.registry import steps

    known = {spec.name for spec in steps("generator")} | {s for s in made_by if s}
    if unknown := sorted(set(share) - known):
        raise PrefabError(f"augment weight names {', '.join(map(repr, unknown))}: not a generator "
                          f"(known: {', '.join(sorted(known))})")
