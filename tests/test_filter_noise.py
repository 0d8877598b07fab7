"""The noise filter: known flips rank first, votes and judges count, decisions reconcile,
scores are stored with the version, and a rerun reuses embeddings and out-of-fold work.

Most tests replace the MiniLM features with a deterministic bag-of-words hash (numpy,
milliseconds) so they exercise the filter's own logic fast; the slow ones use the real
encoder and the real data.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import filters._noise_core as core
import filters.noise as noise_module
from factory.steps import StepContext
from factory.steps.params import build_params
from filters._noise_signals import (
    auroc,
    confident_joint,
    label_issues,
    neighbour_agreement,
    noise_rate,
    vote_evidence,
)
from filters.noise import NoiseParams, Views, decide_noise, score_views
from schemas.pairs import Message, Pair, pairs_to_table
from tests.toy import _BAD, _TOPICS, toy_pairs

FLIPPED = (3, 11, 17, 26, 38, 45, 59, 64, 77, 90)

# ---- fixtures -------------------------------------------------------------------------------


def _hash_features(texts: list[str], dim: int = 48) -> np.ndarray:
    """A stand-in encoder: hashed bag of words, L2-normalised."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-9)


@pytest.fixture
def fake_encoder(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []

    def features(data, ctx):  # noqa: ANN001, ANN202 - the hook's signature
        calls.append(len(data))
        return _hash_features(data.chosen), _hash_features(data.rejected)

    monkeypatch.setattr(noise_module, "_features", features)
    return calls


def flipped_table(n: int = 120, flipped: tuple[int, ...] = FLIPPED, ties: int = 0) -> pa.Table:
    """Pairs where an on-topic answer beats an insult, every prompt distinct, a few labels
    flipped; then ``ties`` tie pairs (two phrasings of one good answer)."""
    pairs = []
    for i in range(n + ties):
        topic, answer = _TOPICS[i % len(_TOPICS)]
        prompt = [Message("user", f"Question {i}: tell me {topic}.")]
        if i >= n:
            pairs.append(Pair(prompt, answer, f"Sure! {answer}", tie=True))
        elif i in flipped:
            pairs.append(Pair(prompt, _BAD[i % len(_BAD)], answer))
        else:
            pairs.append(Pair(prompt, answer, _BAD[i % len(_BAD)]))
    return pairs_to_table(pairs)


def synthetic_views(n: int = 240, flipped: tuple[int, ...] = FLIPPED, seed: int = 0, *,
                    votes: tuple[np.ndarray, np.ndarray] | None = None,
                    judge: np.ndarray | None = None) -> Views:
    """Pairs with a clear learnable direction in feature space, a few labels flipped."""
    rng = np.random.default_rng(seed)
    dim = 16
    good = rng.normal(size=dim)
    good /= np.linalg.norm(good)
    x_c = rng.normal(size=(n, dim)) * 0.6 + good
    x_r = rng.normal(size=(n, dim)) * 0.6 - good
    flips = np.zeros(n, dtype=bool)
    flips[list(flipped)] = True
    x_c, x_r = np.where(flips[:, None], x_r, x_c), np.where(flips[:, None], x_c, x_r)
    lengths = rng.normal(size=n) * 0.3
    agree, against = votes if votes is not None else (None, None)
    return Views(x_chosen=x_c.astype(np.float32), x_rejected=x_r.astype(np.float32),
                 pair_ids=[f"p{i}" for i in range(n)], prompt_ids=[f"q{i // 2}" for i in range(n)],
                 length_diff=lengths, votes_agree=agree, votes_against=against, judge=judge,
                 judge_column="consistency_agreement" if judge is not None else None,
                 label_key=hashlib.sha256(flips.tobytes()).hexdigest())


def context(home, **settings) -> StepContext:  # noqa: ANN001
    params = build_params(NoiseParams, {"synthetic_copies": 3, **settings}, step="noise")
    return StepContext("noise", params, seed=0, home=home, progress=False)


# ---- known flips ----------------------------------------------------------------------------


def test_known_flips_rank_first(tmp_path) -> None:
    scored, stats = score_views(synthetic_views(), context(tmp_path))
    suspicion = scored.columns["suspicion"]
    top = set(np.argsort(-suspicion)[: len(FLIPPED)].tolist())
    assert len(top & set(FLIPPED)) >= len(FLIPPED) - 1, sorted(top)
    truth = np.isin(np.arange(len(suspicion)), FLIPPED)
    assert auroc(suspicion, truth) > 0.98
    # every single signal sees them too, each in its own way
    for column, sign in (("oof_margin", -1), ("aum", -1), ("crm_loss", 1), ("knn_agreement", -1)):
        assert auroc(sign * scored.columns[column], truth) > 0.9, column
    # 10 of 240 flipped: the estimate is near 4%, and the interval holds it
    assert 0.0 <= stats["noise_rate"] <= 0.12
    low, high = stats["noise_rate_interval"]
    assert low <= stats["noise_rate"] <= high
    assert abs(np.mean(suspicion) - stats["noise_rate"]) < 0.01  # calibrated to the estimate
    assert all(w >= 0 for w in stats["combiner_weights"].values())
    reasons = [scored.signals[i] for i in FLIPPED]
    assert all("rm" in r and "neighbours" in r for r in reasons), reasons


def test_flips_are_found_through_the_runner_and_counts_reconcile(fake_encoder, home) -> None:
    import factory
    from factory.catalog import Catalog

    catalog = Catalog(home)
    catalog.commit("toy", flipped_table(ties=6), message="toy")
    report = factory.filter("noise", "toy", "clean", settings={"share": str(len(FLIPPED) / 120),
                                                               "synthetic_copies": "3"}, home=home)
    assert report["rows_in"] == 126 == report["rows_kept"] + report["rows_dropped"] + report["rows_failed"]
    assert report["rows_dropped"] == len(FLIPPED)
    kept_ids = set(catalog.read_table("clean").column("pair_id").to_pylist())
    ids = catalog.read_table("toy").column("pair_id").to_pylist()
    assert not {ids[i] for i in FLIPPED} & kept_ids  # exactly the flipped pairs went
    assert report["stats"]["ties_unscored"] == 6 and report["stats"]["pairs_scored"] == 120

    # the scores of every input row stay readable from the committed version
    info = catalog.resolve("clean")
    stored = catalog.read_attachment(info, "scores")
    assert stored.num_rows == 126
    assert stored.equals(catalog.find_scores(info.lineage["score_key"])[1])
    suspicion = stored.column("noise_suspicion")
    assert suspicion.null_count == 6  # ties are not scored ...
    actions = stored.column("noise_action").to_pylist()
    assert actions[-6:] == ["keep"] * 6  # ... and always kept
    reasons = stored.column("noise_reason").to_pylist()
    assert all(reasons[i].startswith("label noise suspect") and "flagged by" in reasons[i] for i in FLIPPED)
    assert sum(r is not None for r in reasons) == len(FLIPPED)


@pytest.mark.parametrize("action", ["drop", "flip", "weight"])
def test_actions_reconcile_and_rethreshold_from_stored_scores(fake_encoder, home, action) -> None:
    import factory
    from factory.catalog import Catalog

    catalog = Catalog(home)
    catalog.commit("toy", flipped_table(), message="toy")
    base = {"synthetic_copies": "3", "action": action}
    first = factory.filter("noise", "toy", "a", settings={**base, "share": "0.05"}, home=home)
    assert not first["scores_reused"]
    second = factory.filter("noise", "toy", "b", settings={**base, "threshold": "0.5"}, home=home)
    assert second["scores_reused"] and len(fake_encoder) == 1  # re-decided, nothing recomputed
    for report, flagged in ((first, 6), (second, None)):
        assert report["rows_in"] == report["rows_kept"] + report["rows_dropped"] + report["rows_failed"]
        moved = {"drop": report["rows_dropped"], "flip": report["rows_flipped"],
                 "weight": report["rows_reweighted"]}[action]
        if flagged is not None:
            assert moved == flagged
        others = {"drop", "flip", "weight"} - {action}
        assert all(report[f"rows_{dict(drop='dropped', flip='flipped', weight='reweighted')[o]}"] == 0
                   for o in others)
    scores = catalog.read_attachment("a", "scores")
    suspect = pc.equal(scores["noise_action"], action)
    assert pc.sum(suspect).as_py() == 6
    out = catalog.read_table("a")
    if action == "flip":
        before = {r["pair_id"]: r for r in catalog.read_table("toy").to_pylist()}
        after = {r["pair_id"]: r for r in out.to_pylist()}
        for pid in pc.filter(scores["pair_id"], suspect).to_pylist():
            assert after[pid]["chosen"] == before[pid]["rejected"]
            assert after[pid]["rejected"] == before[pid]["chosen"]
    if action == "weight":
        weights = out.column("weight").to_numpy(zero_copy_only=False)
        s = scores.column("noise_suspicion").to_numpy()
        is_suspect = suspect.to_numpy(zero_copy_only=False)
        np.testing.assert_allclose(weights[is_suspect], 1.0 - s[is_suspect])


def test_decide_rules(tmp_path) -> None:
    table = pa.table({
        "suspicion": pa.array([0.9, 0.1, None, 0.6, 0.3], pa.float64()),
        "signals": pa.array(["rm, votes", "", None, "", "rm"], pa.string()),
        "rate_estimate": pa.array([0.4] * 5, pa.float64()),
        "base_weight": pa.array([1.0, 1.0, 1.0, 2.0, 1.0], pa.float64()),
    })

    def decide(**settings: str):
        return decide_noise(table, build_params(NoiseParams, settings, step="noise"))

    default = decide()  # top 40% of the 4 scored rows: 2 rows
    assert default.action.to_pylist() == ["drop", "keep", "keep", "drop", "keep"]
    assert "flagged by rm, votes" in default.reason[0].as_py() and "estimated noise rate" in default.reason[0].as_py()
    assert "combined score only" in default.reason[3].as_py()
    assert default.reason[1].as_py() is None
    assert decide(threshold="0.25").action.to_pylist() == ["drop", "keep", "keep", "drop", "drop"]
    assert decide(share="0.25").action.to_pylist() == ["drop", "keep", "keep", "keep", "keep"]
    weighted = decide(action="weight", threshold="0.5", weight_floor="0.2")
    assert weighted.action.to_pylist() == ["weight", "keep", "keep", "weight", "keep"]
    assert weighted.weight.to_pylist()[0] == pytest.approx(0.2)  # 1 - 0.9 is below the floor
    assert weighted.weight.to_pylist()[3] == pytest.approx(2.0 * 0.4)
    with pytest.raises(Exception, match="either 'threshold' or 'share'"):
        decide(threshold="0.5", share="0.1")


# ---- votes and judges ------------------------------------------------------------------------


def test_votes_are_evidence(tmp_path) -> None:
    n = 240
    agree = np.full(n, 3)
    against = np.zeros(n, dtype=np.int64)
    split = np.array([100, 120, 140, 160, 180])  # correctly labelled, but annotators split 2-1
    agree[split], against[split] = 2, 1
    wrong = np.array([50, 70])  # majority against the label: a mislabelled row
    agree[wrong], against[wrong] = 1, 2
    voted, stats = score_views(synthetic_views(votes=(agree, against)), context(tmp_path))
    assert stats["annotator_accuracy"] is not None and 0.5 < stats["annotator_accuracy"] <= 1.0
    columns = voted.columns
    np.testing.assert_allclose(columns["suspicion"], 1 / (1 + np.exp(-(columns["model_logodds"]
                                                                        + columns["votes_logodds"]))), atol=1e-9)
    unanimous = np.setdiff1d(np.arange(n), np.r_[split, wrong])
    votes = columns["votes_logodds"]
    assert votes[wrong].min() > 0 > votes[split].max() > votes[unanimous].max()
    assert all("votes" in voted.signals[i] for i in np.r_[split, wrong])
    assert not any("votes" in voted.signals[i] for i in unanimous)
    # rows whose majority voted against their label now lead, though their features look right
    top = set(np.argsort(-columns["suspicion"])[:2].tolist())
    assert top == set(wrong.tolist())
    plain, _ = score_views(synthetic_views(), context(tmp_path))
    assert plain.columns["suspicion"][wrong].max() < np.sort(plain.columns["suspicion"])[-len(FLIPPED)]


def test_vote_accuracy_is_estimated_without_gold_labels() -> None:
    rng = np.random.default_rng(0)
    right = rng.random((4000, 3)) < 0.8
    evidence = vote_evidence(right.sum(1), (~right).sum(1))
    assert evidence.accuracy == pytest.approx(0.8, abs=0.02)
    assert evidence.logodds[0] == pytest.approx((3 - 2 * right[0].sum()) * np.log(evidence.accuracy / (1 - evidence.accuracy)))


def test_judge_agreement_joins_the_combiner(tmp_path) -> None:
    n = 240
    rng = np.random.default_rng(3)
    judge = np.clip(rng.normal(0.8, 0.1, n), 0, 1)
    judge[list(FLIPPED)] = 0.15  # the judges disagree with the flipped labels
    scored, stats = score_views(synthetic_views(judge=judge), context(tmp_path))
    assert stats["judge_column"] == "consistency_agreement"
    assert stats["combiner_weights"]["judge_logit"] > 0
    assert all("judges" in scored.signals[i] for i in FLIPPED)
    plain, plain_stats = score_views(synthetic_views(), context(tmp_path))
    assert "judge_logit" not in plain_stats["combiner_weights"]
    assert np.isnan(plain.columns["judge_agreement"]).all()


def test_judge_column_is_read_from_a_consistency_run(fake_encoder, tmp_path) -> None:
    table = flipped_table()
    agreement = np.full(table.num_rows, 0.9)
    agreement[list(FLIPPED)] = 0.1
    action = np.full(table.num_rows, "keep", dtype=object)
    agreement[0], action[0] = 0.2, "flip"  # the consistency filter flipped row 0 after scoring it
    table = table.append_column("consistency_agreement", pa.array(agreement))
    table = table.append_column("consistency_action", pa.array(action.tolist(), pa.string()))
    result = noise_module.noise(table, context(tmp_path))
    judged = result.table.column("judge_agreement").to_numpy()
    assert judged[0] == pytest.approx(0.8) and judged[FLIPPED[0]] == pytest.approx(0.1)
    assert result.stats["judge_column"] == "consistency_agreement"
    assert result.stats["combiner_weights"]["judge_logit"] > 0


# ---- caches ----------------------------------------------------------------------------------


def test_rerun_reuses_the_out_of_fold_cache(tmp_path, monkeypatch) -> None:
    first, stats = score_views(synthetic_views(), context(tmp_path))
    assert stats["oof_cache"] == "miss" and list((tmp_path / "noise").glob("*.npz"))

    def no_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the heads were trained again")

    monkeypatch.setattr(core, "train_heads", no_training)
    again, stats = score_views(synthetic_views(), context(tmp_path, neighbours="5", action="flip"))
    assert stats["oof_cache"] == "hit"
    np.testing.assert_array_equal(first.columns["oof_margin"], again.columns["oof_margin"])
    np.testing.assert_array_equal(first.columns["aum"], again.columns["aum"])
    # other labels (one more flip) or other head settings are a different key: retrained
    with pytest.raises(AssertionError, match="trained again"):
        score_views(synthetic_views(flipped=(*FLIPPED, 100)), context(tmp_path))
    with pytest.raises(AssertionError, match="trained again"):
        score_views(synthetic_views(), context(tmp_path, epochs="7"))


@pytest.mark.slow
def test_cli_end_to_end_reuses_embeddings_and_oof(cli, home, monkeypatch) -> None:
    """Real encoder: `prefab filter noise`, then the same data under another name recomputes
    neither embeddings nor heads."""
    from factory.catalog import Catalog
    from factory.embed import encoder as encoder_module

    Catalog(home).commit("toy", flipped_table(80, flipped=(3, 17, 38, 59)), message="toy")
    result = cli("filter", "noise", "--from", "toy", "--name", "clean", "--set", "synthetic_copies=3", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["rows_in"] == 80 == report["rows_kept"] + report["rows_dropped"]
    assert report["stats"]["oof_cache"] == "miss"
    scores = Catalog(home).read_attachment("clean", "scores")
    top = np.argsort(-scores.column("noise_suspicion").to_numpy())[:4]
    assert set(top.tolist()) == {3, 17, 38, 59}

    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("recomputed")

    monkeypatch.setattr(encoder_module.MeanPoolEncoder, "embed_ids", fail)
    monkeypatch.setattr(core, "train_heads", fail)
    # a new version with the same pairs: the catalog's score reuse does not apply, the caches do
    table = Catalog(home).read_table("toy")
    Catalog(home).commit("toy2", table.slice(0), message="copy")
    again = cli("filter", "noise", "--from", "toy2", "--name", "clean2", "--set", "synthetic_copies=3", "--json")
    assert again.code == 0, again.stderr
    assert again.json()["stats"]["oof_cache"] == "hit"


# ---- arithmetic ------------------------------------------------------------------------------


def test_confident_learning_matches_cleanlab() -> None:
    cleanlab_count = pytest.importorskip("cleanlab.count")
    cleanlab_filter = pytest.importorskip("cleanlab.filter")
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 500
        labels = (rng.random(n) < 0.5).astype(np.int64)
        signal = np.where(labels == 1, 1.0, -1.0) * rng.uniform(0, 2, n)
        noisy = np.where(rng.random(n) < 0.2 + 0.05 * trial, -signal, signal)
        p1 = 1 / (1 + np.exp(-noisy))
        pred_probs = np.column_stack([1 - p1, p1])
        ours = confident_joint(labels, pred_probs)
        theirs = cleanlab_count.compute_confident_joint(labels, pred_probs, calibrate=True)
        np.testing.assert_allclose(ours, theirs, atol=1.0)  # theirs is rounded to integers
        expected = cleanlab_count.num_label_issues(labels, pred_probs,
                                                   estimation_method="off_diagonal_calibrated") / n
        assert noise_rate(labels, pred_probs) == pytest.approx(expected, abs=2 / n)
        flagged = cleanlab_filter.find_label_issues(labels, pred_probs)
        assert (label_issues(labels, pred_probs) != flagged).sum() <= 2


def test_neighbour_agreement_flags_a_contradicting_pair() -> None:
    rng = np.random.default_rng(0)
    direction = rng.normal(size=8)
    d = direction + rng.normal(size=(50, 8)) * 0.1
    d[7] = -d[7]  # labelled the other way round
    agreement = neighbour_agreement(d, 10)
    assert agreement[7] < -0.9 and np.delete(agreement, 7).min() > 0.5
    assert neighbour_agreement(np.zeros((5, 8)), 3).tolist() == [0.0] * 5  # identical responses


def test_length_direction_needs_evidence() -> None:
    rng = np.random.default_rng(0)
    assert core.length_direction(rng.normal(0.5, 1.0, 400)) == -1.0  # labels prefer longer
    assert core.length_direction(rng.normal(-0.5, 1.0, 400)) == 1.0
    assert core.length_direction(rng.normal(0.0, 1.0, 400)) == 0.0  # no preference: left out


def test_too_small_tables_fail_clearly(fake_encoder, home) -> None:
    import factory
    from factory.catalog import Catalog
    from schemas.errors import PrefabError

    Catalog(home).commit("tiny", toy_pairs(8), message="tiny")
    with pytest.raises(PrefabError, match="at least 20 real non-tie pairs"):
        factory.filter("noise", "tiny", "x", home=home)


@pytest.mark.slow
@pytest.mark.realdata
def test_real_pandalm_injected_flips(shared_data, tmp_path) -> None:
    from schemas.readers import read_path

    table = read_path(shared_data / "pandalm-testset-v1.json", "auto").table
    table = table.filter(pc.invert(table.column("tie")))
    rng = np.random.default_rng(0)
    flips = rng.random(table.num_rows) < 0.2
    chosen, rejected = table.column("chosen").to_numpy(zero_copy_only=False), table.column("rejected").to_numpy(
        zero_copy_only=False)
    table = table.set_column(table.schema.get_field_index("chosen"), "chosen",
                             pa.array(np.where(flips, rejected, chosen).tolist(), pa.string()))
    table = table.set_column(table.schema.get_field_index("rejected"), "rejected",
                             pa.array(np.where(flips, chosen, rejected).tolist(), pa.string()))
    index = table.schema.get_field_index("votes")
    table = table.set_column(index, "votes", pa.nulls(table.num_rows, table.schema.field("votes").type))
    result = noise_module.noise(table, context(tmp_path, synthetic_copies="5"))
    suspicion = result.table.column("suspicion").to_numpy()
    assert auroc(suspicion, flips) > 0.78
    assert abs(result.stats["noise_rate"] - flips.mean()) < 0.1


# ---- generated pairs, separation, summary and progress (issue 18) ------------------------------


def _with_generated(real: pa.Table, count: int) -> pa.Table:
    """``real`` followed by ``count`` generated pairs (a generator's provenance: parent pairs
    named, the rejected side generated), each trivially right by construction."""
    from schemas.pairs import Provenance

    parents = real.column("pair_id").to_pylist()
    made = []
    for i in range(count):
        topic, answer = _TOPICS[i % len(_TOPICS)]
        made.append(Pair([Message("user", f"Generated {i}: tell me {topic}.")], answer, "Sure!",
                         provenance=Provenance(step="master_keys", parent_ids=[parents[i % len(parents)]],
                                               generated="rejected")))
    return pa.concat_tables([real, pairs_to_table(made)], promote_options="permissive")


def test_generated_pairs_are_kept_unscored_and_the_rate_is_the_real_pairs(fake_encoder, tmp_path) -> None:
    """Issue 18: after a merge with many generated pairs the filter found nothing; the rate is
    now estimated on the real pairs, the generated ones are kept unscored, and it warns."""
    real = flipped_table()
    table = _with_generated(real, 480)
    result = noise_module.noise(table, context(tmp_path))
    suspicion = result.table.column("suspicion").to_numpy(zero_copy_only=False)
    assert np.isnan(suspicion[real.num_rows:]).all()  # generated: not scored
    assert np.isfinite(suspicion[: real.num_rows]).all()
    stats = result.stats
    assert stats["generated_unscored"] == 480 and stats["pairs_scored"] == real.num_rows
    assert stats["warnings"] and "480 generated pairs are not scored" in stats["warnings"][0]
    # the real pairs are scored exactly as they would be on their own
    alone = noise_module.noise(real, context(tmp_path / "alone"))
    np.testing.assert_allclose(suspicion[: real.num_rows], alone.table.column("suspicion").to_numpy())
    assert stats["noise_rate"] == alone.stats["noise_rate"] and stats["separation"] == alone.stats["separation"]
    top = set(np.argsort(-np.nan_to_num(suspicion, nan=-1.0))[: len(FLIPPED)].tolist())
    assert len(top & set(FLIPPED)) >= len(FLIPPED) - 2
    decision = decide_noise(result.table, build_params(NoiseParams, {"share": "0.1"}, step="noise"))
    dropped = np.flatnonzero(np.asarray(decision.action.to_pylist()) == "drop")
    assert len(dropped) == 12 and dropped.max() < real.num_rows  # generated pairs are always kept
    assert "generated pairs not scored" in stats["summary"] and "estimated noise rate" in stats["summary"]
    default = decide_noise(result.table, build_params(NoiseParams, {}, step="noise"))
    assert stats["flagged"] == default.action.to_pylist().count("drop")


def test_scores_that_cannot_separate_flag_nothing_by_default(tmp_path) -> None:
    """Issue 18: on real HH every suspicion lay in 0.158-0.207 and the top rate-share was cut
    anyway; when the scores cannot tell synthetic flips apart, the default rule flags none."""
    rng = np.random.default_rng(1)
    n = 240
    x_c, x_r = rng.normal(size=(n, 16)).astype(np.float32), rng.normal(size=(n, 16)).astype(np.float32)
    views = Views(x_chosen=x_c, x_rejected=x_r, pair_ids=[f"p{i}" for i in range(n)],
                  prompt_ids=[f"q{i // 2}" for i in range(n)], length_diff=np.zeros(n), votes_agree=None,
                  votes_against=None, judge=None, judge_column=None, label_key="random")
    scored, stats = score_views(views, context(tmp_path))
    assert stats["separation"] < 0.65, stats
    table = pa.table({"suspicion": scored.columns["suspicion"], "signals": scored.signals,
                      "rate_estimate": np.full(n, stats["noise_rate"]), "separation": np.full(n, stats["separation"]),
                      "base_weight": np.ones(n)})
    default = decide_noise(table, build_params(NoiseParams, {}, step="noise"))
    assert set(default.action.to_pylist()) == {"keep"}
    flags, rule = noise_module.flag(table, build_params(NoiseParams, {}, step="noise"))
    assert not flags.any() and "cannot separate" in rule
    # asked for explicitly, a share is still cut
    shared = decide_noise(table, build_params(NoiseParams, {"share": "0.1"}, step="noise"))
    assert shared.action.to_pylist().count("drop") == 24
    stats.update(pairs_scored=n)
    assert "cannot separate" in noise_module.summary_line(stats, build_params(NoiseParams, {}, step="noise"))
    # scores that separate well say so and keep the default cut
    _, good = score_views(synthetic_views(), context(tmp_path))
    assert good["separation"] > 0.9
    good.update(pairs_scored=240, flagged=10, flagged_expected_wrong=0.8)
    line = noise_module.summary_line(good, build_params(NoiseParams, {}, step="noise"))
    assert "cannot separate" not in line and "flags 10, 80.0% of them expected mislabelled" in line


def test_cli_line_shows_the_estimated_rate(fake_encoder, cli, home) -> None:
    from factory.catalog import Catalog

    Catalog(home).commit("toy", flipped_table(), message="toy")
    result = cli("filter", "noise", "--from", "toy", "--name", "clean", "--set", "synthetic_copies=3")
    assert result.code == 0, result.stderr
    assert re.search(r"estimated noise rate \d+\.\d% \[\d+\.\d%, \d+\.\d%\] on 120 real pairs", result.stdout)


def test_progress_reports_each_phase(tmp_path, capsys) -> None:
    """Issue 18: 31k pairs showed `0/31213` for 8 minutes; each phase now reports."""
    score_views(synthetic_views(), context(tmp_path, epochs="2"))
    assert capsys.readouterr().err == ""  # progress=False: silent
    params = build_params(NoiseParams, {"synthetic_copies": 3, "epochs": 2}, step="noise")
    score_views(synthetic_views(), StepContext("noise", params, seed=0, home=tmp_path / "p", progress=True))
    err = capsys.readouterr().err
    assert "noise: train" in err and "epoch" in err and "copy 3/3" in err and "pair-epochs/s" in err
    assert "combining the signals" in err


# ---- the shipped recipes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["quickstart.yaml", "hh_rlhf.yaml"])
def test_shipped_recipes_filter_noise_before_adding_generated_pairs(name) -> None:
    """Issue 18: both recipes ran the noise filter after merging generated pairs (0 dropped)."""
    import yaml

    from tests.conftest import REPO

    recipe = yaml.safe_load((REPO / "examples" / name).read_text())
    steps = recipe["steps"]
    noise_at = next(i for i, s in enumerate(steps) if s.get("filter") == "noise")
    sources = {s["name"] for s in recipe["sources"]}
    assert steps[noise_at]["from"] in sources  # straight on the ingested human pairs
    assert all(i > noise_at for i, s in enumerate(steps) if "generate" in s)


def test_quickstart_evaluates_on_held_out_demo_pairs() -> None:
    """Issue 18: the quickstart evaluated on its own training seeds."""
    import json

    import yaml

    from tests.conftest import REPO

    examples = REPO / "examples"
    recipe = yaml.safe_load((examples / "quickstart.yaml").read_text())
    paths = {s["name"]: examples / s["path"] for s in recipe["sources"]}
    evals = recipe["train"]["eval"]
    assert evals and "demo" not in evals

    def prompts(path):  # noqa: ANN001, ANN202
        return {json.dumps(json.loads(line)["prompt"]) for line in path.read_text().splitlines()}

    training = prompts(paths["demo"])
    for name in evals:
        held_out = prompts(paths[name])
        assert len(held_out) >= 50 and not held_out & training, name


def test_projection_from_chunked_covariance_equals_the_svd(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    # features with a clearly ordered spectrum, so each component is defined up to sign
    scales = np.geomspace(10.0, 0.1, 24)
    x_chosen = (rng.normal(size=(301, 24)) * scales + 3.0).astype(np.float32)
    x_rejected = (rng.normal(size=(299, 24)) * scales - 1.0).astype(np.float32)
    monkeypatch.setattr(noise_module, "_PROJECT_ROWS", 64)  # several chunks per side
    chosen, rejected = noise_module.project(x_chosen, x_rejected, 8)

    both = np.vstack([x_chosen, x_rejected]).astype(np.float64)
    centre = both.mean(0)
    basis = np.linalg.svd(both - centre, full_matrices=False)[2][:8].T
    _, axes = noise_module.principal_axes([x_chosen, x_rejected], 8)
    signs = np.sign((axes * basis).sum(0))
    np.testing.assert_allclose(axes, basis * signs, atol=1e-8)
    np.testing.assert_allclose(chosen, ((x_chosen - centre) @ basis) * signs, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(rejected, ((x_rejected - centre) @ basis) * signs, rtol=1e-5, atol=1e-4)
    assert chosen.dtype == rejected.dtype == np.float32


def test_projection_signs_are_reproducible() -> None:
    x = np.random.default_rng(1).normal(size=(200, 12)).astype(np.float16)
    _, axes = noise_module.principal_axes([x[:100], x[100:]], 4)
    _, again = noise_module.principal_axes([-x[:100] + 0, -x[100:]], 4)  # same covariance
    np.testing.assert_allclose(axes, again, atol=1e-8)
    assert (axes[np.abs(axes).argmax(0), np.arange(4)] > 0).all()
