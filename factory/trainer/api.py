"""The trainer's Python API: train, score, evaluate and out-of-fold scores.

``data`` is a catalog ref (``name``, ``name@N``, ``name@tag``) or a pair table; a model is
a registered model name (``name`` or ``name@N``), a model folder, or a loaded
:class:`RewardModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from factory.home import resolve_home
from factory.trainer.data import PairData, kfold_by_prompt, pair_data
from factory.trainer.evaluate import evaluate_model, score_pairs
from factory.trainer.loop import TrainConfig, fit
from factory.trainer.model import META_FILE, HeadFeaturizer, RewardModel, load_reward_model
from schemas.errors import PrefabError


@dataclass
class TrainResult:
    name: str
    path: Path
    dataset: str | None  # the exact version trained on (name@N), None for an in-memory table
    metrics: dict[str, Any]
    params: dict[str, Any]
    model: RewardModel = field(repr=False)
    registered: dict[str, Any] | None = None


def _home(home: str | Path | None) -> Path:
    return resolve_home(home)


def _catalog(home: str | Path | None) -> Any:
    from factory.catalog import Catalog

    return Catalog(_home(home))


def _load_data(data: str | pa.Table, home: str | Path | None) -> tuple[pa.Table, str | None]:
    if isinstance(data, pa.Table):
        return data, None
    cat = _catalog(home)
    info = cat.resolve(data)
    return cat.read_table(info.ref), info.ref


def _load_model(model: str | Path | RewardModel, home: str | Path | None) -> RewardModel:
    if isinstance(model, RewardModel):
        return model
    cache_root = _home(home) / "embeddings"
    if (Path(model) / META_FILE).is_file():
        return load_reward_model(model, cache_root=cache_root)
    entry = _catalog(home).get_model(str(model))
    return load_reward_model(entry["path"], cache_root=cache_root)


def train(
    data: str | pa.Table,
    name: str,
    *,
    home: str | Path | None = None,
    base: str = "minilm",
    mode: str = "head",
    eval: str | pa.Table | list[str] | None = None,  # noqa: A002 - the CLI's --eval
    resume: bool = False,
    out: str | Path | None = None,
    robustness: bool = True,
    **options: Any,
) -> TrainResult:
    """Train a Bradley–Terry reward model on a catalog version and register it.

    ``options`` are :class:`TrainConfig` fields (epochs, lr, batch_size, max_length, seed,
    val_fraction, center_coef, checkpoint_steps, max_pairs, device, progress, …).
    """
    cfg = TrainConfig(mode=mode, base=base, **options).resolved()
    table, data_ref = _load_data(data, home)
    cat = _catalog(home) if data_ref is not None else None
    # A model version is immutable like a dataset version: each run trains in the name's
    # work folder (where its checkpoint lives for --resume) and lands in its own vN folder.
    work = Path(out) if out is not None else _home(home) / "models" / name / "run"
    if (work / META_FILE).is_file() and out is not None:
        raise PrefabError(f"model folder {work} already holds a model; choose another --out")
    checkpoint_dir = work / "checkpoint"
    if checkpoint_dir.exists() and not resume:
        raise PrefabError(f"{checkpoint_dir} holds an unfinished run; pass --resume to continue it")
    if resume and not checkpoint_dir.exists():
        raise PrefabError(f"nothing to resume: {checkpoint_dir} does not exist")

    pairs = pair_data(table)
    result = fit(pairs, cfg, checkpoint_dir=checkpoint_dir, resume=resume,
                 cache_root=_home(home) / "embeddings")
    result.model.save(work)
    folder = work
    if out is None:
        taken = [int(p.name[1:]) for p in work.parent.glob("v*") if p.name[1:].isdigit()]
        version = max([_catalog(home).next_model_version(name), *(t + 1 for t in taken)])
        folder = work.parent / f"v{version}"
        work.rename(folder)
    last = result.history[-1] if result.history else {}
    metrics: dict[str, Any] = {
        "train_pairs": result.stats["train_pairs"],
        "val_pairs": result.stats["val_pairs"],
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "train_seconds": round(result.train_seconds, 3),
        "pairs_per_second": round(result.pairs_per_second, 3),
        "train_loss": last.get("train_loss"),
        "val_loss": last.get("val_loss"),
        "val_accuracy": last.get("val_accuracy"),
        "history": result.history,
        "device": result.stats["device"],
    }
    evals = [eval] if isinstance(eval, str | pa.Table) else list(eval or [])
    if evals:
        metrics["eval"] = {}
        for item in evals:
            eval_table, eval_ref = _load_data(item, home)
            key = eval_ref or f"table{len(metrics['eval'])}"
            metrics["eval"][key] = evaluate_model(result.model, pair_data(eval_table),
                                                  robustness=robustness, seed=cfg.seed)
    params = {**cfg.as_params(), "resume": resume}
    registered = None
    if cat is not None and data_ref is not None:
        registered = cat.register_model(name, folder, data_ref, metrics, params)
    return TrainResult(name, folder, data_ref, metrics, params, result.model, registered)


def with_rewards(table: pa.Table, r_chosen: np.ndarray, r_rejected: np.ndarray) -> pa.Table:
    for column in ("reward_chosen", "reward_rejected"):
        if column in table.column_names:
            table = table.drop_columns([column])
    table = table.append_column("reward_chosen", pa.array(r_chosen, pa.float64()))
    return table.append_column("reward_rejected", pa.array(r_rejected, pa.float64()))


def score(
    model: str | Path | RewardModel,
    pairs: pa.Table,
    *,
    home: str | Path | None = None,
    batch_size: int = 64,
) -> pa.Table:
    """``pairs`` with ``reward_chosen`` and ``reward_rejected`` columns (float64)."""
    rm = _load_model(model, home)
    r_c, r_r = score_pairs(rm, pair_data(pairs), batch_size)
    return with_rewards(pairs, r_c, r_r)


def evaluate(
    model: str | Path | RewardModel,
    data: str | pa.Table,
    *,
    home: str | Path | None = None,
    robustness: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Pairwise accuracy (ties as errors), tie accuracy, breakdowns and robustness probes."""
    rm = _load_model(model, home)
    table, ref = _load_data(data, home)
    metrics = evaluate_model(rm, pair_data(table), robustness=robustness, seed=seed)
    metrics["dataset"] = ref
    return metrics


