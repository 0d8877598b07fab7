"""The step mechanism: registry, typed parameters, the runner's batches, provenance and resume."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pytest

from factory.steps import (
    ParamError,
    StepContext,
    StepResult,
    build_params,
    failed_rows,
    generator,
    get_step,
    param,
    parse_settings,
    steps,
)
from factory.steps.runner import execute, prepare, stamp_generated
from schemas.pairs import Message, Pair, pairs_to_table


def _seeds(n: int = 10) -> pa.Table:
    return pairs_to_table(
        Pair([Message("user", f"Question number {i}?")], f"Answer {i}. It is right.", f"Wrong {i}.", task="qa")
        for i in range(n)
    )


@dataclass(frozen=True)
class ToyParams:
    count: int = param(1, "copies per seed", low=0, high=5)
    ratio: float = param(0.5, "a share", low=0.0, high=1.0)
    mode: Literal["a", "b"] = param("a", "a choice")
    words: list[str] = param(["x", "y"], "a list")
    label: str | None = param(None, "optional text")
    fail_every: int = param(0, "fail every n-th row (0: never)", low=0)


CALLS: list[int] = []


@generator("test_toy", params=ToyParams, batch_rows=4)
def toy(table: pa.Table, ctx: StepContext[ToyParams]) -> StepResult:
    """A test generator: rewrites the rejected answer."""
    CALLS.append(table.num_rows)
    rows = table.to_pylist()
    out, bad = [], []
    for i, row in enumerate(rows):
        if ctx.params.fail_every and int(row["chosen"].split()[1].rstrip(".")) % ctx.params.fail_every == 0:
            bad.append(i)
            continue
        for k in range(ctx.params.count):
            out.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": f"{row['rejected']} #{k}",
                        "parent_ids": [row["pair_id"]], "generated": "rejected", "method": f"copy:{k}"})
    schema = pa.schema([("prompt", table.schema.field("prompt").type), ("chosen", pa.string()),
                        ("rejected", pa.string()), ("parent_ids", pa.list_(pa.string())),
                        ("generated", pa.string()), ("method", pa.string())])
    return StepResult(pa.Table.from_pylist(out, schema=schema), failed_rows(bad, ["unlucky"] * len(bad)),
                      {"made": len(out)})


def test_registry_lists_builtin_steps_and_rejects_unknown_ones() -> None:
    names = {s.name for s in steps("generator")}
    assert {"master_keys", "test_toy"} <= names
    assert "dedup" in {s.name for s in steps("filter")}
    with pytest.raises(ParamError, match=r"unknown generator 'nope' \(known: .*master_keys"):
        get_step("nope", "generator")
    assert get_step("master_keys", "generator").summary.startswith("Rejected answers made of master keys")


def test_settings_are_typed_and_validated_naming_the_key() -> None:
    params = build_params(ToyParams, {"count": "3", "ratio": "0.25", "mode": "b", "words": "p, q",
                                      "label": "none"}, step="test_toy")
    assert (params.count, params.ratio, params.mode, params.words, params.label) == (3, 0.25, "b", ["p", "q"], None)
    assert build_params(ToyParams, {"words": '[" ", ","]'}, step="t").words == [" ", ","]
    assert build_params(ToyParams, {}, step="t").words == ["x", "y"]
    cases = {
        "colour": r"unknown parameter 'colour' \(known: count, fail_every, label, mode, ratio, words\)",
        "count": r"parameter 'count' expects an integer, got 'many'",
        "ratio": r"parameter 'ratio' must be <= 1.0, got 2.0",
        "mode": r"parameter 'mode' expects one of 'a', 'b', got 'c'",
    }
    bad = {"colour": "red", "count": "many", "ratio": "2", "mode": "c"}
    for key, message in cases.items():
        with pytest.raises(ParamError, match=message):
            build_params(ToyParams, {key: bad[key]}, step="test_toy")
    with pytest.raises(ParamError, match="--set expects KEY=VALUE"):
        parse_settings(["count"])
    with pytest.raises(ParamError, match="given twice"):
        parse_settings(["count=1", "count=2"])


def test_runner_feeds_batches_and_offsets_failed_rows() -> None:
    seeds = _seeds(10)
    prepared = prepare("generator", "test_toy", {"count": "2", "fail_every": "3"})
    ctx = StepContext("test_toy", prepared.params, seed=7, run_id="run-1")
    CALLS.clear()
    result = execute(prepared, seeds, ctx)
    assert CALLS == [4, 4, 2]
    # rows 0, 3, 6, 9 fail; positions are in the whole input, not the batch
    assert result.failed.column("row").to_pylist() == [0, 3, 6, 9]
    assert result.stats == {"made": 12}
    stamped = stamp_generated(result.table, seeds, pa.array(["seeds@1"] * 10), prepared, ctx)
    provenance = stamped.column("provenance").to_pylist()
    assert {p["step"] for p in provenance} == {"test_toy"}
    assert {p["run_id"] for p in provenance} == {"run-1"} and {p["seed"] for p in provenance} == {7}
    assert {p["source"] for p in provenance} == {"seeds@1"}
    assert provenance[0]["parent_ids"] == [seeds.column("pair_id")[1].as_py()]
    assert provenance[0]["generated"] == "rejected" and provenance[0]["method"] == "copy:0"
    assert len({p["params_hash"] for p in provenance}) == 1
    assert stamped.column("pair_id")[0].as_py() != seeds.column("pair_id")[1].as_py()


def test_an_interrupted_run_resumes_after_its_finished_batches(tmp_path) -> None:
    seeds = _seeds(10)
    prepared = prepare("generator", "test_toy", {})
    ctx = StepContext("test_toy", prepared.params)
    real_fn = prepared.spec.fn
    calls: list[int] = []
    interrupt_at = [2]

    def interrupted(table, ctx):
        calls.append(table.num_rows)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt
        return real_fn(table, ctx)

    object.__setattr__(prepared.spec, "fn", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            execute(prepared, seeds, ctx, resume_dir=tmp_path / "work")
        calls.clear()
        interrupt_at[0] = 0
        result = execute(prepared, seeds, ctx, resume_dir=tmp_path / "work")
    finally:
        object.__setattr__(prepared.spec, "fn", real_fn)
    assert calls == [4, 2]  # the first batch was kept, not recomputed
    assert result.table.num_rows == 10


def test_a_whole_table_step_says_what_runs_instead_of_a_bar_stuck_at_zero(capsys) -> None:
    from factory.steps.runner import _progress_bar

    line = _progress_bar(1200, "filter noise", True, whole_table=True)
    line.update(1200)
    line.close()
    err = capsys.readouterr().err
    assert "filter noise: 1,200 rows as one whole-table pass" in err
    assert "filter noise: 1,200 rows done in" in err and "0/1200" not in err


@generator("test_toy_chunks", params=ToyParams, batch_rows=None)
def toy_chunks(table: pa.Table, ctx: StepContext[ToyParams]) -> StepResult:
    """A whole-table test generator that gives its output as an iterator of 3-row chunks."""
    bad = [i for i in range(table.num_rows) if ctx.params.fail_every and i % ctx.params.fail_every == 0]
    keep = pa.array([i not in bad for i in range(table.num_rows)])
    kept = table.filter(keep)
    out = pa.table({"prompt": kept.column("prompt"), "chosen": kept.column("chosen"),
                    "rejected": pa.array([f"{r} (chunked)" for r in kept.column("rejected").to_pylist()]),
                    "parent_ids": pa.array([[p] for p in kept.column("pair_id").to_pylist()]),
                    "generated": pa.array(["rejected"] * kept.num_rows), "method": pa.array(["chunk"] * kept.num_rows)})
    return StepResult((out.slice(start, 3) for start in range(0, out.num_rows, 3)),
                      failed_rows(bad, ["unlucky"] * len(bad)), {"made": out.num_rows})


def test_a_generator_may_give_its_output_in_chunks(home) -> None:
    import factory
    from factory.catalog import Catalog

    seeds = _seeds(10)
    prepared = prepare("generator", "test_toy_chunks", {"fail_every": "4"})
    result = execute(prepared, seeds, StepContext("test_toy_chunks", prepared.params))
    assert result.table.num_rows == 7 and result.failed.column("row").to_pylist() == [0, 4, 8]

    Catalog(home).commit("seeds", seeds)
    made = factory.generate("test_toy_chunks", "seeds", "chunked", settings={"fail_every": "4"}, home=home,
                            progress=False)
    assert (made["rows_in"], made["rows_generated"], made["rows_failed"]) == (10, 7, 3)
    assert made["seeds_used"] + made["seeds_failed"] + made["seeds_without_output"] == 10
    out = Catalog(home).read_table("chunked")
    expected = [seeds.column("pair_id")[i].as_py() for i in range(10) if i % 4]
    parents = out.column("provenance").combine_chunks().field("parent_ids").to_pylist()
    assert [p[0] for p in parents] == expected
    assert all(r.endswith(" (chunked)") for r in out.column("rejected").to_pylist())
    assert len(set(out.column("pair_id").to_pylist())) == 7


def test_a_filter_may_not_give_chunks() -> None:
    from factory.steps.registry import StepSpec
    from factory.steps.runner import StepOutputError, run_batch

    spec = StepSpec(name="chunky", kind="filter", fn=lambda t, c: StepResult(iter([t])), params=ToyParams,
                    version="1", doc="")
    with pytest.raises(StepOutputError, match="a filter returns a pyarrow Table"):
        run_batch(spec, _seeds(2), 0, StepContext("chunky", ToyParams()))
