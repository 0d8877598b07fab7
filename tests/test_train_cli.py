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
from factory.trainer.toy import toy_pairs
from schemas.errors import PrefabError

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
    assert 0.0 <= held["master_key"]["fpr"] <= 1.0 and held["master_key"]["comparisons"] > 0
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
