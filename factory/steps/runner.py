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
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from factory.home import resolve_home
from factory.steps.context import FAILED_SCHEMA, GENERATED_SCHEMA, Decision, StepContext, StepResult
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


# ---- the rows a step reads ----------------------------------------------------------------

# Rows per batch where the runner streams rows through itself (a filter's output, a
# generator's stamping): a few tens of MiB of text, whatever the version's size.
STREAM_ROWS = 16_384


def _in_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order: absent ones null, others cast (as
    ``concat_tables(promote_options="permissive")`` would have them)."""
    if table.schema.equals(schema):
        return table
    columns = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _rebatched(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of ``tables`` in consecutive batches of exactly ``rows`` (the last may be
    shorter), whatever sizes they came in: batch boundaries, and so resume keys and every
    batch's result, do not depend on how the data files were written."""
    pending: list[pa.Table] = []
    count = 0
    for table in tables:
        if table.num_rows == 0:
            continue
        pending.append(table)
        count += table.num_rows
        while count >= rows:
            joined = pa.concat_tables(pending) if len(pending) > 1 else pending[0]
            yield joined.slice(0, rows)
            pending, count = [joined.slice(rows)], count - rows
    if count:
        yield pa.concat_tables(pending) if len(pending) > 1 else pending[0]


def _mapped_copy(catalog: Any, info: Any) -> pa.Table:
    """A version's rows memory-mapped from its Arrow copy under the home (the one
    ``factory.load`` makes and reuses; ``catalog gc`` cleans it): the texts are file-backed
    pages the kernel can drop and re-read, not anonymous memory."""
    from factory.catalog.exporters import _write_arrow_stream, load_cache_path

    path = load_cache_path(catalog, info)
    if path.is_file():
        os.utime(path)  # its last use, which `catalog gc` measures the grace period from
    else:
        _write_arrow_stream(catalog, info, path, progress=False)
    return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()


