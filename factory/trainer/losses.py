"""Pairwise reward-model losses: Bradley–Terry with margins, a tie loss, per-pair weights.

For a pair with rewards r_c, r_r and d = r_c − r_r + offset (offset 0 unless the rewards
being trained are added to fixed ones, as in residual training, where it is the fixed gap):
- preference pairs: −log σ(d − margin) (margin null -> 0; TRL's form);
- tie pairs: BCE(σ(d), 0.5) = −½ log σ(d) − ½ log σ(−d), minimised at d = 0 (Crome);
- optional centering: coef · ((r_c + r_r)²) per pair (TRL's ``center_rewards_coefficient``).

The batch loss is Σ wᵢ ℓᵢ / (B · w̄), w̄ the mean weight of the whole training set (the
trainer passes it as ``mean_weight``): a batch that happens to hold only low-weight pairs
(e.g. generated ones) takes a step as small as its weights, instead of the full step a
per-batch Σ wᵢ ℓᵢ / Σ wᵢ would give it. Unit weights give the plain mean either way.
Without ``mean_weight`` (validation: one batch of the whole set) it is Σ wᵢ ℓᵢ / Σ wᵢ.
A weight of 0 adds nothing, so a zero-weight pair has exactly no influence on the loss
or its gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    loss: torch.Tensor  # scalar, what backward() sees
    per_pair: torch.Tensor  # unweighted loss of each pair (for logging and low-loss selection)
    bt: float  # weighted mean over preference pairs (nan if none)
    tie: float  # weighted mean over tie pairs (nan if none)


def pair_losses(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    tie: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> torch.Tensor:
    """Unweighted loss of each pair."""
    diff = r_chosen - r_rejected
    if offset is not None:
        diff = diff + offset.to(diff.dtype)
    shifted = diff - margin.to(diff.dtype) if margin is not None else diff
    bt = -F.logsigmoid(shifted)
    if tie is not None:
        tie_loss = -0.5 * (F.logsigmoid(diff) + F.logsigmoid(-diff))
        per_pair = torch.where(tie.bool(), tie_loss, bt)
    else:
        per_pair = bt
    if center_coef:
        per_pair = per_pair + center_coef * (r_chosen + r_rejected) ** 2
    return per_pair


def preference_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    *,
    tie: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    center_coef: float = 0.0,
    mean_weight: float | None = None,
) -> LossParts:
    per_pair = pair_losses(r_chosen, r_rejected, tie=tie, margin=margin, offset=offset,
                           center_coef=center_coef)
    w = torch.ones_like(per_pair) if weight is None else weight.to(per_pair.dtype)
    if mean_weight is not None:
        if not mean_weight > 0:
            raise ValueError(f"mean_weight must be > 0, got {mean_weight}")
        loss = (w * per_pair).sum() / (len(per_pair) * mean_weight)
    else:
        # clamp: an all-zero-weight batch contributes a zero loss (and zero gradients), not NaN
        loss = (w * per_pair).sum() / w.sum().clamp(min=1e-12)
    with torch.no_grad():
        is_tie = tie.bool() if tie is not None else torch.zeros_like(per_pair, dtype=torch.bool)
        bt = _masked_mean(per_pair, w, ~is_tie)
        tie_mean = _masked_mean(per_pair, w, is_tie)
    return LossParts(loss=loss, per_pair=per_pair.detach(), bt=bt, tie=tie_mean)


def _masked_mean(values: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> float:
    w = weights * mask
    total = w.sum()
    return float((values * w).sum() / total) if total > 0 else float("nan")
