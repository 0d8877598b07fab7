"""The step runner: everything around a step that no step does by hand.

It validates parameters before any work, feeds the step its input (in batches when the
step is row-local), stamps provenance on every generated row, applies a filter's decision
to its stored scores, reconciles counts, and commits one catalog version whose lineage
names the input versions. Failed rows go to the catalog's side table with their reason.

Interrupted runs lose nothing: a row-local step's finished batches are kept under
``home/steps/<key>/`` and a rerun of the same command starts after them; a filter's
scores are stored with the version and reused when only a threshold changes.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.home import resolve_home
from factory.steps.context import FAILED_SCHEMA, Decision, StepContext, StepResult
from factory.steps.params import build_params, model_fields, params_hash, ref_fields
from factory.steps.registry import StepKind, StepSpec, get_step
from factory.steps.sources import file_pin, resolve_model, resolve_source
from schemas.errors import PrefabError
from schemas.pairs import PAIR_COLUMNS, PAIR_SCHEMA, PROVENANCE_TYPE, content_ids


class StepOutputError(PrefabError):
    """A step returned a table that breaks its contract (a bug in the step, not the data)."""


@dataclass
class Prepared:
    """A step resolved and its parameters validated: nothing has run or been paid for."""

    spec: StepSpec
    params: Any
    backend: Any
    # files and model folders the parameters name -> their pin (set by pin_refs)
    pins: dict[str, str] = field(default_factory=dict)

    @property
    def params_hash(self) -> str:
        return params_hash(self.params)


def prepare(kind: StepKind, name: str, settings: dict[str, Any] | None = None,
            backend: Any = None, home: str | Path | None = None) -> Prepared:
    """Resolve the step and validate its settings; fails in one line before any work.

    A backend given as a spec string caches its requests under ``home`` (as the CLI and
    recipes do), unless the spec names a ``cache`` itself."""
    spec = get_step(name, kind)
    params = build_params(spec.params, settings or {}, step=name)
    if isinstance(backend, str):
        backend = backend_for(backend, home)
    if spec.backend == "required" and backend is None:
        from factory.steps.context import MissingBackendError
        from factory.steps.llm import missing_backend_message

        raise MissingBackendError(missing_backend_message(kind, name))
    return Prepared(spec, params, backend)


def backend_for(spec: str, home: str | Path | None, **overrides: Any) -> Any:
    """A backend from its spec, its request cache under ``home`` unless the spec sets ``cache``."""
    from factory.llm import backend_from_spec, parse_spec

    _, _, options = parse_spec(spec)
    if "cache" not in options:
        overrides.setdefault("cache", resolve_home(home) / "llm_cache.duckdb")
    return backend_from_spec(spec, **overrides)


def pin_refs(prepared: Prepared, catalog: Any) -> dict[str, str]:
    """Pin the data and models the parameters name, so the step identity names them exactly.

    ``ref=True`` parameters: catalog refs are rewritten in place (``eval`` -> ``eval@3``),
    files are pinned by path, size and mtime. ``model=True`` parameters: registered models
    are rewritten (``rm`` -> ``rm@3``), model folders pinned like files. A name that is both
    a local path and in the catalog is refused (see :mod:`factory.steps.sources`).
    Returns (and keeps on ``prepared.pins``) the file and folder pins.
    """
    pins: dict[str, str] = {}
    changes: dict[str, Any] = {}
    for names, resolve in ((ref_fields(prepared.params), resolve_source),
                           (model_fields(prepared.params), resolve_model)):
        for name in names:
            value = getattr(prepared.params, name)
            if value is None:
                continue
            items = value if isinstance(value, list) else [value]
            pinned = []
            for item in items:
                source = resolve(item, catalog)
                if source.path is not None:
                    pins[item] = file_pin(source.path)
                    pinned.append(item)
                else:
                    pinned.append(source.ref)
            changes[name] = pinned if isinstance(value, list) else pinned[0]
    if changes:
        prepared.params = dataclasses.replace(prepared.params, **changes)
    prepared.pins = pins
    return pins


def exact_inputs(prepared: Prepared, refs: Sequence[str], catalog: Any) -> list[str]:
    """The step's inputs as its identity names them: exact versions, or pinned files."""
    if prepared.spec.input_kind == "trajectories":
        return [file_pin(ref) for ref in refs]
    return [catalog.resolve(ref).ref for ref in refs]


