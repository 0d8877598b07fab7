"""The trainer's Python API: train, score, evaluate, out-of-fold scores and load_model.

``data`` is a catalog ref (``name``, ``name@N``, ``name@tag``), a pyarrow Table or a
``datasets.Dataset`` (e.g. ``factory.catalog.load(ref)``); a model is a registered model
name (``name`` or ``name@N``), a model folder, or a loaded :class:`RewardModel`.

Loaded models are kept per process (a few, least recently used first out), so scoring by
name many times loads the model once. Model versions are immutable, so a cached one is
never stale; ``name`` alone still resolves to the newest version on every call.
"""

from __future__ import annotations

import shutil
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from factory.home import resolve_home
from factory.trainer.data import PairData, kfold_by_prompt, pair_data
from factory.trainer.evaluate import evaluate_model, score_pairs, score_pairs_truncated
from factory.trainer.loop import (
    RESUME_KEYS,
    TrainConfig,
    TrainingInterrupted,
    fit,
    read_checkpoint_params,
)
from factory.trainer.model import META_FILE, HeadFeaturizer, RewardModel, load_reward_model
from factory.trainer.progress import phase
from factory.trainer.residual import check_base, combine, residual_data
from factory.trainer.runlock import inside_home, model_folder, run_lock
from schemas.errors import PrefabError

MODEL_CACHE_SIZE = 4
RUN_FOLDER = "run"  # models/NAME/run: the run in progress (and its checkpoint)
# CLI spelling of each setting, for messages about --resume.
FLAG_OF = {"center_coef": "--center-rewards", "val_fraction": "--val-fraction",
           "batch_size": "--batch-size", "max_length": "--max-length", "max_pairs": "--max-pairs",
           "weight_decay": "--weight-decay", "head_hidden": "--head-hidden",
           "augment_weight": "--augment-weight", "val_on": "--val-on", "features": "--features",
           "residual_of": "--residual-of", "trainable_layers": "--trainable-layers"}


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


def _as_table(data: Any) -> pa.Table | None:
    """A pyarrow Table of ``data`` if it is a Table or a ``datasets.Dataset``, else None."""
    if isinstance(data, pa.Table):
        return data
    if type(data).__module__.startswith("datasets.") and hasattr(data, "with_format"):
        # with_format("arrow")[:] honours a Dataset's select/shuffle/filter indices.
        return data.with_format("arrow")[:]
    return None


def _load_data(data: Any, home: str | Path | None) -> tuple[pa.Table, str | None]:
    table = _as_table(data)
    if table is not None:
        return table, None
    if not isinstance(data, str):
        raise PrefabError(f"data must be a catalog ref, a pyarrow Table or a datasets.Dataset, "
                          f"not {type(data).__name__}")
    cat = _catalog(home)
    info = cat.resolve(data)
    return cat.read_table(info.ref), info.ref


_MODELS: OrderedDict[tuple[str, str], RewardModel] = OrderedDict()
_MODELS_LOCK = threading.Lock()


def load_model(
    name_or_path: str | Path | RewardModel,
    home: str | Path | None = None,
    *,
    device: str | None = None,
) -> RewardModel:
    """A trained reward model: a registered ``name``/``name@N`` or a model folder.

    The result is what :func:`score` and :func:`evaluate` take; load once and reuse it.
    Repeated loads of one version in a process return the same object.
    """
    if isinstance(name_or_path, RewardModel):
        return name_or_path
    home_path = _home(home)
    if (Path(name_or_path) / META_FILE).is_file():
        folder = Path(name_or_path).resolve()
    else:
        # on a lake: the shared copy, every file checked against its recorded sha256
        folder = _catalog(home).checked_model_path(str(name_or_path)).resolve()
    key = (str(folder), f"{device}|{(home_path / 'embeddings').resolve()}")
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is not None:
            _MODELS.move_to_end(key)
            return model
    model = load_reward_model(folder, cache_root=home_path / "embeddings", device=device,
                              hidden_root=home_path / "hidden")
    with _MODELS_LOCK:
        _MODELS[key] = model
        while len(_MODELS) > MODEL_CACHE_SIZE:
            _MODELS.popitem(last=False)
    return model


