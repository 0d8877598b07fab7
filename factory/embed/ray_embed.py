"""Embeddings on Ray: a whole-table step's inputs are encoded by a pool of Ray actors first, so
the step then runs unchanged on the driver and finds every vector in the embedding cache
(the neighbour index is then built there from those vectors).

A whole-table step that embeds declares what it will ask for (``embeds=`` on its decorator):
``fn(table, ctx) -> iterable of EmbedRequest``, built from the same code the step runs, so
the texts and their cut (``keep``) are exactly those :func:`factory.embed.embed_texts` will
be given, or the token ids the trainer's head featurizer will embed. With ``--engine ray``
the runner calls :func:`precompute` with them:

1. *plan* (driver, no model run): each distinct input once, by its cache key; inputs already
   in the cache are left out. A text wanted at its start and at its end travels as one row,
   so a text short enough not to be cut is encoded once (its two vectors are the same);
2. *encode* (Ray Data ``map_batches`` over an actor pool, one pool per encoder): each actor
   loads the encoder once, one GPU per actor where the cluster has GPUs, otherwise the CPUs
   shared out as torch threads;
3. *store* (driver, the cache's only writer here): vectors come back with their keys and
   are written as cache shards, so workers need no file system shared with the home.

Memory on the driver: the distinct keys planned (~100 bytes per distinct input) and one
chunk of inputs at a time; the inputs to encode wait in Ray's object store (which spills to
disk), never all at once in the driver's heap. (The step itself, run next, holds what it
holds in process.)

Vectors are computed in the driver's precision (fp32, or bf16 when the driver's encoder uses
it), so they land in the cache folder the driver's own encoder reads.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from factory.embed import _TAIL_KEY, MAX_TOKENS, cache_root, encoder_cache
from factory.embed.cache import KEY_BYTES, ids_key, show_progress, text_key
from schemas.errors import PrefabError

if TYPE_CHECKING:
    from factory.embed.cache import EmbeddingCache
    from factory.steps.context import StepContext

Keep = Literal["start", "end"]
_START, _END = 1, 2
# Texts per object-store block and per actor call (the actor batches them by length inside):
# one block is one call, so the blocks spread over the whole pool.
CHUNK_ROWS = ROWS_PER_CALL = 1024

PLAN_SCHEMA = pa.schema([
    pa.field("text", pa.large_string()),  # a plain text (null for a token-id row)
    pa.field("start", pa.bool_()),  # encode it cut on the right (keep="start")
    pa.field("end", pa.bool_()),  # encode it cut on the left (keep="end")
    # its start vector is cached or made by this run: an end that needs no cut is that vector
    pa.field("plain_elsewhere", pa.bool_()),
    pa.field("ids", pa.list_(pa.int64())),  # token ids to encode as they are (null for a text row)
])


@dataclass(frozen=True)
class EmbedRequest:
    """What a step will embed: ``texts`` it passes to :func:`factory.embed.embed_texts`, with
    each ``keep`` it asks for (``("start", "end")``: both calls, on the same texts), or ``ids``
    it rendered and cut itself and embeds through the cache by their exact ids (the trainer's
    head features, :class:`factory.trainer.model.HeadFeaturizer`). ``encoder``: the encoder
    folder, the identity the cache is keyed by (``None``: the bundled MiniLM)."""

    texts: Sequence[str] = ()
    keep: tuple[Keep, ...] = ("start",)
    ids: Sequence[np.ndarray] = ()
    encoder: str | None = None

    def __post_init__(self) -> None:
        bad = [k for k in self.keep if k not in ("start", "end")]
        if bad or not self.keep:
            raise ValueError(f"keep must name 'start' and/or 'end', got {self.keep!r}")
        if len(self.texts) and len(self.ids):
            raise ValueError("an EmbedRequest holds texts or token ids, not both")

    @property
    def modes(self) -> int:
        return (_START if "start" in self.keep else 0) | (_END if "end" in self.keep else 0)


# What a step declares with ``embeds=``: the requests its run will make on ``table``.
EmbedPlanner = Callable[[pa.Table, "StepContext[Any]"], Iterable[EmbedRequest]]


def plain_key(text: str) -> bytes:
    """The cache key ``embed_texts`` gives ``text`` cut on the right (or not cut at all)."""
    return text_key(text, MAX_TOKENS)


def tail_key(text: str) -> bytes:
    """The cache key ``embed_texts(keep="end")`` gives ``text`` when it had to be cut."""
    return text_key(_TAIL_KEY + text, MAX_TOKENS)


@dataclass
class PlanCounts:
    asked: int = 0  # texts and sequences in the requests, repeats included
    distinct: int = 0  # distinct texts and sequences
    sent: int = 0  # rows sent to the workers (distinct inputs with a vector still missing)


class Planner:
    """Distinct inputs whose vectors one cache lacks, as chunks (:data:`PLAN_SCHEMA`).

    A text asked for in several requests is planned once per ``keep``, a token sequence once;
    ``cached(key)`` says whether the cache holds a key. Only the keys planned stay in memory
    (~100 bytes each), not the texts."""

    def __init__(self, cached: Callable[[bytes], bool], chunk_rows: int = CHUNK_ROWS) -> None:
        self.cached, self.chunk_rows = cached, chunk_rows
        self.counts = PlanCounts()
        self._planned: dict[bytes, int] = {}  # plain or ids key -> keep modes planned (ids: _START)
        self._rows: dict[str, list[Any]] = {name: [] for name in PLAN_SCHEMA.names}

    def add(self, request: EmbedRequest) -> Iterator[pa.Table]:
        """Plan ``request``; yields each chunk as it fills."""
        for raw in request.texts:
            self._text(str(raw), request.modes)
            yield from self._full()
        for seq in request.ids:
            self._ids(np.asarray(seq, dtype=np.int64))
            yield from self._full()

    def finish(self) -> Iterator[pa.Table]:
        """The last, partly filled chunk."""
        if self._rows["text"]:
            yield self._take()

    def _text(self, text: str, modes: int) -> None:
        self.counts.asked += 1
        plain = plain_key(text)
        before = self._planned.get(plain, 0)
        new = modes & ~before
        if not new:
            return
        self.counts.distinct += before == 0
        self._planned[plain] = before | new
        start = bool(new & _START) and not self.cached(plain)
        end = bool(new & _END) and not self.cached(tail_key(text))
        if start or end:
            self._append(text, start, end, bool((before | new) & _START) or self.cached(plain), None)

    def _ids(self, seq: np.ndarray) -> None:
        self.counts.asked += 1
        key = ids_key(seq)
        if key in self._planned:
            return
        self.counts.distinct += 1
        self._planned[key] = _START
        if not self.cached(key):
            self._append(None, False, False, False, seq)

    def _append(self, *values: Any) -> None:
        for name, value in zip(PLAN_SCHEMA.names, values, strict=True):
            self._rows[name].append(value)

    def _full(self) -> Iterator[pa.Table]:
        if len(self._rows["text"]) >= self.chunk_rows:
            yield self._take()

    def _take(self) -> pa.Table:
        self.counts.sent += len(self._rows["text"])
        chunk = pa.table(self._rows, schema=PLAN_SCHEMA)
        self._rows = {name: [] for name in PLAN_SCHEMA.names}
        return chunk


def plan_missing(requests: Iterable[EmbedRequest], cached: Callable[[bytes], bool], *,
                 chunk_rows: int = CHUNK_ROWS, counts: PlanCounts | None = None) -> Iterator[pa.Table]:
    """The chunks of :class:`Planner` for ``requests`` (one cache; ``counts`` filled in)."""
    planner = Planner(cached, chunk_rows)
    if counts is not None:
        planner.counts = counts
    for request in requests:
        yield from planner.add(request)
    yield from planner.finish()


def vectors_table(keys: Sequence[bytes], vectors: np.ndarray) -> pa.Table:
    """Keys and vectors as Arrow: what an actor returns for the driver to store."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    return pa.table({
        "key": pa.array(list(keys), pa.binary(KEY_BYTES)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
    })


