"""``factory.generate`` and ``factory.filter``: run a registered step on catalog versions.

Both validate the step's parameters and resolve every input ref before any work, run the
step through the runner, and commit one new version whose lineage lists the inputs as
parents, the step with its parameters, the run id and the reconciled counts.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.steps import runner as _runner  # STREAM_ROWS read at call time: one setting
from factory.steps.context import FAILED_SCHEMA, Decision, StepContext
from factory.steps.identity import StepIdentity, identify
from factory.steps.params import as_dict
from factory.steps.runner import (
    Executed,
    StepInput,
    apply_decision,
    check_decision,
    check_generated,
    clear_work_dir,
    decision_counts,
    exact_inputs,
    execute,
    failed_side_table,
    new_run_id,
    pin_refs,
    prefixed_scores,
    prepare,
    run_step,
    run_work_dir,
    stamp_generated,
)
from schemas.errors import PrefabError
from schemas.pairs import PAIR_COLUMNS, PAIR_SCHEMA


def _refs(from_: str | Sequence[str]) -> list[str]:
    refs = [from_] if isinstance(from_, str) else list(from_)
    if not refs:
        raise PrefabError("--from needs at least one dataset ref")
    return refs


@dataclass
class FileInput:
    """A file read directly (trajectory steps): recorded in lineage by path and sha256."""

    ref: str
    sha256: str
    rows: int


def _read_trajectory_files(paths: list[str]) -> tuple[list[FileInput], pa.Table, pa.Array]:
    from schemas.readers.trajectories import read_trajectories

    infos, tables = [], []
    for path in paths:
        if not Path(path).is_file():
            raise PrefabError(f"--from {path}: this step reads trajectory files, and there is no such file")
        table = read_trajectories(path)
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        infos.append(FileInput(str(path), digest, table.num_rows))
        tables.append(table)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    sources = pa.array([i.ref for i, t in zip(infos, tables, strict=True) for _ in range(t.num_rows)], pa.string())
    return infos, table, sources


def _step_input(catalog: Any, refs: list[str], input_kind: str = "pairs") -> tuple[list[Any], StepInput]:
    """The inputs' infos and their rows, which nothing reads yet (trajectory files are read now)."""
    if input_kind == "trajectories":
        infos, table, sources = _read_trajectory_files(refs)
        return infos, StepInput(table=table, sources=sources)
    infos = [catalog.resolve(ref) for ref in refs]
    return infos, StepInput(catalog=catalog, infos=infos)


def _seed_rows(source: StepInput, extras: list[pa.Field]) -> Iterator[pa.Table]:
    """The seed pairs (``--with-input``) a batch at a time, in the generated pairs' columns:
    canonical ones, then the step's declared extras as nulls."""
    for batch in source.batches(_runner.STREAM_ROWS, columns=list(PAIR_COLUMNS)):
        batch = batch.cast(PAIR_SCHEMA)
        for extra in extras:
            batch = batch.append_column(extra, pa.nulls(batch.num_rows, extra.type))
        yield batch


def _seeds_used(run: Executed, ids: pa.ChunkedArray, failed: pa.Table) -> tuple[int, int]:
    """(seeds some generated pair names as a parent and that did not fail, seeds that
    failed), from the ids alone."""
    failed_rows = pc.unique(failed.column("row")).to_numpy()
    failed_mask = np.zeros(len(ids), dtype=bool)
    failed_mask[failed_rows] = True
    if run.rows:
        parents = pc.unique(pc.list_flatten(run.column("parent_ids")))
        named = pc.is_in(ids, value_set=parents).to_numpy(zero_copy_only=False)
    else:
        named = np.zeros(len(ids), dtype=bool)
    return int((named & ~failed_mask).sum()), len(failed_rows)


def _reasons_by_row(failed: pa.Table, n: int) -> pa.Array:
    """One reason per input row: the step's failure reason, null where it scored the row."""
    at = np.full(n, -1, dtype=np.int64)
    at[failed.column("row").to_numpy()] = np.arange(failed.num_rows)
    reasons = failed.column("reason").cast(pa.string()).combine_chunks()
    return reasons.take(pa.array(at, mask=at < 0))


