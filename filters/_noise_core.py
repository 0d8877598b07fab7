"""The noise filter's computation on arrays: trained signals, the synthetic-flip copy that
teaches the combiner, and the combined suspicion score. No tables, no catalog.

Signals, each oriented so that larger means "more likely mislabelled" once negated where
noted (the combiner learns the signs anyway):

- out-of-fold RM ensemble: k folds split by prompt x several seeds (each seed its own
  split); a pair's margin r_chosen - r_rejected from the heads that never saw its prompt,
  mean and spread over seeds;
- confident learning: the out-of-fold probability σ(margin) with a random A/B side per
  pair, the calibrated confident joint, its noise rate and a bootstrap interval, and
  cleanlab's ``prune_by_noise_rate`` issue flag;
- training dynamics: the margin each pair had when visited in each epoch by the heads
  that train on it: the area under the margin (AUM) and forgetting events (learnt, then
  wrong again), plus the in-sample mean reward gap (PrefCleanBench's RwGap);
- CRM peer review: two heads per fold trained side by side, each learning only from the
  small-loss pairs its peer kept (the share left out ramps up to the estimated noise
  rate); a pair's held-out loss under the peer that likes it more, whether both peers
  reject it, and how often both left it out during training;
- neighbourhood agreement, at two radii (no model: label agreement among the pairs whose
  preference direction is most similar);
- signed length difference of the two responses (a frozen encoder barely sees length);
- judge agreement (a ``consistency_*`` column) when present; annotator votes enter as a
  separate Bayesian term (see :func:`filters._noise_signals.vote_evidence`).

The combiner is a logistic model trained on a copy of the data in which a known share of
pairs was flipped on purpose (every signal recomputed on that copy, models retrained):
the synthetic flips are its labels, so it learns how each signal moves when a label is
wrong on *this* data, without any gold labels. Applied to the real data's signals it
gives a log-odds, shifted so that its mean matches the estimated noise rate (a
calibrated probability), plus the votes' log-likelihood ratio.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from factory.trainer.data import kfold_by_prompt
from filters._noise_heads import HeadConfig, HeadRun, train_heads
from filters._noise_signals import (
    Logistic,
    Neighbourhood,
    ab_pred_probs,
    auroc,
    average_ranks,
    fit_logistic,
    label_issues,
    mixture_noise_interval,
    mixture_noise_rate,
    noise_rate,
    sigmoid,
)

MIN_FORGET, MAX_FORGET = 0.05, 0.45


@dataclass(frozen=True)
class ModelConfig:
    folds: int = 5
    seeds: int = 3
    head: HeadConfig = field(default_factory=HeadConfig)
    seed: int = 0


@dataclass
class ModelSignals:
    """Signals from trained heads, for one labelling of the pairs (arrays of n rows)."""

    oof: np.ndarray  # (seeds, n) out-of-fold margins
    aum: np.ndarray
    forgetting: np.ndarray
    rwgap: np.ndarray
    crm_loss: np.ndarray
    crm_suspect: np.ndarray  # bool
    crm_rejected: np.ndarray
    forget_rate: float  # the co-teaching forget rate used (the CL noise rate, clipped)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {"oof": self.oof, "aum": self.aum, "forgetting": self.forgetting, "rwgap": self.rwgap,
                "crm_loss": self.crm_loss, "crm_suspect": self.crm_suspect,
                "crm_rejected": self.crm_rejected, "forget_rate": np.asarray(self.forget_rate)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> ModelSignals:
        return cls(**{k: (float(v) if k == "forget_rate" else v) for k, v in arrays.items()})

    @property
    def oof_prob(self) -> np.ndarray:
        """P(chosen beats rejected): the seeds' probabilities averaged."""
        return sigmoid(self.oof).mean(0)


def fold_assignments(prompt_ids: Sequence[str], cfg: ModelConfig) -> np.ndarray:
    """(seeds, n) fold of each row; each seed splits the prompts its own way."""
    return np.stack([kfold_by_prompt(prompt_ids, cfg.folds, cfg.seed * 1009 + s) for s in range(cfg.seeds)])