def _merge_resume(
    checkpoint_dir: Path, given: dict[str, Any], data_ref: str | None
) -> dict[str, Any]:
    """Settings for --resume: the checkpoint's, checked against those given explicitly."""
    saved = read_checkpoint_params(checkpoint_dir)
    if saved is None:
        raise PrefabError(f"nothing to resume: {checkpoint_dir} holds no checkpoint")
    conflicts = []
    for key, value in given.items():
        if key in saved and value is not None and value != saved[key]:
            conflicts.append(f"{FLAG_OF.get(key, '--' + key)} {value} (checkpoint: {saved[key]})")
    saved_data = saved.get("data")
    if data_ref is not None and saved_data is not None and data_ref != saved_data:
        conflicts.append(f"--data {data_ref} (checkpoint: {saved_data})")
    if conflicts:
        raise PrefabError("--resume continues the checkpoint's settings; these flags conflict: "
                          + "; ".join(conflicts) + " (drop them, or train a new name)")
    return {k: v for k, v in saved.items() if k in RESUME_KEYS}


def train(
    data: str | pa.Table | Any | None,
    name: str,
    *,
    home: str | Path | None = None,
    base: str | None = None,
    mode: str | None = None,
    eval: str | pa.Table | list[str] | None = None,  # noqa: A002 - the CLI's --eval
    resume: bool = False,
    out: str | Path | None = None,
    robustness: bool = True,
    **options: Any,
) -> TrainResult:
    """Train a Bradley–Terry reward model on a catalog version and register it.

    ``options`` are :class:`TrainConfig` fields (epochs, lr, batch_size, max_length, seed,
    val_fraction, center_coef, patience, checkpoint_steps, max_pairs, device, progress, …);
    ``None`` means the default. With ``resume=True`` the run continues its checkpoint with
    the checkpoint's settings (and data, when ``data`` is None); a setting given
    explicitly that differs is an error naming it.

    The run works in ``models/NAME/run`` (or ``out``) under a lock of the name, so two runs
    of one name cannot mix; the finished model moves to ``models/NAME/vN`` and is
    registered as ``NAME@N`` (the same N), without its optimiser checkpoint. A run
    interrupted in training or in the evaluation after it keeps ``run`` and its checkpoint:
    ``resume=True`` continues (a finished run only evaluates and registers).
    """
    model_dir = model_folder(_home(home), name)  # checked before anything is written
    with run_lock(model_dir, name):
        return _train_locked(data, name, model_dir, home=home, base=base, mode=mode, eval=eval,
                             resume=resume, out=out, robustness=robustness, options=options)


def _train_locked(
    data: str | pa.Table | Any | None,
    name: str,
    model_dir: Path,
    *,
    home: str | Path | None,
    base: str | None,
    mode: str | None,
    eval: str | pa.Table | list[str] | None,  # noqa: A002 - the CLI's --eval
    resume: bool,
    out: str | Path | None,
    robustness: bool,
    options: dict[str, Any],
) -> TrainResult:
    work = Path(out) if out is not None else model_dir / RUN_FOLDER
    checkpoint_dir = work / "checkpoint"
    if out is None:  # a planted symlink inside models/NAME must not lead out either
        inside_home(_home(home), checkpoint_dir)
    if checkpoint_dir.exists() and not resume:
        raise PrefabError(f"{checkpoint_dir} holds a run that was interrupted before it was registered; "
                          "pass --resume to continue it")
    if resume and not checkpoint_dir.exists():
        raise PrefabError(f"nothing to resume: {checkpoint_dir} does not exist")
    if out is not None and (work / META_FILE).is_file() and not resume:
        raise PrefabError(f"model folder {work} already holds a model; choose another --out")
    if out is None and work.exists() and not resume:
        shutil.rmtree(work)  # a run stopped before its first checkpoint: nothing to keep

    given = {"mode": mode, "base": base, **options}
    data_ref_given = None
    if isinstance(data, str):
        data_ref_given = _catalog(home).resolve(data).ref
    if resume:
        settings = _merge_resume(checkpoint_dir, given, data_ref_given)
        if data is None:
            data = (read_checkpoint_params(checkpoint_dir) or {}).get("data")
            if data is None:
                raise PrefabError("the checkpoint does not record its data: pass --data")
    else:
        settings = {}
    if data is None:
        raise PrefabError("no training data: pass --data")
    chosen = {**settings, **{k: v for k, v in given.items() if v is not None}}
    cfg = TrainConfig(**chosen).resolved()
    with phase(f"read {data if isinstance(data, str) else 'the pairs'}", cfg.progress) as info:
        table, data_ref = _load_data(data, home)
        pairs = pair_data(table)
        info["detail"] = f"{len(pairs):,} pairs"
    cat = _catalog(home) if data_ref is not None else None
    if cat is not None and out is None:
        _version_folder(cat, name, model_dir)  # fail now, not after the training
    evals = [eval] if isinstance(eval, str | pa.Table) or _as_table(eval) is not None else list(eval or [])
    for item in evals:
        if isinstance(item, str):
            _catalog(home).resolve(item)  # a misspelt --eval fails now, not after the training

    base_model = None
    if cfg.residual_of:
        base_model = load_model(cfg.residual_of, home)
        check_base(base_model, cfg.mode, cfg.base, cfg.features, cfg.trainable_layers)
    trained_on = residual_data(pairs, base_model, cfg.progress) if base_model else pairs
    result = fit(trained_on, cfg, checkpoint_dir=checkpoint_dir, resume=resume,
                 cache_root=_home(home) / "embeddings", tokens_root=_home(home) / "tokens",
                 hidden_root=_home(home) / "hidden", checkpoint_extra={"data": data_ref})
    model = combine(base_model, result.model, cfg.residual_of) if base_model else result.model
    try:
        metrics = _train_metrics(result, cfg, model if base_model is not None else None, pairs)
        with phase(f"save the model to {work}", cfg.progress):
            model.save(work)
        if evals:
            metrics["eval"] = {}
            for item in evals:
                eval_table, eval_ref = _load_data(item, home)
                key = eval_ref or f"table{len(metrics['eval'])}"
                with phase(f"evaluate on {key}", cfg.progress, count=eval_table.num_rows):
                    metrics["eval"][key] = evaluate_model(model, pair_data(eval_table),
                                                          robustness=robustness, seed=cfg.seed,
                                                          home=home, progress=cfg.progress)
    except KeyboardInterrupt:
        raise EvaluationInterrupted(checkpoint_dir, result.steps) from None
    params = {**cfg.as_params(), "resume": resume}
    folder, registered = _publish(work, name, model_dir, cat, data_ref, metrics, params,
                                  keep_in_place=out is not None)
    return TrainResult(name, folder, data_ref, metrics, params, model, registered)


