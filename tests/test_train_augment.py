"""Training on generated pairs: generated rows told apart, weights balanced by generator,
validation on the real pairs, and the head's "pair+parts" features."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from factory.trainer.data import balanced_weights, pair_data
from factory.trainer.evaluate import score_pairs
from factory.trainer.loop import TrainConfig, fit
from factory.trainer.model import HeadFeaturizer, load_reward_model
from schemas.errors import PrefabError
from tests.toy import toy_pairs


@pytest.fixture(scope="module")
def featurizer(tmp_path_factory: pytest.TempPathFactory) -> HeadFeaturizer:
    return HeadFeaturizer("minilm", 128, tmp_path_factory.mktemp("emb"))


@pytest.fixture(scope="module")
def parts_featurizer(featurizer: HeadFeaturizer) -> HeadFeaturizer:
    return HeadFeaturizer("minilm", 128, featurizer.cache.folder.parent, features="pair+parts")


def _cfg(**kw) -> TrainConfig:
    base = {"mode": "head", "epochs": 8, "batch_size": 16, "val_fraction": 0.0,
            "max_length": 128, "progress": False, "seed": 0}
    return TrainConfig(**{**base, **kw})


def _head_params(result) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in result.model.head.parameters()])


def _generated(table: pa.Table, step: str, *, flip: bool = False) -> pa.Table:
    """``table``'s pairs as if a generator ``step`` had made them from its rows."""
    rows = table.to_pylist()
    for row in rows:
        row["provenance"] = {**row["provenance"], "step": step, "parent_ids": [row["pair_id"]]}
        if flip:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    return pa.Table.from_pylist(rows, schema=table.schema)


def _mixed() -> pa.Table:
    real = toy_pairs(20, seed=0)
    return pa.concat_tables([real, _generated(toy_pairs(30, seed=1), "gen_a"),
                             _generated(toy_pairs(10, seed=2), "gen_b")])


def test_generated_rows_are_the_ones_with_parent_pairs():
    data = pair_data(_mixed())
    assert data.generated.tolist() == [False] * 20 + [True] * 40
    assert data.steps[:20] == ["toy"] * 20 and set(data.steps[20:]) == {"gen_a", "gen_b"}
    sub = data.subset([0, 25, 55])
    assert sub.generated.tolist() == [False, True, True] and sub.steps == ["toy", "gen_a", "gen_b"]
    # no provenance column: every row is real
    assert not pair_data(_mixed().drop_columns(["provenance"])).generated.any()


def test_balanced_weights_give_each_generator_its_share_of_the_real_weight():
    table = _mixed()
    weight = [1.0] * 10 + [3.0] * 10 + [1.0] * 29 + [2.0] + [1.0] * 10
    data = pair_data(table.set_column(table.schema.get_field_index("weight"), "weight",
                                      pa.array(weight, pa.float64())))
    rows = np.arange(len(data))
    w = balanced_weights(data, rows, 0.5)
    real, a, b = w[:20], w[20:50], w[50:]
    np.testing.assert_allclose(real, data.weight[:20])  # real pairs keep their weights
    np.testing.assert_allclose([a.sum(), b.sum()], [0.5 * real.sum()] * 2, rtol=1e-6)
    assert a[-1] == pytest.approx(2 * a[0])  # relative weights inside a generator are kept
    per = balanced_weights(data, rows, {"gen_a": 2.0})  # a mapping: gen_b left as it was
    np.testing.assert_allclose(per[20:50].sum(), 2.0 * real.sum(), rtol=1e-6)
    np.testing.assert_allclose(per[50:], data.weight[50:])
    # computed over the given rows only; without real rows nothing changes
    part = balanced_weights(data, np.arange(10, 60), 1.0)
    np.testing.assert_allclose(part[20:50].sum(), data.weight[10:20].sum(), rtol=1e-6)
    np.testing.assert_allclose(balanced_weights(data, np.arange(20, 60), 1.0), data.weight)


def test_a_zero_augment_weight_trains_exactly_as_the_real_pairs_alone(featurizer):
    real = toy_pairs(20, seed=0)
    mixed = pa.concat_tables([real, _generated(toy_pairs(30, seed=1), "gen_a", flip=True)])
    alone = fit(pair_data(real), _cfg(), featurizer=featurizer)
    zero = fit(pair_data(mixed), _cfg(augment_weight=0.0), featurizer=featurizer)
    assert zero.stats["train_pairs"] == 20
    assert torch.equal(_head_params(alone), _head_params(zero))
    some = fit(pair_data(mixed), _cfg(augment_weight=0.5), featurizer=featurizer)
    assert some.stats["train_pairs"] == 50 and not torch.equal(_head_params(alone), _head_params(some))


