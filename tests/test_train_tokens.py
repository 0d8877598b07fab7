"""The tokens and top-k modes on a tiny randomly initialised BERT: training, the hidden-state
cache (reuse and invalidation), the top layers run on cached states, ties, residual
training, save/load and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from factory.catalog import Catalog
from factory.cli import main
from factory.trainer.backbones import encode_pairs, pad_batch
from factory.trainer.data import pair_data
from factory.trainer.evaluate import score_pairs
from factory.trainer.hidden_cache import FrozenStates
from factory.trainer.loop import TrainConfig, fit
from factory.trainer.model import HeadFeaturizer, load_reward_model
from factory.trainer.token_head import AttentionPool, TokenFeaturizer, net_rewards
from schemas.errors import PrefabError
from tests.toy import tiny_backbone, toy_pairs


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_backbone(tmp_path_factory.mktemp("tiny-bert"), "bert")


def _cfg(base: str, mode: str = "tokens", **kw) -> TrainConfig:
    opts = {"mode": mode, "base": base, "epochs": 10, "lr": 1e-2, "batch_size": 8, "max_length": 64,
            "val_fraction": 0.0, "progress": False, "seed": 0}
    if mode == "top-k":
        opts["trainable_layers"] = 1
    return TrainConfig(**{**opts, **kw})


@pytest.fixture
def forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sequences the frozen encoder ran on, over every store in the test."""
    seen: list[int] = []
    original = FrozenStates.__call__

    def counted(self, sequences):
        seen.append(len(sequences))
        return original(self, sequences)

    monkeypatch.setattr(FrozenStates, "__call__", counted)
    return seen


def test_tokens_mode_trains_and_round_trips(bert_dir, tmp_path):
    data = pair_data(toy_pairs(32, seed=0))
    result = fit(data, _cfg(bert_dir, features="pair+parts"), hidden_root=tmp_path / "hidden")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    r_c, r_r = score_pairs(result.model, data)
    assert (r_c > r_r).mean() >= 0.9
    folder = result.model.save(tmp_path / "rm")
    assert json.loads((folder / "prefab_model.json").read_text())["mode"] == "tokens"
    again = load_reward_model(folder, hidden_root=tmp_path / "hidden")
    np.testing.assert_allclose(score_pairs(again, data)[0], r_c, atol=1e-6)


@pytest.mark.parametrize("features", ["pair", "pair+parts"])
def test_an_untrained_tokens_net_reads_what_head_mode_reads(bert_dir, tmp_path, features):
    """Attention pooling starts as mean pooling: before training, the tokens net's features
    are head mode's, row for row (each input's own states and mask, chosen apart from
    rejected, each response with its own prompt) -- and its rewards come back in row order
    when scored in length-sorted batches smaller than the data."""
    data = pair_data(toy_pairs(20, seed=8))
    prompts, responses = data.prompts + data.prompts, data.chosen + data.rejected
    expected, _ = HeadFeaturizer(bert_dir, 64, tmp_path / "emb", features=features).featurize(prompts, responses)
    featurizer = TokenFeaturizer(bert_dir, 64, "tokens", None, tmp_path / "hidden", features=features)
    inputs = featurizer.inputs(prompts, responses)
    torch.manual_seed(0)
    net = featurizer.new_net(16).eval()
    rows = np.random.default_rng(0).permutation(len(inputs))  # chosen and rejected mixed in one batch
    with torch.no_grad():
        got = net.features(inputs.batch(rows, featurizer.device)).numpy()
        from_expected = net.head(torch.from_numpy(expected[rows])).double().numpy()
    np.testing.assert_allclose(got, expected[rows], atol=2e-3)  # float16 cache
    np.testing.assert_allclose(net_rewards(net, inputs, rows, featurizer.device, batch_size=6), from_expected,
                               atol=2e-3)


