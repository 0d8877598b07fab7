"""Steps in bounded memory: a row-local step reads the catalog a batch at a time, a filter's
output and a generator's pairs stream into the commit, and a run in small batches commits
exactly what a run in one batch does (same rows, order, labels, weights, scores, counts)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import factory
import factory.catalog.catalog as catalog_module
import factory.catalog.store as store_module
import factory.steps.api as api_module
import factory.steps.registry as registry
import factory.steps.runner as runner_module
from factory.catalog import Catalog
from factory.steps import (
    Decision,
    StepContext,
    StepResult,
    failed_rows,
    filter_step,
    generator,
    param,
)
from factory.steps.runner import StepInput, apply_decision, prepare, stamp_generated
from schemas.pairs import PAIR_SCHEMA, PROVENANCE_TYPE, Message, Pair, pairs_to_table

# ---- the steps under test --------------------------------------------------------------


@dataclass(frozen=True)
class NoParams:
    fail: bool = param(True, "fail the rows of bucket 4")


def _bucket(pair_ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """0..4 from a pair id's last hex digit: what the probe filter does to the pair."""
    return np.array([int(p[-1], 16) % 5 for p in pair_ids.to_pylist()], dtype=np.int64)


def decide_probe(scores: pa.Table, params: NoParams) -> Decision:
    bucket = scores.column("bucket").to_numpy()
    action = np.array(["drop", "flip", "weight", "keep", "keep"], dtype=object)[bucket]
    reason = [None if a == "keep" else f"bucket {b}" for a, b in zip(action, bucket, strict=True)]
    weight = pa.array(np.where(bucket == 2, 0.25, np.nan))
    return Decision(pa.array(action.tolist(), pa.string()), pa.array(reason, pa.string()), weight)


def probe(table: pa.Table, ctx: StepContext[NoParams]) -> StepResult:
    """A test filter: drops, flips, reweights or keeps a pair by its id; fails bucket 4."""
    bucket = _bucket(table.column("pair_id"))
    failing = np.flatnonzero(bucket == 4) if ctx.params.fail else np.array([], dtype=np.int64)
    scores = pa.table({"bucket": pa.array(bucket, pa.int64()), "length": pc.utf8_length(table.column("chosen"))})
    return StepResult(scores, failed_rows(failing.tolist(), ["probe failed"] * len(failing)), {"scored": len(bucket)})


filter_step("test_stream_probe", params=NoParams, decide=decide_probe, batch_rows=4096)(probe)
filter_step("test_stream_probe_whole", params=NoParams, decide=decide_probe)(probe)


@generator("test_stream_swap", params=NoParams, batch_rows=4096)
def swap(table: pa.Table, ctx: StepContext[NoParams]) -> StepResult:
    """A test generator: one swapped pair per seed, none for bucket 3, a failure for bucket 4."""
    bucket = _bucket(table.column("pair_id"))
    made = np.flatnonzero(bucket < 3)
    failing = np.flatnonzero(bucket == 4)
    rows = pa.array(made, pa.int64())
    out = pa.table({
        "prompt": table.column("prompt").take(rows),
        "chosen": pc.binary_join_element_wise(table.column("rejected").take(rows), " (swapped)", ""),
        "rejected": table.column("chosen").take(rows),
        "parent_ids": pa.array([[p] for p in table.column("pair_id").take(rows).to_pylist()],
                               pa.list_(pa.string())),
        "generated": pa.array(["both"] * len(made), pa.string()),
        "method": pa.array([f"swap:{b}" for b in bucket[made]], pa.string()),
    })
    return StepResult(out, failed_rows(failing.tolist(), ["swap failed"] * len(failing)), {"made": len(made)})


# ---- fixtures ----------------------------------------------------------------------------


def _pairs(n: int, start: int = 0, *, text: int = 0) -> pa.Table:
    filler = " filler" * text
    return pairs_to_table(
        Pair([Message("user", f"Question {i}?")], f"Answer {i}.{filler}", f"Wrong {i}.{filler}",
             votes=[1, 1, -1] if i % 2 else [1], weight=1.0, task="qa",
             attribute_scores=[{"attribute": "help", "chosen": 0.9, "rejected": float(i % 7) / 10}])
        for i in range(start, start + n)
    )


def _small_batches(monkeypatch: pytest.MonkeyPatch, kind: str, step: str, rows: int) -> None:
    """Batches of a few rows everywhere: the step's, the runner's streams and the catalog's
    row groups (so the input files hold many row groups as well)."""
    spec = registry._STEPS[(kind, step)]
    monkeypatch.setitem(registry._STEPS, (kind, step), dataclasses.replace(spec, batch_rows=rows))
    monkeypatch.setattr(runner_module, "STREAM_ROWS", rows - 2)
    monkeypatch.setattr(store_module, "ROW_GROUP_ROWS", rows + 3)
    monkeypatch.setattr(catalog_module, "ID_CHECK_ROWS", 4)