# ---- running a step on a table (pure: no catalog) ---------------------------------------


def _concat(tables: Sequence[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t is not None]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")


class _WholeTableLine:
    """A whole-table step runs as one call: a row bar would sit at 0/N until the end (the
    step reports its own phases), so say what runs and, at the end, how long it took."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        import sys

        self.total, self.desc, self.enabled = total, desc, enabled
        self.started = time.monotonic()
        if enabled:
            print(f"{desc}: {total:,} rows as one whole-table pass", file=sys.stderr, flush=True)

    def update(self, rows: int) -> None:
        import sys

        if self.enabled:
            seconds = time.monotonic() - self.started
            rate = f", {rows / seconds:,.0f} rows/s" if seconds > 0 else ""
            print(f"{self.desc}: {rows:,} rows done in {seconds:.1f} s{rate}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


def _progress_bar(total: int, desc: str, enabled: bool | None, *, whole_table: bool = False) -> Any:
    import sys

    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    if whole_table:
        return _WholeTableLine(total, desc, enabled)
    return tqdm(total=total, desc=desc, unit="row", dynamic_ncols=True, disable=not enabled)


def _sum_stats(into: dict[str, Any], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            into[key] = into.get(key, 0) + value
        elif isinstance(value, dict):
            _sum_stats(into.setdefault(key, {}), value)
        else:
            into[key] = value


def run_batch(spec: StepSpec, batch: pa.Table, start: int, ctx: StepContext) -> tuple[pa.Table, pa.Table, dict, dict]:
    """One batch through the step, checked: (output, failed rows in input positions, stats, usage)."""
    result = spec.fn(batch, ctx)
    if not isinstance(result, StepResult):
        raise StepOutputError(f"{spec.name} returned {type(result).__name__}, not StepResult")
    failed = result.failed if result.failed is not None else FAILED_SCHEMA.empty_table()
    failed = failed.set_column(0, "row", pc.add(failed["row"].cast(pa.int64()), start))
    if spec.kind == "filter" and result.table.num_rows != batch.num_rows:
        raise StepOutputError(f"filter {spec.name} returned {result.table.num_rows} score rows "
                              f"for {batch.num_rows} input rows")
    return result.table, failed, result.stats, result.usage


class _RayBatch:
    """A Ray Data worker's job: run one batch and write its results as Parquet beside the
    others, the same files an in-process run keeps for resuming; return only where."""

    def __init__(self, spec: StepSpec, ctx: StepContext, folder: Path) -> None:
        self.spec, self.ctx, self.folder = spec, ctx, folder

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = int(batch.column("__prefab_row")[0].as_py())
        rows = batch.drop_columns(["__prefab_row"])
        if _load_batch(self.folder, start) is None:
            _save_batch(self.folder, start, *run_batch(self.spec, rows, start, self.ctx))
        return pa.table({"start": [start], "rows": [rows.num_rows]})


def fill_on_ray(prepared: Prepared, table: pa.Table, ctx: StepContext, folder: Path,
                address: str | None = None) -> int:
    """Compute every missing batch of a row-local step with Ray Data ``map_batches``.

    Each batch is one block, so batch boundaries (and with them every result) equal the
    in-process run's. Returns the number of batches computed.
    """
    try:
        import ray
    except ImportError:
        raise PrefabError("--engine ray needs Ray: pip install 'prefab[ray]'") from None
    spec = prepared.spec
    batch_rows = spec.batch_rows or max(table.num_rows, 1)
    starts = [s for s in range(0, table.num_rows, batch_rows) if _load_batch(folder, s) is None]
    if not starts:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    indexed = table.append_column("__prefab_row", pa.array(range(table.num_rows), pa.int64()))
    blocks = [indexed.slice(s, batch_rows) for s in starts]
    worker_ctx = dataclasses.replace(ctx, backend=None, progress=False)
    done = ray.data.from_arrow(blocks).map_batches(
        _RayBatch(spec, worker_ctx, folder), batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
    ).take_all()
    return len(done)


def execute(prepared: Prepared, table: pa.Table, ctx: StepContext, *,
            resume_dir: Path | None = None, engine: str = "local", ray_address: str | None = None) -> StepResult:
    """Run the step over ``table`` (batch by batch when it is row-local).

    With ``resume_dir`` every finished batch is written there first, and batches already
    there are read back instead of recomputed, so an interrupted run resumes. With
    ``engine="ray"`` a row-local step's batches are computed by Ray Data workers into
    ``resume_dir`` first; steps that need the whole table, or an LLM backend object, run
    here (LLM steps are bound by the endpoint, not this machine), a whole-table step that
    declares ``embeds`` after Ray actors have put its embeddings in the cache.
    """
    spec = prepared.spec
    ran_on_ray = False
    if engine == "ray" and spec.batch_rows is not None and ctx.backend is None:
        if resume_dir is None:
            raise PrefabError("--engine ray needs a work folder for the workers' Parquet files")
        say_resuming(spec, resume_dir, list(range(0, table.num_rows, spec.batch_rows)) or [0])
        fill_on_ray(prepared, table, ctx, resume_dir, ray_address)
        ran_on_ray = True
    elif engine == "ray" and spec.embeds is not None:
        # Whole-table: Ray actors fill the embedding cache, then the step runs here on cached vectors.
        from factory.embed.ray_embed import precompute_for_step

        precompute_for_step(spec.embeds, table, ctx, ray_address)
    elif engine not in ("local", "ray"):
        raise PrefabError(f"unknown engine {engine!r} (known: local, ray)")
    if spec.backend != "none":
        # Before any batch: the backend the parameters need, valid templates, and a whole-run
        # cost estimate within --max-cost (cached requests free).
        from factory.steps.llm import preflight

        preflight(spec, prepared.params, table, ctx)
    batch_rows = spec.batch_rows or max(table.num_rows, 1)
    starts = list(range(0, table.num_rows, batch_rows)) or [0]
    if resume_dir is not None and not ran_on_ray:
        say_resuming(spec, resume_dir, starts)
    outputs, failures, stats, usage = [], [], {}, {}
    bar = _progress_bar(table.num_rows, f"{spec.kind} {spec.name}", ctx.progress,
                        whole_table=spec.batch_rows is None)
    done = 0
    try:
        for start in starts:
            batch = table.slice(start, batch_rows)
            cached = _load_batch(resume_dir, start) if resume_dir else None
            if cached is None:
                cached = run_batch(spec, batch, start, ctx)
                if resume_dir is not None:
                    _save_batch(resume_dir, start, *cached)
            out, failed, batch_stats, batch_usage = cached
            outputs.append(out)
            failures.append(failed)
            _sum_stats(stats, batch_stats)
            _sum_stats(usage, batch_usage)
            bar.update(batch.num_rows)
            done += 1
    except KeyboardInterrupt:
        if resume_dir is not None and done:
            import sys

            print(f"prefab: {spec.name} stopped after {done} of {len(starts)} batches; they are kept, and "
                  "the same command resumes after them", file=sys.stderr)
        raise
    finally:
        bar.close()
    return StepResult(_concat(outputs), _concat(failures) if failures else None, stats, usage)


def say_resuming(spec: StepSpec, folder: Path, starts: Sequence[int]) -> int:
    """Tell stderr when an interrupted run's batches are found (the run then starts after
    them); returns how many there are."""
    kept = sum((folder / f"rows-{start:012d}").is_dir() for start in starts) if folder.is_dir() else 0
    if kept:
        import sys

        verb = "generate" if spec.kind == "generator" else "filter"
        print(f"prefab: resuming {verb} {spec.name}: {kept} of {len(starts)} batches kept from an interrupted "
              "run", file=sys.stderr, flush=True)
    return kept


def _save_batch(folder: Path, start: int, table: pa.Table, failed: pa.Table,
                stats: dict[str, Any], usage: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"rows-{start:012d}"
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    pq.write_table(table, tmp / "out.parquet")
    pq.write_table(failed, tmp / "failed.parquet")
    (tmp / "stats.json").write_text(json.dumps({"stats": stats, "usage": usage}, default=str))
    try:
        tmp.rename(final)  # a batch is there whole or not at all
    except OSError:  # another worker finished the same batch first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _load_batch(folder: Path, start: int) -> tuple[pa.Table, pa.Table, dict, dict] | None:
    final = folder / f"rows-{start:012d}"
    if not final.is_dir():
        return None
    meta = json.loads((final / "stats.json").read_text())
    return (pq.read_table(final / "out.parquet"), pq.read_table(final / "failed.parquet"),
            meta["stats"], meta["usage"])


# ---- generators: provenance and ids ------------------------------------------------------


def with_ids(table: pa.Table) -> pa.Table:
    """Add (or recompute) ``pair_id`` and ``prompt_id`` from content."""
    pair_ids, prompt_ids = content_ids(table)
    for name, column in (("pair_id", pair_ids), ("prompt_id", prompt_ids)):
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table


def stamp_generated(out: pa.Table, inputs: pa.Table, input_sources: pa.Array, prepared: Prepared,
                    ctx: StepContext, *, used_llm: bool = True) -> pa.Table:
    """Canonical generated rows with provenance filled in by the runner."""
    spec = prepared.spec
    missing = [c for c in ("prompt", "chosen", "rejected", "parent_ids") if c not in out.column_names]
    if missing:
        raise StepOutputError(f"generator {spec.name} output lacks column(s) {', '.join(missing)}")
    n = out.num_rows
    id_column = "pair_id" if "pair_id" in inputs.column_names else "trajectory_id"
    source_of = dict(zip(inputs.column(id_column).to_pylist(), input_sources.to_pylist(), strict=True))
    parents = out.column("parent_ids").to_pylist()
    sources = [source_of.get(p[0]) if p else None for p in parents]
    model = getattr(prepared.backend, "model", None)
    provenance = {
        "source": sources,
        "source_file": [None] * n,
        "source_line": [None] * n,
        "step": [spec.name] * n,
        "step_version": [spec.version] * n,
        "params_hash": [prepared.params_hash] * n,
        "model": [model] * n,
        # a rules-mode run of a step that also has LLM templates used none of them
        "template_hash": [spec.template_hash if used_llm else None] * n,
        "seed": [ctx.seed] * n,
        "run_id": [ctx.run_id] * n,
        "parent_ids": parents,
        "generated": out.column("generated").to_pylist() if "generated" in out.column_names else [None] * n,
        "method": out.column("method").to_pylist() if "method" in out.column_names else [None] * n,
    }
    struct = pa.StructArray.from_arrays(
        [pa.array(provenance[f.name], f.type) for f in PROVENANCE_TYPE], fields=list(PROVENANCE_TYPE)
    )
    columns = {}
    for f in PAIR_SCHEMA:
        if f.name == "provenance":
            columns[f.name] = struct
        elif f.name in out.column_names:
            columns[f.name] = out.column(f.name).cast(f.type)
        elif f.name == "tie":
            columns[f.name] = pa.array([False] * n, pa.bool_())
        elif f.name in ("pair_id", "prompt_id"):
            columns[f.name] = pa.array([""] * n, pa.string())
        else:
            columns[f.name] = pa.nulls(n, f.type)
    stamped = with_ids(pa.table(columns, schema=PAIR_SCHEMA))
    for name in spec.columns:  # declared extras (e.g. rubrics' "rubric") travel with the pairs
        if name in out.column_names:
            stamped = stamped.append_column(name, out.column(name))
    return stamped


# ---- filters: scores and decisions --------------------------------------------------------


def prefixed_scores(scores: pa.Table, step: str) -> pa.Table:
    names = [c if c.startswith(f"{step}_") else f"{step}_{c}" for c in scores.column_names]
    return scores.rename_columns(names)


def check_decision(decision: Decision, n: int, step: str) -> None:
    if len(decision.action) != n or len(decision.reason) != n:
        raise StepOutputError(f"filter {step}: decision covers {len(decision.action)} rows, input has {n}")
    bad = set(pc.unique(decision.action).to_pylist()) - {"keep", "drop", "flip", "weight"}
    if bad:
        raise StepOutputError(f"filter {step}: unknown action(s) {sorted(map(str, bad))}")


def apply_decision(table: pa.Table, decision: Decision, failed_rows: np.ndarray) -> tuple[pa.Table, dict[str, int]]:
    """Drop, flip and reweight rows as decided; failed rows are left out (they are in the side table)."""
    n = table.num_rows
    action = np.asarray(decision.action.to_pylist(), dtype=object)
    action[failed_rows] = "failed"
    flip = action == "flip"
    reweight = action == "weight"
    frame = pl.from_arrow(table)
    if flip.any():
        mask = pl.Series(flip)
        frame = frame.with_columns(
            pl.when(mask).then(pl.col("rejected")).otherwise(pl.col("chosen")).alias("chosen"),
            pl.when(mask).then(pl.col("chosen")).otherwise(pl.col("rejected")).alias("rejected"),
        )
        if "votes" in frame.columns:
            frame = frame.with_columns(
                pl.when(mask).then(pl.col("votes").list.eval(-pl.element())).otherwise(pl.col("votes")).alias("votes")
            )
        if "attribute_scores" in frame.columns:
            swapped = pl.col("attribute_scores").list.eval(pl.struct(
                pl.element().struct.field("attribute"),
                pl.element().struct.field("rejected").alias("chosen"),
                pl.element().struct.field("chosen").alias("rejected"),
            ))
            frame = frame.with_columns(
                pl.when(mask).then(swapped).otherwise(pl.col("attribute_scores")).alias("attribute_scores")
            )
    if reweight.any() and decision.weight is not None:
        new_weight = pl.Series(decision.weight.to_numpy(zero_copy_only=False), dtype=pl.Float64)
        frame = frame.with_columns(
            pl.when(pl.Series(reweight)).then(new_weight).otherwise(pl.col("weight")).alias("weight")
        )
    keep = (action != "drop") & (action != "failed")
    out = frame.filter(pl.Series(keep)).to_arrow()
    counts = {
        "rows_in": n,
        "rows_kept": int(keep.sum()),
        "rows_dropped": int((action == "drop").sum()),
        "rows_failed": int((action == "failed").sum()),
        "rows_flipped": int(flip.sum()),
        "rows_reweighted": int(reweight.sum()),
    }
    return out, counts


def failed_side_table(failed: pa.Table, inputs: pa.Table, step: str) -> pa.Table:
    """The catalog's side table: step, pair_id, reason and the input row as JSON."""
    rows = failed.column("row").to_pylist()
    picked = inputs.take(pa.array(rows, pa.int64())) if rows else inputs.slice(0, 0)
    id_column = "pair_id" if "pair_id" in inputs.column_names else "trajectory_id"
    canonical = picked.select([c for c in picked.column_names if c in PAIR_COLUMNS or c in (
        "trajectory_id", "task_id", "instruction", "steps", "outcome")])
    raw = [json.dumps(r, ensure_ascii=False, default=str) for r in canonical.to_pylist()]
    return pa.table({
        "step": pa.array([step] * len(rows), pa.string()),
        "pair_id": picked.column(id_column).cast(pa.string()) if rows else pa.array([], pa.string()),
        "reason": failed.column("reason").cast(pa.string()),
        "raw": pa.array(raw, pa.string()),
    })


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]


def step_work_dir(home: str | Path | None, key: str) -> Path:
    return resolve_home(home) / "steps" / key


def clear_work_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)

