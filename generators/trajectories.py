"""Corrupted agent trajectories (UI-Genie) and real success-vs-failure pairs.

Input: trajectory rows (:data:`schemas.rows.TRAJECTORY_SCHEMA`, read from files by
:func:`schemas.readers.trajectories.read_trajectories`). Output: preference pairs.

**How a trajectory becomes a pair.**

- Task-level (outcome) pairs: ``prompt = [user: instruction]``; each response is the whole
  run rendered as text, one line per event::

      [user] I want to cancel reservation ABC123.
      [agent] call get_reservation_details {"reservation_id": "ABC123"}
      [tool get_reservation_details] {"reservation_id": "ABC123", ...}
      [agent] Your reservation is cancelled.

  A tool-call turn's text comes on the ``[agent]`` line before the call. The closing
  ``final_observation`` (τ-bench's ``###STOP###``) is not an agent action and is not
  rendered: it would be a cue that tells finished runs from truncated ones by itself.
- Step-level (process) pairs: ``prompt = [user: instruction]`` followed by the history
  before step t as chat turns (observations as ``user``, actions as ``assistant``, tool
  outputs as ``tool``) up to the observation that step t answers; the responses are the
  action at step t: the real one (chosen) and the replaced one (rejected).

Long observations and tool outputs are cut to ``max_observation_chars`` in renderings.

**Negatives**, from successful runs (``outcome == "success"``):

- ``truncation``: the run cut before its goal — before the last call that matches a gold
  action, or the reply that first states every gold output (τ-bench metadata); without
  gold data, before the last step. Keeps a fraction of the steps drawn from
  [``truncate_min``, ``truncate_max``].
- ``wrong_instruction``: another task's successful run under this task's instruction.
- ``continuation``: the run followed by extra state-changing tool calls after the goal,
  taken verbatim (call and real output) from other runs of the same task, else the data.
- ``action_replacement`` (step-level): one tool call replaced by a plausible other one — the
  same tool with one argument changed to a value the data has for that tool and key, or a
  different tool call seen elsewhere (same task preferred).
- ``natural``: a real successful run against a real failed run of the same ``task_id``.

Every corrupted step list stays a valid trajectory (:func:`validate_steps`). Failed runs
whose task has no success, runs with another outcome and runs too short for a corruption
are counted in the stats; rows whose steps are malformed are failed rows.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from factory.steps import GENERATED_SCHEMA, StepContext, StepResult, failed_rows, generator, param
from schemas.pairs import pair_id_of
from schemas.rows import STEP_KINDS, tool_call_text

KINDS = ("truncation", "wrong_instruction", "continuation", "action_replacement", "natural")
# Calls whose names start like this read state; appending them after the goal harms nothing,
# so they would make false negatives for the continuation corruption.
READ_ONLY_PREFIXES = ("get", "search", "list", "find", "lookup", "read", "check", "calculate", "think")

OUTPUT_SCHEMA = GENERATED_SCHEMA


@dataclass(frozen=True)
class TrajectoriesParams:
    kinds: list[str] = param(list(KINDS), "negatives to make: " + ", ".join(KINDS))
    truncate_min: float = param(0.3, "smallest share of the steps before the goal (of all steps when no goal "
                                     "is known) that a truncation keeps",
                                low=0.0, high=1.0)
    truncate_max: float = param(0.7, "largest share of the steps before the goal (of all steps when no goal "
                                     "is known) that a truncation keeps",
                                low=0.0, high=1.0)
    max_per_trajectory: int = param(1, "negatives of each corruption kind per successful run", low=1)
    max_natural_per_task: int = param(4, "real success-vs-failure pairs per task (0: every combination)",
                                      low=0)
    extra_steps: int = param(1, "tool calls the continuation appends after the goal", low=1, high=5)
    continuation_tools: list[str] = param([], "tools the continuation may append (empty: every tool whose "
                                              "name does not start with a read-only verb: "
                                              + ", ".join(READ_ONLY_PREFIXES) + ")")
    max_observation_chars: int = param(600, "observations and tool outputs longer than this are cut in "
                                             "renderings (0: never)", low=0)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"parameter 'kinds': unknown kind {unknown[0]!r} (known: {', '.join(KINDS)})")
        if not self.kinds:
            raise ValueError("parameter 'kinds' is empty: nothing to generate")
        if self.truncate_min > self.truncate_max:
            raise ValueError(f"parameter 'truncate_min' ({self.truncate_min}) exceeds 'truncate_max' "
                             f"({self.truncate_max})")


# ---- structure and rendering ----------------------------------------------------------------


def validate_steps(steps: Sequence[dict[str, Any]]) -> list[str]:
    """What is wrong with a step list (empty when it is a valid trajectory).

    Valid: at least one step; each a ``reply`` with text and no tool fields, or a
    ``tool_call`` with a tool name and JSON-object arguments; every call but the last has
    its output (an observation follows every call that the run continued after).
    """
    problems = []
    if not steps:
        return ["no steps"]
    for i, step in enumerate(steps):
        kind = step.get("kind")
        if kind not in STEP_KINDS:
            problems.append(f"step {i}: unknown kind {kind!r}")
        elif kind == "reply":
            if not (step.get("action") or "").strip():
                problems.append(f"step {i}: reply without text")
            if any(step.get(k) is not None for k in ("tool_name", "tool_arguments", "tool_output")):
                problems.append(f"step {i}: reply with tool fields")
        else:
            if not (step.get("tool_name") or "").strip():
                problems.append(f"step {i}: tool call without a tool name")
            try:
                arguments = json.loads(step.get("tool_arguments") or "")
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                problems.append(f"step {i}: tool arguments are not a JSON object")
            if step.get("tool_output") is None and i < len(steps) - 1:
                problems.append(f"step {i}: tool call without output before step {i + 1}")
    return problems


def _clip(text: str, limit: int) -> str:
    if limit and len(text) > limit:
        return text[:limit] + f" ...[{len(text) - limit} more characters]"
    return text


def render_action(step: dict[str, Any]) -> str:
    """An action as the agent would emit it: the reply, or any text then the call."""
    if step["kind"] != "tool_call":
        return step["action"]
    call = tool_call_text(step["tool_name"], step["tool_arguments"])
    return f"{step['thought']}\n{call}" if step.get("thought") else call


def render_trajectory(steps: Sequence[dict[str, Any]], max_chars: int = 0) -> str:
    """A run as readable text: ``[user]`` observations, ``[agent]`` actions, ``[tool NAME]`` outputs."""
    lines = []
    for step in steps:
        if step.get("observation") is not None:
            lines.append(f"[user] {_clip(step['observation'], max_chars)}")
        lines.append(f"[agent] {render_action(step)}")
        if step["kind"] == "tool_call" and step.get("tool_output") is not None:
            lines.append(f"[tool {step['tool_name']}] {_clip(step['tool_output'], max_chars) or '(empty)'}")
    return "\n".join(lines)


def history_prompt(instruction: str, steps: Sequence[dict[str, Any]], t: int,
                   max_chars: int = 0) -> list[dict[str, str]]:
    """The chat an agent sees before acting at step ``t``, after the task instruction."""
    messages = [{"role": "user", "content": instruction}]
    for step in steps[:t]:
        if step.get("observation") is not None:
            messages.append({"role": "user", "content": _clip(step["observation"], max_chars)})
        messages.append({"role": "assistant", "content": render_action(step)})
        if step["kind"] == "tool_call" and step.get("tool_output") is not None:
            messages.append({"role": "tool", "content": _clip(step["tool_output"], max_chars) or "(empty)"})
    if steps[t].get("observation") is not None:
        messages.append({"role": "user", "content": _clip(steps[t]["observation"], max_chars)})
    return messages


def _canonical(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _call_key(step: dict[str, Any]) -> tuple[str, str]:
    return step["tool_name"], _canonical(json.loads(step["tool_arguments"]))


def goal_step(steps: Sequence[dict[str, Any]], metadata: dict[str, Any]) -> int | None:
    """Index of the step where the goal was met, from gold actions/outputs; None if unknown."""
    marks = []
    gold = [a for a in metadata.get("gold_actions") or [] if isinstance(a, dict) and a.get("name")]
    if gold:
        exact = {(a["name"], _canonical(a.get("kwargs") or {})) for a in gold}
        names = {a["name"] for a in gold}
        calls = [i for i, s in enumerate(steps) if s["kind"] == "tool_call"]
        matched = [i for i in calls if _call_key(steps[i]) in exact] or \
                  [i for i in calls if steps[i]["tool_name"] in names]
        if matched:
            marks.append(max(matched))
    outputs = [str(o).lower() for o in metadata.get("gold_outputs") or []]
    if outputs:
        for i, step in enumerate(steps):
            text = render_action(step).lower()
            if all(o in text for o in outputs):
                marks.append(i)
                break
    return max(marks) if marks else None


# ---- the generator ---------------------------------------------------------------------------


@dataclass
class Negative:
    """One pair plus the step list of its rejected side (kept for structure checks)."""

    kind: str
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    parent_ids: list[str]
    method: str
    generated: str
    task: str
    steps: list[dict[str, Any]]


@dataclass
class _Run:
    row: int
    id: str
    task_id: str | None
    instruction: str
    steps: list[dict[str, Any]]
    outcome: str | None
    metadata: dict[str, Any]


@generator("trajectories", params=TrajectoriesParams, version="1", batch_rows=None,
           input_kind="trajectories")
def trajectories(table: pa.Table, ctx: StepContext[TrajectoriesParams]) -> StepResult:
    """Corrupted-trajectory negatives (UI-Genie) and real success-vs-failure pairs."""
    negatives, failed, stats = make_negatives(table, ctx)
    rows = [{"prompt": n.prompt, "chosen": n.chosen, "rejected": n.rejected, "tie": False,
             "attribute": n.kind, "task": n.task, "parent_ids": n.parent_ids, "generated": n.generated,
             "method": n.method} for n in negatives]
    rows_failed = failed_rows([r for r, _ in failed], [reason for _, reason in failed])
    return StepResult(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), rows_failed, stats)


def make_negatives(table: pa.Table, ctx: StepContext[TrajectoriesParams]
                   ) -> tuple[list[Negative], list[tuple[int, str]], dict[str, Any]]:
    """The pairs (with their rejected step lists), the failed input rows and the stats."""
    params = ctx.params
    runs, failed = _runs(table)
    successes = [r for r in runs if r.outcome == "success"]
    failures = [r for r in runs if r.outcome == "failure"]
    stats: dict[str, Any] = {
        "trajectories": table.num_rows, "successes": len(successes), "failures": len(failures),
        "other_outcome": len(runs) - len(successes) - len(failures), "malformed": len(failed),
        "made": {k: 0 for k in params.kinds}, "skipped": defaultdict(int),
    }
    pools = _Pools(runs, params)
    made: list[Negative] = []
    for run in successes:
        chosen = render_trajectory(run.steps, params.max_observation_chars)
        for kind in params.kinds:
            if kind == "natural":
                continue
            maker = {"truncation": _truncations, "wrong_instruction": _wrong_instructions,
                     "continuation": _continuations, "action_replacement": _replacements}[kind]
            got = maker(run, chosen, pools, ctx)
            if not got:
                stats["skipped"][f"{kind}: {pools.last_reason}"] += 1
            made += got
    if "natural" in params.kinds:
        natural, unpaired, mismatched = _natural(successes, failures, ctx)
        made += natural
        stats["failures_without_success"] = unpaired
        stats["natural_instruction_mismatch"] = mismatched
    out, seen = [], set()
    for negative in made:
        key = pair_id_of(negative.prompt, negative.chosen, negative.rejected)
        if negative.chosen == negative.rejected:
            stats["skipped"][f"{negative.kind}: identical renderings"] += 1
        elif key in seen:
            stats["skipped"][f"{negative.kind}: duplicate pair"] += 1
        else:
            seen.add(key)
            out.append(negative)
            stats["made"][negative.kind] += 1
    stats["skipped"] = dict(sorted(stats["skipped"].items()))
    stats["pairs"] = len(out)
    return out, failed, stats


def _runs(table: pa.Table) -> tuple[list[_Run], list[tuple[int, str]]]:
    runs, failed = [], []
    for row, record in enumerate(table.to_pylist()):
        steps = record.get("steps") or []
        problems = validate_steps(steps)
        if problems:
            failed.append((row, "malformed trajectory: " + "; ".join(problems[:3])))
            continue
        metadata = record.get("metadata")
        try:
            metadata = json.loads(metadata) if isinstance(metadata, str) else (metadata or {})
        except json.JSONDecodeError:
            metadata = {}
        runs.append(_Run(row, record["trajectory_id"], record.get("task_id"), record["instruction"], steps,
                         record.get("outcome"), metadata if isinstance(metadata, dict) else {}))
    return runs, failed


class _Pools:
    """What corruptions draw from: every real tool call, by task, tool and argument."""

    def __init__(self, runs: list[_Run], params: TrajectoriesParams) -> None:
        self.params = params
        self.last_reason = ""
        self.successes_by_task: dict[str | None, list[_Run]] = defaultdict(list)
        self.success_list = sorted((r for r in runs if r.outcome == "success"), key=lambda r: r.id)
        for run in self.success_list:
            self.successes_by_task[run.task_id].append(run)
        # (run id, step) for every call that has its output, ordered for stable draws
        self.calls: list[tuple[_Run, dict[str, Any]]] = []
        self.values: dict[tuple[str, str], set[str]] = defaultdict(set)
        for run in sorted(runs, key=lambda r: r.id):
            for step in run.steps:
                if step["kind"] != "tool_call":
                    continue
                for key, value in json.loads(step["tool_arguments"]).items():
                    self.values[(step["tool_name"], key)].add(_canonical(value))
                if step.get("tool_output") is not None:
                    self.calls.append((run, step))
        tools = set(params.continuation_tools)
        self.writes = [(r, s) for r, s in self.calls
                       if (s["tool_name"] in tools if tools
                           else not s["tool_name"].lower().startswith(READ_ONLY_PREFIXES))]

    def skip(self, reason: str) -> list[Negative]:
        self.last_reason = reason
        return []


def _keys(run: _Run, kind: str, n: int) -> list[str]:
    return [f"{run.id}\x00{kind}\x00{j}" for j in range(n)]


def _pick_distinct(ctx: StepContext[Any], keys: list[str], options: int, salt: str) -> list[int]:
    """Up to len(keys) distinct indices in range(options), fixed by (seed, keys)."""
    if options <= 0:
        return []
    draws = ctx.row_uniform([f"{keys[0]}\x00{i}" for i in range(options)], salt)
    return [int(i) for i in draws.argsort(kind="stable")[: len(keys)]]


def _truncations(run: _Run, chosen: str, pools: _Pools, ctx: StepContext[TrajectoriesParams]) -> list[Negative]:
    params = ctx.params
    goal = goal_step(run.steps, run.metadata)
    horizon = goal if goal is not None else len(run.steps) - 1  # steps a truncation may keep at most
    if horizon < 1:
        return pools.skip("goal at the first step" if goal is not None else "a single step")
    base = goal if goal is not None else len(run.steps)
    draws = ctx.row_uniform(_keys(run, "truncation", params.max_per_trajectory), "truncation")
    kept = []
    for u in draws:
        fraction = params.truncate_min + u * (params.truncate_max - params.truncate_min)
        k = min(max(1, math.ceil(fraction * base)), horizon)
        if k not in kept:
            kept.append(k)
    out = []
    for k in kept:
        steps = run.steps[:k]
        marker = f"goal at step {goal + 1}" if goal is not None else "no goal marker"
        out.append(Negative("truncation", [{"role": "user", "content": run.instruction}], chosen,
                            render_trajectory(steps, params.max_observation_chars), [run.id],
                            f"truncate:{k}/{len(run.steps)} ({marker})", "rejected", "agent_trajectory", steps))
    return out


def _wrong_instructions(run: _Run, chosen: str, pools: _Pools,
                        ctx: StepContext[TrajectoriesParams]) -> list[Negative]:
    params = ctx.params
    others = [r for r in pools.success_list
              if r.task_id != run.task_id and r.instruction.strip() != run.instruction.strip()]
    if not others:
        return pools.skip("no successful run of another task")
    picks = _pick_distinct(ctx, _keys(run, "wrong_instruction", params.max_per_trajectory), len(others),
                           "wrong_instruction")
    return [Negative("wrong_instruction", [{"role": "user", "content": run.instruction}], chosen,
                     render_trajectory(others[i].steps, params.max_observation_chars), [run.id, others[i].id],
                     f"other_task:{others[i].task_id}", "none", "agent_trajectory", list(others[i].steps))
            for i in picks]


def _continuations(run: _Run, chosen: str, pools: _Pools,
                   ctx: StepContext[TrajectoriesParams]) -> list[Negative]:
    params = ctx.params
    own = {_call_key(s) for s in run.steps if s["kind"] == "tool_call"}
    fresh = [(r, s) for r, s in pools.writes if r.id != run.id and _call_key(s) not in own]
    same_task = [(r, s) for r, s in fresh if r.task_id == run.task_id]
    pool = same_task if len(same_task) >= params.extra_steps else fresh
    if len(pool) < params.extra_steps:
        return pools.skip("no state-changing call to append")
    out = []
    for j in range(params.max_per_trajectory):
        picks = _pick_distinct(ctx, [f"{run.id}\x00continuation\x00{j}\x00{e}" for e in range(params.extra_steps)],
                               len(pool), f"continuation:{j}")
        extra = [{**pool[i][1], "observation": None, "thought": None} for i in picks]
        steps = list(run.steps) + extra
        sources = [pool[i][0].id for i in picks]
        out.append(Negative("continuation", [{"role": "user", "content": run.instruction}], chosen,
                            render_trajectory(steps, params.max_observation_chars),
                            [run.id, *dict.fromkeys(sources)],
                            "continue:+" + ",".join(s["tool_name"] for s in extra)
                            + (" (same task)" if pool is same_task else ""), "rejected", "agent_trajectory",
                            steps))
    return out


def _replacements(run: _Run, chosen: str, pools: _Pools,
                  ctx: StepContext[TrajectoriesParams]) -> list[Negative]:
    del chosen  # step-level pairs compare one action, not the run
    params = ctx.params
    calls = [i for i, s in enumerate(run.steps) if s["kind"] == "tool_call"]
    if not calls:
        return pools.skip("no tool call to replace")
    picks = _pick_distinct(ctx, _keys(run, "action_replacement", params.max_per_trajectory), len(calls),
                           "action_replacement")
    out = []
    for j, pick in enumerate(picks):
        t = calls[pick]
        key = f"{run.id}\x00action_replacement\x00{j}"
        replaced = _replace(run, run.steps[t], key, pools, ctx)
        if replaced is None:
            continue
        new_step, how, source = replaced
        steps = list(run.steps[:t]) + [new_step]
        out.append(Negative("action_replacement", history_prompt(run.instruction, run.steps, t,
                                                                 params.max_observation_chars),
                            render_action(run.steps[t]), render_action(new_step),
                            [run.id] + ([source] if source and source != run.id else []),
                            f"replace_action:step {t + 1}: {how}", "rejected", "agent_step", steps))
    return out or pools.skip("no plausible replacement")


def _replace(run: _Run, step: dict[str, Any], key: str, pools: _Pools,
             ctx: StepContext[Any]) -> tuple[dict[str, Any], str, str | None] | None:
    """A plausible other call for ``step``: (new step, how, run it came from)."""
    name = step["tool_name"]
    arguments = json.loads(step["tool_arguments"])
    changeable = sorted(k for k, v in arguments.items() if pools.values[(name, k)] - {_canonical(v)})
    others = [(r, s) for r, s in pools.calls if s["tool_name"] != name]
    others = [(r, s) for r, s in others if r.task_id == run.task_id] or others
    if not changeable and not others:
        return None
    use_argument = bool(changeable) and (not others or ctx.row_uniform([key], "strategy")[0] < 0.5)
    base = {"observation": step.get("observation"), "thought": step.get("thought"), "tool_output": None}
    if use_argument:
        field = changeable[int(ctx.row_choice([key], len(changeable), "argument")[0])]
        options = sorted(pools.values[(name, field)] - {_canonical(arguments[field])})
        value = options[int(ctx.row_choice([key], len(options), "value")[0])]
        new_arguments = json.dumps({**arguments, field: json.loads(value)}, ensure_ascii=False)
        new = {**step, **base, "tool_arguments": new_arguments, "action": tool_call_text(name, new_arguments)}
        return new, f"argument {field}", None
    source, other = others[int(ctx.row_choice([key], len(others), "tool")[0])]
    new = {**other, **base}
    return new, f"tool {name} -> {other['tool_name']}", source.id


def _natural(successes: list[_Run], failures: list[_Run],
             ctx: StepContext[TrajectoriesParams]) -> tuple[list[Negative], int, int]:
    params = ctx.params
    by_task: dict[str | None, list[_Run]] = defaultdict(list)
    for run in failures:
        by_task[run.task_id].append(run)
    wins: dict[str | None, list[_Run]] = defaultdict(list)
    for run in successes:
        wins[run.task_id].append(run)
    out, unpaired, mismatched = [], 0, 0
    for task_id in sorted(by_task, key=str):
        if task_id is None or task_id not in wins:
            unpaired += len(by_task[task_id])
            continue
        combos = [(s, f) for s in sorted(wins[task_id], key=lambda r: r.id)
                  for f in sorted(by_task[task_id], key=lambda r: r.id)]
        if params.max_natural_per_task and len(combos) > params.max_natural_per_task:
            draws = ctx.row_uniform([f"{s.id}\x00{f.id}" for s, f in combos], "natural")
            keep = sorted(sorted(range(len(combos)), key=lambda i: draws[i])[: params.max_natural_per_task])
            combos = [combos[i] for i in keep]
        for success, failure in combos:
            if success.instruction.strip() != failure.instruction.strip():
                mismatched += 1  # one task id, two goals: the pair would not compare like with like
                continue
            out.append(Negative("natural", [{"role": "user", "content": success.instruction}],
                                render_trajectory(success.steps, params.max_observation_chars),
                                render_trajectory(failure.steps, params.max_observation_chars),
                                [success.id, failure.id], f"natural:task {task_id}", "none", "agent_trajectory",
                                list(failure.steps)))
    return out, unpaired, mismatched