def _filter_run(home: Path, step: str) -> tuple[dict, pa.Table, pa.Table, pa.Table]:
    catalog = Catalog(home)
    catalog.commit("seeds", _pairs(60))
    result = factory.filter(step, "seeds", "kept", home=home)
    info = catalog.resolve("kept")
    return result, catalog.read_table(info), catalog.read_attachment(info, "scores"), catalog.failures(info)


# ---- filters -----------------------------------------------------------------------------


def test_a_filter_streamed_in_small_batches_commits_what_one_batch_does(tmp_path, monkeypatch) -> None:
    whole = _filter_run(tmp_path / "whole", "test_stream_probe")
    _small_batches(monkeypatch, "filter", "test_stream_probe", 7)
    streamed = _filter_run(tmp_path / "streamed", "test_stream_probe")
    (result, rows, scores, failures), (s_result, s_rows, s_scores, s_failures) = whole, streamed
    assert s_rows.equals(rows) and s_scores.equals(scores)
    assert s_failures.equals(failures) and failures.num_rows
    counts = ("rows_in", "rows_kept", "rows_dropped", "rows_failed", "rows_flipped", "rows_reweighted")
    assert {k: s_result[k] for k in counts} == {k: result[k] for k in counts}
    assert result["rows_in"] == result["rows_kept"] + result["rows_dropped"] + result["rows_failed"] == 60
    # every action happened, so each was applied batch by batch
    assert min(result[k] for k in counts) > 0
    assert rows.column_names[-4:] == ["test_stream_probe_bucket", "test_stream_probe_length",
                                      "test_stream_probe_action", "test_stream_probe_reason"]


def test_decisions_applied_batch_by_batch_equal_the_whole_table_application(tmp_path, monkeypatch) -> None:
    table = _pairs(60)
    scores = pa.table({"bucket": pa.array(_bucket(table.column("pair_id")), pa.int64())})
    decision = decide_probe(scores, NoParams())
    failed = _bucket(table.column("pair_id")) == 4
    verdicts = api_module._verdicts(scores, decision, "p")
    annotated = table
    for column in verdicts.column_names:
        annotated = annotated.append_column(column, verdicts.column(column))
    expected, counts = apply_decision(annotated, decision, failed)
    batches = list(api_module.filtered_batches(table, verdicts, decision, failed, batch_rows=7))
    assert len(batches) == 9
    assert pa.concat_tables(batches).equals(expected)
    assert counts == runner_module.decision_counts(decision, failed)
    flipped = expected.filter(pc.equal(expected.column("p_action"), "flip"))
    assert flipped.num_rows and all(c.startswith("Wrong") for c in flipped.column("chosen").to_pylist())
    assert flipped.column("attribute_scores")[0].as_py()[0]["chosen"] != 0.9
    odd = [v for v in flipped.column("votes").to_pylist() if len(v) == 3]
    assert odd and all(v == [-1, -1, 1] for v in odd)
    reweighted = expected.filter(pc.equal(expected.column("p_action"), "weight"))
    assert reweighted.num_rows and set(reweighted.column("weight").to_pylist()) == {0.25}


def test_a_whole_table_filter_reads_a_memory_mapped_copy_and_decides_the_same(tmp_path) -> None:
    row_local = _filter_run(tmp_path / "a", "test_stream_probe")
    whole = _filter_run(tmp_path / "b", "test_stream_probe_whole")
    rename = {c: c.replace("_whole", "") for c in whole[1].column_names}
    assert whole[1].rename_columns([rename[c] for c in whole[1].column_names]).equals(row_local[1])
    assert list((tmp_path / "b" / "cache" / "datasets").glob("*.arrow"))  # the mapped copy, reused by load()


def test_step_input_reads_several_versions_in_exact_batches_and_takes_rows_in_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "ROW_GROUP_ROWS", 5)
    catalog = Catalog(tmp_path)
    first = catalog.commit("a", _pairs(23))
    second = catalog.commit("b", _pairs(17, 100).append_column("note", pa.array(["n"] * 17)))
    source = StepInput(catalog=catalog, infos=[first, second])
    whole = pa.concat_tables([catalog.read_table(first), catalog.read_table(second)], promote_options="permissive")
    batches = list(source.batches(6))
    assert [b.num_rows for b in batches] == [6] * 6 + [4]
    assert pa.concat_tables(batches).equals(whole) and source.whole().equals(whole)
    assert source.take(pa.array([30, 2, 22, 23])).equals(whole.take(pa.array([30, 2, 22, 23])))
    assert source.column("pair_id").equals(whole.column("pair_id"))
    assert source.sources().cast(pa.string()).to_pylist() == ["a@1"] * 23 + ["b@1"] * 17