class StepInput:
    """The rows a step runs on: catalog versions, read a batch at a time and never held
    whole unless a whole-table step asks (then memory-mapped), or one in-memory table
    (trajectory files, a direct call with a table).

    Rows are in input order, the versions one after another, in the schema the versions'
    schemas unify to.
    """

    def __init__(self, *, catalog: Any = None, infos: Sequence[Any] = (), table: pa.Table | None = None,
                 sources: pa.Array | None = None) -> None:
        self.catalog, self.infos, self.table, self._sources = catalog, list(infos), table, sources
        if table is not None:
            self.schema, self.num_rows = table.schema, table.num_rows
            self._schemas = [table.schema]
        else:
            self._schemas = [catalog.schema(info) for info in self.infos]
            self.schema = (self._schemas[0] if len(self._schemas) == 1
                           else pa.unify_schemas(self._schemas, promote_options="permissive"))
            self.num_rows = sum(info.rows for info in self.infos)

    @classmethod
    def of(cls, rows: pa.Table | StepInput) -> StepInput:
        return rows if isinstance(rows, StepInput) else cls(table=rows)

    @property
    def column_names(self) -> list[str]:
        return self.schema.names

    def batches(self, batch_rows: int, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        """Every row in consecutive batches of exactly ``batch_rows`` (the last may be shorter);
        only the batch being read is in memory."""
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        if self.table is not None:
            table = self.table.select(schema.names)
            for start in range(0, table.num_rows, batch_rows):
                yield table.slice(start, batch_rows)
            return

        def read() -> Iterator[pa.Table]:
            for info, own in zip(self.infos, self._schemas, strict=True):
                present = [c for c in schema.names if c in own.names]
                for batch in self.catalog.batches(info, columns=present, batch_rows=batch_rows):
                    yield _in_schema(pa.Table.from_batches([batch]), schema)

        yield from _rebatched(read(), batch_rows)

    def column(self, name: str) -> pa.ChunkedArray:
        """One column of every row (ids, say), read alone."""
        if self.table is not None:
            return self.table.column(name)
        kind = self.schema.field(name).type
        chunks = [chunk for info in self.infos
                  for chunk in self.catalog.read_table(info, columns=[name]).column(name).cast(kind).chunks]
        return pa.chunked_array(chunks, kind)

    def sources(self) -> pa.Array:
        """Each row's input (its version ref), dictionary-encoded: a small index per row."""
        if self._sources is not None:
            return self._sources
        counts = [info.rows for info in self.infos]
        indices = pa.array(np.repeat(np.arange(len(counts), dtype=np.int32), counts))
        return pa.DictionaryArray.from_arrays(indices, pa.array([i.ref for i in self.infos], pa.string()))

    def whole(self) -> pa.Table:
        """Every row at once, for a whole-table step: every column, memory-mapped from the
        versions' Arrow copies (see :func:`_mapped_copy`), so the columns a step does not
        read are never paged in and the texts it reads stay out of anonymous memory."""
        if self.table is not None:
            return self.table
        tables = [_mapped_copy(self.catalog, info) for info in self.infos]
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")

    def take(self, rows: pa.Array) -> pa.Table:
        """The rows at these positions, in that order (failed rows, say), picked in one
        streamed pass: only they are kept."""
        if self.table is not None:
            return self.table.take(rows)
        positions = np.asarray(rows.to_numpy(zero_copy_only=False), dtype=np.int64)
        if not len(positions):
            return self.schema.empty_table()
        order = np.argsort(positions, kind="stable")
        wanted = positions[order]
        picked, start = [], 0
        for batch in self.batches(STREAM_ROWS):
            lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
            if hi > lo:
                picked.append(batch.take(pa.array(wanted[lo:hi] - start)))
            start += batch.num_rows
        found = pa.concat_tables(picked)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return found.take(pa.array(inverse))


# ---- running a step on its rows -----------------------------------------------------------


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


def run_batch(spec: StepSpec, batch: pa.Table, start: int, ctx: StepContext
              ) -> tuple[pa.Table | Iterator[pa.Table], pa.Table, dict, dict]:
    """One batch through the step, checked: (output, failed rows in input positions, stats,
    usage). A generator's output may be an iterator of chunks (see :class:`StepResult`)."""
    result = spec.fn(batch, ctx)
    if not isinstance(result, StepResult):
        raise StepOutputError(f"{spec.name} returned {type(result).__name__}, not StepResult")
    if not isinstance(result.table, pa.Table) and (spec.kind == "filter" or not isinstance(result.table, Iterator)):
        raise StepOutputError(f"{spec.name} returned a {type(result.table).__name__} as its table; a filter returns "
                              "a pyarrow Table, a generator a Table or an iterator of Tables")
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
        if not _batch_folder(self.folder, start).is_dir():
            _save_batch(self.folder, start, *run_batch(self.spec, rows, start, self.ctx))
        return pa.table({"start": [start], "rows": [rows.num_rows]})


def fill_on_ray(prepared: Prepared, rows: pa.Table | StepInput, ctx: StepContext, folder: Path,
                address: str | None = None) -> int:
    """Compute every missing batch of a row-local step with Ray Data ``map_batches``.

    Each batch is one block, so batch boundaries (and with them every result) equal the
    in-process run's. The driver reads the input a batch at a time and puts each missing
    batch in Ray's object store (which spills to disk), so it never holds the input whole.
    Returns the number of batches computed.
    """
    try:
        import ray
    except ImportError:
        raise PrefabError("--engine ray needs Ray: pip install 'prefab[ray]'") from None
    spec = prepared.spec
    source = StepInput.of(rows)
    batch_rows = spec.batch_rows or max(source.num_rows, 1)
    missing = {s for s in range(0, source.num_rows, batch_rows) if not _batch_folder(folder, s).is_dir()}
    if not missing:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    blocks = []
    for start, batch in zip(range(0, source.num_rows, batch_rows), source.batches(batch_rows), strict=True):
        if start in missing:
            row = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))
            blocks.append(ray.put(batch.append_column("__prefab_row", row)))
    worker_ctx = dataclasses.replace(ctx, backend=None, progress=False)
    done = ray.data.from_arrow_refs(blocks).map_batches(
        _RayBatch(spec, worker_ctx, folder), batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
    ).take_all()
    return len(done)


