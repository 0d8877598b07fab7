"""The table-level LLM map that every LLM step shares.

A step describes its LLM work as calls (an input row, the values for a versioned
:class:`Template`, a sample index) and hands them to :class:`LLMMap`, which

* renders one request per call -- system and user message, the template's JSON schema
  (strict-compatible: every object closed and every property required), an explicit
  ``max_tokens``, the run seed and the call's ``sample_index`` -- so that k samples of one
  row are k distinct, reproducible cache entries;
* sends them through the backend, whose persistent request cache makes a rerun send
  nothing and a killed run resume with only what was never answered;
* turns every reply into either a parsed object or a failure reason: a reply cut at the
  token limit, a refusal, a reply that does not parse against the schema, one the step's
  own check rejects, or a transport error. A failure is never dropped and never half
  parsed: the step reports its row as failed with that reason (the runner puts it in the
  catalog's side table);
* adds up usage (models, judges, tokens, cost, cache hits, reply statuses and the
  sampling parameters per template) for the version's lineage.

Budgets: the backend's ``max_cost`` stops a run at the cap (the finished requests are
cached); the map then raises :class:`BudgetReachedError` instead of committing rows that
merely ran out of money. Before a run, :func:`preflight` estimates the whole step's
uncached cost from its planner (:func:`llm_plan`) and refuses to start above the budget;
:func:`preview` is the same estimate for ``--dry-run``, with the first requests rendered.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from factory.llm.pricing import estimate_tokens
from factory.llm.structured import strict_schema_problem
from factory.llm.types import (
    BUDGET_EXCEEDED,
    CANCELLED,
    OK,
    PARSE_ERROR,
    TRUNCATED,
    BudgetExceededError,
    LLMError,
    Request,
    Response,
    SamplingParams,
)
from factory.steps.context import MissingBackendError, StepContext, failed_rows
from schemas.errors import PrefabError
from schemas.prompts import prompt_text as text_of  # the one prompt renderer, under its old name

REASON_CHARS = 160  # how much of a bad reply a failure reason quotes


class TemplateError(PrefabError):
    """A prompt template or its schema is unusable (found before anything is sent)."""


class BudgetReachedError(LLMError):
    """The backend's ``max_cost`` was reached mid-run; finished requests are cached."""


# ---- templates -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """A versioned prompt: a system message, a user message with ``{field}`` slots, and the
    JSON schema the reply must follow. Bump ``version`` whenever the wording changes; the
    text itself is hashed into provenance and every request's cache key, so an edited
    template never reuses answers to the old one."""

    name: str
    version: str
    user: str
    system: str = ""
    schema: Mapping[str, Any] | None = None
    max_tokens: int = 1024  # always sent: a reply without a bound can cost anything

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def fields(self) -> frozenset[str]:
        names = set()
        for text in (self.system, self.user):
            names |= {f for _, f, _, _ in string.Formatter().parse(text) if f}
        return frozenset(names)

    def source(self) -> str:
        """Everything that shapes the request, as one string (what ``templates=`` hashes)."""
        return json.dumps({"version": self.version, "system": self.system, "user": self.user,
                           "schema": self.schema, "max_tokens": self.max_tokens}, sort_keys=True)

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.source().encode()).hexdigest()[:16]

    def validate(self) -> None:
        """Raise :class:`TemplateError` for a slot that is not a plain name or a schema that
        structured outputs would refuse in strict mode."""
        for text in (self.system, self.user):
            try:
                parsed = list(string.Formatter().parse(text))
            except ValueError as exc:
                raise TemplateError(f"template {self.id}: {exc} (write literal braces as {{{{ }}}})") from None
            for _, name, spec, conversion in parsed:
                if name is not None and (not name.isidentifier() or spec or conversion):
                    raise TemplateError(f"template {self.id}: slot {{{name}}} must be a plain name")
        if self.schema is not None:
            problem = strict_schema_problem(dict(self.schema))
            if problem:
                raise TemplateError(f"template {self.id}: schema is not strict-compatible: {problem}")
        if self.max_tokens < 1:
            raise TemplateError(f"template {self.id}: max_tokens must be >= 1")

    def render(self, values: Mapping[str, Any]) -> list[dict[str, str]]:
        missing = self.fields - set(values)
        if missing:
            raise TemplateError(f"template {self.id}: no value for {', '.join(sorted(missing))}")
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format_map(values)})
        messages.append({"role": "user", "content": self.user.format_map(values)})
        return messages


def template_sources(*templates: Template) -> dict[str, str]:
    """``templates=`` for the step decorator: the runner hashes them into provenance."""
    return {t.id: t.source() for t in templates}


def strict_object(properties: Mapping[str, Any]) -> dict[str, Any]:
    """An object schema in the strict subset: closed, every property required."""
    return {"type": "object", "properties": dict(properties), "required": list(properties),
            "additionalProperties": False}


# ---- calls and replies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One request to make: for input ``row``, with these template values, draw ``sample``."""

    row: int
    values: Mapping[str, Any]
    sample: int = 0
    tag: Any = None  # the step's own bookkeeping (an attribute, whether A/B was swapped...)


