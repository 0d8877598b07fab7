"""The training loop shared by both modes: batches, checkpoints, resume, Ctrl+C, progress.

A run is a pure function of (data, config): the split and every epoch's batch order come
from the seed, so a resumed run replays exactly the batches an uninterrupted run would have
seen after the checkpoint. Ctrl+C (or SIGTERM) sets a flag; the loop finishes the current
optimiser step, writes a checkpoint and raises :class:`TrainingInterrupted` (a second Ctrl+C
stops at once). Before the loop, head mode embeds through :mod:`factory.embed`, whose
Ctrl+C saves the embeddings computed so far and raises ``EmbeddingInterrupted``.

With a validation split the run keeps the epoch with the lowest validation loss, not the
last one, and stops once ``patience`` epochs in a row failed to improve on it.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from factory.columns import take
from factory.trainer import backbones
from factory.trainer.data import PairData, balanced_weights, epoch_batches, split_by_prompt
from factory.trainer.losses import preference_loss
from factory.trainer.model import HEAD_FEATURES, HeadFeaturizer, ModelSpec, RewardHead, RewardModel
from factory.trainer.progress import bar as progress_bar
from factory.trainer.progress import note, phase
from factory.trainer.token_cache import encode_cached
from schemas.errors import PrefabError

CHECKPOINT_FILE = "checkpoint.pt"

# Defaults differ by mode: a head on cached embeddings wants many cheap epochs at a high
# rate; fine-tuning a transformer wants one or two epochs at a small one.
MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "head": {"epochs": 30, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.01, "checkpoint_steps": 0,
             "patience": 5},
    "full": {"epochs": 1, "lr": 2e-5, "batch_size": 16, "weight_decay": 0.0, "checkpoint_steps": 200,
             "patience": 1},
    # Pooling + head on cached token states: head mode's regime, each step a little dearer.
    "tokens": {"epochs": 30, "lr": 1e-3, "batch_size": 64, "weight_decay": 0.01, "checkpoint_steps": 0,
               "patience": 5},
    # Top layers + pooling + head: the copied layers move at a share of lr (token_head).
    "top-k": {"epochs": 10, "lr": 1e-3, "batch_size": 32, "weight_decay": 0.01, "checkpoint_steps": 0,
              "patience": 2},
}
TOKEN_MODES = ("tokens", "top-k")
# Settings a checkpoint records: --resume takes them from there, and they must not change.
RESUME_KEYS = ("mode", "base", "epochs", "lr", "batch_size", "weight_decay", "max_length", "seed",
               "val_fraction", "center_coef", "head_hidden", "max_pairs", "patience", "augment_weight",
               "residual_of",
               "val_on", "features", "trainable_layers")


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped early (Ctrl+C or a step limit); the checkpoint holds the last step."""

    def __init__(self, checkpoint: Path | None, step: int):
        self.checkpoint = checkpoint
        self.step = step
        super().__init__(f"training interrupted at step {step}; checkpoint {checkpoint}")


