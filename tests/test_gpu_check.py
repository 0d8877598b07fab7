"""benchmarks/gpu_check.py: full mode through factory.train on a tiny random decoder, with
what the run observed (linear-output dtype, layer forwards per step) in the table."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from factory.embed.encoder import minilm_path
from tests.conftest import REPO


def _gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _tiny_row(tmp_path: Path, **kw):
    gc = _gpu_check()
    decoder = gc.random_backbone(tmp_path / "llama", "llama", minilm_path(), "tiny")
    opts = {"epochs": 1, "batch_size": 8, "max_length": 48, "lr": 1e-3, "device": None,
            "bf16": None, "grad_ckpt": None, "val_fraction": 0.25}
    row = gc.prefab_row("tiny", gc.demo_table(24), decoder, tmp_path / "run", **{**opts, **kw})
    return gc, row


def test_tiny_decoder_row_reports_recomputed_forwards_when_checkpointing(tmp_path):
    gc, row = _tiny_row(tmp_path, device="cpu", grad_ckpt=True)
    assert row.fwd_per_step == 2.0  # the first block ran again in backward: checkpointing
    assert row.bf16 == "float32"  # no autocast on CPU
    assert row.params_m > 0 and math.isfinite(row.loss_first) and math.isfinite(row.loss_last)
    assert row.pairs == "18/6" and row.epochs == 1 and row.peak_gib is None
    assert "| tiny | " in gc.table_text([row]) and "on (2.0)" in gc.table_text([row])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_mode_defaults_on_cuda_train_in_bf16_without_checkpointing_a_small_model(tmp_path):
    _, row = _tiny_row(tmp_path)  # bf16 and checkpointing left to the trainer's defaults
    assert row.bf16 == "bfloat16"
    assert row.fwd_per_step == 1.0  # checkpointing is for billion-scale backbones
    assert row.peak_gib > 0 and row.note == "device cuda"
