"""One step identity keys the resume folder, the stored scores and the recipe step: two runs
that differ in the judge, a model version or the backend never share a result."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from factory.catalog import Catalog
from factory.steps import StepResult, generator
from tests.test_llm_steps_script import length_judge, spec, start, write_seeds

# The chosen answer is always the longer one: the length judge agrees with every label...
CLEAR = [("Explain gravity.", "Masses attract each other in proportion to their mass.", "Magic."),
         ("Explain rain.", "Vapour condenses into droplets that fall when heavy.", "Clouds cry."),
         ("Explain tides.", "The moon's gravity pulls the oceans into two bulges.", "Fish."),
         ("Explain wind.", "Air flows from high to low pressure as the sun heats the ground.", "Trees wave.")]


def short_judge(a: str, b: str) -> str:
    """...and this one always prefers the shorter: here, the rejected answer."""
    return "B" if len(a) >= len(b) else "A"


def _seeds(cli, tmp_path: Path, name: str = "pairs", suffix: str = "") -> str:
    rows = [{"prompt": p + suffix, "chosen": c + suffix, "rejected": r + suffix} for p, c, r in CLEAR]
    assert cli("ingest", write_seeds(tmp_path / f"{name}.jsonl", rows), "--name", name).code == 0
    return name


def test_a_different_judge_recomputes_the_scores_and_its_verdicts_decide(cli, home, tmp_path) -> None:
    ref = _seeds(cli, tmp_path)
    judge_a, _ = start(length_judge)
    judge_b, script_b = start(short_judge)
    try:
        first = cli("filter", "consistency", "--from", ref, "--name", "judged", "--backend", spec(judge_a),
                    "--set", "flip_below=0.0", "--json")
        assert first.code == 0, first.stderr
        second = cli("filter", "consistency", "--from", ref, "--name", "judged", "--backend", spec(judge_b),
                     "--set", "flip_below=0.0", "--json")
        assert second.code == 0, second.stderr
    finally:
        judge_a.stop()
        judge_b.stop()
    a, b = first.json(), second.json()
    assert (a["rows_kept"], a["rows_flipped"], a["scores_reused"]) == (4, 0, False)
    assert (b["rows_kept"], b["rows_flipped"], b["scores_reused"]) == (4, 4, False) and script_b.bodies
    rows = Catalog(home).read_table(b["ref"]).to_pylist()
    assert all(len(r["chosen"]) < len(r["rejected"]) for r in rows)  # judge B's side, not A's
    assert all(r["consistency_agreement"] == 0.0 for r in rows)
    lineage = Catalog(home).resolve(b["ref"]).lineage
    assert lineage["judges"] == ["openai:test-model"] and lineage["models"] == []  # a judge is no model
    assert lineage["step_identity"]["backend"]["base_url"] == judge_b.base_url.rstrip("/")


def test_the_recipe_step_key_changes_with_the_backend(home, tmp_path) -> None:
    from factory.recipe.runner import step_key
    from factory.recipe.spec import load_recipe
    from schemas.readers import read_path

    seeds = write_seeds(tmp_path / "seeds.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in CLEAR])
    Catalog(home).commit("pairs", read_path(seeds).table)

    def key(backend: str) -> str:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"recipe: r\nbackend: '{backend}'\nsteps:\n  - filter: consistency\n    from: pairs\n"
                          "    name: judged\n")
        loaded = load_recipe(recipe, catalog=Catalog(home))
        return step_key(loaded.steps[0], loaded, Catalog(home), {})

    one = key("openai:judge-a?base_url=http://127.0.0.1:9/v1&api_key_env=NO_SUCH_KEY")
    assert one == key("openai:judge-a?base_url=http://127.0.0.1:9/v1&api_key_env=NO_SUCH_KEY&concurrency=3")
    assert one != key("openai:judge-b?base_url=http://127.0.0.1:9/v1&api_key_env=NO_SUCH_KEY")
    assert one != key("openai:judge-a?base_url=http://127.0.0.2:9/v1&api_key_env=NO_SUCH_KEY")


def test_generate_with_a_home_caches_llm_requests_under_it(tmp_path, monkeypatch) -> None:
    import factory
    import factory.ingest

    monkeypatch.delenv("PREFAB_HOME", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    home = tmp_path / "elsewhere"
    seeds = write_seeds(tmp_path / "seeds.jsonl", [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in CLEAR])
    factory.ingest.ingest(seeds, "pairs", home=home)
    server, _ = start()
    try:
        factory.generate("causal", "pairs", "rewritten", settings={"mode": "llm", "attributes": ["correctness"]},
                         backend=spec(server), home=home)
    finally:
        server.stop()
    assert (home / "llm_cache.duckdb").exists() or list(home.glob("llm_cache.duckdb*"))
    assert not (cwd / ".prefab").exists()


@pytest.mark.parametrize("verb", ["generate", "filter"])
def test_name_equal_to_an_input_is_refused(cli, home, tmp_path, verb) -> None:
    ref = _seeds(cli, tmp_path)
    step = "master_keys" if verb == "generate" else "dedup"
    result = cli(verb, step, "--from", f"{ref}@1", "--name", ref)
    assert result.code != 0
    assert "--name pairs is also an input" in result.stderr and "choose another --name" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert Catalog(home).resolve(ref).version == 1  # nothing committed


@dataclass(frozen=True)
class _NoParams:
    pass


_STOP_AT: dict[str, str | None] = {"pair_id": None}


@generator("identity_test_copy", params=_NoParams, batch_rows=4)
def _copy(table: pa.Table, ctx) -> StepResult:
    """Copies its seeds (a test step); stops like Ctrl+C at the batch that starts at a given pair."""
    if table.column("pair_id")[0].as_py() == _STOP_AT["pair_id"]:
        raise KeyboardInterrupt
    out = table.select(["prompt", "chosen", "rejected"])
    out = out.append_column("parent_ids", pa.array([[p] for p in table.column("pair_id").to_pylist()]))
    out = out.append_column("generated", pa.array(["none"] * table.num_rows))
    return StepResult(out.append_column("method", pa.array(["copy"] * table.num_rows)))


def test_a_resumed_run_says_it_resumes(home, tmp_path, capsys) -> None:
    import factory
    import factory.ingest

    rows = [{"prompt": f"{p} ({i})", "chosen": c, "rejected": r} for i in range(3) for p, c, r in CLEAR]
    factory.ingest.ingest(write_seeds(tmp_path / "seeds.jsonl", rows), "pairs", home=home)
    seeds = Catalog(home).read_table("pairs")
    _STOP_AT["pair_id"] = seeds.column("pair_id")[4].as_py()  # the second batch of three
    try:
        with pytest.raises(KeyboardInterrupt):
            factory.generate("identity_test_copy", "pairs", "copies", home=home, progress=False)
    finally:
        _STOP_AT["pair_id"] = None
    capsys.readouterr()
    result = factory.generate("identity_test_copy", "pairs", "copies", home=home, progress=False)
    assert result["rows_generated"] == 12
    err = capsys.readouterr().err
    assert "resuming generate identity_test_copy: 1 of 3 batches kept from an interrupted run" in err


def test_identity_key_ingredients() -> None:
    from factory.steps.identity import StepIdentity

    base = StepIdentity("filter", "f", "1", {"k": 1, "threshold": 0.5}, frozenset({"k"}), ("a@1",), 0)
    same_scores = StepIdentity("filter", "f", "1", {"k": 1, "threshold": 0.9}, frozenset({"k"}), ("a@1",), 0)
    assert base.key("scores") == same_scores.key("scores") and base.key("run") != same_scores.key("run")
    for other in (StepIdentity("filter", "f", "2", {"k": 1}, frozenset({"k"}), ("a@1",), 0),
                  StepIdentity("filter", "f", "1", {"k": 1}, frozenset({"k"}), ("a@2",), 0),
                  StepIdentity("filter", "f", "1", {"k": 1}, frozenset({"k"}), ("a@1",), 1),
                  StepIdentity("filter", "f", "1", {"k": 1}, frozenset({"k"}), ("a@1",), 0,
                               backend={"model": "m", "kind": "openai"}),
                  StepIdentity("filter", "f", "1", {"k": 1}, frozenset({"k"}), ("a@1",), 0, template_hash="t")):
        assert other.key("scores") != base.key("scores")
    assert json.dumps(base.lineage())  # plain data for lineage


def test_a_local_folder_named_like_a_catalog_dataset_is_ambiguous(cli, home, tmp_path, monkeypatch) -> None:
    from factory.steps.sources import AmbiguousSourceError, resolve_source

    ref = _seeds(cli, tmp_path, "eval")
    _seeds(cli, tmp_path, "train", suffix=" Different words entirely, about cooking pasta and sauces.")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval").mkdir()  # a folder that happens to share the dataset's name
    result = cli("filter", "dedup", "--from", "train", "--name", "clean", "--set", "against=eval")
    assert result.code != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "'eval' is both a local path" in result.stderr and "./eval" in result.stderr and "eval@N" in result.stderr
    catalog = Catalog(home)
    with pytest.raises(AmbiguousSourceError):
        resolve_source("eval", catalog)
    assert resolve_source("./eval", catalog).path == Path("eval")
    assert resolve_source("eval@1", catalog).ref == f"{ref}@1"
    assert resolve_source("train", catalog).ref == "train@1"  # no such folder: the catalog
    ok = cli("filter", "dedup", "--from", "train", "--name", "clean", "--set", "against=eval@1", "--json")
    assert ok.code == 0, ok.stderr
    assert Catalog(home).resolve("clean").lineage["params"]["against"] == ["eval@1"]