class EmbedActor:
    """One encoder per Ray actor, loaded once: plan rows in, (key, vector) rows out."""

    def __init__(self, encoder_path: str, variant: str, batch_size: int, threads: int | None) -> None:
        import torch

        from factory.embed.encoder import MeanPoolEncoder, bf16_ok, pick_device

        if not Path(encoder_path).is_dir():
            raise PrefabError(f"Ray worker has no encoder folder {encoder_path}: run the workers in the "
                              "driver's environment (the same prefab install)")
        if threads:
            torch.set_num_threads(threads)
        device = pick_device()
        want_bf16 = variant.endswith("|bf16")
        if want_bf16 and not bf16_ok(device):
            raise PrefabError(f"the driver embeds in bf16 but a Ray worker runs on {device}: give the "
                              "workers GPUs or run the driver without one")
        self.encoder = MeanPoolEncoder(encoder_path, device)
        self.encoder.bf16 = want_bf16  # the driver's precision: its cache folder, its vectors
        if self.encoder.cache_variant != variant:
            raise PrefabError(f"Ray worker encoder is {self.encoder.cache_variant!r}, the driver's is "
                              f"{variant!r}: run the workers in the driver's environment")
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        start, end, elsewhere = (batch.column(c).to_pylist() for c in ("start", "end", "plain_elsewhere"))
        keys: list[bytes] = []
        sequences: list[np.ndarray] = []
        starts = [i for i, wanted in enumerate(start) if wanted]  # text rows; ids rows have neither
        if starts:
            sequences += self.encoder.tokenize_plain([texts[i] for i in starts], MAX_TOKENS)
            keys += [plain_key(texts[i]) for i in starts]
        ends = [i for i, wanted in enumerate(end) if wanted]
        if ends:
            ids, cut = self.encoder.tokenize_tail([texts[i] for i in ends], MAX_TOKENS)
            for i, seq, was_cut in zip(ends, ids, cut, strict=True):
                if was_cut:
                    keys.append(tail_key(texts[i]))
                    sequences.append(seq)
                elif not elsewhere[i]:  # not cut: its end vector is its start vector
                    keys.append(plain_key(texts[i]))
                    sequences.append(seq)
        for seq in batch.column("ids").to_pylist():
            if seq is not None:
                sequences.append(np.asarray(seq, dtype=np.int64))
                keys.append(ids_key(sequences[-1]))
        vectors = self.encoder.embed_ids(sequences, self.batch_size)
        return vectors_table(keys, vectors.reshape(len(keys), self.encoder.dim))