@dataclass
class TrainConfig:
    mode: str = "head"
    base: str = backbones.MINILM
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    max_length: int = 256
    patience: int | None = None  # epochs without a better validation loss before stopping; 0: never
    seed: int = 0
    val_fraction: float = 0.1
    center_coef: float = 0.0
    grad_clip: float = 1.0
    checkpoint_steps: int | None = None  # 0: only at the end of each epoch
    head_hidden: int = 256
    features: str = "pair"  # head/tokens/top-k: "pair" or "pair+parts" (see model.HEAD_FEATURES)
    trainable_layers: int | None = None  # top-k mode: the backbone's last N layers are trained
    # Generated pairs (a generator's provenance step): each generator's pairs together weigh
    # this many times the real training pairs (balanced by generator; a mapping gives each
    # generator its own share). None: the weight column as it is.
    augment_weight: float | dict[str, float] | None = None
    # What the validation loss (best epoch, early stopping) is computed on: "all" pairs of
    # the validation prompts, or only the "real" ones (no generated pair), so augmentation
    # cannot trade the real pairs' fit for easy generated ones unnoticed.
    val_on: str = "all"
    # Head mode: train a residual on top of this base model (name, name@N or folder): reward =
    # base + residual, fitted to the generated pairs with the real pairs' order kept.
    residual_of: str | None = None
    max_pairs: int | None = None  # cap on training pairs (benchmarks, smoke runs)
    device: str | None = None  # None: CUDA when present, else CPU
    bf16: bool | None = None  # None: on CUDA with bf16 support
    gradient_checkpointing: bool | None = None  # None: on CUDA for billion-scale backbones
    eval_batch_size: int = 64
    progress: bool | None = None  # None: bars only when stderr is a terminal
    stop_after_steps: int | None = None  # stop (as on Ctrl+C) after this many steps in total

    def resolved(self) -> TrainConfig:
        if self.mode not in MODE_DEFAULTS:
            raise PrefabError(f"mode must be one of {', '.join(MODE_DEFAULTS)}, got {self.mode!r}")
        if self.mode == "top-k" and (self.trainable_layers is None or self.trainable_layers < 1):
            raise PrefabError(f"--trainable-layers must be 1 or more for --mode top-k, got {self.trainable_layers}")
        if self.mode != "top-k" and self.trainable_layers is not None:
            raise PrefabError(f"--trainable-layers is for --mode top-k, not {self.mode}")
        filled = {k: v for k, v in MODE_DEFAULTS[self.mode].items() if getattr(self, k) is None}
        # Python numbers, not numpy ones: they reach the optimiser's and the checkpoint's state,
        # which loads back as plain data only.
        cfg = replace(self, **{k: plain(v) for k, v in asdict(replace(self, **filled)).items()})
        if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0 or cfg.max_length < 8:
            raise PrefabError("epochs, batch size and lr must be positive; max length >= 8")
        if cfg.patience < 0:
            raise PrefabError(f"patience must be >= 0, got {cfg.patience}")
        if cfg.features not in HEAD_FEATURES:
            raise PrefabError(f"features must be one of {', '.join(HEAD_FEATURES)}, got {cfg.features!r}")
        if cfg.features != "pair" and cfg.mode == "full":
            raise PrefabError(f"features {cfg.features!r} are for head mode (and tokens, top-k); full mode "
                              "reads the pair itself")
        if cfg.val_on not in ("all", "real"):
            raise PrefabError(f"val_on must be 'all' or 'real', got {cfg.val_on!r}")
        shares = cfg.augment_weight.values() if isinstance(cfg.augment_weight, dict) else [cfg.augment_weight]
        if any(v is not None and not (v >= 0 and math.isfinite(v)) for v in shares):
            raise PrefabError(f"augment weight must be finite and >= 0, got {cfg.augment_weight!r}")
        return cfg

    def as_params(self) -> dict[str, Any]:
        skip = {"progress", "stop_after_steps", "eval_batch_size"}
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class FitResult:
    model: RewardModel
    history: list[dict[str, Any]]
    train_idx: np.ndarray
    val_idx: np.ndarray
    train_seconds: float  # the optimisation loop (with validation), this session
    pairs_per_second: float  # pairs trained over the whole run: loading, embedding, loop
    steps: int
    resumed_from_step: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    best_epoch: int | None = None  # the epoch whose weights the model has (None: the last)
    stopped_early: bool = False
    embed_seconds: float = 0.0  # head mode: encoding the pairs (0 on a warm cache)
    total_seconds: float = 0.0


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's payload: tensors and plain data only (``weights_only``), so a file
    planted in the home cannot run code when a run resumes."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrefabError(f"{path} holds more than tensors and plain data, so it was not loaded "
                          f"({first}); delete its folder and train again") from None