# ---- generators --------------------------------------------------------------------------


def _generate_run(home: Path, *, with_input: bool) -> tuple[dict, pa.Table, pa.Table]:
    catalog = Catalog(home)
    catalog.commit("seeds-a", _pairs(30))
    catalog.commit("seeds-b", _pairs(25, 100))
    result = factory.generate("test_stream_swap", ["seeds-a", "seeds-b"], "made", with_input=with_input, home=home)
    info = catalog.resolve("made")
    return result, catalog.read_table(info), catalog.failures(info)


def _without_run_id(table: pa.Table) -> pa.Table:
    provenance = table.column("provenance").combine_chunks()
    fields = [provenance.field(f.name) if f.name != "run_id" else pa.nulls(len(provenance), pa.string())
              for f in PROVENANCE_TYPE]
    struct = pa.StructArray.from_arrays(fields, fields=list(PROVENANCE_TYPE), mask=pc.is_null(provenance))
    return table.set_column(table.schema.get_field_index("provenance"), "provenance", struct)


@pytest.mark.parametrize("with_input", [False, True])
def test_a_generator_streamed_in_small_batches_commits_what_one_batch_does(tmp_path, monkeypatch,
                                                                            with_input) -> None:
    result, rows, failures = _generate_run(tmp_path / "whole", with_input=with_input)
    _small_batches(monkeypatch, "generator", "test_stream_swap", 6)
    s_result, s_rows, s_failures = _generate_run(tmp_path / "streamed", with_input=with_input)
    assert _without_run_id(s_rows).equals(_without_run_id(rows))
    assert s_failures.equals(failures) and failures.num_rows
    counts = ("rows_in", "rows_generated", "rows_failed", "seeds_used", "seeds_failed", "seeds_without_output")
    assert {k: s_result[k] for k in counts} == {k: result[k] for k in counts}
    seeds = pa.concat_tables([_pairs(30), _pairs(25, 100)])
    bucket = _bucket(seeds.column("pair_id"))
    assert result["seeds_used"] == int((bucket < 3).sum()) == result["rows_generated"]
    assert result["seeds_failed"] == int((bucket == 4).sum()) == result["rows_failed"]
    assert result["seeds_without_output"] == int((bucket == 3).sum())
    made = rows.slice(seeds.num_rows) if with_input else rows
    if with_input:
        assert rows.column("pair_id").to_pylist()[:seeds.num_rows] == seeds.column("pair_id").to_pylist()
    sources = pc.struct_field(made.column("provenance"), "source").to_pylist()
    expected = ["seeds-a@1" if b < 30 else "seeds-b@1" for b in np.flatnonzero(bucket < 3)]
    assert sources == expected


def _reference_stamp(out: pa.Table, inputs: pa.Table, input_sources: pa.Array, prepared, ctx) -> pa.Table:
    """The list-based stamping the columnar one replaced (provenance only), as a control."""
    source_of = dict(zip(inputs.column("pair_id").to_pylist(), input_sources.to_pylist(), strict=True))
    parents = out.column("parent_ids").to_pylist()
    n = out.num_rows
    return pa.table({
        "source": pa.array([source_of.get(p[0]) if p else None for p in parents], pa.string()),
        "step": pa.array([prepared.spec.name] * n, pa.string()),
        "seed": pa.array([ctx.seed] * n, pa.int64()),
        "parent_ids": pa.array(parents, pa.list_(pa.string())),
        "method": pa.array(out.column("method").to_pylist(), pa.string()),
    })


def test_columnar_stamping_equals_the_list_based_one_for_odd_parents() -> None:
    prepared = prepare("generator", "test_stream_swap", {})
    ctx = StepContext("test_stream_swap", prepared.params, seed=3, run_id="r")
    # an id in two inputs (the later counts), rows without parents, a parent not in the inputs
    inputs = pa.table({"pair_id": ["a", "b", "c", "b"]})
    sources = pa.array(["x@1", "x@1", "y@1", "y@1"])
    out = pa.table({
        "prompt": pa.array([[{"role": "user", "content": f"q{i}"}] for i in range(6)],
                           PAIR_SCHEMA.field("prompt").type),
        "chosen": [f"c{i}" for i in range(6)], "rejected": [f"r{i}" for i in range(6)],
        "parent_ids": pa.array([["b", "a"], [], None, ["zz"], ["c"], ["a"]], pa.list_(pa.string())),
        "method": ["m"] * 6,
    }).slice(1)  # a slice, as the runner stamps a batch at a time
    stamped = stamp_generated(out, inputs, sources, prepared, ctx)
    provenance = stamped.column("provenance").combine_chunks()
    got = pa.table({name: provenance.field(name) for name in ("source", "step", "seed", "parent_ids", "method")})
    expected = _reference_stamp(out, inputs, sources, prepared, ctx)
    assert got.equals(expected.cast(got.schema))
    assert got.column("source").to_pylist() == [None, None, None, "y@1", "x@1"]


