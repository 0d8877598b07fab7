"""Absolute ratings per attribute (ArmoRM / HelpSteer / UltraFeedback style), and pairs from them.

An LLM rates each answer of a seed pair on its own (one request per answer and draw, so
the other answer's position cannot sway it) on a 1..``scale`` scale for every attribute
in ``attributes`` -- by default HelpSteer's helpfulness, correctness, coherence,
complexity and verbosity, or any list of names. Ratings are JSON-schema constrained, and
a reply that misses an attribute, repeats one or leaves the scale fails its seed.

Each seed yields one pair with ``attribute_scores`` (``[{attribute, chosen, rejected}]``,
the mean over ``samples`` draws) and a label derived from the ratings from the gap between
the answers' mean rating over the ``overall`` attributes (default: all but complexity and
verbosity, which describe an answer rather than grade it); a gap within ``tie_margin``
makes a tie. The ``margin`` column, which the trainer reads as a reward gap in logits, is
that gap as a share of the scale's range times ``max_margin``: gap / (scale − 1) ·
max_margin, so the widest possible gap (scale − 1 points) asks for ``max_margin`` logits
(default 1) and a 1-point gap on a 1–10 scale for 1/9 of that, whatever the scale. A raw
rating gap would ask a 6-point gap on a 1–10 scale for a 6-logit reward gap. Where the ratings prefer the seed's rejected answer, the pair
is flipped (``disagree=flip``, its scores swapped with it) or left out (``drop``,
counted). The method says which: ``ratings:agree``, ``ratings:flipped`` or ``ratings:tie``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa

from factory.steps import StepContext, StepResult, generator, param
from factory.steps.llm import (
    Call,
    LLMMap,
    Planned,
    Template,
    llm_plan,
    looks_refused,
    strict_object,
    template_sources,
    text_of,
)
from schemas.pairs import ATTRIBUTE_SCORE_TYPE

HELPSTEER: dict[str, str] = {
    "helpfulness": "how useful the response is for the prompt overall",
    "correctness": "whether every fact, number and step in it is right, and nothing relevant is missing",
    "coherence": "how clear, consistent and logically organised it is",
    "complexity": "how much expertise it takes to write it (basic vocabulary 1, expert knowledge high)",
    "verbosity": "how much detail it gives relative to what the prompt asks (terse 1, very detailed high)",
}
DESCRIPTIVE = ("complexity", "verbosity")

RATE = Template(
    "ratings_rate", "1",
    system=("You rate assistant responses for reward-model training, one attribute at a time, on an absolute "
            "scale. Judge the response on its own merits."),
    user=("Prompt:\n<<<\n{prompt}\n>>>\n\nResponse:\n<<<\n{response}\n>>>\n\n"
          "Rate the response from 1 (lowest) to {scale} (highest) on each of these attributes:\n{attributes}\n\n"
          "Give one entry per attribute, in this order, with a one-sentence rationale before its score."),
    schema=strict_object({"ratings": {"type": "array", "items": strict_object({
        "attribute": {"type": "string"}, "rationale": {"type": "string"}, "score": {"type": "integer"}})}}),
    max_tokens=512,
)


@dataclass(frozen=True)
class RatingsParams:
    attributes: list[str] = param(list(HELPSTEER), "attributes to rate (HelpSteer's five, or any names)")
    overall: list[str] = param([], "attributes whose mean rating decides the label (empty: all but complexity "
                                   "and verbosity)")
    scale: int = param(5, "ratings run from 1 to this", low=2, high=10)
    samples: int = param(1, "rating draws per answer, averaged", low=1, high=16)
    tie_margin: float = param(0.0, "a mean-rating gap at most this makes a tie", low=0.0)
    max_margin: float = param(1.0, "margin (reward gap in logits) of the widest rating gap, scale - 1 "
                                   "points; smaller gaps get their share of it", low=0.0)
    disagree: Literal["flip", "drop"] = param("flip", "when the ratings prefer the rejected answer: flip the "
                                                      "pair, or leave it out")
    include_ties: bool = param(True, "rate tie-labelled seeds too (their label then comes from the ratings)")
    temperature: float = param(0.0, "sampling temperature", low=0.0, high=2.0)
    max_tokens: int = param(512, "reply token limit of one rating", low=32)

    def __post_init__(self) -> None:
        names = [a.strip().lower() for a in self.attributes]
        if not names or any(not a for a in names):
            raise ValueError("parameter 'attributes' needs at least one non-empty name")
        if len(set(names)) != len(names):
            raise ValueError("parameter 'attributes' lists a name twice")
        unknown = sorted(set(a.lower() for a in self.overall) - set(names))
        if unknown:
            raise ValueError(f"parameter 'overall' names {unknown}, which are not in 'attributes'")
        if not self.overall and not [a for a in names if a not in DESCRIPTIVE]:
            raise ValueError("parameter 'overall' is needed when every attribute is descriptive")

    @property
    def names(self) -> list[str]:
        return [a.strip().lower() for a in self.attributes]

    @property
    def overall_names(self) -> list[str]:
        return [a.lower() for a in self.overall] or [a for a in self.names if a not in DESCRIPTIVE]


def _attribute_lines(params: RatingsParams) -> str:
    return "\n".join(f"- {a}: {HELPSTEER.get(a, f'the response’s {a}')}" for a in params.names)


def _seeds(table: pa.Table, params: RatingsParams) -> tuple[list[int], list[int]]:
    chosen = [c or "" for c in table.column("chosen").to_pylist()]
    rejected = [r or "" for r in table.column("rejected").to_pylist()]
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    empty = [i for i in range(table.num_rows) if not chosen[i].strip() or not rejected[i].strip()]
    usable = [i for i in range(table.num_rows)
              if chosen[i].strip() and rejected[i].strip() and (params.include_ties or not ties[i])]
    return usable, empty


def _calls(table: pa.Table, rows: list[int], params: RatingsParams) -> list[Call]:
    prompts = table.column("prompt").to_pylist()
    sides = {"chosen": table.column("chosen").to_pylist(), "rejected": table.column("rejected").to_pylist()}
    lines = _attribute_lines(params)
    return [Call(i, {"prompt": text_of(prompts[i]), "response": sides[side][i], "scale": params.scale,
                     "attributes": lines}, sample=k, tag=side)
            for i in rows for side in ("chosen", "rejected") for k in range(params.samples)]


def _margin(gap: float, params: RatingsParams) -> float:
    """A mean-rating gap as a reward margin: its share of the scale's range, in max_margin units."""
    return gap / (params.scale - 1) * params.max_margin