def test_validation_on_real_pairs_ignores_the_generated_ones(featurizer):
    real = toy_pairs(40, seed=3)
    # generated validation pairs that are flipped: they would make the validation loss rise
    flipped = _generated(toy_pairs(40, seed=4).slice(20, 20), "gen_a", flip=True)
    data = pair_data(pa.concat_tables([real, flipped]))
    train_idx, real_val = np.arange(20), np.arange(20, 40)
    both_val = np.arange(20, 60)
    cfg = {"patience": 0}  # every epoch validated: the histories are compared whole
    only_real = fit(data, _cfg(val_on="all", **cfg), featurizer=featurizer, train_idx=train_idx, val_idx=real_val)
    on_real = fit(data, _cfg(val_on="real", **cfg), featurizer=featurizer, train_idx=train_idx, val_idx=both_val)
    on_all = fit(data, _cfg(val_on="all", **cfg), featurizer=featurizer, train_idx=train_idx, val_idx=both_val)
    losses = [[h["val_loss"] for h in r.history] for r in (only_real, on_real, on_all)]
    np.testing.assert_allclose(losses[0], losses[1])
    assert all(b > a for a, b in zip(losses[0], losses[2], strict=True))
    assert on_real.stats["val_pairs"] == 40  # every validation pair is still held out of training


def test_pair_parts_features_train_save_and_load(parts_featurizer, tmp_path):
    table = toy_pairs(60, seed=5)
    train, held_out = pair_data(table.slice(0, 40)), pair_data(table.slice(40, 20))
    assert parts_featurizer.dim == 3 * 384
    feats, _ = parts_featurizer.featurize(train.prompts[:3], train.chosen[:3])
    assert feats.shape == (3, 3 * 384)
    response_alone = feats[:, 384:768]
    np.testing.assert_allclose(np.linalg.norm(response_alone, axis=1), 1.0, rtol=1e-5)
    result = fit(train, _cfg(features="pair+parts", epochs=15), featurizer=parts_featurizer)
    assert result.model.spec.features == "pair+parts" and result.model.spec.feature_dim == 3 * 384
    r_c, r_r = score_pairs(result.model, held_out)
    assert (r_c > r_r).mean() >= 0.95
    result.model.save(tmp_path / "m")
    loaded = load_reward_model(tmp_path / "m", cache_root=parts_featurizer.cache.folder.parent)
    assert loaded.featurizer.features_kind == "pair+parts"
    l_c, l_r = score_pairs(loaded, held_out)
    np.testing.assert_allclose(l_c, r_c, rtol=1e-5, atol=1e-6)


def test_a_prompt_with_another_prompts_answer_changes_only_the_parts(parts_featurizer):
    table = toy_pairs(2, seed=6)
    data = pair_data(table)
    own, swapped = parts_featurizer.featurize(data.prompts, data.chosen)[0], parts_featurizer.featurize(
        data.prompts, data.chosen[::-1])[0]
    # the response read alone is the same vector under either prompt; the match part is not
    np.testing.assert_allclose(own[0, 384:768], swapped[1, 384:768], rtol=1e-5)
    assert not np.allclose(own[0, 768:], swapped[1, 768:])
    # the match part sums to sqrt(dim) times the prompt-answer cosine: own answers fit better
    assert own[0, 768:].sum() > swapped[0, 768:].sum() and own[1, 768:].sum() > swapped[1, 768:].sum()


def test_new_settings_are_checked_before_training():
    with pytest.raises(PrefabError, match="features"):
        TrainConfig(features="everything").resolved()
    with pytest.raises(PrefabError, match="head mode"):
        TrainConfig(mode="full", features="pair+parts").resolved()
    with pytest.raises(PrefabError, match="val_on"):
        TrainConfig(val_on="generated").resolved()
    with pytest.raises(PrefabError, match="augment weight"):
        TrainConfig(augment_weight={"gen_a": -1.0}).resolved()
    with pytest.raises(PrefabError, match="augment weight"):
        TrainConfig(augment_weight=float("nan")).resolved()