class EvaluationInterrupted(TrainingInterrupted):
    """Ctrl+C while saving or evaluating after training: the trained run is kept, resumable."""

    def __init__(self, checkpoint: Path, step: int):
        super().__init__(checkpoint, step)
        self.args = (f"training finished at step {step}, but saving or evaluating the model was "
                     f"interrupted; the run is kept in {checkpoint.parent}: rerun with --resume to "
                     "evaluate and register it",)


def _version_folder(cat: Any, name: str, model_dir: Path) -> tuple[int, Path]:
    """The version this run registers and its folder ``models/NAME/vN`` (which must be free)."""
    version = cat.next_model_version(name)
    folder = model_dir / f"v{version}"
    if folder.exists() or folder.is_symlink():
        raise PrefabError(f"{folder} exists but {name}@{version} is not registered (left by a run an older "
                          "prefab could not finish); remove that folder and train again")
    return version, folder


def _free_folder(model_dir: Path, prefix: str) -> Path:
    taken = {p.name for p in model_dir.glob(f"{prefix}*")}
    return model_dir / next(f"{prefix}{k}" for k in range(1, len(taken) + 2) if f"{prefix}{k}" not in taken)


def _publish(
    work: Path, name: str, model_dir: Path, cat: Any, data_ref: str | None, metrics: dict[str, Any],
    params: dict[str, Any], *, keep_in_place: bool,
) -> tuple[Path, dict[str, Any] | None]:
    """Move the finished run to its version folder, register it, then drop the checkpoint.

    The folder is named after the version the catalog registers. If registering fails
    (or is interrupted) the run moves back, checkpoint and all, so --resume can finish it;
    only a registered version loses its optimiser state."""
    folder, registered = work, None
    if keep_in_place:
        if cat is not None:
            registered = cat.register_model(name, folder, data_ref, metrics, params, exclude=("checkpoint",))
    elif cat is None:  # an in-memory table: kept, but no catalog version to name it after
        folder = _free_folder(model_dir, "unregistered-")
        work.rename(folder)
    else:
        version, folder = _version_folder(cat, name, model_dir)
        work.rename(folder)
        try:
            registered = cat.register_model(name, folder, data_ref, metrics, params, exclude=("checkpoint",))
        except BaseException:
            folder.rename(work)
            raise
        if registered["version"] != version:
            raise PrefabError(f"{folder} was registered as {name}@{registered['version']}: another process "
                              f"registered {name} meanwhile without the training lock")
    shutil.rmtree(folder / "checkpoint", ignore_errors=True)
    return folder, registered


