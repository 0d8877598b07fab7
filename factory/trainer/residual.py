"""Residual training: robustness from generated pairs without moving the real pairs' order.

A base head-mode model is trained on real pairs. The residual head is trained on the same
features with the base's reward gap Δ_base as a fixed offset on every generated pair, so
the loss of a generated pair is the loss of base + residual: a preference pair asks for
``Δ_base + Δ_residual > margin`` (the residual learns only what the base gets wrong), a
tie asks for ``Δ_base + Δ_residual = 0`` (the residual's target is ``−Δ_base``, so the
combined reward ties). Every real pair becomes a tie of the residual alone (offset 0), so
the residual stays flat where the base's order came from. The saved model is one head,
base + residual (:class:`~factory.trainer.model.SummedHead`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from factory.trainer.data import PairData
from factory.trainer.evaluate import score_pairs_truncated
from factory.trainer.model import RewardModel, SummedHead
from factory.trainer.progress import phase
from schemas.errors import PrefabError

RESIDUAL_MODES = ("head", "tokens", "top-k")


def check_base(base: RewardModel, mode: str, encoder: str, features: str,
               trainable_layers: int | None = None) -> None:
    """The residual reads the base's features: the same mode (head, tokens or top-k with the
    same number of trained layers), encoder and features."""
    if mode not in RESIDUAL_MODES or base.spec.mode != mode:
        raise PrefabError(f"residual training needs a base of the same mode, one of {', '.join(RESIDUAL_MODES)} "
                          f"(base: {base.spec.mode}, --mode {mode})")
    if mode == "top-k" and base.spec.extra.get("trainable_layers") != trainable_layers:
        raise PrefabError(f"the base model trained {base.spec.extra.get('trainable_layers')} top layers; "
                          f"--trainable-layers must match (got {trainable_layers})")
    if "residual_of" in base.spec.extra:
        raise PrefabError("the base model is itself residual: train the residual on its own base")
    if (base.spec.base, base.spec.features) != (encoder, features):
        raise PrefabError(f"the base model reads {base.spec.features!r} features of {base.spec.base!r}; "
                          f"the residual must too (got {features!r} of {encoder!r})")


def residual_data(data: PairData, base: RewardModel, progress: bool | None = False) -> PairData:
    """``data`` relabelled for the residual: generated pairs (preferences and ties) offset by
    the base's reward gap, real pairs as ties of the residual alone."""
    generated = data.generated
    if not (generated & ~data.tie).any():
        raise PrefabError("residual training needs generated preference pairs (from a generator) in the data")
    with phase("score pairs with the base model", progress, count=len(data)):
        r_c, r_r, _ = score_pairs_truncated(base, data, progress=progress)
    offset = np.where(generated, r_c - r_r, 0.0).astype(np.float32)
    return replace(data, offset=offset, tie=data.tie | ~generated)


def combine(base: RewardModel, residual: RewardModel, base_ref: str) -> RewardModel:
    """One model whose reward is base + residual."""
    assert base.head is not None and residual.head is not None
    extra = {**residual.spec.extra, "residual_of": base_ref, "base_head_hidden": base.spec.head_hidden}
    spec = replace(residual.spec, extra=extra)
    head = SummedHead(base.head, residual.head).to(residual.device).eval()
    return RewardModel(spec, head=head, featurizer=residual.featurizer, device=residual.device)


__all__ = ["check_base", "combine", "residual_data"]