@dataclass
class Executed:
    """A step's run over its input: failures, stats and usage in memory; its output either
    in memory (a whole-table step's, or any step's without a work folder) or left in the
    work folder's batch files, read back a batch at a time by :meth:`outputs`."""

    failed: pa.Table
    stats: dict[str, Any]
    usage: dict[str, Any]
    tables: list[pa.Table] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def schema(self) -> pa.Schema:
        """The outputs' columns, types unified over the batches."""
        schemas = [t.schema for t in self.tables] + [pq.read_schema(f) for f in self.files]
        schemas = [s.remove_metadata() for s in schemas if len(s)]
        if not schemas:
            return pa.schema([])
        return pa.unify_schemas(schemas, promote_options="permissive")

    @property
    def rows(self) -> int:
        return sum(t.num_rows for t in self.tables) + sum(pq.ParquetFile(f).metadata.num_rows for f in self.files)

    def column(self, name: str) -> pa.ChunkedArray:
        """One output column (ids, say), read alone from each batch."""
        kind = self.schema.field(name).type
        parts = [t.column(name) if name in t.column_names else pa.nulls(t.num_rows, kind) for t in self.tables]
        for f in self.files:
            parts.append(pq.read_table(f, columns=[name]).column(name) if name in pq.read_schema(f).names
                         else pa.nulls(pq.ParquetFile(f).metadata.num_rows, kind))
        return pa.chunked_array([c for part in parts for c in pa.chunked_array(part).cast(kind).chunks], kind)

    def outputs(self, batch_rows: int | None = None) -> Iterator[pa.Table]:
        """Every output row in batches of ``batch_rows`` (default :data:`STREAM_ROWS`), all in
        :attr:`schema`."""
        schema = self.schema
        batch_rows = batch_rows or STREAM_ROWS

        def read() -> Iterator[pa.Table]:
            for table in self.tables:
                yield _in_schema(table, schema)
            for f in self.files:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows):
                    yield _in_schema(pa.Table.from_batches([batch]), schema)

        yield from _rebatched(read(), batch_rows)

    def whole(self) -> pa.Table:
        return _concat(self.tables + [pq.read_table(f) for f in self.files])


def execute(prepared: Prepared, table: pa.Table | StepInput, ctx: StepContext, *,
            resume_dir: Path | None = None, engine: str = "local", ray_address: str | None = None) -> StepResult:
    """Run the step over ``table`` (batch by batch when it is row-local) and gather its
    output in memory: a filter's scores, or a generator's pairs for a direct call. See
    :func:`run_step`, which leaves a generator's output in the work folder instead."""
    run = run_step(prepared, table, ctx, resume_dir=resume_dir, engine=engine, ray_address=ray_address, keep=True)
    return StepResult(run.whole(), _concat([run.failed]), run.stats, run.usage)


