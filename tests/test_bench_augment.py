"""benchmarks/augment.py end to end on a small slice of the real shared data: every run is
trained and scored, the table and the target verdicts print, and the JSON holds the numbers.

The slice's flags bound the work (one training seed, two folds, small caps); no clock
stops the run, so a busy machine makes it slower, never failing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


@pytest.mark.slow
@pytest.mark.realdata
def test_augment_benchmark_runs_on_a_small_slice(shared_data, tmp_path) -> None:
    out = tmp_path / "augment.json"
    command = [sys.executable, str(REPO / "benchmarks" / "augment.py"), "--suites", "shared,trajectories",
               "--home", str(tmp_path / "home"), "--pool-pairs", "120", "--ood-pairs", "40", "--folds", "2", "--probe-prompts", "10",
               "--ood-probe-prompts", "4", "--rewrite-pairs", "30", "--ci-pairs", "10", "--train-seeds", "1",
               "--traj-folds", "2",
               "--traj-repeats", "1", "--runs", "master_keys,causal,neutral,hard_negatives,all,residual", "--json", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| + all four |" in done.stdout and "| real + all corruptions |" in done.stdout
    verdicts = [line for line in done.stdout.splitlines() if " MET - " in line]
    assert {line.split(":")[0] for line in verdicts} >= {"shared", "trajectories (pair)"}
    results = json.loads(out.read_text())
    runs = {row["run"]: row for row in results["shared"]}
    assert set(runs) == {"base (real pairs)", "+ master_keys", "+ causal", "+ neutral", "+ hard_negatives",
                         "+ all four", "+ all four, residual on the base"}
    base, keys = runs["base (real pairs)"], runs["+ master_keys"]
    assert keys["train_pairs"] > base["train_pairs"] and base["acc_diff"] == 0.0
    assert base["held_out_pairs"] > 60  # every real pair is held out once
    assert results["trajectories"][0]["scored"] > 0
