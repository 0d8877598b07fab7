"""Evaluation of a reward model on a pair table.

Accuracy follows RewardBench: a preference pair counts as correct only if r_chosen is
strictly greater than r_rejected, so a model that scores both alike is wrong, not half
right. Tie pairs are scored separately: the share whose |r_a − r_b| is under a threshold.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from factory.trainer.data import PairData
from factory.trainer.model import RewardModel

TIE_THRESHOLDS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
NONE_GROUP = "(none)"


def _group_breakdown(
    keys: Sequence[str | None], correct: np.ndarray, tie: np.ndarray
) -> dict[str, dict[str, Any]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key if key is not None else NONE_GROUP].append(i)
    out = {}
    for key in sorted(groups):
        idx = np.asarray(groups[key])
        pref = idx[~tie[idx]]
        out[key] = {
            "pairs": int(len(idx)),
            "preference_pairs": int(len(pref)),
            "accuracy": float(correct[pref].mean()) if len(pref) else None,
        }
    return out


def pairwise_metrics(
    r_chosen: np.ndarray,
    r_rejected: np.ndarray,
    data: PairData,
    *,
    tie_thresholds: Sequence[float] = TIE_THRESHOLDS,
    bins: int = 20,
) -> dict[str, Any]:
    r_chosen = np.asarray(r_chosen, dtype=np.float64)
    r_rejected = np.asarray(r_rejected, dtype=np.float64)
    diff = r_chosen - r_rejected
    tie = data.tie
    pref = ~tie
    correct = diff > 0  # strict: equal rewards are an error
    metrics: dict[str, Any] = {
        "pairs": int(len(diff)),
        "preference_pairs": int(pref.sum()),
        "tie_pairs": int(tie.sum()),
        "accuracy": float(correct[pref].mean()) if pref.any() else None,
        "mean_margin": float(diff[pref].mean()) if pref.any() else None,
        "reward_mean": float(np.concatenate([r_chosen, r_rejected]).mean()) if len(diff) else None,
        "reward_std": float(np.concatenate([r_chosen, r_rejected]).std()) if len(diff) else None,
    }
    abs_tie = np.abs(diff[tie])
    metrics["tie_accuracy"] = {
        f"{t:g}": (float((abs_tie < t).mean()) if len(abs_tie) else None) for t in tie_thresholds
    }
    metrics["tie_mean_abs_diff"] = float(abs_tie.mean()) if len(abs_tie) else None
    metrics["by_source"] = _group_breakdown(data.sources, correct, tie)
    metrics["by_attribute"] = _group_breakdown(data.attributes, correct, tie)
    metrics["by_task"] = _group_breakdown(data.tasks, correct, tie)
    if pref.any():
        counts, edges = np.histogram(diff[pref], bins=bins)
        metrics["margin_histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
    else:
        metrics["margin_histogram"] = {"edges": [], "counts": []}
    return metrics


def score_pairs(model: RewardModel, data: PairData, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected) in one scoring call, so head mode embeds everything in one go."""
    n = len(data)
    r = model.reward(data.prompts + data.prompts, data.chosen + data.rejected, batch_size)
    return r[:n], r[n:]


def evaluate_model(
    model: RewardModel,
    data: PairData,
    *,
    robustness: bool = True,
    max_probe_prompts: int = 200,
    contrast_threshold: float = 0.8,
    seed: int = 0,
) -> dict[str, Any]:
    from factory.trainer.robustness import contrast_consistency, master_key_fpr

    r_c, r_r = score_pairs(model, data)
    metrics = pairwise_metrics(r_c, r_r, data)
    if robustness:
        metrics["master_key"] = master_key_fpr(model, data, r_r, max_prompts=max_probe_prompts,
                                               seed=seed)
        metrics["contrast_instructions"] = contrast_consistency(
            model, data, threshold=contrast_threshold, max_pairs=max_probe_prompts
        )
    return metrics


def summary_text(metrics: dict[str, Any], title: str = "") -> str:
    """Human-readable lines for the CLI."""

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [title] if title else []
    lines.append(
        f"pairs {metrics['pairs']} (preference {metrics['preference_pairs']}, ties {metrics['tie_pairs']})"
        f"  accuracy {pct(metrics['accuracy'])}"
    )
    if metrics["tie_pairs"]:
        ties = ", ".join(f"|Δ|<{k}: {pct(v)}" for k, v in metrics["tie_accuracy"].items())
        lines.append(f"tie pairs: {ties}")
    for group in ("by_source", "by_attribute", "by_task"):
        rows = metrics.get(group) or {}
        if len(rows) > 1 or (rows and NONE_GROUP not in rows):
            lines.append(f"{group.replace('_', ' ')}:")
            lines += [f"  {k:<24} {pct(v['accuracy']):>7}  ({v['pairs']} pairs)" for k, v in rows.items()]
    mk = metrics.get("master_key")
    if mk and mk.get("fpr") is not None:
        lines.append(f"master-key false-positive rate {pct(mk['fpr'])} over {mk['comparisons']} comparisons")
    ci = metrics.get("contrast_instructions")
    if ci is not None:
        lines.append(
            f"contrast-instructions consistency {pct(ci['consistency'])} over {ci['contrast_pairs']} mined pairs"
        )
    return "\n".join(lines)