@pytest.mark.parametrize("mode", ["tokens", "top-k"])
def test_a_rows_reward_does_not_depend_on_its_batchs_padding(bert_dir, tmp_path, mode):
    """With trained (non-zero) pooling scores, and in top-k with the top layer's attention, a
    row scores the same alone as in a batch padded to a longer row: the mask keeps the
    padding out of both."""
    data = pair_data(toy_pairs(12, seed=9))
    featurizer = TokenFeaturizer(bert_dir, 64, mode, 1 if mode == "top-k" else None, tmp_path / "hidden",
                                 features="pair+parts")
    inputs = featurizer.inputs(data.prompts + data.prompts, data.chosen + data.rejected)
    torch.manual_seed(0)
    net = featurizer.new_net(16).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, AttentionPool):
                module.score.weight.normal_(0, 1.0)
        rows = np.arange(len(inputs))
        assert len(set(inputs.lengths.tolist())) > 1  # the batch pads some rows
        batched = net(inputs.batch(rows, featurizer.device)).numpy()
        alone = np.concatenate([net(inputs.batch(rows[i : i + 1], featurizer.device)).numpy() for i in rows])
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_the_hidden_state_cache_is_reused_and_keyed_by_length_and_model(bert_dir, tmp_path, forwards):
    data = pair_data(toy_pairs(24, seed=1))
    root = tmp_path / "hidden"
    first = fit(data, _cfg(bert_dir, epochs=2), hidden_root=root)
    assert sum(forwards) == 2 * len(data)  # chosen and rejected, each once
    forwards.clear()
    again = fit(data, _cfg(bert_dir, epochs=2, seed=1), hidden_root=root)  # another seed, another run
    assert forwards == []
    # another fold: a subset of the same texts is all in the cache too
    fit(data, _cfg(bert_dir, epochs=1), hidden_root=root, train_idx=np.arange(10), val_idx=np.arange(10, 14))
    assert forwards == [] and again.history and first.history
    fit(data, _cfg(bert_dir, epochs=1, max_length=48), hidden_root=root)
    assert sum(forwards) == 2 * len(data)  # another length: computed again
    forwards.clear()
    other = tiny_backbone(tmp_path / "other-bert", "bert")  # same config, another model
    fit(data, _cfg(other, epochs=1), hidden_root=root)
    assert sum(forwards) == 2 * len(data)


def test_top_layers_on_cached_states_give_the_encoders_output(bert_dir, tmp_path):
    featurizer = TokenFeaturizer(bert_dir, 64, "top-k", 1, tmp_path / "hidden")
    data = pair_data(toy_pairs(6, seed=2))
    inputs = featurizer.inputs(data.prompts, data.chosen)
    states, mask = inputs.joint.batch(np.arange(len(data)), featurizer.device)
    top = featurizer.top_layers()
    encoded = encode_pairs(featurizer.encoder.tokenizer, data.prompts, data.chosen, 64)
    input_ids, attn = pad_batch(encoded.ids, featurizer.encoder.tokenizer.pad_token_id, featurizer.device)
    with torch.no_grad():
        expected = featurizer.encoder.model(input_ids=input_ids, attention_mask=attn).last_hidden_state
        got = top(states, mask)
    keep = mask.unsqueeze(-1)
    torch.testing.assert_close(got * keep, expected * keep, atol=2e-2, rtol=2e-2)  # float16 cache


def test_top_k_trains_and_its_saved_model_scores_identically(bert_dir, tmp_path):
    data = pair_data(toy_pairs(32, seed=3))
    result = fit(data, _cfg(bert_dir, "top-k", epochs=6), hidden_root=tmp_path / "hidden")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    r_c, r_r = score_pairs(result.model, data)
    assert (r_c > r_r).mean() >= 0.9
    folder = result.model.save(tmp_path / "rm")
    saved = torch.load(folder / "head.pt", weights_only=True)
    assert any(k.startswith("top.layers.0.") for k in saved)  # the trained layer travels with it
    # reloaded in a fresh store: the frozen lower layers run again, then the saved top layer
    again = load_reward_model(folder, hidden_root=tmp_path / "fresh")
    a_c, a_r = score_pairs(again, data)
    np.testing.assert_allclose(a_c, r_c, atol=1e-5)
    np.testing.assert_allclose(a_r, r_r, atol=1e-5)