# ---- memory ------------------------------------------------------------------------------

# The child builds nothing big itself: the version is committed by a first process, so the
# limit is set over a process that has only imported the code.
_LIMITED = """
import resource, sys
import factory.catalog.store as store, factory.catalog.catalog as catalog, factory.catalog.exporters as exporters
import factory.steps.runner as runner
# a "batch" of 2048 rows everywhere: the catalog's row groups and reads, the runner's streams
store.ROW_GROUP_ROWS, catalog.ID_CHECK_ROWS, exporters.BATCH_ROWS = 2048, 512, 2048
runner.STREAM_ROWS = 2048
import factory, polars, duckdb
import tests.test_steps_stream  # registers the probe filters
from factory.steps.registry import load_steps
load_steps()
def mapped() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()
limit = mapped() + {budget_mib} * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
try:
    {run}
except MemoryError:
    import traceback
    traceback.print_exc()
    sys.exit(3)
print("ok")
"""

_BUILD = """
import factory.catalog.store as store, factory.catalog.catalog as catalog
store.ROW_GROUP_ROWS, catalog.ID_CHECK_ROWS = 2048, 512
from factory.catalog import Catalog
from tests.test_steps_stream import _pairs
def parts():
    for start in range(0, {n}, 2000):
        yield _pairs(2000, start, text=300)
Catalog({home!r}).commit("big", parts())
"""

_THREADS = {"OMP_NUM_THREADS": "1", "POLARS_MAX_THREADS": "1", "MALLOC_ARENA_MAX": "1", "RAYON_NUM_THREADS": "1",
            "ARROW_DEFAULT_MEMORY_POOL": "system"}


def _child(code: str) -> subprocess.CompletedProcess:
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, **_THREADS, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=root)


def _whole_table_filter(home: str, step: str) -> None:
    """The control: the filter as it ran before streaming: the input read whole, annotated
    whole, decided whole through polars, committed as one table."""
    from factory.steps.runner import execute

    catalog = Catalog(home)
    table = catalog.read_table("big")
    prepared = prepare("filter", step, {"fail": False})
    result = execute(prepared, table, StepContext(step, prepared.params))
    scores = result.table
    decision = prepared.spec.decide(scores, prepared.params)
    annotated = table
    for column in api_module._verdicts(scores, decision, step).column_names:
        annotated = annotated.append_column(column, api_module._verdicts(scores, decision, step).column(column))
    out, _ = apply_decision(annotated, decision, np.zeros(table.num_rows, dtype=bool))
    catalog.commit("kept-control", out)


@pytest.mark.slow
@pytest.mark.parametrize("step", ["test_stream_probe", "test_stream_probe_whole"])
def test_a_filter_over_a_version_runs_in_a_budget_that_holding_it_whole_overflows(tmp_path, step) -> None:
    # 60k pairs of ~4.4 kB text: ~250 MiB of answers. Streamed, a filter holds a batch of
    # the input (2048 rows here), the commit's row groups and the scores: it fits ~500 MiB
    # of address space with the libraries' own (thread stacks, allocator arenas), whatever
    # the version's size; a whole-table step adds its memory-mapped copy of the version
    # (~250 MiB of file pages, counted here as address space). The control holds the texts
    # three times over (the table, polars' copy, the output) and fits no 900 MiB even at 40k.
    home = str(tmp_path / "home")
    built = _child(_BUILD.format(n=60_000, home=home))
    assert built.returncode == 0, built.stderr[-2000:]
    run = f"factory.filter({step!r}, 'big', 'kept', settings={{'fail': False}}, home={home!r})"
    bounded = _child(_LIMITED.format(budget_mib=800, run=run))
    assert bounded.returncode == 0, bounded.stdout + bounded.stderr[-3000:]
    control = _child(_LIMITED.format(
        budget_mib=800, run=f"from tests.test_steps_stream import _whole_table_filter\n    "
                            f"_whole_table_filter({home!r}, {step!r})"))
    assert control.returncode != 0 and "ok" not in control.stdout, control.stdout + control.stderr[-2000:]