@dataclass
class Reply:
    call: Call
    value: Any  # the parsed object; None when the call failed
    reason: str | None  # why it failed; None when it did not
    response: Response | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


Check = Callable[[Any, Call], str | None]

_REFUSAL = re.compile(
    r"^\W*(?:i(?:'|\u2019)?m sorry|i am sorry|sorry,|i can(?:'|\u2019)?t (?:help|assist|comply|do|provide|"
    r"fulfil)|i cannot (?:help|assist|comply|do|provide|fulfil)|i won(?:'|\u2019)?t|i will not|i(?:'|\u2019)?m "
    r"(?:not able|unable)|i am (?:not able|unable)|as an ai\b|i must decline)", re.I)


def looks_refused(text: str | None) -> bool:
    """True for the opening of a refusal ("I'm sorry, but I can't help with that")."""
    return bool(text) and bool(_REFUSAL.match(text.strip()))


def _clip(text: str | None, limit: int = REASON_CHARS) -> str:
    text = " ".join((text or "").split())
    return json.dumps(text if len(text) <= limit else text[: limit - 1] + "\u2026", ensure_ascii=False)


def failure_reason(response: Response, template: Template, max_tokens: int) -> str | None:
    """Why ``response`` is not a usable answer to ``template``, or None when it is."""
    raw = response.text
    if response.finish_reason == "content_filter":
        return f"{template.name}: refused (content filter): {_clip(raw)}"
    if response.status == OK:
        return None
    if response.status == TRUNCATED:
        return (f"{template.name}: truncated: the reply reached max_tokens={max_tokens} before it was complete "
                f"(raise max_tokens): {_clip(raw)}")
    if response.status == PARSE_ERROR:
        if looks_refused(raw):
            return f"{template.name}: refused: {_clip(raw)}"
        return f"{template.name}: unparseable reply ({response.error}): {_clip(raw)}"
    return f"{template.name}: {response.status}: {response.error or 'no reply'}"


# ---- the map -----------------------------------------------------------------------------------


