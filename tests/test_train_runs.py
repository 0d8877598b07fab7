"""A training run's folders: names that stay in the home, one run per name at a time,
registered versions named after their catalog version and without optimiser state, and
a Ctrl+C in the evaluation after training that leaves a resumable run, not a stray version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import factory
from factory.catalog import Catalog
from factory.cli import main
from factory.trainer.runlock import LOCK_FILE, run_lock
from schemas.errors import PrefabError
from tests.toy import toy_pairs

FAST = ["--epochs", "2", "--max-length", "64", "--no-progress"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("runs") / "home"
    cat = Catalog(home)
    table = toy_pairs(24, seed=0)
    cat.commit("toy", table.slice(0, 16), message="train")
    cat.commit("toy-eval", table.slice(16), message="held out")
    return home


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _train(capsys, home: Path, name: str, *extra: str) -> tuple[int, str, str]:
    code = main(["train", "--data", "toy", "--name", name, "--home", str(home), *FAST, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_name_leaving_the_home_is_refused_before_anything_is_written(home, capsys):
    outside = home.parent

    def written_outside() -> set[str]:
        return {f for f in _files(outside) if not f.startswith(f"{home.name}/")}

    before = written_outside()
    code, _, err = _train(capsys, home, "../../x")
    assert code == 1 and err.count("\n") == 1 and "invalid model name '../../x'" in err
    with pytest.raises(PrefabError, match="invalid model name"):
        factory.train("toy", "../escape", home=home, epochs=1, max_length=64, progress=False)
    # a models/NAME that is a symlink to elsewhere is an escape too
    elsewhere = outside / "elsewhere"
    elsewhere.mkdir()
    (home / "models").mkdir(exist_ok=True)
    (home / "models" / "linked").symlink_to(elsewhere)
    code, _, err = _train(capsys, home, "linked")
    assert code == 1 and err.count("\n") == 1 and "outside the home" in err
    # and so is a run folder planted as a symlink inside a model's folder
    (home / "models" / "planted").mkdir()
    (home / "models" / "planted" / "run").symlink_to(elsewhere)
    code, _, err = _train(capsys, home, "planted")
    assert code == 1 and err.count("\n") == 1 and "outside the home" in err
    assert written_outside() == before and not any(elsewhere.iterdir())


def test_a_second_run_of_a_name_in_training_is_refused_in_one_line(home, capsys):
    folder = home / "models" / "rm-busy"
    with run_lock(folder, "rm-busy"):  # as another process holding the name
        code, _, err = _train(capsys, home, "rm-busy")
    assert code == 1 and err.count("\n") == 1
    assert "'rm-busy' is being trained by another run" in err and f"pid {os.getpid()}" in err
    assert not (folder / "run").exists()
    # the lock goes with its holder: the name trains once it is free
    code, _, err = _train(capsys, home, "rm-busy")
    assert code == 0, err


def test_the_lock_holds_across_processes(home, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom factory.trainer.runlock import run_lock\n"
         "with run_lock(Path(sys.argv[1]), 'rm-other'):\n    print('held', flush=True)\n    sys.stdin.read()",
         str(home / "models" / "rm-other")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code, _, err = _train(capsys, home, "rm-other")
        assert code == 1 and f"pid {holder.pid}" in err and "being trained by another run" in err
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0


def test_a_registered_version_keeps_what_scoring_needs_not_the_optimiser(home, capsys):
    code, out, err = _train(capsys, home, "rm-files")
    assert code == 0, err
    entry = Catalog(home).get_model("rm-files")
    folder = Path(entry["path"])
    assert folder == home / "models" / "rm-files" / "v1" and f"saved to {folder}" in out
    assert _files(folder) == {"prefab_model.json", "head.pt"}  # no checkpoint/ with the optimiser
    assert _files(home / "models" / "rm-files") == {"v1/prefab_model.json", "v1/head.pt", LOCK_FILE}
    scored = factory.score("rm-files", "toy-eval", home=home)
    assert scored.num_rows == 8


def test_ctrl_c_in_the_evaluation_keeps_a_resumable_run_and_versions_agree(home, capsys, monkeypatch):
    import factory.trainer.api as api

    real = api.evaluate_model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "evaluate_model", interrupted)
    code, _, err = _train(capsys, home, "rm-ki", "--eval", "toy-eval")
    assert code == 130 and "saving or evaluating the model was interrupted" in err and "--resume" in err
    models = home / "models" / "rm-ki"
    assert not (models / "v1").exists() and (models / "run" / "checkpoint").is_dir()
    assert "rm-ki" not in {m["name"] for m in Catalog(home).models()}
    # a plain rerun is told to resume, in one line
    code, _, err = _train(capsys, home, "rm-ki", "--eval", "toy-eval")
    assert code == 1 and err.count("\n") == 1 and "--resume" in err

    monkeypatch.setattr(api, "evaluate_model", real)
    code = main(["train", "--name", "rm-ki", "--home", str(home), "--resume", "--eval", "toy-eval",
                 "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    entry = Catalog(home).get_model("rm-ki")
    assert entry["version"] == 1 and Path(entry["path"]) == models / "v1"
    assert f"saved to {models / 'v1'}" in out and "eval on toy-eval@1" in out
    # the finished run only evaluated: no step trained twice
    metrics = entry["metrics"]
    assert metrics["resumed_from_step"] == metrics["steps"] and metrics["steps"] > 0
    assert not (models / "run").exists() and _files(models / "v1") == {"prefab_model.json", "head.pt"}

    # the next run is version 2, in v2
    code, out, err = _train(capsys, home, "rm-ki")
    assert code == 0 and Catalog(home).get_model("rm-ki")["version"] == 2 and f"saved to {models / 'v2'}" in out


def test_a_stray_version_folder_or_a_misspelt_eval_is_named_before_training(home, capsys):
    stray = home / "models" / "rm-stray" / "v1"
    stray.mkdir(parents=True)
    code, _, err = _train(capsys, home, "rm-stray")
    assert code == 1 and err.count("\n") == 1 and "rm-stray@1 is not registered" in err
    assert not (stray.parent / "run").exists()
    code, _, err = _train(capsys, home, "rm-typo", "--eval", "toy-evl")
    assert code == 1 and err.count("\n") == 1 and "toy-evl" in err
    assert not (home / "models" / "rm-typo" / "run").exists()


def test_progress_shows_every_long_phase_on_stderr(home, capsys):
    factory.train("toy", "rm-quiet", home=home, epochs=1, max_length=64, progress=False, eval="toy-eval")
    assert capsys.readouterr().err == ""
    with pytest.raises(factory.trainer.TrainingInterrupted):
        factory.train("toy", "rm-shown", home=home, epochs=2, max_length=64, progress=True,
                      stop_after_steps=1)
    capsys.readouterr()
    factory.train("toy", "rm-shown", home=home, progress=True, resume=True, eval="toy-eval")
    err = capsys.readouterr().err
    lines = [part.strip() for part in err.replace("\r", "\n").splitlines() if part.strip()]

    def said(start: str) -> bool:
        return any(line.startswith(start) for line in lines)

    # before the first step: reading, resuming, loading, tokenising, the embedding cache
    assert said("prefab: read toy: done in") and said("prefab: resuming ") and "at step 1" in err
    assert said("prefab: load encoder minilm: done in")
    assert said("tokenize: 100%") and "32/32" in err and "pair/s" in err
    assert said("prefab: embed: done in") and "32 from the cache" in err  # embedded by the first run
    assert said("train head: 100%")
    # the evaluation after training: its phases, counts and rates
    assert said("prefab: evaluate on toy-eval@1 (8 pairs)") and said("prefab: score pairs: done in")
    assert said("prefab: master-key probe: done in") and said("prefab: contrast-instructions probe: done in")
    assert "pairs/s" in err


def test_cli_on_a_terminal_shows_the_embedding_and_evaluation_bars(home, capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    # lengths no other test uses: every pair is cut differently, so nothing is in the cache
    code = main(["train", "--data", "toy", "--name", "rm-tty", "--home", str(home), "--epochs", "1",
                 "--max-length", "24"])
    err = capsys.readouterr().err
    assert code == 0 and "tokenize: 100%" in err and "embed pairs: 100%" in err and "train head" in err
    code = main(["eval", "rm-tty", "--data", "toy-eval", "--home", str(home), "--max-length", "20"])
    err = capsys.readouterr().err
    assert code == 0 and "prefab: score pairs: done in" in err and "embed pairs: 100%" in err
    assert "prefab: master-key probe: done in" in err
