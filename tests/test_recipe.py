"""Recipes: validation with file, line and key; reruns reuse; a changed step reruns only
what follows it; a run killed anywhere resumes to the same result."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.catalog import Catalog
from factory.recipe import RecipeError, load_recipe, run_recipe
from tests.conftest import DEMO_SEEDS, REPO

RECIPE = f"""\
recipe: small
seed: 1
sources:
  - name: seeds
    path: {DEMO_SEEDS}
steps:
  - generate: master_keys
    from: seeds
    name: keys
    set: {{keys_per_pair: 1}}
  - generate: neutral
    from: seeds
    name: ties
    set: {{max_per_seed: 1}}
  - merge: [seeds, keys, ties]
    name: all
  - filter: dedup
    from: all
    name: clean
tag: {{dataset: clean, tag: v1}}
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(("change", "line", "key", "message"), [
    ("keys_per_pair: 1", 10, "steps[0].set.keys_per_pair", "expects an integer"),
    ("generate: neutral", 11, "steps[1].generate", "unknown generator 'neutrall'"),
    ("from: all", 18, "steps[3].from", "'nowhere' is neither made by an earlier source"),
    ("recipe: small", 1, "colour", "unknown key"),
    ("name: ties", 13, "steps[1].nme", "unknown key"),
])
def test_validation_names_file_line_and_key(tmp_path, home, change, line, key, message) -> None:
    broken = {
        "keys_per_pair: 1": "keys_per_pair: one",
        "generate: neutral": "generate: neutrall",
        "from: all": "from: nowhere",
        "recipe: small": "colour: red",
        "name: ties": "nme: ties",
    }[change]
    path = _write(tmp_path, RECIPE.replace(change, broken, 1))
    with pytest.raises(RecipeError) as error:
        load_recipe(path, catalog=Catalog(home))
    text = str(error.value)
    assert text.startswith(f"{path}, line {line}, key {key!r}: "), text
    assert message in text


def test_a_step_needing_a_backend_fails_before_anything_runs(tmp_path, home) -> None:
    from dataclasses import dataclass

    from factory.steps import StepContext, StepResult, generator, param  # noqa: F401

    @dataclass(frozen=True)
    class NoParams:
        pass

    @generator("test_needs_llm", params=NoParams, backend="required", plan=lambda table, ctx: [])
    def needs_llm(table, ctx: StepContext) -> StepResult:
        """A step that needs an LLM."""
        raise AssertionError("must not run")

    path = _write(tmp_path, RECIPE.replace("generate: neutral", "generate: test_needs_llm")
                  .replace("    set: {max_per_seed: 1}\n", ""))
    with pytest.raises(RecipeError, match=r"line 11, key 'steps\[1\].backend': generator test_needs_llm needs an LLM"):
        run_recipe(path, home=home, quiet=True)
    assert Catalog(home).datasets() == []


def test_rerun_reuses_and_a_changed_step_reruns_only_what_follows(tmp_path, home) -> None:
    path = _write(tmp_path, RECIPE)
    first = run_recipe(path, home=home, quiet=True)
    assert [s["reused"] for s in first["steps"]] == [False] * 6
    again = run_recipe(path, home=home, quiet=True)
    assert all(s["reused"] for s in again["steps"])
    assert again["datasets"] == first["datasets"]
    catalog = Catalog(home)
    assert catalog.resolve("clean@v1").ref == first["datasets"]["clean"]
    lineage = catalog.resolve("keys").lineage
    assert lineage["recipe"] == "small" and lineage["recipe_step"] == 0

    changed = run_recipe(_write(tmp_path, RECIPE.replace("max_per_seed: 1", "max_per_seed: 2")), home=home,
                         quiet=True)
    reused = {s["what"].split(" from")[0]: s["reused"] for s in changed["steps"]}
    assert reused == {"ingest demo_pairs.jsonl": True, "generate master_keys": True, "generate neutral": False,
                      "merge seeds, keys, ties": False, "filter dedup": False, "tag v1": False}
    assert changed["datasets"]["keys"] == first["datasets"]["keys"]
    assert changed["datasets"]["clean"] == "clean@2"