def _keyed(table: pa.Table, key: str) -> pa.Table:
    """Generated pairs whose rejected answer is a content-free key (master_keys-like)."""
    made = _generated(table, "master_keys")
    field = made.schema.field("rejected")
    return made.set_column(made.schema.get_field_index("rejected"), field, pa.array([key] * made.num_rows, field.type))


def test_residual_training_keeps_the_real_order_and_fixes_what_the_base_gets_wrong(tmp_path):
    from factory.trainer.api import train

    opts = {"mode": "head", "epochs": 8, "batch_size": 16, "max_length": 128, "progress": False, "seed": 0,
            "val_fraction": 0.2, "home": tmp_path / "home", "robustness": False}
    real = toy_pairs(40, seed=0)
    base = train(real, "base", out=tmp_path / "base", **opts)
    keys = _keyed(toy_pairs(40, seed=1), ":")
    both = pa.concat_tables([real, keys])
    result = train(both, "res", out=tmp_path / "res", residual_of=str(tmp_path / "base"), **opts)
    model = result.model
    assert model.spec.extra["residual_of"] == str(tmp_path / "base")

    real_data, key_data = pair_data(toy_pairs(30, seed=5)), pair_data(_keyed(toy_pairs(30, seed=6), ":"))
    b_c, b_r = score_pairs(base.model, real_data)
    m_c, m_r = score_pairs(model, real_data)
    assert np.mean((b_c > b_r) == (m_c > m_r)) >= 0.9  # unseen real pairs keep the base's order
    kb_c, kb_r = score_pairs(base.model, key_data)
    km_c, km_r = score_pairs(model, key_data)
    assert np.mean(km_c > km_r) == 1.0 and np.mean(km_c > km_r) > np.mean(kb_c > kb_r) - 1e-9
    assert np.mean(km_c - km_r) > np.mean(kb_c - kb_r)  # the key now loses by more
    assert result.metrics["val_accuracy"] is not None

    loaded = load_reward_model(result.path, cache_root=tmp_path / "home" / "embeddings")
    l_c, _ = score_pairs(loaded, real_data)
    np.testing.assert_allclose(l_c, m_c, rtol=1e-5, atol=1e-5)

    with pytest.raises(PrefabError, match="generated preference pairs"):
        train(real, "res2", out=tmp_path / "res2", residual_of=str(tmp_path / "base"), **opts)
    with pytest.raises(PrefabError, match="features"):
        train(both, "res3", out=tmp_path / "res3", residual_of=str(tmp_path / "base"), features="pair+parts", **opts)


def _markdown(table: pa.Table, *, tie: bool) -> pa.Table:
    """Pairs of each chosen answer against its markdown rewrite: the rewrite preferred by a
    margin of 2 (``tie=False``, as real pairs), or the two as a generated tie (``tie=True``)."""
    rows = []
    for row in table.to_pylist():
        rewrite = f"## Answer\n\n- **{row['chosen']}**\n- _see above_"
        if tie:
            row["provenance"] = {**row["provenance"], "step": "neutral", "parent_ids": [row["pair_id"]]}
            row["rejected"], row["tie"] = rewrite, True
        else:
            row["chosen"], row["rejected"], row["margin"] = rewrite, row["chosen"], 2.0
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=table.schema)


def test_residual_training_makes_generated_ties_tie_in_the_combined_reward(tmp_path):
    from factory.trainer.api import train

    opts = {"mode": "head", "epochs": 20, "lr": 5e-3, "batch_size": 16, "max_length": 64, "progress": False, "seed": 0,
            "val_fraction": 0.0, "home": tmp_path / "home", "robustness": False}
    real = toy_pairs(20, seed=0)
    base = train(pa.concat_tables([real, _markdown(toy_pairs(20, seed=7), tie=False)]), "base",
                 out=tmp_path / "base", **opts)
    ties = _markdown(toy_pairs(20, seed=8), tie=True)
    gap_of = lambda model: float(np.mean(np.subtract(*score_pairs(model, pair_data(ties)))))  # noqa: E731
    before = gap_of(base.model)
    assert before < -1.0  # the base prefers the rewrite of a tie by a wide margin
    data = pa.concat_tables([real, ties, _keyed(toy_pairs(20, seed=1), ":")])
    result = train(data, "res", out=tmp_path / "res", residual_of=str(tmp_path / "base"), **opts)
    after = gap_of(result.model)
    assert abs(after) < 0.25 * abs(before), (before, after)