def _train_metrics(result: Any, cfg: TrainConfig, combined: RewardModel | None, pairs: PairData) -> dict[str, Any]:
    by_epoch = {h["epoch"]: h for h in result.history}
    kept = by_epoch.get(result.best_epoch) or (result.history[-1] if result.history else {})
    return {
        "train_pairs": result.stats["train_pairs"],
        "val_pairs": result.stats["val_pairs"],
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "epochs_run": len(result.history),
        "best_epoch": kept.get("epoch"),
        "stopped_early": result.stopped_early,
        "embed_seconds": round(result.embed_seconds, 3),
        "train_seconds": round(result.train_seconds, 3),
        "total_seconds": round(result.total_seconds, 3),
        "pairs_per_second": round(result.pairs_per_second, 3),
        "train_loss": kept.get("train_loss"),
        "val_loss": kept.get("val_loss"),
        # a residual's own accuracy says nothing: the combined model's is the one to show
        "val_accuracy": (kept.get("val_accuracy") if combined is None
                         else _accuracy(combined, pairs.subset(result.val_idx))),
        "max_length": cfg.max_length,
        "truncated_pairs": result.stats["truncated_pairs"],
        "truncated_share": round(result.stats["truncated_share"], 6),
        "history": result.history,
        "device": result.stats["device"],
    }


def _accuracy(model: RewardModel, data: PairData) -> float | None:
    """Pairwise accuracy of ``model`` over the preference pairs of ``data`` (None: none)."""
    keep = ~data.tie
    if len(data) == 0 or not keep.any():
        return None
    r_c, r_r = score_pairs(model, data)
    return float((r_c[keep] > r_r[keep]).mean())


def with_rewards(table: pa.Table, r_chosen: np.ndarray, r_rejected: np.ndarray) -> pa.Table:
    for column in ("reward_chosen", "reward_rejected"):
        if column in table.column_names:
            table = table.drop_columns([column])
    table = table.append_column("reward_chosen", pa.array(r_chosen, pa.float64()))
    return table.append_column("reward_rejected", pa.array(r_rejected, pa.float64()))


def score(
    model: str | Path | RewardModel,
    pairs: str | pa.Table | Any,
    *,
    home: str | Path | None = None,
    batch_size: int = 64,
    max_length: int | None = None,
) -> Any:
    """``pairs`` with ``reward_chosen`` and ``reward_rejected`` columns (float64).

    ``pairs`` is a pyarrow Table (-> Table), a ``datasets.Dataset`` (-> Dataset) or a
    catalog ref (-> Table). ``model`` as for :func:`load_model`, which caches it.
    """
    rm = load_model(model, home)
    table, _ = _load_data(pairs, home)
    r_c, r_r, _ = score_pairs_truncated(rm, pair_data(table), batch_size, max_length=max_length)
    if _as_table(pairs) is not None and not isinstance(pairs, pa.Table):
        dataset = pairs.remove_columns([c for c in ("reward_chosen", "reward_rejected")
                                        if c in pairs.column_names])
        dataset = dataset.add_column("reward_chosen", r_c.tolist())
        return dataset.add_column("reward_rejected", r_r.tolist())
    return with_rewards(table, r_c, r_r)


def evaluate(
    model: str | Path | RewardModel,
    data: str | pa.Table | Any,
    *,
    home: str | Path | None = None,
    robustness: bool = True,
    seed: int = 0,
    max_length: int | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Pairwise accuracy (tie-labelled pairs apart), tie accuracy, truncation, breakdowns and
    robustness probes. ``max_length`` scores at another length than the model trained at."""
    rm = load_model(model, home)
    table, ref = _load_data(data, home)
    metrics = evaluate_model(rm, pair_data(table), robustness=robustness, seed=seed,
                             max_length=max_length, home=home, progress=progress)
    metrics["dataset"] = ref
    return metrics


def oof_scores(
    pairs: pa.Table | Any,
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
    table, _ = _load_data(pairs, home)
    data: PairData = pair_data(table)
    folds = kfold_by_prompt(data.prompt_ids, k, seed)
    progress = options.pop("progress", False)
    cfg = TrainConfig(mode=mode, base=base, seed=seed, val_fraction=0.0, progress=progress, **options)
    featurizer = None
    if mode == "head":
        resolved = cfg.resolved()
        featurizer = HeadFeaturizer(base, resolved.max_length, _home(home) / "embeddings",
                                    progress=progress, features=resolved.features)
        featurizer.features(data.prompts + data.prompts, data.chosen + data.rejected)
    r_c = np.zeros(len(data))
    r_r = np.zeros(len(data))
    for fold in range(k):
        held = np.flatnonzero(folds == fold)
        if len(held) == 0:
            continue
        result = fit(data, cfg, featurizer=featurizer, train_idx=np.flatnonzero(folds != fold),
                     val_idx=np.zeros(0, dtype=np.int64), cache_root=None,
                     hidden_root=_home(home) / "hidden")
        held_c, held_r = score_pairs(result.model, data.subset(held))
        r_c[held], r_r[held] = held_c, held_r
    out = with_rewards(table, r_c, r_r)
    return out.append_column("fold", pa.array(folds, pa.int64()))
