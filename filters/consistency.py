"""Rejection sampling with a judge: keep the pairs whose label a judge agrees with.

``judge=llm`` (default): an LLM re-decides each pair ``samples`` times. With ``swap`` (on
by default) the rejected answer is shown first in half of the draws -- which half is
fixed by the pair id and the sample index (:func:`factory.steps.llm.ab_swapped`),
alternating, so an even ``samples`` shows each order exactly equally often and a judge's
preference for a position adds as many votes to one side as to the other. ``style``:

- ``verdict``: a brief reason, then A, B or tie;
- ``generative`` (DeepSeek-GRM / RM-R1): the judge first writes the principles that matter
  for this prompt, then a critique of both answers against them, then its verdict; the
  ``samples`` draws (at temperature 0.7 unless set) are voted.

With ``rubric`` (on by default) and a ``rubric`` column in the input (made by the
``rubrics`` generator), the judge grades with that rubric (hard rules first).

``judge=rm``: a reward model trained by ``prefab train`` (``model=NAME``) scores both
answers; one vote, and the agreement is sigma(r_chosen - r_rejected).

Stored scores per pair: ``agreement`` (the share of votes for the labelled side, a tie
vote counting half; for a tie-labelled pair, 1 - |mean vote|), ``votes`` (+1 chosen, -1
rejected, 0 tie, in sample order), ``swapped`` (draws that showed the rejected answer
first) and ``samples_valid``. The decision keeps a pair when ``agreement >= threshold``,
flips it when ``flip_below`` is set and ``agreement <= flip_below``, and drops it
otherwise; both are thresholds, so changing them re-decides without a new request. A draw
that failed (refused, truncated, unparseable) fails its pair, with the reason, unless
``min_valid`` allows fewer valid draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from factory.steps import Decision, StepContext, StepResult, failed_rows, filter_step, param
from factory.steps.llm import (
    Call,
    LLMMap,
    Planned,
    Template,
    ab_swapped,
    strict_object,
    template_sources,
    text_of,
)

_SYSTEM = ("You are an impartial judge of assistant responses. The order in which the responses are shown says "
           "nothing about their quality; do not let length or style decide unless the prompt asks for it.")
_PAIR = ("Prompt:\n<<<\n{prompt}\n>>>\n{rubric_block}\nResponse A:\n<<<\n{a}\n>>>\n\nResponse B:\n<<<\n{b}\n>>>\n\n")
_VERDICT = {"type": "string", "enum": ["A", "B", "tie"]}

JUDGE = Template(
    "consistency_judge", "1", system=_SYSTEM,
    user=_PAIR + "Which response is better? Give a one-sentence reason, then the verdict (A, B, or tie if "
                 "neither is better).",
    schema=strict_object({"reason": {"type": "string"}, "verdict": _VERDICT}),
    max_tokens=256,
)

GENERATIVE = Template(
    "consistency_generative", "1", system=_SYSTEM,
    user=_PAIR + "First write the principles (3 to 5) that decide what a good response to this prompt is. Then "
                 "critique each response against them, point by point. Only then give the verdict (A, B, or tie "
                 "if neither is better).",
    schema=strict_object({"principles": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
                          "critique": {"type": "string"}, "verdict": _VERDICT}),
    max_tokens=1024,
)


@dataclass(frozen=True)
class ConsistencyParams:
    judge: Literal["llm", "rm"] = param("llm", "who judges: an LLM (--backend) or a reward model (model=NAME)")
    style: Literal["verdict", "generative"] = param("verdict", "llm judge: a verdict with a short reason, or "
                                                               "principles + critique + verdict (DeepSeek-GRM)")
    samples: int = param(2, "llm judge: draws per pair, voted (even numbers balance the A/B order)", low=1, high=64)
    swap: bool = param(True, "llm judge: show the rejected answer first in half the draws (cancels position bias)")
    rubric: bool = param(True, "llm judge: grade with the pair's `rubric` column when the input has one")
    model: str | None = param(None, "rm judge: a reward model trained by `prefab train` (name or path)",
                              model=True)
    temperature: float | None = param(None, "llm judge: sampling temperature (default 0 for verdict, 0.7 for "
                                            "generative)", low=0.0, high=2.0)
    max_tokens: int | None = param(None, "llm judge: reply token limit (default 256 for verdict, 1024 for "
                                         "generative)", low=16)
    min_valid: int = param(0, "llm judge: valid draws a pair needs (0: all of them); fewer fails the pair", low=0)
    threshold: float = param(0.5, "keep pairs whose agreement with the label is at least this",
                             low=0.0, high=1.0, decision=True)
    flip_below: float | None = param(None, "flip pairs whose agreement is at most this (unset: never flip)",
                                     low=0.0, high=1.0, decision=True)

    def __post_init__(self) -> None:
        if self.judge == "rm" and not self.model:
            raise ValueError("judge=rm needs model=NAME (a reward model trained by `prefab train`)")
        if self.min_valid > self.samples:
            raise ValueError(f"parameter 'min_valid' ({self.min_valid}) exceeds 'samples' ({self.samples})")
        if self.flip_below is not None and self.flip_below >= self.threshold:
            raise ValueError(f"parameter 'flip_below' ({self.flip_below}) must be below 'threshold' ({self.threshold})")

    @property
    def template(self) -> Template:
        return GENERATIVE if self.style == "generative" else JUDGE

    @property
    def sampling(self) -> tuple[float, int]:
        default_t = 0.7 if self.style == "generative" else 0.0
        return (default_t if self.temperature is None else self.temperature,
                self.max_tokens or self.template.max_tokens)


def _rubric_block(items: list[dict[str, Any]] | None) -> str:
    if not items:
        return ""
    rules = [i["text"] for i in items if i["kind"] == "hard_rule"]
    principles = [i["text"] for i in items if i["kind"] != "hard_rule"]
    lines = ["", "Grade with this rubric. A response that breaks a hard rule loses to one that does not; "
                 "otherwise prefer the one that satisfies the principles better."]
    lines += ["Hard rules:"] + [f"{k}. {t}" for k, t in enumerate(rules, 1)] if rules else []
    lines += ["Principles:"] + [f"{k}. {t}" for k, t in enumerate(principles, 1)]
    return "\n".join(lines) + "\n"


def judge_calls(table: pa.Table, params: ConsistencyParams) -> list[Call]:
    """``samples`` calls per pair; ``tag`` says whether the rejected answer is shown first."""
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    pair_ids = table.column("pair_id").to_pylist()
    rubrics = (table.column("rubric").to_pylist() if params.rubric and "rubric" in table.column_names
               else [None] * table.num_rows)
    calls = []
    for i in range(table.num_rows):
        block = _rubric_block(rubrics[i])
        for k in range(params.samples):
            swapped = params.swap and ab_swapped(pair_ids[i], k)
            a, b = (rejected[i], chosen[i]) if swapped else (chosen[i], rejected[i])
            calls.append(Call(i, {"prompt": text_of(prompts[i]), "rubric_block": block, "a": a or "", "b": b or ""},
                              sample=k, tag=swapped))
    return calls


def agreement_of(votes: list[int], tie: bool) -> float:
    """Share of votes for the labelled side (a tie vote is half); for a tie label, 1 - |mean|."""
    mean = sum(votes) / len(votes)
    return 1.0 - abs(mean) if tie else (mean + 1.0) / 2.0


def plan_consistency(table: pa.Table, ctx: StepContext[ConsistencyParams]) -> list[Planned]:
    params = ctx.params
    if params.judge != "llm":
        return []
    temperature, max_tokens = params.sampling
    return [Planned(params.template, judge_calls(table, params), temperature=temperature, max_tokens=max_tokens)]


def _scores(agreement: list[float | None], votes: list[list[int] | None], swapped: list[int | None],
            valid: list[int | None]) -> pa.Table:
    return pa.table({
        "agreement": pa.array(agreement, pa.float64()),
        "votes": pa.array(votes, pa.list_(pa.int8())),
        "swapped": pa.array(swapped, pa.int64()),
        "samples_valid": pa.array(valid, pa.int64()),
    })


def _rm_judge(table: pa.Table, ctx: StepContext[ConsistencyParams]) -> StepResult:
    from factory.trainer import score

    params = ctx.params
    scored = score(params.model, table.select(["prompt", "chosen", "rejected"]), home=ctx.home)
    margin = np.asarray(scored.column("reward_chosen").to_pylist()) - np.asarray(
        scored.column("reward_rejected").to_pylist())
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    agreement = []
    for m, tie in zip(margin.tolist(), ties, strict=True):
        p = 1.0 / (1.0 + math.exp(-m))
        agreement.append(1.0 - abs(2.0 * p - 1.0) if tie else p)
    votes = [[1 if m > 0 else -1 if m < 0 else 0] for m in margin.tolist()]
    out = _scores(agreement, votes, [0] * table.num_rows, [1] * table.num_rows)
    out = out.append_column("reward_margin", pa.array(margin, pa.float64()))
    usage = {"judges": [f"rm:{params.model}"], "models": []}
    return StepResult(out, None, {"judged": table.num_rows}, usage)


def decide_consistency(scores: pa.Table, params: ConsistencyParams) -> Decision:
    actions, reasons = [], []
    for a in scores.column("agreement").to_pylist():
        if a is None:  # a failed row: the runner sets it aside with its own reason
            actions.append("keep")
            reasons.append(None)
        elif params.flip_below is not None and a <= params.flip_below:
            actions.append("flip")
            reasons.append(f"judge agreement {a:.2f} <= flip_below {params.flip_below:g}: judge prefers the rejected")
        elif a >= params.threshold:
            actions.append("keep")
            reasons.append(None)
        else:
            actions.append("drop")
            reasons.append(f"judge agreement {a:.2f} < threshold {params.threshold:g}")
    return Decision(pa.array(actions, pa.string()), pa.array(reasons, pa.string()))


@filter_step("consistency", params=ConsistencyParams, decide=decide_consistency, version="1", backend="optional",
             batch_rows=4096, templates=template_sources(JUDGE, GENERATIVE), plan=plan_consistency,
             needs="a chat model with JSON-schema structured outputs as the judge; "
                   "or judge with a reward model: --set judge=rm --set model=NAME",
             reads=("prompt", "chosen", "rejected", "tie"))
def consistency(table: pa.Table, ctx: StepContext[ConsistencyParams]) -> StepResult:
    """Judge agreement with each pair's label, k order-swapped draws voted; keep above a threshold."""
    params = ctx.params
    if params.judge == "rm":
        return _rm_judge(table, ctx)
    llm = LLMMap(ctx, role="judge", what="an LLM judge (or --set judge=rm model=NAME)")
    temperature, max_tokens = params.sampling
    replies = llm.run(params.template, judge_calls(table, params), temperature=temperature, max_tokens=max_tokens)
    n = table.num_rows
    votes: list[list[int]] = [[] for _ in range(n)]
    swapped = [0] * n
    bad: dict[int, list[str]] = {}
    for reply in replies:
        i = reply.call.row
        if not reply.ok:
            bad.setdefault(i, []).append(f"sample {reply.call.sample}: {reply.reason}")
            continue
        verdict = reply.value["verdict"]
        swapped[i] += bool(reply.call.tag)
        if verdict == "tie":
            votes[i].append(0)
        else:
            votes[i].append(1 if (verdict == "A") != bool(reply.call.tag) else -1)
    need = params.min_valid or params.samples
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    agreement: list[float | None] = []
    failed: dict[int, str] = {}
    for i in range(n):
        if len(votes[i]) < need:
            failed[i] = (f"{len(votes[i])} of {params.samples} judge draws valid (need {need}): "
                         + "; ".join(bad.get(i, [])))
            agreement.append(None)
        else:
            agreement.append(agreement_of(votes[i], ties[i]))
    out = _scores(agreement, [v if a is not None else None for v, a in zip(votes, agreement, strict=True)],
                  [s if a is not None else None for s, a in zip(swapped, agreement, strict=True)],
                  [len(v) if a is not None else None for v, a in zip(votes, agreement, strict=True)])
    rows = sorted(failed)
    stats = {"judged": n - len(failed), "draws": len(replies), "draws_failed": sum(len(b) for b in bad.values()),
             "draws_swapped": sum(swapped), "rubric_conditioned": bool(params.rubric and "rubric" in table.column_names)}
    return StepResult(out, failed_rows(rows, [failed[r] for r in rows]), stats, llm.usage)