class LLMMap:
    """A step invocation's LLM work: render, send, parse, check, join back, account.

    ``role`` is ``"generator"`` (the model writes data: lineage ``models``) or ``"judge"``
    (it decides labels: lineage ``judges``). Failures are kept per input row; a step calls
    :meth:`failed_table` for its ``StepResult.failed`` and :attr:`usage` for its usage.
    """

    def __init__(self, ctx: StepContext, *, role: str = "generator", what: str = "an LLM"):
        self.ctx = ctx
        self.role = role
        self.what = what
        self.failures: dict[int, list[str]] = {}
        self._counts: Counter[str] = Counter()
        self._tokens = {"prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
        self._sampling: dict[str, str] = {}
        self._names: set[str] = set()

    # -- requests --------------------------------------------------------------------------
    def request(self, template: Template, call: Call, *, temperature: float | None = None,
                max_tokens: int | None = None) -> Request:
        limit = int(max_tokens or template.max_tokens)
        return Request(
            template.render(call.values),
            SamplingParams(temperature=temperature, max_tokens=limit),
            sample_index=call.sample,
            seed=self.ctx.seed,
            json_schema=dict(template.schema) if template.schema is not None else None,
            schema_name=template.name,
        )

    # -- running ---------------------------------------------------------------------------
    def run(self, template: Template, calls: Sequence[Call], *, check: Check | None = None,
            temperature: float | None = None, max_tokens: int | None = None) -> list[Reply]:
        """One :class:`Reply` per call, in call order. Failed replies also go to
        :attr:`failures` under their row; ``check(value, call)`` may reject a parsed reply
        with a reason (a rewrite identical to its input, an item that names the topic...)."""
        if not calls:
            return []
        backend = self.ctx.require_backend(self.what)
        template.validate()
        limit = int(max_tokens or template.max_tokens)
        requests = [self.request(template, c, temperature=temperature, max_tokens=limit) for c in calls]
        self._names.add(f"{backend.kind}:{backend.model}")
        self._sampling[template.id] = json.dumps(
            {"temperature": temperature, "max_tokens": limit, "seed": self.ctx.seed,
             "samples": 1 + max(c.sample for c in calls), "template_hash": template.hash}, sort_keys=True)
        responses = backend.run_batch(requests, progress=self.ctx.progress)
        self._account(responses)
        budget_hit = sum(r is not None and r.status == BUDGET_EXCEEDED for r in responses)
        if budget_hit:
            budget = getattr(backend, "budget", None)
            spent = f" (${budget.spent:.4f} of max_cost ${budget.max_cost:.4f})" if budget is not None else ""
            raise BudgetReachedError(
                f"{self.ctx.step}: budget reached{spent}: {len(responses) - budget_hit} of {len(responses)} "
                f"{template.name} requests finished and are cached, {budget_hit} were not sent; nothing was "
                "committed. Rerun with a higher --max-cost to finish (cached requests are free)")
        replies = []
        for call, response in zip(calls, responses, strict=True):
            if response is None or response.status == CANCELLED:  # stopped: run_batch raises on its own
                reason = f"{template.name}: not sent (the run was stopped)"
                replies.append(Reply(call, None, reason, response))
                self.fail(call.row, reason)
                continue
            reason = failure_reason(response, template, limit)
            value = response.parsed if template.schema is not None else response.text
            if reason is None and check is not None:
                problem = check(value, call)
                if problem:
                    reason = f"{template.name}: {problem}"
            if reason is not None:
                value = None
                self.fail(call.row, reason)
            replies.append(Reply(call, value, reason, response))
        return replies

    def _account(self, responses: Sequence[Response | None]) -> None:
        for r in responses:
            if r is None:
                continue
            self._counts[r.status] += 1
            if r.cached:
                self._counts["cache_hits"] += 1
            else:
                self._counts["sent"] += 1
                self._tokens["prompt_tokens"] += r.prompt_tokens
                self._tokens["completion_tokens"] += r.completion_tokens
                self._tokens["cost"] += r.cost

    # -- failures and usage ----------------------------------------------------------------
    def fail(self, row: int, reason: str) -> None:
        reasons = self.failures.setdefault(row, [])
        if reason not in reasons:
            reasons.append(reason)

    def failed(self, row: int) -> bool:
        return row in self.failures

    def failed_table(self, extra: Mapping[int, str] | None = None) -> pa.Table:
        merged = {row: "; ".join(reasons) for row, reasons in self.failures.items()}
        for row, reason in (extra or {}).items():
            merged[row] = f"{merged[row]}; {reason}" if row in merged else reason
        rows = sorted(merged)
        return failed_rows(rows, [merged[r] for r in rows])

    @property
    def usage(self) -> dict[str, Any]:
        names = sorted(self._names)
        return {
            "models": names if self.role == "generator" else [],
            "judges": names if self.role == "judge" else [],
            "requests": sum(v for k, v in self._counts.items() if k in ("sent", "cache_hits")),
            "requests_sent": self._counts["sent"],
            "cache_hits": self._counts["cache_hits"],
            "replies": {k: v for k, v in self._counts.items() if k not in ("sent", "cache_hits")},
            "prompt_tokens": self._tokens["prompt_tokens"],
            "completion_tokens": self._tokens["completion_tokens"],
            "cost": round(self._tokens["cost"], 6),
            # JSON strings, not numbers: the runner sums numeric usage over batches.
            "sampling": dict(self._sampling),
        }


def merge_usage(*usages: Mapping[str, Any]) -> dict[str, Any]:
    """Usage of several maps (a generator's writer and its judge) as one."""
    out: dict[str, Any] = {"models": [], "judges": []}
    for usage in usages:
        for key, value in usage.items():
            if key in ("models", "judges"):
                out[key] = sorted(set(out[key]) | set(value))
            elif isinstance(value, dict):
                merged = out.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v if isinstance(v, int | float) else v
            elif isinstance(value, int | float):
                out[key] = out.get(key, 0) + value
    return out


def ab_swapped(pair_id: str, sample: int) -> bool:
    """Whether sample ``sample`` of a pair shows the rejected answer first.

    Fixed by the pair id and the sample index only, so it is the same on every rerun and
    in every batch split; consecutive samples alternate, so any even k shows each order
    exactly k/2 times and a position preference cancels out of the vote.
    """
    start = int(hashlib.blake2b(pair_id.encode(), digest_size=2).hexdigest(), 16) & 1
    return bool((start + sample) % 2)


# ---- planning: missing backends, budgets and dry runs ------------------------------------------


@dataclass
class Planned:
    """Requests a step will make: ``exact`` when they are known before the run; otherwise
    stand-ins for requests built from an earlier stage's replies (counted, not cached)."""

    template: Template
    calls: list[Call]
    exact: bool = True
    temperature: float | None = None
    max_tokens: int | None = None


Planner = Callable[[pa.Table, StepContext], list[Planned]]


def llm_plan(kind: str, step: str, *, needs: str) -> Callable[[Planner], Planner]:
    """Declare, ahead of the step itself, what ``step`` will ask its LLM for a given input
    table and parameters (the same as the decorator's ``plan=`` and ``needs=``).

    ``plan(table, ctx)`` returns the :class:`Planned` stages (empty when the parameters
    need no LLM, e.g. a rules mode). An LLM step with no planner fails to register.
    """
    from factory.steps.registry import _PLANNERS

    def wrap(fn: Planner) -> Planner:
        _PLANNERS[(kind, step)] = (fn, needs)
        return fn

    return wrap


def _spec(kind: str, step: str) -> Any:
    from factory.steps.registry import get_step

    return get_step(step, kind)  # type: ignore[arg-type]


def backend_hint(kind: str, step: str) -> str:
    needs = _spec(kind, step).needs
    return f" ({needs})" if needs else ""


def missing_backend_message(kind: str, step: str, params: Any = None) -> str:
    mode = getattr(params, "mode", None)
    which = f"{kind} {step}" + (f" with mode={mode}" if mode else "")
    return (f"{which} needs an LLM backend{backend_hint(kind, step)}: pass --backend SPEC, e.g. "
            "--backend 'openai:gpt-4o-mini' or --backend 'openai:MODEL?base_url=http://localhost:8000/v1' "
            "(vllm serve, SGLang, Ollama) or --backend 'vllm:MODEL' on a GPU")


def _plan(kind: str, step: str, table: pa.Table, ctx: StepContext) -> list[Planned]:
    plan = _spec(kind, step).plan
    return plan(table, ctx) if plan is not None else []


def estimate(planned: Sequence[Planned], ctx: StepContext) -> dict[str, Any]:
    """Request count, tokens and cost of ``planned``, cached requests left out."""
    backend = ctx.backend
    mapper = LLMMap(ctx)
    stages, requests, exact_flags = [], [], []
    for stage in planned:
        stage.template.validate()
        built = [mapper.request(stage.template, c, temperature=stage.temperature, max_tokens=stage.max_tokens)
                 for c in stage.calls]
        requests += built
        exact_flags += [stage.exact] * len(built)
        stages.append({"template": stage.template.id, "template_hash": stage.template.hash,
                       "requests": len(built), "known_before_run": stage.exact,
                       "max_tokens": int(stage.max_tokens or stage.template.max_tokens),
                       "temperature": stage.temperature})
    cached: set[int] = set()
    cache = getattr(backend, "cache", None)
    if cache is not None and requests:
        keys = [backend.request_key(r) if exact else None for r, exact in zip(requests, exact_flags, strict=True)]
        hits = cache.get_many([k for k in keys if k is not None])
        cached = {i for i, k in enumerate(keys) if k is not None and k in hits}
    prompt_tokens = completion_tokens = 0
    for i, r in enumerate(requests):
        if i not in cached:
            p, c = estimate_tokens(r)
            prompt_tokens += p
            completion_tokens += c
    price = None
    model = getattr(backend, "model", None)
    if backend is not None and hasattr(backend, "prices"):
        price = backend.prices.get(model)
    cost = price.cost(prompt_tokens, completion_tokens) if price is not None else None
    budget = getattr(backend, "budget", None)
    return {
        "stages": stages, "requests": len(requests), "cached": len(cached), "to_send": len(requests) - len(cached),
        "estimated_prompt_tokens": prompt_tokens, "max_completion_tokens": completion_tokens,
        "estimated_cost_usd": None if cost is None else round(cost, 6),
        "price_known": price is not None, "model": f"{backend.kind}:{model}" if backend is not None else None,
        "max_cost": getattr(budget, "max_cost", None),
        "_requests": requests,
    }


def preflight(spec: Any, params: Any, table: pa.Table | Iterable[pa.Table], ctx: StepContext) -> None:
    """Before a step runs: the backend it needs is there, its templates are valid, and the
    whole run's estimated cost (cached requests free) fits the backend's ``max_cost``.
    ``table`` may come as batches (a row-local step's): they are planned one at a time."""
    budget = getattr(ctx.backend, "budget", None)
    totals = {"estimated_cost_usd": 0.0, "to_send": 0, "requests": 0, "estimated_prompt_tokens": 0,
              "max_completion_tokens": 0}
    for batch in [table] if isinstance(table, pa.Table) else table:
        planned = _plan(spec.kind, spec.name, batch, ctx)
        if not planned:
            continue
        if ctx.backend is None:
            raise MissingBackendError(missing_backend_message(spec.kind, spec.name, params))
        if budget is None or budget.max_cost is None:
            for stage in planned:  # every batch renders the same templates
                stage.template.validate()
            return
        est = estimate(planned, ctx)
        if est["estimated_cost_usd"] is None:
            raise LLMError(f"--max-cost needs a price for {est['model']}: add price_in=...&price_out=... "
                           "(USD per 1M tokens) to the backend spec")
        for key in totals:
            totals[key] += est[key]
    if budget is None or budget.max_cost is None:
        return
    left = budget.max_cost - budget.spent
    if totals["estimated_cost_usd"] > left:
        raise BudgetExceededError(
            f"{spec.name}: estimated cost ${totals['estimated_cost_usd']:.4f} for {totals['to_send']} uncached "
            f"requests (of {totals['requests']}; ~{totals['estimated_prompt_tokens']} prompt tokens, up to "
            f"{totals['max_completion_tokens']} completion tokens) exceeds --max-cost ${left:.4f}; nothing was "
            "sent. Raise --max-cost, lower max_tokens or run on fewer rows (see --dry-run)")


def _read(refs: Sequence[str], home: str | Path | None) -> tuple[list[Any], pa.Table]:
    from factory.catalog import Catalog

    catalog = Catalog(home)
    infos = [catalog.resolve(ref) for ref in refs]
    tables = [catalog.read_table(info) for info in infos]
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    return infos, table


def preview(kind: str, step: str, from_: str | Sequence[str], *, settings: Mapping[str, Any] | None = None,
            backend: Any = None, home: str | Path | None = None, seed: int = 0, show: int = 2) -> dict[str, Any]:
    """What an LLM step would send (``--dry-run``): templates and schemas validated, the
    request count, estimated tokens and cost (cached requests free) and the first ``show``
    requests rendered. Nothing is sent."""
    refs = [from_] if isinstance(from_, str) else list(from_)
    _, table = _read(refs, home)
    return preview_table(kind, step, table, settings=settings, backend=backend, home=home, seed=seed, show=show)


def preview_table(kind: str, step: str, table: pa.Table, *, settings: Mapping[str, Any] | None = None,
                  backend: Any = None, home: str | Path | None = None, seed: int = 0,
                  show: int = 2) -> dict[str, Any]:
    """:func:`preview` of ``table`` (read from the catalog or straight from a file)."""
    from factory.catalog import Catalog
    from factory.steps.runner import pin_refs, prepare

    catalog = Catalog(home)
    prepared = prepare(kind, step, dict(settings or {}), backend, home=catalog.home)  # type: ignore[arg-type]
    pin_refs(prepared, catalog)
    ctx = StepContext(step, prepared.params, seed=seed, home=catalog.home, backend=prepared.backend, progress=False)
    planned = _plan(kind, step, table, ctx)
    if not planned:
        return {"llm": False}
    if prepared.backend is None:
        raise MissingBackendError(missing_backend_message(kind, step, prepared.params))
    est = estimate(planned, ctx)
    requests = est.pop("_requests")
    shown = []
    for r in requests[:show]:
        shown.append({"messages": r.messages, "max_tokens": r.params.max_tokens, "temperature": r.params.temperature,
                      "sample_index": r.sample_index, "seed": r.seed, "schema": r.schema_name})
    return {"llm": True, **est, "first_requests": shown}


def estimate_line(p: Mapping[str, Any]) -> str:
    """One line for an estimate: requests, tokens and cost (or why the cost is unknown)."""
    cost = ("unknown (no price for this model: add price_in/price_out to the spec)"
            if p["estimated_cost_usd"] is None else f"${p['estimated_cost_usd']:.4f} at most")
    return (f"LLM {p['model']}: {p['requests']} requests ({p['cached']} cached, {p['to_send']} to send), "
            f"~{p['estimated_prompt_tokens']} prompt tokens + up to {p['max_completion_tokens']} completion tokens, "
            f"estimated cost {cost}" + (f", --max-cost ${p['max_cost']:.4f}" if p.get("max_cost") is not None else ""))


def preview_text(p: Mapping[str, Any]) -> str:
    """``--dry-run`` lines for :func:`preview`'s result."""
    if not p.get("llm"):
        return "  LLM: none needed with these parameters"
    lines = ["  " + estimate_line(p)]
    for s in p["stages"]:
        known = "" if s["known_before_run"] else " (estimated: built from the previous stage's replies)"
        lines.append(f"    {s['template']} [{s['template_hash']}]: {s['requests']} requests, max_tokens "
                     f"{s['max_tokens']}, temperature {s['temperature']}{known}")
    for i, r in enumerate(p["first_requests"]):
        lines.append(f"  request {i + 1} ({r['schema']}, sample {r['sample_index']}, max_tokens {r['max_tokens']}):")
        for m in r["messages"]:
            text = m["content"] if len(m["content"]) <= 600 else m["content"][:600] + " \u2026"
            lines.append(f"    [{m['role']}] " + text.replace("\n", "\n      "))
    return "\n".join(lines)


__all__ = [
    "BudgetReachedError", "Call", "LLMMap", "Planned", "Reply", "Template", "TemplateError", "ab_swapped",
    "backend_hint", "estimate", "failure_reason", "llm_plan", "looks_refused", "merge_usage",
    "estimate_line", "missing_backend_message", "preflight", "preview", "preview_table", "preview_text", "strict_object", "template_sources",
    "text_of",
]
