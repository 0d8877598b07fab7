"""Evaluation of a reward model on a pair table.

Accuracy follows RewardBench: a preference pair counts as correct only if r_chosen is
strictly greater than r_rejected, so a model that scores both alike is wrong, not half
right. Tie-labelled pairs (Crome neutral pairs, PandaLM ties) have no right order: they
are left out of pairwise accuracy and scored as ties instead -- the share whose
|r_a − r_b| is under a threshold -- and the summary says how many were left out.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from factory.trainer.data import PairData
from factory.trainer.model import RewardModel
from factory.trainer.progress import phase

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
    r_c, r_r, _ = score_pairs_truncated(model, data, batch_size)
    return r_c, r_r


def score_pairs_truncated(
    model: RewardModel,
    data: PairData,
    batch_size: int = 64,
    *,
    max_length: int | None = None,
    progress: bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(r_chosen, r_rejected, truncated): truncated marks pairs with either side cut."""
    n = len(data)
    r, cut = model.score(data.prompts + data.prompts, data.chosen + data.rejected, batch_size,
                         max_length=max_length, progress=progress)
    return r[:n], r[n:], cut[:n] | cut[n:]


def evaluate_model(
    model: RewardModel,
    data: PairData,
    *,
    robustness: bool = True,
    max_probe_prompts: int = 200,
    contrast_threshold: float = 0.8,
    seed: int = 0,
    max_length: int | None = None,
    home: str | Path | None = None,
    embed: Callable[[list[str]], np.ndarray] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Pairwise metrics, truncation share and robustness probes of ``model`` on ``data``.

    ``max_length`` scores at another length than the model trained at; ``embed`` (default:
    :func:`factory.embed.embed_texts` under ``home``) mines the contrast instructions.
    """
    from factory.trainer.robustness import contrast_consistency, master_key_fpr

    length = max_length or model.spec.max_length
    with phase("score pairs", progress, count=len(data)):
        r_c, r_r, cut = score_pairs_truncated(model, data, max_length=length, progress=progress)
    metrics = pairwise_metrics(r_c, r_r, data)
    metrics["max_length"] = length
    metrics["truncated_pairs"] = int(cut.sum())
    metrics["truncated_share"] = float(cut.mean()) if len(cut) else 0.0
    if robustness:
        # The probes read keys and contrast combinations at the length the answers were
        # scored at: comparing rewards of different contexts would measure the length.
        with phase("master-key probe", progress):
            metrics["master_key"] = master_key_fpr(model, data, r_c, r_r, max_prompts=max_probe_prompts,
                                                   seed=seed, max_length=length, progress=progress)
        if embed is None:
            from factory.embed import embed_texts

            def embed(texts: list[str]) -> np.ndarray:
                return embed_texts(texts, home=home, progress=progress)

        with phase("contrast-instructions probe", progress):
            metrics["contrast_instructions"] = contrast_consistency(
                model, data, embed=embed, threshold=contrast_threshold, max_pairs=max_probe_prompts,
                max_length=length, progress=progress,
            )
    return metrics


def summary_text(metrics: dict[str, Any], title: str = "") -> str:
    """Human-readable lines for the CLI."""

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [title] if title else []
    lines.append(
        f"accuracy {pct(metrics['accuracy'])} over {metrics['preference_pairs']} preference pairs"
        f" (of {metrics['pairs']})"
    )
    if metrics["tie_pairs"]:
        ties = ", ".join(f"|Δ|<{k}: {pct(v)}" for k, v in metrics["tie_accuracy"].items())
        lines.append(f"{metrics['tie_pairs']} tie-labelled pairs left out of pairwise accuracy, "
                     f"scored as ties: {ties}")
    if metrics.get("truncated_pairs") is not None:
        lines.append(f"truncated at {metrics['max_length']} tokens: {metrics['truncated_pairs']} pairs "
                     f"({pct(metrics['truncated_share'])})")
    for group in ("by_source", "by_attribute", "by_task"):
        rows = metrics.get(group) or {}
        if len(rows) > 1 or (rows and NONE_GROUP not in rows):
            lines.append(f"{group.replace('_', ' ')}:")
            lines += [f"  {k:<24} {pct(v['accuracy']):>7}  ({v['pairs']} pairs)" for k, v in rows.items()]
    mk = metrics.get("master_key")
    if mk and mk.get("fpr") is not None:
        lines.append(
            f"master-key false-positive rate {pct(mk['fpr'])} (a key scores >= the chosen answer), "
            f"{pct(mk['fpr_vs_rejected'])} vs the rejected answer, over {mk['pairs']} pairs x "
            f"{len(mk['by_key'])} keys"
        )
        worst = max(mk["by_key"].items(), key=lambda kv: kv[1]["vs_chosen"])
        if worst[1]["vs_chosen"]:
            lines.append(f"  worst key {worst[0]!r}: {pct(worst[1]['vs_chosen'])} vs chosen")
    ci = metrics.get("contrast_instructions")
    if ci is not None and ci.get("contrast_pairs"):
        lines.append(
            f"contrast-instructions consistency {pct(ci['consistency'])} over {ci['contrast_pairs']} "
            f"mined pairs: same prompt (own vs neighbour's answer) {pct(ci['same_prompt'])}, "
            f"same answer (own vs neighbour's prompt) {pct(ci['same_answer'])}"
        )
    elif ci is not None:
        lines.append("contrast-instructions consistency n/a: no look-alike instructions found")
    return "\n".join(lines)