def run_step(prepared: Prepared, rows: pa.Table | StepInput, ctx: StepContext, *,
             resume_dir: Path | None = None, engine: str = "local", ray_address: str | None = None,
             keep: bool = False) -> Executed:
    """Run the step over ``rows``.

    Memory: a row-local step (``batch_rows`` = N) reads its input from the catalog N rows
    at a time; in memory are that batch and the step's results for it, and, with ``keep``
    or without ``resume_dir``, every batch's output (a filter's one small score row per
    input row). A whole-table step gets every row at once, memory-mapped
    (:meth:`StepInput.whole`), plus whatever its own whole-table part holds (its docstring
    says what); a generator that gives its output as an iterator of chunks has them written
    to ``resume_dir`` one at a time, so its whole output is never in memory (unless ``keep``).

    With ``resume_dir`` every finished batch is written there first (``rows-N``), and
    batches already there are read back instead of recomputed, so an interrupted run
    resumes; without ``keep`` their outputs stay there (:class:`Executed` reads them back a
    batch at a time). With ``engine="ray"`` a row-local step's batches are computed by Ray
    Data workers into ``resume_dir`` first; steps that need the whole table, or an LLM
    backend object, run here (LLM steps are bound by the endpoint, not this machine), a
    whole-table step that declares ``embeds`` after Ray actors have put its embeddings in the
    cache.
    """
    spec = prepared.spec
    source = StepInput.of(rows)
    keep = keep or resume_dir is None
    ran_on_ray = False
    if engine == "ray" and spec.batch_rows is not None and ctx.backend is None:
        if resume_dir is None:
            raise PrefabError("--engine ray needs a work folder for the workers' Parquet files")
        say_resuming(spec, resume_dir, list(range(0, source.num_rows, spec.batch_rows)) or [0])
        fill_on_ray(prepared, source, ctx, resume_dir, ray_address)
        ran_on_ray = True
    elif engine not in ("local", "ray"):
        raise PrefabError(f"unknown engine {engine!r} (known: local, ray)")
    whole = source.whole() if spec.batch_rows is None else None
    if engine == "ray" and whole is not None and spec.embeds is not None:
        # Whole-table: Ray actors fill the embedding cache, then the step runs here on cached vectors.
        from factory.embed.ray_embed import precompute_for_step

        precompute_for_step(spec.embeds, whole, ctx, ray_address)
    if spec.backend != "none":
        # Before any batch: the backend the parameters need, valid templates, and a whole-run
        # cost estimate within --max-cost (cached requests free), planned a batch at a time.
        from factory.steps.llm import preflight

        preflight(spec, prepared.params, whole if whole is not None else source.batches(spec.batch_rows), ctx)
    if whole is not None:
        starts, batches = [0], iter([whole])
    else:
        starts = list(range(0, source.num_rows, spec.batch_rows)) or [0]
        batches = source.batches(spec.batch_rows) if source.num_rows else iter([source.schema.empty_table()])
    if resume_dir is not None and not ran_on_ray:
        say_resuming(spec, resume_dir, starts)
    run = Executed(FAILED_SCHEMA.empty_table(), {}, {})
    failures: list[pa.Table] = []
    bar = _progress_bar(source.num_rows, f"{spec.kind} {spec.name}", ctx.progress, whole_table=whole is not None)
    done = 0
    try:
        for start, batch in zip(starts, batches, strict=True):
            kept = _load_batch(resume_dir, start, output=keep) if resume_dir else None
            if kept is None:
                kept = run_batch(spec, batch, start, ctx)
                if resume_dir is not None:
                    _save_batch(resume_dir, start, *kept)
                    if not isinstance(kept[0], pa.Table):  # its chunks went to the file as they came
                        kept = _load_batch(resume_dir, start, output=keep)
                        assert kept is not None  # just saved
            out, failed, batch_stats, batch_usage = kept
            if keep:
                run.tables.extend([out] if isinstance(out, pa.Table) else out)
            else:
                run.files.append(_batch_folder(resume_dir, start) / "out.parquet")
            del kept, out
            failures.append(failed)
            _sum_stats(run.stats, batch_stats)
            _sum_stats(run.usage, batch_usage)
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
    run.failed = _concat(failures)
    return run


def say_resuming(spec: StepSpec, folder: Path, starts: Sequence[int]) -> int:
    """Tell stderr when an interrupted run's batches are found (the run then starts after
    them); returns how many there are."""
    kept = sum(_batch_folder(folder, start).is_dir() for start in starts) if folder.is_dir() else 0
    if kept:
        import sys

        verb = "generate" if spec.kind == "generator" else "filter"
        print(f"prefab: resuming {verb} {spec.name}: {kept} of {len(starts)} batches kept from an interrupted "
              "run", file=sys.stderr, flush=True)
    return kept


def _batch_folder(folder: Path, start: int) -> Path:
    return folder / f"rows-{start:012d}"