def model_signals(x_chosen: np.ndarray, x_rejected: np.ndarray, prompt_ids: Sequence[str],
                  a_is_chosen: np.ndarray, cfg: ModelConfig,
                  on_epoch: Callable[[], None] | None = None) -> ModelSignals:
    """Train the ensemble and the co-teaching peers (``cfg.head.epochs`` epochs each;
    ``on_epoch`` is called after every epoch of either)."""
    n = len(x_chosen)
    k, seeds = cfg.folds, cfg.seeds
    folds = fold_assignments(prompt_ids, cfg)
    rows = np.arange(n)
    heads = np.arange(k)[:, None]
    mask = np.concatenate([folds[s][None, :] != heads for s in range(seeds)])  # head s*k+f trains off fold f
    run = train_heads(x_chosen, x_rejected, mask, cfg.head, on_epoch=on_epoch)
    oof = np.stack([run.final[s * k + folds[s], rows] for s in range(seeds)])
    aum, forgetting, rwgap = _dynamics(run, mask)

    labels, pred_probs = ab_pred_probs(sigmoid(oof).mean(0), a_is_chosen)
    rate = noise_rate(labels, pred_probs)
    forget_rate = float(np.clip(rate, MIN_FORGET, MAX_FORGET))

    # CRM peer review on the first seed's folds: heads 2f and 2f+1 are peers.
    peer_mask = np.repeat(folds[0][None, :] != heads, 2, axis=0)
    peers = np.arange(2 * k) ^ 1
    epochs = cfg.head.epochs
    ramp = max(1, epochs // 3)
    forget = forget_rate * np.minimum(1.0, (np.arange(epochs) + 1) / ramp)
    crm_cfg = replace(cfg.head, seed=cfg.head.seed + 7919)  # peers start apart from the ensemble
    crm = train_heads(x_chosen, x_rejected, peer_mask, crm_cfg, peers=peers, forget=forget,
                      on_epoch=on_epoch)
    held_a = crm.final[2 * folds[0], rows]
    held_b = crm.final[2 * folds[0] + 1, rows]
    loss_a, loss_b = np.logaddexp(0.0, -held_a), np.logaddexp(0.0, -held_b)
    # "Both reject": above each peer's own (1 - noise rate) loss quantile on held-out pairs.
    suspect = (loss_a > np.quantile(loss_a, 1 - forget_rate)) & (loss_b > np.quantile(loss_b, 1 - forget_rate))
    return ModelSignals(oof=oof.astype(np.float32), aum=aum, forgetting=forgetting, rwgap=rwgap,
                        crm_loss=np.minimum(loss_a, loss_b), crm_suspect=suspect,
                        crm_rejected=crm.both_rejected, forget_rate=forget_rate)


def _dynamics(run: HeadRun, in_train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUM, forgetting events and in-sample mean margin, over the heads that train on a row."""
    weights = in_train.astype(np.float64)
    heads_per_row = np.maximum(weights.sum(0), 1.0)
    history = run.history
    epochs = history.shape[1]
    aum = np.einsum("men,mn->n", history, weights) / (heads_per_row * epochs)
    correct = history > 0
    forgotten = (correct[:, :-1] & ~correct[:, 1:]).sum(1)  # (heads, n)
    forgetting = (forgotten * weights).sum(0) / heads_per_row
    rwgap = (run.final * weights).sum(0) / heads_per_row
    return aum, forgetting, rwgap


# ---- the combiner ---------------------------------------------------------------------------

# Each signal's orientation: multiplied by it, larger means "more likely mislabelled".
# The length difference has no fixed direction (some sets prefer longer answers, some
# shorter): its orientation is the data's own, see :func:`combine`.
ORIENTATION: dict[str, float] = {
    "oof_margin": -1.0, "aum": -1.0, "rwgap": -1.0, "forgetting": 1.0, "crm_loss": 1.0,
    "crm_rejected": 1.0, "knn_agreement": -1.0, "knn_wide_agreement": -1.0, "length_diff": 1.0,
    "judge_logit": -1.0,
}
FEATURES = tuple(ORIENTATION)


@dataclass
class Evidence:
    """Every signal of one labelling of the pairs, as columns named in :data:`FEATURES`."""

    models: ModelSignals
    columns: dict[str, np.ndarray]
    cl_issue: np.ndarray
    cl_labels: np.ndarray
    cl_pred_probs: np.ndarray

    def matrix(self, names: list[str], orientation: np.ndarray) -> np.ndarray:
        return np.column_stack([self.columns[name] for name in names]) * orientation


def evidence(x_chosen: np.ndarray, x_rejected: np.ndarray, prompt_ids: Sequence[str], a_is_chosen: np.ndarray,
             length_diff: np.ndarray, judge: np.ndarray | None, cfg: ModelConfig, neighbours: int,
             wide_neighbours: int, models: ModelSignals | None = None,
             on_epoch: Callable[[], None] | None = None, *, neighbourhood: Neighbourhood | None = None,
             flips: np.ndarray | None = None) -> Evidence:
    """All signals for the labelling given by (x_chosen, x_rejected); ``models`` reuses a
    cached training run. ``neighbourhood``: the directions' neighbours searched for another
    labelling of these pairs (at least ``wide_neighbours`` deep), which differs from this one
    by ``flips`` (None: the same); without it they are searched here."""
    if models is None:
        models = model_signals(x_chosen, x_rejected, prompt_ids, a_is_chosen, cfg, on_epoch)
    if neighbourhood is None:
        neighbourhood, flips = Neighbourhood.search(x_chosen - x_rejected, max(neighbours, wide_neighbours)), None
    labels, pred_probs = ab_pred_probs(models.oof_prob, a_is_chosen)
    columns = {
        "oof_margin": models.oof.mean(0).astype(np.float64),
        "oof_spread": models.oof.std(0).astype(np.float64),
        "aum": models.aum,
        "forgetting": models.forgetting,
        "rwgap": models.rwgap,
        "crm_loss": models.crm_loss,
        "crm_rejected": models.crm_rejected,
        "knn_agreement": neighbourhood.agreement(neighbours, flips),
        "knn_wide_agreement": neighbourhood.agreement(wide_neighbours, flips),
        "length_diff": np.asarray(length_diff, dtype=np.float64),
        "judge_logit": np.zeros(len(x_chosen)) if judge is None else _logit(judge),
    }
    return Evidence(models=models, columns=columns, cl_issue=label_issues(labels, pred_probs),
                    cl_labels=labels, cl_pred_probs=pred_probs)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.5), 0.02, 0.98)
    return np.log(p / (1 - p))


def synthetic_groups(uniform: np.ndarray, rate: float, copies: int) -> np.ndarray:
    """Copy number in which each row is flipped on purpose (``copies``: never): disjoint
    groups, so every copy stays close to the real data (its noise plus ``rate``)."""
    return np.minimum((uniform / rate).astype(np.int64), copies)


def flip_views(x_chosen: np.ndarray, x_rejected: np.ndarray, flips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (np.where(flips[:, None], x_rejected, x_chosen), np.where(flips[:, None], x_chosen, x_rejected))


@dataclass
class Combined:
    names: list[str]
    orientation: np.ndarray
    model: Logistic
    logit: np.ndarray  # the real data's log-odds of a wrong label, calibrated to noise_rate
    standardized: np.ndarray  # (n, features) oriented signals in the combiner's units
    noise_rate: float
    noise_low: float
    noise_high: float
    l2: float = 1.0
    # AUROC of the combined score for the synthetic flips, on copies the combiner did not
    # fit (in-sample with a single copy): how well the scores can tell a wrong label at all.
    separation: float = float("nan")

    def weights(self) -> dict[str, float]:
        return {name: round(float(c), 4) for name, c in zip(self.names, self.model.coef, strict=True)}


def combine(real: Evidence, copies: list[tuple[Evidence, np.ndarray]], *, use_judge: bool,
            fallback_rate: float, seed: int = 0, l2: float | None = None) -> Combined:
    """Fit the combiner on the copies' synthetic flips, estimate the noise rate, score the data.

    Weights are kept >= 0 on oriented signals: with labels as noisy as these (a copy's
    unflipped pairs include the data's own errors), free signs let correlated signals
    cancel with large opposite weights, and the ranking swings from run to run.
    """
    names = [n for n in FEATURES if use_judge or n != "judge_logit"]
    direction = length_direction(real.columns["length_diff"])
    if direction == 0.0:
        names.remove("length_diff")
    orientation = np.array([ORIENTATION[n] for n in names])
    if direction != 0.0:
        orientation[names.index("length_diff")] = direction
    blocks = [ev.matrix(names, orientation) for ev, _ in copies]
    targets = [flips.astype(np.float64) for _, flips in copies]
    x, y = np.vstack(blocks), np.concatenate(targets)
    l2, separation = choose_l2(blocks, targets) if l2 is None else (l2, float("nan"))
    model = fit_logistic(x, y, l2=l2, nonnegative=np.ones(len(names), dtype=bool))
    copy_score = model.logit(x)
    flipped = y > 0.5
    if not np.isfinite(separation):
        separation = auroc(copy_score, flipped)
    rate = mixture_noise_rate(copy_score, flipped)
    low, high = mixture_noise_interval(copy_score, flipped, seed=seed)
    if not np.isfinite(rate):
        rate, low, high = fallback_rate, float("nan"), float("nan")
    real_x = real.matrix(names, orientation)
    raw = model.logit(real_x)
    logit = raw + calibrate_shift(raw, rate)
    return Combined(names=names, orientation=orientation, model=model, logit=logit,
                    standardized=(real_x - model.mean) / model.scale, noise_rate=rate,
                    noise_low=low, noise_high=high, l2=l2, separation=separation)


L2_GRID = (1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0)


def choose_l2(blocks: list[np.ndarray], targets: list[np.ndarray]) -> tuple[float, float]:
    """The ridge strength for the combiner, by leave-one-copy-out ranking of synthetic flips,
    and that ridge's held-out AUROC (nan with a single copy).

    How much the copies can teach depends on the data's own noise: a copy's unflipped
    pairs carry the data's errors, which dilute the synthetic labels by (1 - 2 x noise).
    Nearly clean data supports sharp weights; very noisy data supports only a broad,
    shrunken mix (as the ridge grows, each weight tends to its signal's own association
    with the flips). The one-standard-error rule picks the strongest ridge whose held-out
    AUROC is within one standard error of the best, so that weights are only sharpened
    when the copies clearly support it.
    """
    if len(blocks) < 2:
        return L2_GRID[0], float("nan")
    means, errors = [], []
    for l2 in L2_GRID:
        scores = []
        for held in range(len(blocks)):
            x = np.vstack([b for i, b in enumerate(blocks) if i != held])
            y = np.concatenate([t for i, t in enumerate(targets) if i != held])
            model = fit_logistic(x, y, l2=l2, nonnegative=np.ones(x.shape[1], dtype=bool))
            scores.append(auroc(model.logit(blocks[held]), targets[held] > 0.5))
        valid = np.asarray([v for v in scores if np.isfinite(v)])
        means.append(float(valid.mean()) if len(valid) else -np.inf)
        errors.append(float(valid.std(ddof=1) / np.sqrt(len(valid))) if len(valid) > 1 else 0.0)
    best = int(np.argmax(means))
    floor = means[best] - errors[best]
    chosen = max(i for i, mean in enumerate(means) if mean >= floor)
    return L2_GRID[chosen], means[chosen]


def length_direction(length_diff: np.ndarray, z: float = 2.0) -> float:
    """Which way a flipped label moves the length difference, or 0 when the data does not say.

    Most labels are right (noise below one half), so the side the labels prefer is the
    side most pairs' chosen answer is on, and a flipped label points the other way. A
    Wilcoxon signed-rank test of the log length ratios (robust to their heavy tails)
    decides; within ``z`` standard errors of zero -- at high noise the preference shrinks
    by (1 - 2 x noise) -- a guess could turn the signal backwards, and the synthetic
    copies cannot catch that (they flip the length difference with the label whatever
    its direction), so length is left out instead.
    """
    d = np.asarray(length_diff, dtype=np.float64)
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 0.0
    statistic = float((np.sign(d) * average_ranks(np.abs(d))).sum())
    score = statistic / np.sqrt(n * (n + 1) * (2 * n + 1) / 6)
    if abs(score) < z:
        return 0.0
    return -1.0 if score > 0 else 1.0


def calibrate_shift(logit: np.ndarray, rate: float) -> float:
    """The constant that makes mean σ(logit + shift) equal ``rate`` (bisection: monotone)."""
    if len(logit) == 0:
        return 0.0
    rate = float(np.clip(rate, 1e-4, 1 - 1e-4))
    low, high = -50.0, 50.0
    for _ in range(80):
        mid = (low + high) / 2
        if sigmoid(logit + mid).mean() < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2