def _verdicts(scores: pa.Table, decision: Decision, step: str) -> pa.Table:
    """The columns a filter adds to every row: its scores, then ``<step>_action`` and ``<step>_reason``."""
    return (scores.append_column(f"{step}_action", decision.action.cast(pa.string()))
            .append_column(f"{step}_reason", decision.reason.cast(pa.string())))


def filtered_batches(source: StepInput | pa.Table, verdicts: pa.Table, decision: Decision,
                     failed_mask: np.ndarray, batch_rows: int | None = None) -> Iterator[pa.Table]:
    """A filter's output a batch at a time: each input batch with its rows' ``verdicts``
    attached (replacing those of an earlier run of the same filter) and the decision
    applied, failed rows left out. Only one batch of the input is in memory."""
    start = 0
    for batch in StepInput.of(source).batches(batch_rows or _runner.STREAM_ROWS):
        rows = batch.num_rows
        annotated = batch.drop_columns([c for c in verdicts.column_names if c in batch.column_names])
        for column in verdicts.column_names:
            annotated = annotated.append_column(column, verdicts.column(column).slice(start, rows))
        out, _ = apply_decision(annotated, decision.slice(start, rows), failed_mask[start:start + rows])
        start += rows
        yield out


def _id_column(table: pa.Table) -> str:
    return "pair_id" if "pair_id" in table.column_names else "trajectory_id"


def _usage_lineage(usage: dict[str, Any]) -> dict[str, Any]:
    # Each model is listed by the role it played, as the step's LLM maps (or its reward-model
    # judge) reported it: a judge's verdicts are not generated text.
    return {"models": sorted(set(usage.get("models", []))), "judges": sorted(set(usage.get("judges", []))),
            "usage": {k: v for k, v in usage.items() if k not in ("models", "judges")}}


def _refuse_overwriting_an_input(name: str, refs: Sequence[str], verb: str) -> None:
    """``--name`` equal to an input's dataset would make that input's latest version this
    step's output alone (the seeds would silently drop out of ``name``)."""
    for ref in refs:
        if ref.split("@", 1)[0] == name:
            raise PrefabError(f"--name {name} is also an input ({ref}): its latest version would become the "
                              f"{verb} output alone; choose another --name (e.g. --name {name}-{verb})")


class MissingColumnError(PrefabError):
    """An input lacks a column the step declares it reads."""


def check_reads(spec: Any, columns: Sequence[str], refs: Sequence[str]) -> None:
    """Refuse, before any work, an input without a column the step reads (``reads=``)."""
    from factory.steps.registry import missing_columns

    missing = missing_columns(spec, list(columns))
    if missing:
        verb = "generate" if spec.kind == "generator" else "filter"
        raise MissingColumnError(f"{verb} {spec.name} reads column {missing[0]!r}, which {', '.join(refs)} "
                                 f"lacks (its columns: {', '.join(columns)}); give it an input that has it")


def _step_identity(prepared: Any, catalog: Any, refs: Sequence[str], seed: int) -> StepIdentity:
    return identify(prepared, exact_inputs(prepared, refs, catalog), seed)


@dataclass
class StoredScores:
    """A filter's stored scores for one input version."""

    table: pa.Table  # one row per input row, sorted by "row", the step's columns prefixed "<step>_"
    version: str  # the ref of the version that stored them
    stats: dict  # that version's lineage "stats"
    lineage: dict = field(default_factory=dict, repr=False)  # that version's whole lineage


def _stored_under(catalog: Any, key: str) -> StoredScores | None:
    found = catalog.find_scores(key)
    if found is None:
        return None
    info, table = found
    order = pa.compute.sort_indices(table, [("row", "ascending")])
    lineage = info.lineage or {}
    return StoredScores(table.take(order), info.ref, dict(lineage.get("stats") or {}), dict(lineage))