def _save_batch(folder: Path, start: int, table: pa.Table | Iterator[pa.Table], failed: pa.Table,
                stats: dict[str, Any], usage: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    final = _batch_folder(folder, start)
    tmp = folder / f".{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    if isinstance(table, pa.Table):
        pq.write_table(table, tmp / "out.parquet")
    else:
        _write_chunks(table, tmp / "out.parquet")
    pq.write_table(failed, tmp / "failed.parquet")
    (tmp / "stats.json").write_text(json.dumps({"stats": stats, "usage": usage}, default=str))
    try:
        tmp.rename(final)  # a batch is there whole or not at all
    except OSError:  # another worker finished the same batch first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _write_chunks(chunks: Iterator[pa.Table], path: Path) -> None:
    """A generator's output chunks into one Parquet file as they come, in the first chunk's
    schema (only one chunk is in memory at a time)."""
    writer: pq.ParquetWriter | None = None
    try:
        for chunk in chunks:
            if writer is None:
                schema = chunk.schema
                writer = pq.ParquetWriter(path, schema)
            writer.write_table(_in_schema(chunk, schema))
        if writer is None:  # no chunk at all: no pairs, in the columns a generator gives
            pq.write_table(GENERATED_SCHEMA.empty_table(), path)
    finally:
        if writer is not None:
            writer.close()


def _load_batch(folder: Path, start: int, *, output: bool = True) -> tuple[pa.Table | None, pa.Table, dict, dict] | None:
    """A kept batch's (output, failed rows, stats, usage); its output is left on disk (None)
    unless ``output``."""
    final = _batch_folder(folder, start)
    if not final.is_dir():
        return None
    meta = json.loads((final / "stats.json").read_text())
    return (pq.read_table(final / "out.parquet") if output else None, pq.read_table(final / "failed.parquet"),
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


def check_generated(spec: StepSpec, columns: Sequence[str]) -> None:
    """A generator's output has the columns the runner folds into pairs and provenance."""
    missing = [c for c in ("prompt", "chosen", "rejected", "parent_ids") if c not in columns]
    if missing:
        raise StepOutputError(f"generator {spec.name} output lacks column(s) {', '.join(missing)}")


def _first_parents(parents: pa.ListArray) -> pa.Array:
    """Each row's first parent id (null for a row without parents), columnar."""
    has = pc.fill_null(pc.greater(pc.list_value_length(parents), 0), False)
    starts = parents.offsets.slice(0, len(parents))  # positions in parents.values, slice-aware
    return parents.values.take(pc.if_else(has, starts, pa.scalar(None, starts.type)))


def _sources_of(first: pa.Array, input_ids: pa.ChunkedArray | pa.Array, input_sources: pa.Array) -> pa.Array:
    """The input (its source label) of each row's first parent: a hash lookup over the
    input ids only. Where an id occurs twice, the later row counts (as it always has)."""
    ids = input_ids.combine_chunks() if isinstance(input_ids, pa.ChunkedArray) else input_ids
    if isinstance(input_sources, pa.ChunkedArray):
        input_sources = input_sources.combine_chunks()
    last = len(ids) - 1
    at = pc.index_in(first, value_set=ids.take(pa.array(np.arange(last, -1, -1, dtype=np.int64))))
    return input_sources.take(pc.subtract(pa.scalar(last, pa.int64()), at.cast(pa.int64()))).cast(pa.string())


def stamp_generated(out: pa.Table, inputs: pa.Table, input_sources: pa.Array, prepared: Prepared,
                    ctx: StepContext, *, used_llm: bool = True) -> pa.Table:
    """Canonical generated rows with provenance filled in by the runner.

    Columnar: ``inputs`` needs only its id column (the runner passes the ids alone) and
    ``input_sources`` each input row's source label; ``out`` may be any slice of a step's
    output, so a run stamps its pairs a batch at a time.
    """
    spec = prepared.spec
    check_generated(spec, out.column_names)
    n = out.num_rows
    id_column = "pair_id" if "pair_id" in inputs.column_names else "trajectory_id"
    parents = out.column("parent_ids").cast(pa.list_(pa.string())).combine_chunks()

    def same(value: Any, kind: pa.DataType) -> pa.Array:
        return pa.repeat(pa.scalar(value, kind), n)

    def own(name: str) -> pa.Array:
        return out.column(name).combine_chunks() if name in out.column_names else pa.nulls(n, pa.string())

    provenance = {
        "source": _sources_of(_first_parents(parents), inputs.column(id_column), input_sources),
        "source_file": pa.nulls(n, pa.string()),
        "source_line": pa.nulls(n, pa.int64()),
        "step": same(spec.name, pa.string()),
        "step_version": same(spec.version, pa.string()),
        "params_hash": same(prepared.params_hash, pa.string()),
        "model": same(getattr(prepared.backend, "model", None), pa.string()),
        # a rules-mode run of a step that also has LLM templates used none of them
        "template_hash": same(spec.template_hash if used_llm else None, pa.string()),
        "seed": same(ctx.seed, pa.int64()),
        "run_id": same(ctx.run_id, pa.string()),
        "parent_ids": parents,
        "generated": own("generated"),
        "method": own("method"),
    }
    struct = pa.StructArray.from_arrays([provenance[f.name].cast(f.type) for f in PROVENANCE_TYPE],
                                        fields=list(PROVENANCE_TYPE))
    columns = {}
    for f in PAIR_SCHEMA:
        if f.name == "provenance":
            columns[f.name] = struct
        elif f.name in out.column_names:
            columns[f.name] = out.column(f.name).cast(f.type)
        elif f.name == "tie":
            columns[f.name] = same(False, pa.bool_())
        elif f.name in ("pair_id", "prompt_id"):
            columns[f.name] = same("", pa.string())
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


def _final_actions(decision: Decision, failed_rows: np.ndarray) -> np.ndarray:
    """Each row's action, "failed" where the step could not score it."""
    action = np.asarray(decision.action.to_numpy(zero_copy_only=False), dtype=object)
    action[failed_rows] = "failed"
    return action


def decision_counts(decision: Decision, failed_rows: np.ndarray) -> dict[str, int]:
    """What applying ``decision`` does, counted from the actions alone (no row is read)."""
    action = _final_actions(decision, failed_rows)
    return {
        "rows_in": len(action),
        "rows_kept": int(((action != "drop") & (action != "failed")).sum()),
        "rows_dropped": int((action == "drop").sum()),
        "rows_failed": int((action == "failed").sum()),
        "rows_flipped": int((action == "flip").sum()),
        "rows_reweighted": int((action == "weight").sum()),
    }


def apply_decision(table: pa.Table, decision: Decision, failed_rows: np.ndarray) -> tuple[pa.Table, dict[str, int]]:
    """Drop, flip and reweight rows as decided; failed rows are left out (they are in the side table).

    Row-local, so it applies to any slice: the api streams a version through it a batch at
    a time with the decision's slice for that batch (:meth:`Decision.slice`).
    """
    action = _final_actions(decision, failed_rows)
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
    return frame.filter(pl.Series(keep)).to_arrow(), decision_counts(decision, failed_rows)


def failed_side_table(failed: pa.Table, inputs: pa.Table | StepInput, step: str) -> pa.Table:
    """The catalog's side table: step, pair_id, reason and the input row as JSON (only the
    failed rows are read, in one streamed pass over a :class:`StepInput`)."""
    rows = failed.column("row").to_pylist()
    picked = inputs.take(pa.array(rows, pa.int64())) if rows else inputs.schema.empty_table()
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


def run_work_dir(catalog: Any, key: str, engine: str) -> Path:
    """Where a step run keeps its finished batches (and a rerun finds them).

    ``<home>/steps/<key>/``, except for Ray on a DuckLake catalog: there the workers may run
    on other hosts, which mount the lake's data path (at the same place) but not the
    driver's home, so the batches go to ``<data path>/staging/<key>/``. The driver reads
    them and commits once (the commit re-checks every row's ids and hashes the objects it
    writes, as for any data); the run then removes the folder, and ``catalog gc`` removes
    one an interrupted run left once it is unused for the cache grace period.
    """
    if engine == "ray" and getattr(catalog, "lake", None) is not None:
        from factory.catalog.housekeeping import STAGING

        return Path(catalog.data_root) / STAGING / key
    return step_work_dir(catalog.home, key)


def clear_work_dir(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)

