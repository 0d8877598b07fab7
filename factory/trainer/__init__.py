"""The bundled reward-model trainer: Bradley–Terry with ties, margins and weights.

Two modes on any backbone: ``head`` (frozen encoder, embeddings cached under
``home/embeddings``, a small MLP trained on top; seconds on CPU) and ``full`` (fine-tune
the whole sequence-classification model; bf16 autocast on CUDA, gradient checkpointing for billion-scale backbones).

The public API re-exports :func:`train`, :func:`score`, :func:`evaluate`,
:func:`oof_scores` and :func:`load_model` as ``factory.train`` and so on. The frozen encoder
and its embedding cache are the shared service of :mod:`factory.embed`.
"""

from __future__ import annotations

from factory.trainer.api import (
    EvaluationInterrupted,
    TrainResult,
    evaluate,
    load_model,
    oof_scores,
    score,
    train,
)
from factory.trainer.loop import TrainConfig, TrainingInterrupted
from factory.trainer.model import RewardModel, load_reward_model

__all__ = [
    "EvaluationInterrupted",
    "RewardModel",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "evaluate",
    "load_model",
    "load_reward_model",
    "oof_scores",
    "score",
    "train",
]