def find_stored_scores(step: str, ref: str, *, settings: dict | None = None, seed: int = 0,
                       backend: Any = None, home: str | Path | None = None) -> StoredScores | None:
    """The scores a run of filter ``step`` with these settings, seed and backend stored for
    exactly ``ref`` (found by the run's :class:`~factory.steps.identity.StepIdentity`), or None.

    Nothing is computed or sent; ``backend`` (an object or a spec) only names the judge.
    """
    from factory.catalog import Catalog

    catalog = Catalog(home)
    prepared = prepare("filter", step, settings, backend, home=catalog.home)
    pin_refs(prepared, catalog)
    identity = _step_identity(prepared, catalog, [ref], seed)
    return _stored_under(catalog, identity.key("scores"))


def plan(kind: str, step: str, from_: str | Sequence[str], *, settings: dict[str, Any] | None = None,
         backend: Any = None, home: str | Path | None = None) -> dict[str, Any]:
    """What a run would do, validated, without running it (``--dry-run``)."""
    from factory.catalog import Catalog

    catalog = Catalog(home)
    prepared = prepare(kind, step, settings, backend, home=catalog.home)  # type: ignore[arg-type]
    pin_refs(prepared, catalog)
    if prepared.spec.input_kind == "trajectories":
        infos, _, _ = _read_trajectory_files(_refs(from_))
    else:
        infos = [catalog.resolve(ref) for ref in _refs(from_)]
        for info in infos:
            check_reads(prepared.spec, catalog.schema(info).names, [info.ref])
    return {"step": step, "kind": kind, "step_version": prepared.spec.version,
            "inputs": [{"ref": i.ref, "rows": i.rows} for i in infos],
            "rows_in": sum(i.rows for i in infos), "params": as_dict(prepared.params),
            "params_hash": prepared.params_hash, "backend": prepared.spec.backend,
            "batch_rows": prepared.spec.batch_rows}