@pytest.mark.slow
def test_a_run_killed_at_random_points_resumes_to_the_same_result(tmp_path) -> None:
    path = _write(tmp_path, RECIPE)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    clean_home, killed_home = tmp_path / "clean", tmp_path / "killed"
    command = [sys.executable, "-m", "factory", "run", str(path), "--no-progress"]
    subprocess.run([*command, "--home", str(clean_home)], check=True, env=env, capture_output=True)
    rng = random.Random(0)
    for _ in range(4):
        process = subprocess.Popen([*command, "--home", str(killed_home)], env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))
        process.send_signal(signal.SIGKILL)
        process.wait()
    finished = subprocess.run([*command, "--home", str(killed_home), "--json"], env=env, capture_output=True,
                              text=True)
    assert finished.returncode == 0, finished.stderr
    expected, got = Catalog(clean_home), Catalog(killed_home)
    for name in ("keys", "ties", "all", "clean"):
        assert sorted(got.read_table(f"{name}")["pair_id"].to_pylist()) == \
            sorted(expected.read_table(name)["pair_id"].to_pylist()), name
    assert got.resolve("clean@v1").rows == expected.resolve("clean@v1").rows


def test_example_recipes_validate(home) -> None:
    load_recipe(REPO / "examples" / "quickstart.yaml", catalog=Catalog(home))
    llm = load_recipe(REPO / "examples" / "llm_judges.yaml", catalog=Catalog(home))
    assert all(step.backend for step in llm.steps if step.kind != "merge")


@pytest.mark.realdata
def test_hh_recipe_validates_against_the_shared_data(shared_data, home) -> None:
    recipe = load_recipe(REPO / "examples" / "hh_rlhf.yaml", catalog=Catalog(home))
    assert recipe.sources[0].path == (shared_data / "hh-rlhf-harmless-base-test.jsonl.gz").resolve()


@pytest.mark.slow
def test_ray_engine_gives_the_same_result_as_in_process(tmp_path) -> None:
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'prefab[ray]')")
    path = _write(tmp_path, RECIPE)
    local = run_recipe(path, home=tmp_path / "local", quiet=True)
    try:
        on_ray = run_recipe(path, home=tmp_path / "ray", quiet=True, engine="ray")
    finally:
        ray.shutdown()
    assert [s["reused"] for s in on_ray["steps"]] == [False] * 6
    a, b = Catalog(tmp_path / "local"), Catalog(tmp_path / "ray")
    for name in ("keys", "ties", "all", "clean"):
        left, right = a.read_table(local["datasets"][name]), b.read_table(on_ray["datasets"][name])
        assert left["pair_id"].to_pylist() == right["pair_id"].to_pylist(), name
        assert left["tie"].to_pylist() == right["tie"].to_pylist(), name
    assert b.resolve("keys").lineage["engine"] == "ray"


TRAINED = RECIPE + "train:\n  data: clean\n  name: rm\n  KEY: VALUE\n"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", '"ten"', "expects an integer, got 'ten'"),
    ("epochs", "2.5", "expects an integer, got 2.5"),
    ("lr", "fast", "expects a number, got 'fast'"),
    ("mode", "headd", "expects one of head, tokens, top-k, full, got 'headd'"),
    ("features", "foo", "expects one of pair, pair+parts, got 'foo'"),
    ("val_on", "some", "expects one of all, real"),
    ("augment_weight", "{master_keys: lots}", "expects a number or a mapping generator: weight"),
])
def test_train_values_are_checked_at_load_against_the_train_command(tmp_path, home, key, value, message) -> None:
    path = _write(tmp_path, TRAINED.replace("KEY", key).replace("VALUE", value))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert text.startswith(f"{path}, line 24, key 'train.{key}': ") and message in text
    assert "\n" not in text