@llm_plan("generator", "ratings", needs="a chat model with JSON-schema structured outputs")
def plan_ratings(table: pa.Table, ctx: StepContext[RatingsParams]) -> list[Planned]:
    usable, _ = _seeds(table, ctx.params)
    return [Planned(RATE, _calls(table, usable, ctx.params), temperature=ctx.params.temperature,
                    max_tokens=ctx.params.max_tokens)]


@generator("ratings", params=RatingsParams, version="2", backend="required", batch_rows=2048,
           templates=template_sources(RATE))
def ratings(table: pa.Table, ctx: StepContext[RatingsParams]) -> StepResult:
    """Per-attribute absolute ratings of both answers, and the pair they imply (ArmoRM / UltraFeedback)."""
    params = ctx.params
    names = params.names
    llm = LLMMap(ctx, role="judge", what="an LLM to rate answers")
    usable, empty = _seeds(table, params)

    def check(value: dict, call: Call) -> str | None:
        got: dict[str, int] = {}
        for entry in value["ratings"]:
            name = entry["attribute"].strip().lower()
            if name in got:
                return f"rated {name!r} twice"
            got[name] = entry["score"]
        missing = [a for a in names if a not in got]
        if missing:
            rationale = " ".join(e["rationale"] for e in value["ratings"])
            if not got and looks_refused(rationale):
                return f"refused: {rationale[:80]!r}"
            return f"no rating for {', '.join(missing)} ({call.tag} answer)"
        out_of_scale = {a: got[a] for a in names if not 1 <= got[a] <= params.scale}
        if out_of_scale:
            return f"ratings outside 1..{params.scale}: {out_of_scale} ({call.tag} answer)"
        return None

    replies = llm.run(RATE, _calls(table, usable, params), check=check, temperature=params.temperature,
                      max_tokens=params.max_tokens)
    scores: dict[tuple[int, str], list[dict[str, int]]] = {}
    for reply in replies:
        if reply.ok:
            got = {e["attribute"].strip().lower(): e["score"] for e in reply.value["ratings"]}
            scores.setdefault((reply.call.row, reply.call.tag), []).append(got)

    prompts = table.column("prompt")
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    pair_ids = table.column("pair_id").to_pylist()
    tasks = table.column("task").to_pylist() if "task" in table.column_names else [None] * table.num_rows
    rows: list[dict[str, Any]] = []
    take: list[int] = []
    counts = {"agree": 0, "flipped": 0, "tie": 0, "dropped_disagree": 0}
    for i in usable:
        if llm.failed(i):
            continue
        mean = {side: {a: sum(d[a] for d in scores[(i, side)]) / len(scores[(i, side)]) for a in names}
                for side in ("chosen", "rejected")}
        gap = (sum(mean["chosen"][a] for a in params.overall_names)
               - sum(mean["rejected"][a] for a in params.overall_names)) / len(params.overall_names)
        attribute_scores = [{"attribute": a, "chosen": mean["chosen"][a], "rejected": mean["rejected"][a]}
                            for a in names]
        first, second, label = chosen[i], rejected[i], "agree"
        if abs(gap) <= params.tie_margin:
            label = "tie"
        elif gap < 0:
            if params.disagree == "drop":
                counts["dropped_disagree"] += 1
                continue
            first, second, label = rejected[i], chosen[i], "flipped"
            attribute_scores = [{"attribute": s["attribute"], "chosen": s["rejected"], "rejected": s["chosen"]}
                                for s in attribute_scores]
        counts[label] += 1
        take.append(i)
        rows.append({"chosen": first, "rejected": second, "tie": label == "tie",
                     "margin": 0.0 if label == "tie" else _margin(abs(gap), params), "attribute_scores": attribute_scores,
                     "task": tasks[i], "parent_ids": [pair_ids[i]], "generated": "none",
                     "method": f"ratings:{label}"})
    out = pa.table({
        "prompt": prompts.take(pa.array(take, pa.int64())),
        "chosen": pa.array([r["chosen"] for r in rows], pa.string()),
        "rejected": pa.array([r["rejected"] for r in rows], pa.string()),
        "tie": pa.array([r["tie"] for r in rows], pa.bool_()),
        "margin": pa.array([r["margin"] for r in rows], pa.float64()),
        "attribute_scores": pa.array([r["attribute_scores"] for r in rows], pa.list_(ATTRIBUTE_SCORE_TYPE)),
        "task": pa.array([r["task"] for r in rows], pa.string()),
        "parent_ids": pa.array([r["parent_ids"] for r in rows], pa.list_(pa.string())),
        "generated": pa.array([r["generated"] for r in rows], pa.string()),
        "method": pa.array([r["method"] for r in rows], pa.string()),
    })
    stats = {"rated_seeds": len(take) + counts["dropped_disagree"], **counts, "seeds_failed_llm": len(llm.failures)}
    failed = llm.failed_table({i: "needs a non-empty chosen and rejected answer" for i in empty})
    return StepResult(out, failed, stats, llm.usage)