@dataclass
class PrecomputeReport:
    asked: int = 0
    distinct: int = 0
    computed: int = 0  # vectors the actors made and the driver stored
    actors: int = 0
    device: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class PoolShape:
    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    threads: int | None  # torch threads per CPU actor

    @property
    def device(self) -> str:
        return "GPU" if self.gpus_per_actor else "CPU"


def pool_shape(resources: dict[str, float], num_actors: int | None) -> PoolShape:
    """One actor per GPU where the cluster has GPUs; otherwise ``num_actors`` (default: one per
    CPU) sharing the CPUs, each with its share as torch threads (no oversubscription)."""
    if num_actors is not None and num_actors < 1:
        raise PrefabError(f"num_actors must be at least 1, got {num_actors}")
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return PoolShape(min(num_actors or gpus, gpus), 1, 1, None)
    cpus = max(1, int(resources.get("CPU", 1)))
    actors = min(num_actors or cpus, cpus)
    threads = max(1, cpus // actors)
    return PoolShape(actors, 0, threads, threads)


def start_ray(address: str | None) -> Any:
    try:
        import ray
    except ImportError:
        raise PrefabError("--engine ray needs Ray: pip install 'prefab[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return ray


class _Group:
    """The requests of one encoder: its cache, its plan, the chunks put in the object store."""

    def __init__(self, encoder_path: str, home: str | Path | None) -> None:
        from factory.embed.encoder import get_encoder

        self.encoder = get_encoder(encoder_path)
        self.cache = encoder_cache(self.encoder, cache_root(home))
        self.cache.refresh()
        self.planner = Planner(self.cache.__contains__)
        self.refs: list[Any] = []


def precompute(requests: Iterable[EmbedRequest], *, home: str | Path | None = None,
               num_actors: int | None = None, address: str | None = None, batch_size: int = 64,
               rows_per_call: int = ROWS_PER_CALL, progress: bool | None = None) -> PrecomputeReport:
    """Encode on Ray every requested input the cache under ``home`` lacks, and store the vectors
    (one actor pool per encoder the requests name). ``address``: an existing cluster (default:
    the running Ray, or a local one)."""
    from factory.embed.encoder import minilm_path

    started = time.monotonic()
    report = PrecomputeReport()

    def put(chunk: pa.Table) -> Any:
        # Ray starts with the first input to encode: a rerun that finds all cached starts none.
        # The object store holds the inputs; the driver keeps only references.
        return start_ray(address).put(chunk)

    groups: dict[str, _Group] = {}  # by encoder folder
    for request in requests:
        folder = str(Path(request.encoder or minilm_path()).resolve())
        group = groups.get(folder) or groups.setdefault(folder, _Group(folder, home))
        group.refs += [put(chunk) for chunk in group.planner.add(request)]
    say = _reporter(progress)
    for group in groups.values():
        group.refs += [put(chunk) for chunk in group.planner.finish()]
        counts = group.planner.counts
        report.asked += counts.asked
        report.distinct += counts.distinct
        if not group.refs:
            continue
        shape = pool_shape(start_ray(address).cluster_resources(), num_actors)
        report.actors, report.device = shape.actors, shape.device
        say(f"embed on ray: {counts.sent:,} of {counts.distinct:,} distinct inputs to encode with "
            f"{Path(group.encoder.path).name} on {shape.actors} {shape.device} actor(s)")
        report.computed += _encode_and_store(group.refs, group.cache, group.encoder, shape, batch_size,
                                             rows_per_call, show_progress(progress))
    report.seconds = time.monotonic() - started
    if report.computed:
        say(f"embed on ray: {report.computed:,} vectors stored in {report.seconds:.1f} s "
            f"({report.computed / max(report.seconds, 1e-9):,.0f} vectors/s)")
    return report


def _encode_and_store(refs: list[Any], cache: EmbeddingCache, encoder: Any, shape: PoolShape,
                      batch_size: int, rows_per_call: int, bars: bool) -> int:
    import ray.data

    data_context = ray.data.DataContext.get_current()
    bars_before, data_context.enable_progress_bars = data_context.enable_progress_bars, bars
    dataset = ray.data.from_arrow_refs(refs).map_batches(
        EmbedActor, fn_constructor_kwargs={"encoder_path": encoder.path, "variant": encoder.cache_variant,
                                           "batch_size": batch_size, "threads": shape.threads},
        concurrency=shape.actors, num_gpus=shape.gpus_per_actor, num_cpus=shape.cpus_per_actor,
        batch_size=rows_per_call, batch_format="pyarrow", zero_copy_batch=True,
    )
    stored = 0
    pending: list[pa.Table] = []
    rows = 0

    def flush() -> None:
        nonlocal stored, pending, rows
        if rows:
            out = pa.concat_tables(pending)
            vectors = np.asarray(out.column("vector").combine_chunks().flatten(), dtype=np.float32)
            stored += cache.put(out.column("key").to_pylist(), vectors.reshape(rows, encoder.dim))
        pending, rows = [], 0

    try:  # stored as they come: an interrupted run keeps every full shard
        for out in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            if out.num_rows:
                pending.append(out)
                rows += out.num_rows
            if rows >= cache.shard_rows:
                flush()
    except Exception as exc:
        cause = prefab_cause(exc)
        if cause is None:
            raise
        raise PrefabError(str(cause)) from exc  # one line, not a worker's traceback
    finally:
        flush()
        data_context.enable_progress_bars = bars_before
    return stored


def prefab_cause(exc: BaseException) -> PrefabError | None:
    """The PrefabError a Ray worker raised, found in the chain Ray wraps it in (or None)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PrefabError):
            return current
        todo += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    return None


def precompute_for_step(planner: EmbedPlanner, table: pa.Table, ctx: StepContext[Any],
                        address: str | None = None) -> PrecomputeReport:
    """What the runner calls before a whole-table step that declares ``embeds=``."""
    return precompute(planner(table, ctx), home=ctx.home, address=address, progress=ctx.progress)


def _reporter(progress: bool | None) -> Callable[[str], None]:
    if not show_progress(progress):
        return lambda _text: None
    return lambda text: print(text, file=sys.stderr, flush=True)