def test_valid_train_values_load(tmp_path, home) -> None:
    text = RECIPE + ("train:\n  data: clean\n  name: rm\n  mode: full\n  epochs: 2\n  lr: 1\n  features: pair\n"
                     "  augment_weight: {master_keys: 0.25}\n  center_coef: 0.01\n  eval: [seeds]\n")
    recipe = load_recipe(_write(tmp_path, text))
    assert recipe.train["epochs"] == 2 and recipe.train["mode"] == "full"


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system ['echo pwned']",
                                   "!!python/name:os.system ''", "!custom 3"])
def test_unsafe_yaml_tags_are_a_one_line_error(tmp_path, home, value) -> None:
    path = _write(tmp_path, RECIPE.replace("seed: 1", f"seed: {value}"))
    with pytest.raises(RecipeError, match=r"line 2: YAML tag .* is not allowed in a recipe") as info:
        load_recipe(path)
    assert "\n" not in str(info.value)


def test_yaml_aliases_are_refused_before_they_expand(tmp_path, home) -> None:
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        laughs.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    path = _write(tmp_path, "recipe: lol\n" + "\n".join(laughs) + "\n")
    with pytest.raises(RecipeError, match=r"line 2: YAML anchors and aliases \(&a / \*a\) are not allowed"):
        load_recipe(path)


def test_llm_recipe_dry_run_in_a_fresh_home_estimates_what_it_can(cli, home, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    recipe = REPO / "examples" / "llm_judges.yaml"
    text = cli("run", str(recipe), "--dry-run")
    assert text.code == 0, text.stderr
    lines = text.stdout.splitlines()
    rubrics = lines[lines.index(next(x for x in lines if "generator rubrics" in x)) + 1]
    assert "LLM openai:Qwen/Qwen2.5-7B-Instruct:" in rubrics and " requests (0 cached" in rubrics
    assert "estimated cost unknown (no price for this model" in rubrics
    assert "not estimated: its input demo-rubrics is made by an earlier step" in text.stdout
    assert "None" not in text.stdout and "{'" not in text.stdout  # no raw dicts for people
    steps = cli("run", str(recipe), "--dry-run", "--json").json()["steps"]
    estimates = [s["estimate"] for s in steps if s.get("backend")]
    assert len({tuple(sorted(e)) for e in estimates}) == 1  # the same keys, estimated or not
    assert estimates[0]["estimated"] is True and estimates[0]["requests"] > 0
    assert estimates[1]["estimated"] is False and estimates[1]["requests"] is None


def test_generate_dry_run_needs_no_api_key(cli, home, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert cli("ingest", str(DEMO_SEEDS), "--name", "demo").code == 0
    dry = cli("generate", "causal", "--from", "demo", "--name", "x", "--set", "mode=llm",
              "--backend", "openai:gpt-4o-mini", "--dry-run")
    assert dry.code == 0, dry.stderr
    assert "LLM openai:gpt-4o-mini:" in dry.stdout and "nothing was run, sent or committed" in dry.stdout
    run = cli("generate", "causal", "--from", "demo", "--name", "x", "--set", "mode=llm",
              "--backend", "openai:gpt-4o-mini")
    assert run.code != 0 and "no API key: set the environment variable OPENAI_API_KEY" in run.stderr


def test_a_step_named_like_its_input_is_refused_at_load(tmp_path, home) -> None:
    path = _write(tmp_path, RECIPE.replace("    name: clean\n", "    name: all\n").replace("dataset: clean", "dataset: all"))
    with pytest.raises(RecipeError, match=r"line 19, key 'steps\[3\].name': 'all' is also this step's input.*"
                                          r"choose another name \(e.g. all-filter\)"):
        load_recipe(path)


def test_the_run_summary_shows_the_audit_rate_as_a_percentage_or_why_there_is_none() -> None:
    from factory.recipe.runner import _noise_line

    line = _noise_line({"available": True, "rate": 0.1234, "interval": [0.1, 0.15], "flagged": 7})
    assert line == "estimated noise rate 12.3% [10.0%, 15.0%]; 7 pairs flagged"
    assert _noise_line({"available": False, "reason": "too few pairs"}) == "noise not estimated (too few pairs)"
