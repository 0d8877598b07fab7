"""Full fine-tuning on tiny randomly initialised backbones (BERT- and Llama-style)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from factory.trainer.backbones import encode_pairs, is_checkpointing
from factory.trainer.data import pair_data
from factory.trainer.evaluate import score_pairs
from factory.trainer.loop import TrainConfig, TrainingInterrupted, fit
from factory.trainer.model import load_reward_model
from tests.toy import tiny_backbone, toy_pairs

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}[SEP]{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_backbone(tmp_path_factory.mktemp("tiny-bert"), "bert")


def _cfg(base: str, **kw) -> TrainConfig:
    opts = {"mode": "full", "base": base, "epochs": 4, "lr": 1e-2, "batch_size": 8,
            "max_length": 64, "val_fraction": 0.0, "progress": False, "seed": 0}
    return TrainConfig(**{**opts, **kw})


def _params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_full_mode_on_tiny_bert_improves_loss_and_round_trips(bert_dir, tmp_path):
    data = pair_data(toy_pairs(32, seed=0))
    result = fit(data, _cfg(bert_dir))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    r_c, r_r = score_pairs(result.model, data)
    assert (r_c > r_r).mean() >= 0.9
    assert not is_checkpointing(result.model.hf_model)  # CPU: off by default
    folder = result.model.save(tmp_path / "rm")
    again = load_reward_model(folder)
    np.testing.assert_allclose(score_pairs(again, data)[0], r_c, atol=1e-5)


def test_full_mode_on_tiny_llama_with_chat_template(tmp_path):
    base = tiny_backbone(tmp_path / "tiny-llama", "llama", chat_template=CHAT_TEMPLATE)
    data = pair_data(toy_pairs(24, seed=1))
    result = fit(data, _cfg(base, epochs=3))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]
    tok = result.model.tokenizer
    text = tok.decode(encode_pairs(tok, data.prompts[:1], data.chosen[:1], 64).ids[0])
    assert "< | user | >" in text and "< | assistant | >" in text  # the template was applied


def test_gradient_checkpointing_path_gives_the_same_losses(bert_dir):
    data = pair_data(toy_pairs(16, seed=2))
    plain = fit(data, _cfg(bert_dir, epochs=2))
    ckpt = fit(data, _cfg(bert_dir, epochs=2, gradient_checkpointing=True))
    assert is_checkpointing(ckpt.model.hf_model)
    for a, b in zip(plain.history, ckpt.history, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4


def test_full_mode_resume_continues_from_saved_step(bert_dir, tmp_path):
    data = pair_data(toy_pairs(32, seed=3))
    cfg = _cfg(bert_dir, epochs=2)  # 4 steps per epoch
    uninterrupted = fit(data, cfg)
    with pytest.raises(TrainingInterrupted):
        fit(data, _cfg(bert_dir, epochs=2, stop_after_steps=5), checkpoint_dir=tmp_path)
    resumed = fit(data, cfg, checkpoint_dir=tmp_path, resume=True)
    assert resumed.resumed_from_step == 5 and resumed.steps == 8
    torch.testing.assert_close(_params(resumed.model.hf_model),
                               _params(uninterrupted.model.hf_model), atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_mode_on_cuda_uses_bf16_and_checkpointing(bert_dir, monkeypatch):
    from factory.trainer import loop

    data = pair_data(toy_pairs(32, seed=4))
    small = fit(data, _cfg(bert_dir, device="cuda"))
    assert not is_checkpointing(small.model.hf_model)  # a small backbone trains faster without
    monkeypatch.setattr(loop, "CHECKPOINTING_FROM_PARAMETERS", 1)
    result = fit(data, _cfg(bert_dir, device="cuda"))
    assert is_checkpointing(result.model.hf_model)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_full_mode_reuses_its_token_cache_with_the_same_results(bert_dir, tmp_path, monkeypatch):
    from factory.trainer import backbones

    data = pair_data(toy_pairs(24, seed=5))
    cfg = _cfg(bert_dir, epochs=2, val_fraction=0.25)
    chunks = {"n": 0}
    encode_chunk = backbones.encode_chunk

    def counted(*args, **kwargs):
        chunks["n"] += 1
        return encode_chunk(*args, **kwargs)

    monkeypatch.setattr(backbones, "encode_chunk", counted)
    temporary = fit(data, cfg)  # no home: a temporary cache for this run
    cold = fit(data, cfg, tokens_root=tmp_path / "tokens")
    tokenized = chunks["n"]
    warm = fit(data, cfg, tokens_root=tmp_path / "tokens")
    assert tokenized > 0 and chunks["n"] == tokenized  # the second run tokenised nothing
    assert len(list((tmp_path / "tokens").iterdir())) == 2  # chosen and rejected
    for run in (cold, warm):
        assert run.history == temporary.history
        torch.testing.assert_close(_params(run.model.hf_model), _params(temporary.model.hf_model))
