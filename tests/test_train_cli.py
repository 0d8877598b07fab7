"""``prefab train`` / ``prefab eval`` end to end on committed data, and the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import factory
from factory.catalog import Catalog
from factory.cli import main
from factory.trainer import TrainingInterrupted
from factory.trainer.robustness import MASTER_KEYS
from schemas.errors import PrefabError
from tests.toy import toy_pairs

FAST = ["--epochs", "10", "--max-length", "96", "--no-progress"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("prefab")
    cat = Catalog(home)
    table = toy_pairs(80, seed=0, ties=4)
    cat.commit("toy", table.slice(0, 40), message="train")
    cat.commit("toy-eval", table.slice(40), message="held-out prompts")
    return home


def _run(capsys, argv: list[str]) -> tuple[int, dict | None, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 and "--json" in argv else None), err


def test_cli_train_then_eval_with_json(home, capsys):
    code, trained, _ = _run(capsys, ["train", "--data", "toy", "--name", "rm", "--home", str(home),
                                     "--eval", "toy-eval", "--json", *FAST])
    assert code == 0
    assert trained["dataset"] == "toy@1" and trained["model"] == "rm" and trained["version"] == 1
    assert trained["train_pairs"] + trained["val_pairs"] == 40
    assert trained["history"][-1]["epoch"] == 10
    held = trained["eval"]["toy-eval@1"]
    assert held["accuracy"] >= 0.9 and held["preference_pairs"] == 40 and held["tie_pairs"] == 4
    mk = held["master_key"]
    assert (mk["pairs"], mk["comparisons"]) == (40, 40 * len(MASTER_KEYS))
    assert set(mk["by_key"]) == set(MASTER_KEYS) and set(mk["by_key"][":"]) == {"vs_chosen", "vs_rejected"}
    assert held["truncated_pairs"] == 0 and held["max_length"] == 96  # short toy answers
    # toy prompts that look alike share their answer, so none qualify as contrast pairs
    assert held["contrast_instructions"]["contrast_pairs"] == 0

    registered = Catalog(home).get_model("rm")
    assert registered["dataset"] == "toy@1"
    assert registered["metrics"]["val_accuracy"] == trained["val_accuracy"]
    assert registered["params"]["mode"] == "head" and registered["params"]["epochs"] == 10

    code, evaluated, _ = _run(capsys, ["eval", "rm", "--data", "toy-eval", "--home", str(home), "--json"])
    assert code == 0 and evaluated["dataset"] == "toy-eval@1"
    assert evaluated["accuracy"] == held["accuracy"]
    assert evaluated["by_source"].keys() == {"toy", "toy-b"}

    # Training the same name again makes version 2 in its own folder; version 1 stays.
    code, again, _ = _run(capsys, ["train", "--data", "toy", "--name", "rm", "--home", str(home), *FAST, "--json"])
    assert code == 0 and again["version"] == 2
    first, second = Catalog(home).get_model("rm@1")["path"], Catalog(home).get_model("rm")["path"]
    assert first != second and Path(first).is_dir() and Path(second).is_dir()


    assert main(["eval", "rm", "--data", "toy-eval", "--home", str(home)]) == 0
    text = capsys.readouterr().out
    assert "rm on toy-eval@1:" in text and "accuracy" in text and "master-key" in text
    assert "4 tie-labelled pairs left out of pairwise accuracy" in text

    # at 12 tokens every pair is cut; eval says so
    code, short, _ = _run(capsys, ["eval", "rm", "--data", "toy-eval", "--home", str(home),
                                   "--max-length", "12", "--no-robustness", "--json"])
    assert code == 0 and short["max_length"] == 12
    assert short["truncated_pairs"] == 44 and short["truncated_share"] == 1.0


def test_cli_train_reports_truncation_best_epoch_and_run_rate(home, capsys):
    code, trained, _ = _run(capsys, ["train", "--data", "toy", "--name", "rm-short", "--home", str(home),
                                     "--epochs", "3", "--max-length", "20", "--no-progress", "--json"])
    assert code == 0
    assert trained["max_length"] == 20 and trained["truncated_pairs"] == 40
    assert trained["truncated_share"] == 1.0
    assert trained["best_epoch"] in {1, 2, 3} and trained["epochs_run"] == 3
    assert trained["pairs_per_second"] * trained["total_seconds"] == pytest.approx(3 * trained["train_pairs"], rel=0.01)
    assert trained["total_seconds"] >= trained["embed_seconds"] + trained["train_seconds"] - 0.01


def test_cli_resume_takes_settings_from_the_checkpoint(home, capsys):
    with pytest.raises(TrainingInterrupted):
        factory.train("toy", "rm-resume", home=home, epochs=3, lr=3e-3, max_length=96, seed=5,
                      progress=False, stop_after_steps=2)
    # a flag that differs from the checkpoint is named, in one line
    code, _, err = _run(capsys, ["train", "--name", "rm-resume", "--home", str(home), "--resume",
                                 "--lr", "0.01", "--epochs", "3", "--no-progress"])
    assert code == 1 and err.count("\n") == 1
    assert "--lr 0.01 (checkpoint: 0.003)" in err and "--epochs" not in err
    # no flags repeated, not even --data: the checkpoint's settings and data are used
    code, resumed, _ = _run(capsys, ["train", "--name", "rm-resume", "--home", str(home), "--resume",
                                     "--no-progress", "--json"])
    assert code == 0 and resumed["resumed_from_step"] == 2 and resumed["dataset"] == "toy@1"
    params = Catalog(home).get_model("rm-resume")["params"]
    assert (params["lr"], params["epochs"], params["max_length"], params["seed"]) == (3e-3, 3, 96, 5)


def test_cli_models_lists_trained_models(home, capsys):
    factory.train("toy", "rm-list", home=home, epochs=2, max_length=96, progress=False, eval="toy-eval")
    code, listed, _ = _run(capsys, ["models", "--home", str(home), "--json"])
    assert code == 0
    row = next(r for r in listed["models"] if r["name"] == "rm-list")
    registered = Catalog(home).get_model("rm-list")
    assert row["version"] == 1 and row["dataset"] == "toy@1" and row["mode"] == "head"
    assert row["val_accuracy"] == registered["metrics"]["val_accuracy"]
    assert row["eval_accuracy"] == {"toy-eval@1": registered["metrics"]["eval"]["toy-eval@1"]["accuracy"]}
    assert main(["models", "--home", str(home)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("MODEL") and "rm-list@1" in text and "toy-eval@1" in text


def test_cli_eval_unknown_model_is_one_line_error(home, capsys):
    code, _, err = _run(capsys, ["eval", "nope", "--data", "toy", "--home", str(home)])
    assert code == 1 and "nope" in err and err.count("\n") == 1


def test_api_interrupt_resume_score_and_oof(home):
    with pytest.raises(TrainingInterrupted):
        factory.train("toy", "rm2", home=home, epochs=4, max_length=96, progress=False,
                      stop_after_steps=2)
    with pytest.raises(PrefabError, match="--resume"):
        factory.train("toy", "rm2", home=home, epochs=4, max_length=96, progress=False)
    result = factory.train("toy", "rm2", home=home, epochs=4, max_length=96, progress=False,
                           resume=True)
    assert result.metrics["resumed_from_step"] == 2 and result.metrics["steps"] == 4
    assert result.path == Catalog(home).models_dir / "rm2" / "v1"

    pairs = Catalog(home).read_table("toy-eval")
    scored = factory.score("rm2", pairs, home=home)
    # a datasets.Dataset (as factory.catalog.load gives) and a catalog ref score the same
    from factory.catalog import load

    dataset = load("toy-eval", home=home)
    as_dataset = factory.score("rm2", dataset, home=home)
    assert type(as_dataset).__name__ == "Dataset"
    assert as_dataset["reward_chosen"] == scored.column("reward_chosen").to_pylist()
    by_ref = factory.score("rm2", "toy-eval", home=home)
    assert by_ref.column("reward_rejected").equals(scored.column("reward_rejected"))
    assert scored.column_names[-2:] == ["reward_chosen", "reward_rejected"]
    assert scored.num_rows == pairs.num_rows
    r_c = scored.column("reward_chosen").to_numpy()
    assert np.isfinite(r_c).all()

    oof = factory.oof_scores(Catalog(home).read_table("toy"), k=3, home=home, epochs=10,
                             max_length=96)
    folds = oof.column("fold").to_numpy()
    prompt_ids = oof.column("prompt_id").to_pylist()
    assert set(folds.tolist()) == {0, 1, 2}
    for p in set(prompt_ids):
        assert len({int(f) for f, q in zip(folds, prompt_ids, strict=True) if q == p}) == 1
    margin = oof.column("reward_chosen").to_numpy() - oof.column("reward_rejected").to_numpy()
    assert (margin > 0).mean() >= 0.9  # out-of-fold, yet the toy set is easy


def test_load_model_loads_each_version_once_per_process(home, monkeypatch):
    import factory.trainer.api as api

    factory.train("toy", "rm-cache", home=home, epochs=2, max_length=96, progress=False)
    api._MODELS.clear()
    loads = []
    real = api.load_reward_model
    monkeypatch.setattr(api, "load_reward_model", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    model = factory.load_model("rm-cache", home=home)
    pairs = Catalog(home).read_table("toy-eval")
    for _ in range(3):
        factory.score("rm-cache", pairs, home=home)
    assert factory.load_model("rm-cache@1", home=home) is model and len(loads) == 1
    np.testing.assert_array_equal(factory.score(model, pairs).column("reward_chosen").to_numpy(),
                                  factory.score("rm-cache", pairs, home=home).column("reward_chosen").to_numpy())


def test_cli_training_options_for_augmented_sets(home, capsys):
    code, trained, _ = _run(capsys, ["train", "--data", "toy", "--name", "rm-parts", "--home", str(home),
                                     "--features", "pair+parts", "--head-hidden", "32", "--val-on", "real",
                                     "--json", *FAST])
    assert code == 0
    params = Catalog(home).get_model("rm-parts")["params"]
    assert (params["features"], params["head_hidden"], params["val_on"]) == ("pair+parts", 32, "real")
    # a weight for a step that is no generator is a misspelling, not a silent no-op
    code, _, err = _run(capsys, ["train", "--data", "toy", "--name", "rm-w", "--home", str(home),
                                 "--augment-weight", "master_key=0.25", *FAST])
    assert code != 0 and "'master_key': not a generator" in err and "master_keys" in err
    # --residual-of reaches the trainer: toy has no generated pairs for a residual to learn from
    code, _, err = _run(capsys, ["train", "--data", "toy", "--name", "rm-r", "--home", str(home),
                                 "--residual-of", "rm-parts", "--features", "pair+parts", *FAST])
    assert code != 0 and "needs generated preference pairs" in err
    with pytest.raises(SystemExit):
        main(["train", "--data", "toy", "--name", "rm-x", "--home", str(home), "--augment-weight", "keys=lots"])
    assert "expected W or GEN=W" in capsys.readouterr().err
