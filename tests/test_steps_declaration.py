"""A step's declaration carries what the runner needs to check before any work: the planner
of an LLM step (--dry-run estimates, the --max-cost check) and the columns it reads."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pytest

from factory.catalog import Catalog
from factory.steps import StepResult, filter_step, generator
from factory.steps.context import Decision
from factory.steps.llm import Call, LLMMap, Planned, Template, strict_object
from tests.test_llm_steps_script import spec, start, write_seeds

ASK = Template("declared_ask", "1", "Say something about:\n{prompt}",
               schema=strict_object({"rewrite": {"type": "string"}}), max_tokens=64)


@dataclass(frozen=True)
class _NoParams:
    pass


def _calls(table: pa.Table) -> list[Call]:
    return [Call(i, {"prompt": str(p)}) for i, p in enumerate(table.column("prompt").to_pylist())]


def _plan(table, ctx) -> list[Planned]:
    return [Planned(ASK, _calls(table))]


CALLED = {"n": 0}


@generator("declared_llm", params=_NoParams, backend="required", plan=_plan, needs="any chat model")
def _declared_llm(table: pa.Table, ctx) -> StepResult:
    """Asks the LLM once per seed (a test step)."""
    CALLED["n"] += 1
    llm = LLMMap(ctx)
    replies = llm.run(ASK, _calls(table))
    out = table.select(["prompt", "chosen"]).append_column(
        "rejected", pa.array([r.value["rewrite"] if r.ok else "" for r in replies]))
    out = out.append_column("parent_ids", pa.array([[p] for p in table.column("pair_id").to_pylist()]))
    out = out.append_column("generated", pa.array(["rejected"] * table.num_rows))
    return StepResult(out.append_column("method", pa.array(["ask"] * table.num_rows)), llm.failed_table(),
                      usage=llm.usage)


def _keep_all(scores: pa.Table, params) -> Decision:
    n = scores.num_rows
    return Decision(pa.array(["keep"] * n), pa.nulls(n, pa.string()))


@filter_step("declared_reads_rubric", params=_NoParams, decide=_keep_all, reads=("prompt", "rubric"))
def _reads_rubric(table: pa.Table, ctx) -> StepResult:
    """Needs a rubric column (a test step)."""
    CALLED["n"] += 1
    return StepResult(pa.table({"score": pa.array([1.0] * table.num_rows)}))


def _ingest(home, tmp_path) -> str:
    import factory.ingest

    rows = [{"prompt": f"Question {i}?", "chosen": f"A good answer {i}.", "rejected": "No."} for i in range(3)]
    factory.ingest.ingest(write_seeds(tmp_path / "seeds.jsonl", rows), "seeds", home=home)
    return "seeds"


def test_an_llm_step_without_a_planner_does_not_register() -> None:
    with pytest.raises(TypeError, match="declares no planner: pass plan=FN"):
        @generator("declared_without_plan", params=_NoParams, backend="optional")
        def _step(table, ctx):  # pragma: no cover - never registered
            raise AssertionError


def test_a_declared_planner_gives_the_dry_run_its_estimate(cli, home, tmp_path) -> None:
    ref = _ingest(home, tmp_path)
    server, script = start()
    try:
        dry = cli("generate", "declared_llm", "--from", ref, "--name", "asked", "--backend", spec(server),
                  "--dry-run", "--json")
    finally:
        server.stop()
    assert dry.code == 0, dry.stderr
    llm = dry.json()["llm"]
    assert llm["requests"] == 3 and llm["stages"][0]["template"] == "declared_ask@1"
    assert not script.bodies  # nothing sent


def test_a_declared_planner_gives_max_cost_its_pre_check(cli, home, tmp_path) -> None:
    ref = _ingest(home, tmp_path)
    server, script = start()
    CALLED["n"] = 0
    try:
        run = cli("generate", "declared_llm", "--from", ref, "--name", "asked", "--max-cost", "0.0000001",
                  "--backend", spec(server, price_in=1000, price_out=1000))
    finally:
        server.stop()
    assert run.code != 0 and "exceeds --max-cost" in run.stderr and "nothing was sent" in run.stderr
    assert not script.bodies and CALLED["n"] == 0


def test_a_missing_input_column_is_refused_before_any_work(cli, home, tmp_path) -> None:
    ref = _ingest(home, tmp_path)
    CALLED["n"] = 0
    for extra in ([], ["--dry-run"]):
        result = cli("filter", "declared_reads_rubric", "--from", ref, "--name", "out", *extra)
        assert result.code != 0
        assert "filter declared_reads_rubric reads column 'rubric', which seeds@1 lacks" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert CALLED["n"] == 0
    with pytest.raises(Exception, match="no dataset named 'out'"):
        Catalog(home).resolve("out")
