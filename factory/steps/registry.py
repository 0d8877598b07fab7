"""The step registry: a generator or filter is one function plus one decorator.

    @generator("master_keys", params=MasterKeysParams, version="1")
    def master_keys(table: pa.Table, ctx: StepContext[MasterKeysParams]) -> StepResult:
        '''Rejected answers made of master keys (One Token to Fool).'''

    @filter_step("dedup", params=DedupParams, decide=decide_dedup, version="1")
    def dedup(table: pa.Table, ctx: StepContext[DedupParams]) -> StepResult: ...

Built-in steps live one module per family in ``generators/`` and ``filters/`` and are found
by importing those packages; third-party steps register through the ``prefab.steps``
entry-point group (each entry point names a module to import).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from factory.steps.params import ParamError

StepKind = Literal["generator", "filter"]


@dataclass(frozen=True)
class StepSpec:
    name: str
    kind: StepKind
    fn: Callable[..., Any]
    params: type
    version: str
    doc: str
    # None: the step needs the whole table at once (global dedup, neighbours, k-fold);
    # N: it is row-local and the runner may feed it batches of N rows (and Ray may too).
    batch_rows: int | None = None
    # filters only: (scores table, params) -> Decision
    decide: Callable[..., Any] | None = None
    # "none" | "optional" | "required": whether the step calls an LLM backend
    backend: str = "none"
    templates: dict[str, str] = field(default_factory=dict)
    # what --from reads: catalog pair versions, or trajectory files (schemas.rows.TRAJECTORY_SCHEMA)
    input_kind: str = "pairs"
    # generators only: extra (non-canonical) output columns committed with the pairs, e.g. rubrics' "rubric"
    columns: tuple[str, ...] = ()
    # LLM steps: plan(table, ctx) -> the requests a run will make (factory.steps.llm.Planned), for
    # --dry-run estimates and the --max-cost check; ``needs`` says which backend, for errors.
    plan: Callable[..., Any] | None = None
    needs: str = ""
    # input columns the step reads: a missing one is refused before any work
    reads: tuple[str, ...] = ()
    # whole-table steps that embed: embeds(table, ctx) -> the factory.embed.ray_embed.EmbedRequest
    # its run will make, so --engine ray encodes them on workers before the step runs
    embeds: Callable[..., Any] | None = None

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else ""

    @property
    def template_hash(self) -> str | None:
        if not self.templates:
            return None
        text = "\x00".join(f"{k}\x00{v}" for k, v in sorted(self.templates.items()))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


_STEPS: dict[tuple[StepKind, str], StepSpec] = {}
# Planners declared with factory.steps.llm.llm_plan ahead of their step: (kind, name) -> (plan, needs)
_PLANNERS: dict[tuple[str, str], tuple[Callable[..., Any], str]] = {}

# What a pair step reads unless it says otherwise.
PAIR_READS = ("prompt", "chosen", "rejected")


def _with_planner(spec: StepSpec) -> StepSpec:
    """An LLM step without a planner would skip --dry-run estimates and the --max-cost check
    unnoticed: declaring one is part of declaring the step."""
    if spec.backend == "none" or spec.plan is not None:
        return spec
    declared = _PLANNERS.get((spec.kind, spec.name))
    if declared is None:
        raise TypeError(f"{spec.kind} {spec.name!r} calls an LLM (backend={spec.backend!r}) but declares no "
                        "planner: pass plan=FN (what it will ask, for --dry-run and --max-cost) to its decorator")
    return dataclasses.replace(spec, plan=declared[0], needs=spec.needs or declared[1])


def _register(spec: StepSpec) -> None:
    if not dataclasses.is_dataclass(spec.params):
        raise TypeError(f"step {spec.name}: params must be a dataclass, got {spec.params!r}")
    spec = _with_planner(spec)
    existing = _STEPS.get((spec.kind, spec.name))
    if existing is not None and existing.fn.__module__ != spec.fn.__module__:
        raise ValueError(f"{spec.kind} {spec.name!r} is registered twice "
                         f"({existing.fn.__module__} and {spec.fn.__module__})")
    _STEPS[(spec.kind, spec.name)] = spec


def generator(
    name: str, *, params: type, version: str = "1", batch_rows: int | None = 4096,
    backend: str = "none", templates: dict[str, str] | None = None, input_kind: str = "pairs",
    columns: tuple[str, ...] = (), plan: Callable[..., Any] | None = None, needs: str = "",
    reads: tuple[str, ...] | None = None, embeds: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(table, ctx) -> StepResult`` as a generator: seed pairs in, new pairs out.

    ``input_kind="trajectories"`` makes ``--from`` read trajectory files instead of pair
    versions, and ``table`` is then in :data:`schemas.rows.TRAJECTORY_SCHEMA`.
    ``columns`` names extra output columns to commit with the pairs (others are dropped).
    A step with ``backend`` other than ``"none"`` declares ``plan(table, ctx) -> [Planned]``
    (built from the same calls the step makes) and ``needs`` (the backend it needs).
    ``reads``: the input columns it needs (default: prompt, chosen, rejected for pair steps).
    ``embeds``: ``embeds(table, ctx) -> [EmbedRequest]`` (:mod:`factory.embed.ray_embed`), the
    texts a whole-table step will embed, built by the step's own code; ``--engine ray`` encodes
    them on Ray actors first.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        default_reads = PAIR_READS if input_kind == "pairs" else ()
        _register(StepSpec(name, "generator", fn, params, version, fn.__doc__ or "",
                           batch_rows, None, backend, dict(templates or {}), input_kind, tuple(columns),
                           plan, needs, tuple(default_reads if reads is None else reads), embeds))
        return fn

    return wrap


def filter_step(
    name: str, *, params: type, decide: Callable[..., Any], version: str = "1",
    batch_rows: int | None = None, backend: str = "none", templates: dict[str, str] | None = None,
    plan: Callable[..., Any] | None = None, needs: str = "", reads: tuple[str, ...] | None = None,
    embeds: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register ``fn(table, ctx) -> StepResult`` as a filter.

    ``fn`` returns per-row scores (one row per input row, in order); ``decide(scores,
    params)`` turns them into keep / drop / flip / weight. Only ``decide`` reads the
    parameters marked ``decision=True``, so a new threshold never recomputes scores.
    ``plan``, ``needs``, ``reads`` and ``embeds`` as for :func:`generator`.
    """

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        _register(StepSpec(name, "filter", fn, params, version, fn.__doc__ or "",
                           batch_rows, decide, backend, dict(templates or {}), plan=plan, needs=needs,
                           reads=tuple(PAIR_READS if reads is None else reads), embeds=embeds))
        return fn

    return wrap


def missing_columns(spec: StepSpec, columns: list[str]) -> list[str]:
    return [c for c in spec.reads if c not in columns]


_loaded = False


def load_steps() -> None:
    """Import the built-in step packages and any ``prefab.steps`` entry points (once)."""
    global _loaded
    if _loaded:
        return
    for package_name in ("generators", "filters"):
        package = importlib.import_module(package_name)
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.startswith("_"):
                importlib.import_module(f"{package_name}.{module.name}")
    from importlib.metadata import entry_points

    for entry in entry_points(group="prefab.steps"):
        importlib.import_module(entry.value.split(":")[0])
    _loaded = True


def steps(kind: StepKind | None = None) -> list[StepSpec]:
    load_steps()
    return sorted((s for s in _STEPS.values() if kind is None or s.kind == kind), key=lambda s: s.name)


def get_step(name: str, kind: StepKind) -> StepSpec:
    load_steps()
    spec = _STEPS.get((kind, name))
    if spec is None:
        known = ", ".join(s.name for s in steps(kind)) or "none"
        raise ParamError(f"unknown {kind} {name!r} (known: {known})")
    return spec
