"""Head mode on the embedded MiniLM: accuracy, ties, weights, embedding cache, resume,
Ctrl+C while embedding, best epoch and early stopping."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from factory.embed.cache import EmbeddingCache
from factory.trainer.data import pair_data
from factory.trainer.evaluate import pairwise_metrics, score_pairs
from factory.trainer.loop import CHECKPOINT_FILE, TrainConfig, TrainingInterrupted, fit
from factory.trainer.model import HeadFeaturizer
from tests.toy import toy_pairs


@pytest.fixture(scope="module")
def featurizer(tmp_path_factory: pytest.TempPathFactory) -> HeadFeaturizer:
    return HeadFeaturizer("minilm", 128, tmp_path_factory.mktemp("emb"))


def _cfg(**kw) -> TrainConfig:
    base = {"mode": "head", "epochs": 20, "batch_size": 16, "val_fraction": 0.0,
            "max_length": 128, "progress": False, "seed": 0}
    return TrainConfig(**{**base, **kw})


def _head_params(result) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in result.model.head.parameters()])


def test_separable_set_reaches_near_perfect_accuracy_on_unseen_prompts(featurizer):
    table = toy_pairs(80, seed=0)
    train, held_out = pair_data(table.slice(0, 40)), pair_data(table.slice(40, 40))
    assert not set(train.prompt_ids) & set(held_out.prompt_ids)
    result = fit(train, _cfg(), featurizer=featurizer)
    assert result.history[-1]["train_loss"] < 0.35  # from ln 2 = 0.69
    r_c, r_r = score_pairs(result.model, held_out)
    assert pairwise_metrics(r_c, r_r, held_out)["accuracy"] >= 0.95


def test_tie_pairs_end_closer_than_preference_pairs(featurizer):
    data = pair_data(toy_pairs(30, seed=1, ties=12))
    result = fit(data, _cfg(), featurizer=featurizer)
    r_c, r_r = score_pairs(result.model, data)
    gap = np.abs(r_c - r_r)
    assert gap[data.tie].mean() < 0.25 * gap[~data.tie].mean()


def test_zero_weight_pair_leaves_trained_parameters_identical(featurizer):
    table = toy_pairs(24, seed=2)
    # A flipped pair (insult chosen) that would pull hard the other way, at weight 0.
    flipped = toy_pairs(30, seed=3).slice(27, 1).to_pylist()[0]
    flipped["chosen"], flipped["rejected"] = flipped["rejected"], flipped["chosen"]
    rows = table.to_pylist()
    with_zero = pa.Table.from_pylist(rows[:10] + [{**flipped, "weight": 0.0}] + rows[10:],
                                     schema=table.schema)
    with_one = pa.Table.from_pylist(rows[:10] + [{**flipped, "weight": 1.0}] + rows[10:],
                                    schema=table.schema)
    cfg = _cfg(epochs=5)
    base = _head_params(fit(pair_data(table), cfg, featurizer=featurizer))
    zero = _head_params(fit(pair_data(with_zero), cfg, featurizer=featurizer))
    one = _head_params(fit(pair_data(with_one), cfg, featurizer=featurizer))
    assert torch.equal(base, zero)
    assert not torch.allclose(base, one)


def test_embedding_cache_hit_avoids_recomputation(featurizer, monkeypatch):
    data = pair_data(toy_pairs(12, seed=5))
    first = featurizer.features(data.prompts, data.chosen)
    # A fresh cache object reads the shards from disk: nothing may reach the encoder.
    featurizer.cache = EmbeddingCache(featurizer.cache.folder.parent, featurizer.cache.folder.name)
    calls = []
    real = featurizer.encoder.embed_ids
    monkeypatch.setattr(featurizer.encoder, "embed_ids",
                        lambda seqs, bs=64: calls.append(len(seqs)) or real(seqs, bs))
    again = featurizer.features(data.prompts, data.chosen)
    assert calls == [] and featurizer.cache.hits == len(data) and featurizer.cache.misses == 0
    np.testing.assert_array_equal(first, again)
    featurizer.features(data.prompts, [c + " (new)" for c in data.chosen])
    assert calls == [len(data)]  # a changed text is a miss, computed once


def test_resume_after_interruption_matches_uninterrupted_run(featurizer, tmp_path):
    data = pair_data(toy_pairs(40, seed=6))
    cfg = _cfg(epochs=3)  # 3 steps per epoch, 9 in all
    full = fit(data, cfg, featurizer=featurizer)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(data, _cfg(epochs=3, stop_after_steps=4), featurizer=featurizer, checkpoint_dir=tmp_path)
    assert stop.value.step == 4 and (tmp_path / CHECKPOINT_FILE).is_file()
    resumed = fit(data, cfg, featurizer=featurizer, checkpoint_dir=tmp_path, resume=True)
    assert resumed.resumed_from_step == 4 and resumed.steps == 9
    assert torch.equal(_head_params(full), _head_params(resumed))


def test_ctrl_c_finishes_the_step_and_keeps_a_checkpoint(featurizer, tmp_path, monkeypatch):
    import os
    import signal

    import factory.trainer.loop as loop

    data = pair_data(toy_pairs(40, seed=7))
    real_loss, calls = loop.preference_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl+C mid-step
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "preference_loss", loss_then_ctrl_c)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as stop:
        fit(data, _cfg(epochs=3), featurizer=featurizer, checkpoint_dir=tmp_path)
    assert stop.value.step == 2  # the interrupted step completed, then training stopped
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is before  # our handler is removed again


def test_ctrl_c_while_embedding_stops_the_run_and_keeps_the_embeddings(tmp_path, monkeypatch):
    """A background job inherits SIGINT ignored; `kill -INT` must still stop the embedding
    phase (it used to run on and exit 0), saving the batches already embedded."""
    import os
    import signal

    from factory.embed import EmbeddingInterrupted

    data = pair_data(toy_pairs(40, seed=8))
    featurizer = HeadFeaturizer("minilm", 128, tmp_path / "emb", batch_size=8)
    real, embedded = featurizer.encoder.embed_ids, []

    def embed_then_ctrl_c(seqs, batch_size=64):
        embedded.append(len(seqs))
        if len(embedded) == 2 and interrupt:
            os.kill(os.getpid(), signal.SIGINT)
        return real(seqs, batch_size)

    monkeypatch.setattr(featurizer.encoder, "embed_ids", embed_then_ctrl_c)
    interrupt, before = True, signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with pytest.raises(EmbeddingInterrupted) as stop:
            fit(data, _cfg(epochs=2), featurizer=featurizer, checkpoint_dir=tmp_path / "ckpt")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # put back as it was
    finally:
        signal.signal(signal.SIGINT, before)
    assert isinstance(stop.value, KeyboardInterrupt)
    assert stop.value.saved == 8 and embedded == [8, 8]
    # a rerun (a new process: a fresh cache object) embeds only what was not saved
    featurizer.cache = EmbeddingCache(featurizer.cache.folder.parent, featurizer.cache.folder.name)
    interrupt, embedded[:] = False, []
    fit(data, _cfg(epochs=2), featurizer=featurizer)
    assert sum(embedded) == 2 * len(data) - 8 and featurizer.cache.hits == 8


def test_embedding_phase_shows_progress_and_is_timed_apart(tmp_path, monkeypatch, capsys):
    import time

    data = pair_data(toy_pairs(20, seed=9))
    featurizer = HeadFeaturizer("minilm", 128, tmp_path / "emb")
    real = featurizer.encoder.embed_ids

    def slow(seqs, batch_size=64):
        time.sleep(1.0)  # a slow encoder: the run's rate must include it
        return real(seqs, batch_size)

    monkeypatch.setattr(featurizer.encoder, "embed_ids", slow)
    result = fit(data, _cfg(epochs=2, progress=True), featurizer=featurizer)
    err = capsys.readouterr().err
    assert "embed pairs" in err and "40/40" in err  # a bar while embedding, not only training
    assert result.embed_seconds >= 1.0
    assert result.total_seconds >= result.embed_seconds + result.train_seconds
    assert result.pairs_per_second == pytest.approx(result.stats["pairs_seen"] / result.total_seconds)
    assert result.pairs_per_second < result.stats["pairs_seen"] / 1.0
    assert result.stats["train_pairs_per_second"] > result.pairs_per_second


def test_keeps_the_best_epoch_and_stops_when_validation_stops_improving(featurizer):
    # Validation pairs are the training pairs with the labels flipped: every epoch of
    # training makes validation worse, so the best epoch is the first.
    table = toy_pairs(24, seed=10)
    rows = table.to_pylist()
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows[:8]]
    data = pair_data(pa.Table.from_pylist(rows + flipped, schema=table.schema))
    train_idx, val_idx = np.arange(24), np.arange(24, 32)
    cfg = _cfg(epochs=10, patience=2, batch_size=8)
    result = fit(data, cfg, featurizer=featurizer, train_idx=train_idx, val_idx=val_idx)
    losses = [h["val_loss"] for h in result.history]
    assert losses[0] < losses[1] < losses[2]
    assert len(result.history) == 3 and result.stopped_early and result.best_epoch == 1
    # the model is epoch 1's: its validation loss is epoch 1's, not the last one's
    from factory.trainer.losses import preference_loss

    r_c, r_r = score_pairs(result.model, data.subset(val_idx))
    val_loss = float(preference_loss(torch.from_numpy(r_c), torch.from_numpy(r_r)).loss)
    assert val_loss == pytest.approx(losses[0], rel=1e-5)
    # patience 0: all 10 epochs run, and still epoch 1 is kept
    full = fit(data, _cfg(epochs=10, patience=0, batch_size=8), featurizer=featurizer,
               train_idx=train_idx, val_idx=val_idx)
    assert len(full.history) == 10 and not full.stopped_early and full.best_epoch == 1
    assert torch.equal(_head_params(full), _head_params(result))


def test_pair_weights_count_even_when_a_batch_holds_one_pair(featurizer):
    # Flipped pairs (insult chosen) at a hundredth of the weight: with one pair per batch,
    # a per-batch normalisation would give each of them a full step, as if unweighted.
    good = toy_pairs(20, seed=11).to_pylist()
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"], "weight": 0.01}
               for r in toy_pairs(40, seed=12).to_pylist()[20:]]
    table = pa.Table.from_pylist(good + flipped, schema=toy_pairs(1).schema)
    cfg = _cfg(epochs=2, batch_size=1)
    weighted = fit(pair_data(table), cfg, featurizer=featurizer)
    unweighted = fit(pair_data(table.drop_columns(["weight"])), cfg, featurizer=featurizer)
    held_out = pair_data(toy_pairs(60, seed=13).slice(40))
    accuracy = [float(np.mean(np.greater(*score_pairs(r.model, held_out)))) for r in (weighted, unweighted)]
    assert accuracy[0] >= 0.9 and accuracy[1] <= 0.6, accuracy


class _OpensAFile:
    """Pickles as a call to open(): what a planted checkpoint could run when loaded."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_round_trip_as_tensors_and_plain_data_only(featurizer, tmp_path):
    from factory.trainer.loop import read_checkpoint_params
    from schemas.errors import PrefabError

    data = pair_data(toy_pairs(40, seed=8))
    cfg = _cfg(epochs=2, seed=np.int64(3), lr=np.float64(2e-3))  # numpy values from a caller
    with pytest.raises(TrainingInterrupted):
        fit(data, replace(cfg, stop_after_steps=2), featurizer=featurizer, checkpoint_dir=tmp_path)
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 2 and state["params"]["seed"] == 3 and "optimizer" in state
    resumed = fit(data, cfg, featurizer=featurizer, checkpoint_dir=tmp_path, resume=True)
    assert resumed.resumed_from_step == 2 and resumed.steps == 6

    # a checkpoint that would run code when unpickled is refused, in one line, and runs nothing
    planted = tmp_path / "planted"
    planted.mkdir()
    state["params"]["note"] = _OpensAFile(str(tmp_path / "ran"))
    torch.save(state, planted / CHECKPOINT_FILE)
    with pytest.raises(PrefabError, match="more than tensors and plain data") as refused:
        read_checkpoint_params(planted)
    assert "\n" not in str(refused.value) and not (tmp_path / "ran").exists()
    with pytest.raises(PrefabError, match="more than tensors"):
        fit(data, cfg, featurizer=featurizer, checkpoint_dir=planted, resume=True)
    assert not (tmp_path / "ran").exists()