def read_checkpoint_state(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The saved state of a run (None when there is no checkpoint)."""
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    return load_checkpoint(path) if path.is_file() else None


def read_checkpoint_params(checkpoint_dir: str | Path) -> dict[str, Any] | None:
    """The settings a checkpoint was made with (None when there is no checkpoint)."""
    state = read_checkpoint_state(checkpoint_dir)
    return None if state is None else dict(state.get("params") or {})


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays as Python numbers and lists, tuples as lists:
    what ``torch.load(weights_only=True)`` reads back (tensors pass through)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return value


class _Task(Protocol):
    module: torch.nn.Module
    lengths: np.ndarray | None
    truncated: np.ndarray  # per row of the data: chosen or rejected input was cut
    embed_seconds: float

    def rewards(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...
    def eval_rewards(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    def to_reward_model(self) -> RewardModel: ...


class _HeadTask:
    """Frozen encoder: embed every row once (cached on disk), then train a small MLP."""

    def __init__(self, data: PairData, cfg: TrainConfig, device: torch.device, cache_root: Any,
                 featurizer: HeadFeaturizer | None = None, rows: np.ndarray | None = None):
        self.cfg = cfg
        self.device = device
        if featurizer is None:
            with phase(f"load encoder {cfg.base}", cfg.progress):
                featurizer = HeadFeaturizer(cfg.base, cfg.max_length, cache_root, device,
                                            progress=cfg.progress, features=cfg.features)
        self.featurizer = featurizer
        if self.featurizer.features_kind != cfg.features:
            raise PrefabError(f"the featurizer makes {self.featurizer.features_kind!r} features, the config "
                              f"asks for {cfg.features!r}")
        # Embed only the rows this run uses (train + validation); others stay zero.
        rows = np.arange(len(data)) if rows is None else rows
        part = data.subset(rows)
        started = time.perf_counter()
        feats, cut = self.featurizer.featurize(part.prompts + part.prompts, part.chosen + part.rejected,
                                               max_length=cfg.max_length, progress=cfg.progress)
        self.embed_seconds = time.perf_counter() - started
        x = np.zeros((2, len(data), feats.shape[1]), dtype=np.float32)
        x[0, rows], x[1, rows] = feats[: len(rows)], feats[len(rows) :]
        self.truncated = np.zeros(len(data), dtype=bool)
        self.truncated[rows] = cut[: len(rows)] | cut[len(rows) :]
        self.x_chosen = torch.from_numpy(x[0]).to(device)
        self.x_rejected = torch.from_numpy(x[1]).to(device)
        torch.manual_seed(cfg.seed)
        self.module = RewardHead(self.featurizer.dim, cfg.head_hidden).to(device)
        self.lengths = None

    def rewards(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(idx).to(self.device)
        both = self.module(torch.cat([self.x_chosen[t], self.x_rejected[t]]))
        return both[: len(idx)], both[len(idx) :]

    @torch.inference_mode()
    def eval_rewards(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.module.eval()
        r_c, r_r = self.rewards(idx)
        self.module.train()
        return r_c.double().cpu().numpy(), r_r.double().cpu().numpy()

    def to_reward_model(self) -> RewardModel:
        spec = ModelSpec("head", self.cfg.base, self.cfg.max_length, self.cfg.head_hidden,
                         self.featurizer.dim, features=self.cfg.features)
        return RewardModel(spec, head=self.module.eval(), featurizer=self.featurizer,
                           device=self.device)


# Measured on an H200 (benchmarks/gpu_check.py): checkpointing cost MiniLM 26% of its
# throughput to save 0.07 GiB and a 212M decoder 42% to save 1.3 GiB; it pays only where
# activations, not speed, are the limit, so by default it is on for billion-scale backbones.
CHECKPOINTING_FROM_PARAMETERS = 1_000_000_000


def _large(module: torch.nn.Module) -> bool:
    return sum(p.numel() for p in module.parameters()) >= CHECKPOINTING_FROM_PARAMETERS


class _FullTask:
    """Fine-tune a sequence-classification backbone end to end."""

    def __init__(self, data: PairData, cfg: TrainConfig, device: torch.device,
                 tokens_root: str | Path | None = None):
        self.cfg = cfg
        self.device = device
        path = backbones.resolve_base(cfg.base)
        torch.manual_seed(cfg.seed)  # the new score head is random: seed it
        with phase(f"load backbone {cfg.base}", cfg.progress):
            self.tokenizer = backbones.load_tokenizer(path)
            self.module = backbones.load_seqcls(path, device)
        self.module.config.pad_token_id = self.tokenizer.pad_token_id
        backbones.disable_dropout(self.module)
        on_cuda = device.type == "cuda"
        self.bf16 = backbones.bf16_ok(device) if cfg.bf16 is None else (cfg.bf16 and on_cuda)
        grad_ckpt = (on_cuda and _large(self.module)) if cfg.gradient_checkpointing is None \
            else cfg.gradient_checkpointing
        if grad_ckpt and getattr(self.module, "supports_gradient_checkpointing", False):
            backbones.enable_checkpointing(self.module)
        tok = self.tokenizer
        positions = getattr(self.module.config, "max_position_embeddings", 0) or 0
        backbones.check_max_length(cfg.max_length, positions, cfg.base)
        # Memory-mapped ids (token_cache), reused across runs under <home>/tokens.
        self.ids_chosen = encode_cached(tok, data.prompts, data.chosen, cfg.max_length, tokens_root,
                                        progress=cfg.progress, desc="tokenize chosen")
        self.ids_rejected = encode_cached(tok, data.prompts, data.rejected, cfg.max_length,
                                          tokens_root, progress=cfg.progress, desc="tokenize rejected")
        self.truncated = self.ids_chosen.truncated | self.ids_rejected.truncated
        self.embed_seconds = 0.0
        self.lengths = np.maximum(self.ids_chosen.lengths, self.ids_rejected.lengths)

    def rewards(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # Chosen and rejected share one forward pass (one padded batch of 2B), as in TRL.
        seqs = [self.ids_chosen[i] for i in idx] + [self.ids_rejected[i] for i in idx]
        ids, mask = backbones.pad_batch(seqs, self.tokenizer.pad_token_id, self.device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.module(input_ids=ids, attention_mask=mask).logits
        both = logits.squeeze(-1).float()
        return both[: len(idx)], both[len(idx) :]

    def eval_rewards(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from factory.trainer.model import full_rewards

        seqs = [self.ids_chosen[i] for i in idx] + [self.ids_rejected[i] for i in idx]
        out = full_rewards(self.module, self.tokenizer, seqs, self.device, self.cfg.eval_batch_size,
                           progress=self.cfg.progress, bf16=self.bf16)
        self.module.train()
        return out[: len(idx)], out[len(idx) :]

    def to_reward_model(self) -> RewardModel:
        spec = ModelSpec("full", self.cfg.base, self.cfg.max_length)
        return RewardModel(spec, hf_model=self.module.eval(), tokenizer=self.tokenizer,
                           device=self.device)


@contextmanager
def _ctrl_c_flag() -> Iterator[dict[str, bool]]:
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt  # second Ctrl+C: do not wait for the step to finish
        flag["stop"] = True

    signal.signal(signal.SIGINT, handler)
    # SIGTERM (a scheduler's or `kill`'s stop) ends the same way, unless someone handles it.
    term_previous = signal.getsignal(signal.SIGTERM)
    if term_previous == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)
        if term_previous == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, term_previous)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """A tiny MLP step is microseconds of math: OpenMP hand-offs across threads (and a
    busy neighbour on a shared core) cost more than they save, so head mode runs on one."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fingerprint(data: PairData, idx: np.ndarray) -> str:
    h = hashlib.sha256()
    rows = np.asarray(idx, dtype=np.int64)
    # Arrow takes, read a chunk at a time: no per-row lookups and no list of all the texts.
    for prompt_id, chosen, rejected in zip(take(data.prompt_ids, rows), take(data.chosen, rows),
                                           take(data.rejected, rows), strict=True):
        h.update(prompt_id.encode())
        h.update(hashlib.sha1((chosen + "\x00" + rejected).encode()).digest())
    return h.hexdigest()[:16]


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write keeps the previous checkpoint


def pair_accuracy(r_c: np.ndarray, r_r: np.ndarray, tie: np.ndarray) -> float:
    """Strict accuracy over preference pairs: equal rewards count as an error."""
    pref = ~tie
    return float((r_c[pref] > r_r[pref]).mean()) if pref.any() else float("nan")


def _cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def fit(
    data: PairData,
    cfg: TrainConfig,
    *,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    cache_root: str | Path | None = None,
    tokens_root: str | Path | None = None,
    hidden_root: str | Path | None = None,
    featurizer: HeadFeaturizer | None = None,
    train_idx: np.ndarray | None = None,
    val_idx: np.ndarray | None = None,
    checkpoint_extra: dict[str, Any] | None = None,
) -> FitResult:
    """Train a reward model on ``data``; see :class:`TrainConfig` for the knobs.

    ``checkpoint_extra`` is recorded with the settings in the checkpoint (e.g. the data
    ref, so that --resume can find it). ``tokens_root`` keeps full mode's token cache
    (normally ``<home>/tokens``; None: a temporary one for this run); ``hidden_root`` the
    tokens/top-k modes' hidden-state cache (normally ``<home>/hidden``; None: temporary).
    """
    run_started = time.perf_counter()
    cfg = cfg.resolved()
    device = backbones.pick_device(cfg.device)
    if train_idx is None:
        train_idx, val_idx = split_by_prompt(data.prompt_ids, cfg.val_fraction, cfg.seed)
    val_idx = np.zeros(0, dtype=np.int64) if val_idx is None else val_idx
    weights = data.weight
    if cfg.augment_weight is not None:  # balanced apart in each split: validation mirrors training
        weights = balanced_weights(data, train_idx, cfg.augment_weight)
        weights[val_idx] = balanced_weights(data, val_idx, cfg.augment_weight)[val_idx]
    # Zero-weight pairs cannot move the loss: skip their compute altogether.
    train_idx = train_idx[weights[train_idx] > 0]
    if cfg.max_pairs is not None and len(train_idx) > cfg.max_pairs:
        keep = np.random.default_rng(cfg.seed).permutation(len(train_idx))[: cfg.max_pairs]
        train_idx = np.sort(train_idx[keep])
    if len(train_idx) == 0:
        raise PrefabError("no training pairs with a positive weight")

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    params = {k: getattr(cfg, k) for k in RESUME_KEYS}
    fingerprint = _fingerprint(data, train_idx)
    state: dict[str, Any] | None = None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        # Checked before the (long) embedding phase, not after it.
        state = load_checkpoint(ckpt_path)
        differ = sorted(k for k in params if k in state["params"] and state["params"][k] != params[k])
        # (the API's --resume takes the checkpoint's settings: this is the library's guard)
        if differ:
            raise PrefabError(f"{ckpt_path}: checkpoint was made with other settings: "
                              + ", ".join(f"{k} {state['params'][k]!r} (now {params[k]!r})" for k in differ))
        if state["fingerprint"] != fingerprint:
            raise PrefabError(f"{ckpt_path}: checkpoint was made on other training pairs; "
                              "start a new model name or drop --resume")
        # Said before the (long) embedding phase: the run continues, it does not start over.
        note(f"resuming {ckpt_path} at step {state['step']}"
             + (" (training had finished: nothing left to train)" if state.get("finished") else ""),
             cfg.progress)

    task: _Task
    if cfg.mode == "head":
        rows = np.union1d(train_idx, val_idx)
        task = _HeadTask(data, cfg, device, cache_root, featurizer, rows)
    elif cfg.mode in TOKEN_MODES:
        from factory.trainer.token_head import TokensTask

        task = TokensTask(data, cfg, device, hidden_root, tokens_root, np.union1d(train_idx, val_idx))
    else:
        task = _FullTask(data, cfg, device, tokens_root)
    module = task.module
    module.train()
    groups = task.param_groups(cfg.lr) if hasattr(task, "param_groups") else module.parameters()
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(train_idx) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    # Linear decay to zero, no warm-up: TRL's (transformers') default schedule.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: max(0.0, 1.0 - s / total_steps)
    )
    tie_t = torch.from_numpy(data.tie).to(device)
    # Weights are relative to the training set's mean, not to each batch's (see losses).
    mean_weight = float(weights[train_idx].astype(np.float64).mean())
    margin_t = torch.from_numpy(data.margin).to(device)
    offset_t = torch.from_numpy(data.gap_offset).to(device)
    weight_t = torch.from_numpy(weights).to(device)
    # The rows the validation loss is computed on (all of them are embedded and trained apart).
    scored_val = val_idx
    if cfg.val_on == "real" and len(val_idx):
        real = val_idx[~data.generated[val_idx]]
        scored_val = real if len(real) else val_idx
    lengths = task.lengths[train_idx] if task.lengths is not None else None

    epoch, batch_in_epoch, step, history = 0, 0, 0, []
    # The best epoch by validation loss: its number, loss, weights (a copy, None for the
    # last epoch) and how many epochs since failed to beat it.
    best: dict[str, Any] = {"epoch": None, "val_loss": math.inf, "weights": None, "stale": 0}
    # finished: the last epoch ran or patience ran out (a resumed finished run only loads).
    finished, stopped_early = False, False
    if state is not None:
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        history = state["history"]
        best = state.get("best", best)
        finished, stopped_early = state.get("finished", False), state.get("stopped_early", False)
    resumed_from = step

    def checkpoint() -> None:
        if ckpt_path is None:
            return
        _save_checkpoint(ckpt_path, {
            "params": plain({**params, **(checkpoint_extra or {})}), "fingerprint": fingerprint,
            "model": module.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": plain(scheduler.state_dict()), "rng": torch.get_rng_state(), "epoch": epoch,
            "batch_in_epoch": batch_in_epoch, "step": step, "history": plain(history),
            "best": {**best, "val_loss": float(best["val_loss"])}, "finished": finished,
            "stopped_early": stopped_early,
        })

    def end_of_epoch(record: dict[str, Any]) -> bool:
        """Track the best epoch; True when patience has run out."""
        loss = record.get("val_loss")
        if loss is None or not math.isfinite(loss):
            return False
        if loss < best["val_loss"]:
            # Later epochs change the weights: keep a copy unless none follows.
            weights = _cpu_copy(module) if record["epoch"] < cfg.epochs else None
            best.update(epoch=record["epoch"], val_loss=loss, stale=0, weights=weights)
            return False
        best["stale"] += 1
        return bool(cfg.patience) and best["stale"] >= cfg.patience

    bar = progress_bar(total_steps, f"train {cfg.mode}", cfg.progress, unit="step", initial=step)
    pairs_seen, started = 0, time.perf_counter()
    try:
        with _ctrl_c_flag() as ctrl_c, _torch_threads(1 if cfg.mode in ("head", "tokens") else None):
            while epoch < cfg.epochs and not finished:
                batches = epoch_batches(len(train_idx), cfg.batch_size, cfg.seed, epoch, lengths)
                running = []
                while batch_in_epoch < len(batches):
                    idx = train_idx[batches[batch_in_epoch]]
                    t = torch.from_numpy(idx).to(device)
                    r_c, r_r = task.rewards(idx)
                    parts = preference_loss(r_c, r_r, tie=tie_t[t], margin=margin_t[t],
                                            weight=weight_t[t], offset=offset_t[t],
                                            center_coef=cfg.center_coef, mean_weight=mean_weight)
                    parts.loss.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    batch_in_epoch += 1
                    pairs_seen += len(idx)
                    running.append(float(parts.loss.detach()))
                    elapsed = time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(loss=f"{running[-1]:.4f}", pairs_s=f"{pairs_seen / elapsed:.1f}", refresh=False)
                    if cfg.checkpoint_steps and step % cfg.checkpoint_steps == 0:
                        checkpoint()
                    if ctrl_c["stop"] or (cfg.stop_after_steps and step >= cfg.stop_after_steps):
                        checkpoint()
                        raise TrainingInterrupted(ckpt_path, step)
                record: dict[str, Any] = {"epoch": epoch + 1, "step": step,
                                          "train_loss": float(np.mean(running)) if running else None}
                if len(scored_val):
                    record.update(_validate(task, data, scored_val, tie_t, margin_t, offset_t, weight_t, cfg))
                history.append(record)
                epoch, batch_in_epoch = epoch + 1, 0
                stopped_early = end_of_epoch(record) and epoch < cfg.epochs
                finished = stopped_early or epoch >= cfg.epochs
                checkpoint()
                if stopped_early:
                    break
    finally:
        bar.close()
    if best["epoch"] is not None and history and best["epoch"] != history[-1]["epoch"]:
        module.load_state_dict(best["weights"])  # later epochs did worse: back to the best
    train_seconds = time.perf_counter() - started
    total_seconds = time.perf_counter() - run_started
    module.eval()
    used = np.union1d(train_idx, val_idx)
    truncated = int(task.truncated[used].sum())
    return FitResult(
        model=task.to_reward_model(),
        history=history,
        train_idx=train_idx,
        val_idx=val_idx,
        train_seconds=train_seconds,
        pairs_per_second=pairs_seen / total_seconds if total_seconds > 0 else float("nan"),
        steps=step,
        resumed_from_step=resumed_from,
        stats={"device": str(device), "train_pairs": int(len(train_idx)),
               "val_pairs": int(len(val_idx)), "pairs_seen": pairs_seen,
               "train_pairs_per_second": pairs_seen / train_seconds if train_seconds > 0 else None,
               "truncated_pairs": truncated,
               "truncated_share": truncated / len(used) if len(used) else 0.0,
               "max_length": cfg.max_length},
        best_epoch=best["epoch"],
        stopped_early=stopped_early,
        embed_seconds=task.embed_seconds,
        total_seconds=total_seconds,
    )


@torch.no_grad()
def _validate(task: _Task, data: PairData, val_idx: np.ndarray, tie_t: torch.Tensor,
              margin_t: torch.Tensor, offset_t: torch.Tensor, weight_t: torch.Tensor,
              cfg: TrainConfig) -> dict[str, float]:
    r_c, r_r = task.eval_rewards(val_idx)
    t = torch.from_numpy(val_idx).to(tie_t.device)
    parts = preference_loss(torch.from_numpy(r_c), torch.from_numpy(r_r), tie=tie_t[t].cpu(),
                            margin=margin_t[t].cpu().double(), weight=weight_t[t].cpu().double(),
                            offset=offset_t[t].cpu().double(),
                            center_coef=cfg.center_coef)
    return {"val_loss": float(parts.loss), "val_accuracy": pair_accuracy(r_c, r_r, data.tie[val_idx])}