def test_a_tie_pair_is_pushed_towards_equal_rewards(bert_dir, tmp_path):
    table = toy_pairs(24, seed=4, ties=16)
    as_ties = pair_data(table)
    as_prefs = pair_data(table.set_column(table.schema.get_field_index("tie"), "tie",
                                          pa.array([False] * table.num_rows)))
    cfg = _cfg(bert_dir, epochs=8)
    tied = fit(as_ties, cfg, hidden_root=tmp_path / "hidden").model
    preferred = fit(as_prefs, cfg, hidden_root=tmp_path / "hidden").model
    tie_rows = np.flatnonzero(as_ties.tie)
    t_c, t_r = score_pairs(tied, as_ties.subset(tie_rows))
    p_c, p_r = score_pairs(preferred, as_ties.subset(tie_rows))
    assert np.abs(t_c - t_r).mean() < 0.5 * np.abs(p_c - p_r).mean()


def test_residual_training_in_tokens_mode(bert_dir, tmp_path):
    from factory.trainer.api import train

    opts = {"mode": "tokens", "base": bert_dir, "epochs": 6, "lr": 1e-2, "batch_size": 16, "max_length": 64,
            "progress": False, "val_fraction": 0.0, "home": tmp_path / "home", "robustness": False}
    real = toy_pairs(24, seed=5)
    train(real, "base", out=tmp_path / "base", **opts)
    rows = toy_pairs(16, seed=6).to_pylist()
    for row in rows:  # a generator's pairs whose rejected answer is a content-free key
        row["provenance"] = {**row["provenance"], "step": "master_keys", "parent_ids": [row["pair_id"]]}
        row["rejected"] = ":"
    keys = pa.Table.from_pylist(rows, schema=real.schema)
    result = train(pa.concat_tables([real, keys]), "res", out=tmp_path / "res", residual_of=str(tmp_path / "base"),
                   **opts)
    assert result.model.spec.extra["residual_of"] == str(tmp_path / "base")
    k_c, k_r = score_pairs(result.model, pair_data(keys))
    assert (k_c > k_r).mean() == 1.0
    loaded = load_reward_model(result.path, hidden_root=tmp_path / "home" / "hidden")
    np.testing.assert_allclose(score_pairs(loaded, pair_data(keys))[0], k_c, atol=1e-6)
    with pytest.raises(PrefabError, match="same mode"):
        train(pa.concat_tables([real, keys]), "res2", out=tmp_path / "res2", residual_of=str(tmp_path / "base"),
              **{**opts, "mode": "top-k", "trainable_layers": 1})


def test_trainable_layers_are_checked():
    with pytest.raises(PrefabError, match="--trainable-layers"):
        TrainConfig(mode="top-k").resolved()
    with pytest.raises(PrefabError, match="--trainable-layers"):
        TrainConfig(mode="tokens", trainable_layers=1).resolved()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefab")
    table = toy_pairs(40, seed=7, ties=4)
    Catalog(home).commit("toy", table.slice(0, 30), message="train")
    Catalog(home).commit("toy-eval", table.slice(30), message="held-out prompts")
    return home


def test_cli_trains_tokens_mode_and_the_registered_model_evaluates(home, bert_dir, capsys):
    code = main(["train", "--data", "toy", "--name", "rm-tok", "--home", str(home), "--mode", "tokens",
                 "--base", bert_dir, "--epochs", "3", "--max-length", "64", "--no-progress", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["mode"] == "tokens" and out["version"] == 1
    assert Catalog(home).get_model("rm-tok")["params"]["mode"] == "tokens"
    code = main(["eval", "rm-tok", "--data", "toy-eval", "--home", str(home), "--json", "--no-robustness"])
    evaluated = json.loads(capsys.readouterr().out)
    assert code == 0 and evaluated["preference_pairs"] == 10 and evaluated["accuracy"] is not None


@pytest.mark.parametrize("layers", ["0", "3"])
def test_cli_rejects_trainable_layers_out_of_range_in_one_line(home, bert_dir, capsys, layers):
    code = main(["train", "--data", "toy", "--name", f"rm-top{layers}", "--home", str(home), "--mode", "top-k",
                 "--trainable-layers", layers, "--base", bert_dir, "--max-length", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--trainable-layers" in err, err