def oof_scores(
    pairs: pa.Table,
    *,
    k: int = 5,
    home: str | Path | None = None,
    mode: str = "head",
    base: str = "minilm",
    seed: int = 0,
    **options: Any,
) -> pa.Table:
    """Out-of-fold rewards: each row scored by a model that never saw its prompt.

    The engine of the noise filters (CRM peer review, confident learning). In head mode
    the encoder runs once for all folds; each fold then trains only the small head.
    Adds ``reward_chosen``, ``reward_rejected`` and ``fold``.
    """
    data: PairData = pair_data(pairs)
    folds = kfold_by_prompt(data.prompt_ids, k, seed)
    cfg = TrainConfig(mode=mode, base=base, seed=seed, val_fraction=0.0,
                      progress=options.pop("progress", False), **options)
    featurizer = None
    if mode == "head":
        resolved = cfg.resolved()
        featurizer = HeadFeaturizer(base, resolved.max_length, _home(home) / "embeddings")
        featurizer.features(data.prompts + data.prompts, data.chosen + data.rejected)
    r_c = np.zeros(len(data))
    r_r = np.zeros(len(data))
    for fold in range(k):
        held = np.flatnonzero(folds == fold)
        if len(held) == 0:
            continue
        result = fit(data, cfg, featurizer=featurizer, train_idx=np.flatnonzero(folds != fold),
                     val_idx=np.zeros(0, dtype=np.int64), cache_root=None)
        held_c, held_r = score_pairs(result.model, data.subset(held))
        r_c[held], r_r[held] = held_c, held_r
    out = with_rewards(pairs, r_c, r_r)
    return out.append_column("fold", pa.array(folds, pa.int64()))