def generate(
    step: str,
    from_: str | Sequence[str],
    name: str,
    *,
    settings: dict[str, Any] | None = None,
    backend: Any = None,
    seed: int = 0,
    with_input: bool = False,
    message: str = "",
    home: str | Path | None = None,
    progress: bool | None = None,
    lineage_extra: dict[str, Any] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run generator ``step`` on the seed pairs of ``from_`` and commit its pairs as ``name``.

    ``settings`` are the step's parameters (strings as from ``--set``, or typed values).
    With ``with_input`` the new version holds the seed pairs followed by the new ones.

    Memory: the seeds are read from the catalog a batch at a time (a row-local step) or
    memory-mapped (a whole-table step, see :func:`~factory.steps.runner.run_step`); the
    generated pairs go to the work folder as they are made, then are stamped and streamed
    into the commit a batch at a time, the seeds first with ``with_input``. Whole-run
    figures (seeds used, failures, provenance sources) come from id columns alone.
    """
    from factory.catalog import Catalog

    started = time.monotonic()
    catalog = Catalog(home)
    prepared = prepare("generator", step, settings, backend, home=catalog.home)
    if prepared.spec.input_kind != "trajectories":
        _refuse_overwriting_an_input(name, _refs(from_), "generate")
    pin_refs(prepared, catalog)
    infos, source = _step_input(catalog, _refs(from_), prepared.spec.input_kind)
    identity = _step_identity(prepared, catalog, _refs(from_), seed)
    refs = [i.ref for i in infos]
    check_reads(prepared.spec, source.column_names, refs)
    file_inputs = [{"file": i.ref, "sha256": i.sha256, "rows": i.rows} for i in infos if isinstance(i, FileInput)]
    if with_input and file_inputs:
        raise PrefabError(f"--with-input needs pair versions as input; {step} reads trajectory files")
    parents = [i.ref for i in infos if not isinstance(i, FileInput)]
    ctx = StepContext(step, prepared.params, seed=seed, run_id=new_run_id(), home=catalog.home,
                      backend=prepared.backend, progress=progress)
    work = run_work_dir(catalog, identity.key("run"), engine)
    run = run_step(prepared, source, ctx, resume_dir=work, engine=engine, ray_address=ray_address)
    out_schema = run.schema
    if len(out_schema):
        check_generated(prepared.spec, out_schema.names)
    side = failed_side_table(run.failed, source, step)
    rows_generated = run.rows
    if rows_generated == 0 and not (with_input and source.num_rows):
        why = (run.stats or {}).get("no_pairs_reason")
        if why:  # the step knows the real cause and the setting to change
            raise PrefabError(f"{step} made no pairs from {', '.join(refs)}: {why}")
        reasons = sorted(set(side.column("reason").to_pylist()))[:3]
        raise PrefabError(f"{step} made no pairs from {', '.join(refs)} ({source.num_rows} seed rows"
                          + (f"; failures: {'; '.join(reasons)}" if reasons else "") + ")")
    id_column = _id_column(source)
    ids = pa.table({id_column: source.column(id_column)})
    used, seeds_failed = _seeds_used(run, ids.column(id_column), run.failed)
    counts = {
        "rows_in": source.num_rows,
        "rows_generated": rows_generated,
        "rows_failed": side.num_rows,
        "seeds_used": used,
        "seeds_failed": seeds_failed,
        "seeds_without_output": source.num_rows - used - seeds_failed,
    }
    lineage = {
        "command": "generate",
        "step": {"name": step, "kind": "generator", "version": prepared.spec.version,
                 "params_hash": prepared.params_hash,
                 "template_hash": prepared.spec.template_hash if run.usage else None},
        "params": as_dict(prepared.params),
        "run_id": ctx.run_id,
        "seed": seed,
        "engine": engine,
        "with_input": with_input,
        "step_key": identity.key("run"),
        "step_identity": identity.lineage(),
        **({"input_files": file_inputs} if file_inputs else {}),
        **counts,
        "stats": run.stats,
        **_usage_lineage(run.usage),
        "wall_seconds": round(time.monotonic() - started, 3),
        **(lineage_extra or {}),
    }
    sources = source.sources()
    generated = (stamp_generated(part, ids, sources, prepared, ctx, used_llm=bool(run.usage))
                 for part in run.outputs())
    out: Iterator[pa.Table] = generated
    if with_input:
        extras = [out_schema.field(c) for c in prepared.spec.columns if c in out_schema.names]
        out = itertools.chain(_seed_rows(source, extras), generated)
    info = catalog.commit(name, out, message=message or f"generate {step} from {', '.join(refs)}",
                          lineage=lineage, parents=parents, failures=side)
    clear_work_dir(work)
    return {"ref": info.ref, "dataset": name, "version": info.version, "step": step, "kind": "generator",
            "inputs": refs, "rows_out": info.rows, **counts, "stats": run.stats, "run_id": ctx.run_id,
            "unchanged": bool(getattr(info, "unchanged", False))}


def filter(  # noqa: A001 - factory.filter is the public name the CLI mirrors
    step: str,
    from_: str | Sequence[str],
    name: str,
    *,
    settings: dict[str, Any] | None = None,
    backend: Any = None,
    seed: int = 0,
    message: str = "",
    home: str | Path | None = None,
    progress: bool | None = None,
    lineage_extra: dict[str, Any] | None = None,
    engine: str = "local",
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Score every pair of ``from_`` with filter ``step``, decide, and commit the kept pairs.

    The scores of every input row (dropped ones included) are stored with the new version;
    a later run that changes only threshold parameters reuses them instead of recomputing.

    Memory: the step sees its input as :func:`~factory.steps.runner.run_step` gives it (a
    batch at a time, or memory-mapped whole); the scores (one small row per input row),
    the decision and the ids are whole; the output is made by reading the input again a
    batch at a time, attaching that batch's scores and verdicts and applying them
    (:func:`~factory.steps.runner.apply_decision`), straight into the commit.
    """
    from factory.catalog import Catalog

    started = time.monotonic()
    catalog = Catalog(home)
    prepared = prepare("filter", step, settings, backend, home=catalog.home)
    spec = prepared.spec
    _refuse_overwriting_an_input(name, _refs(from_), "filter")
    pin_refs(prepared, catalog)
    identity = _step_identity(prepared, catalog, _refs(from_), seed)
    infos, source = _step_input(catalog, _refs(from_))
    refs = [i.ref for i in infos]
    check_reads(spec, source.column_names, refs)
    n = source.num_rows
    score_key = identity.key("scores")
    ctx = StepContext(step, prepared.params, seed=seed, run_id=new_run_id(), home=catalog.home,
                      backend=prepared.backend, progress=progress)
    stored = _stored_under(catalog, score_key)
    work = run_work_dir(catalog, score_key, engine)
    usage: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    # Stored scores with failed rows are not reused: a failure may have been transient (a
    # timeout), and recomputing through the request cache re-sends only those requests.
    if (stored is not None and stored.table.num_rows == n
            and stored.table.column("failed_reason").null_count == stored.table.num_rows):
        table = stored.table
        bookkeeping = {"row", "pair_id", "failed_reason", f"{step}_action", f"{step}_reason"}
        scores = table.drop_columns([c for c in table.column_names if c in bookkeeping])
        failed_reason = table.column("failed_reason")
        # the models that made the scores are those of the run that stored them
        usage = {"models": stored.lineage.get("models", []), "judges": stored.lineage.get("judges", []),
                 "reused_from": stored.version}
        stats = stored.stats
        reused = True
    else:
        result = execute(prepared, source, ctx, resume_dir=work, engine=engine, ray_address=ray_address)
        scores = prefixed_scores(result.table, step)
        failed = result.failed if result.failed is not None else FAILED_SCHEMA.empty_table()
        failed_reason = _reasons_by_row(failed, n)
        usage, stats = result.usage, result.stats
        reused = False
    own_names = scores.rename_columns([c.removeprefix(f"{step}_") for c in scores.column_names])
    decision = spec.decide(own_names, prepared.params)
    check_decision(decision, n, step)
    failed_mask = pa.compute.is_valid(failed_reason).to_numpy(zero_copy_only=False)
    counts = decision_counts(decision, failed_mask)
    failed_rows = pa.array(np.flatnonzero(failed_mask), pa.int64())
    failed_table = pa.table({"row": failed_rows,
                             "reason": failed_reason.take(failed_rows) if len(failed_rows) else pa.array([], pa.string())})
    side = failed_side_table(failed_table, source, step)
    verdicts = _verdicts(scores, decision, step)
    stored_scores = pa.table({"row": pa.array(np.arange(n, dtype=np.int64)), "pair_id": source.column("pair_id"),
                              "failed_reason": failed_reason})
    for column in verdicts.column_names:
        stored_scores = stored_scores.append_column(column, verdicts.column(column))
    if counts["rows_kept"] == 0:
        raise PrefabError(f"filter {step} would keep none of the {n} rows of {', '.join(refs)}; "
                          "nothing committed (check the thresholds)")
    assert counts["rows_in"] == counts["rows_kept"] + counts["rows_dropped"] + counts["rows_failed"]
    lineage = {
        "command": "filter",
        "step": {"name": step, "kind": "filter", "version": spec.version,
                 "params_hash": prepared.params_hash, "template_hash": spec.template_hash},
        "params": as_dict(prepared.params),
        "run_id": ctx.run_id,
        "seed": seed,
        "engine": engine,
        "score_key": score_key,
        "step_identity": identity.lineage(),
        "scores_reused": reused,
        "rows_filtered": counts["rows_dropped"],
        **counts,
        "stats": stats,
        **_usage_lineage(usage),
        "wall_seconds": round(time.monotonic() - started, 3),
        **(lineage_extra or {}),
    }
    out = filtered_batches(source, verdicts, decision, failed_mask)
    info = catalog.commit(name, out, message=message or f"filter {step} from {', '.join(refs)}",
                          lineage=lineage, parents=refs, failures=side,
                          attachments={"scores": stored_scores})
    clear_work_dir(work)
    return {"ref": info.ref, "dataset": name, "version": info.version, "step": step, "kind": "filter",
            "inputs": refs, "rows_out": info.rows, **counts, "scores_reused": reused, "stats": stats,
            "score_columns": scores.column_names, "run_id": ctx.run_id,
            "unchanged": bool(getattr(info, "unchanged", False))}
