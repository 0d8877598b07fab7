"""Read agent trajectories into :data:`schemas.rows.TRAJECTORY_SCHEMA` rows.

Two shapes, detected per record:

- **τ-bench** (``{"task_id", "reward", "info": {"task": {"instruction", ...}}, "traj": [...]}``,
  the historical-trajectory files of sierra-research/tau-bench, JSONL or the original JSON
  array): ``traj`` is an OpenAI chat. Each assistant message is one action (one step per tool
  call it holds); the user messages since the previous action are its observation; tool
  messages are matched to the open calls *by position* (τ-bench reuses call ids); trailing
  user messages become ``final_observation``. ``reward == 1`` is ``success``, else
  ``failure``. Quirks that real files have and that are kept, not dropped: ``reward_info:
  null``, ``content: null`` on tool-call turns, text on tool-call turns (kept as ``thought``),
  tool outputs that are not JSON or empty, a run that ends on a tool message, a leading system
  message (kept in metadata). The task's gold ``actions`` and ``outputs`` go to metadata
  (``gold_actions``, ``gold_outputs``): generators use them to find where the goal was met.
- **prefab** (``{"instruction", "steps": [...], "task_id"?, "outcome"?, "final_observation"?,
  "metadata"?}``): the schema's own fields; a step is ``{"kind": "reply", "action"}`` or
  ``{"kind": "tool_call", "tool_name", "tool_arguments" (object or JSON text), "tool_output"?}``
  plus optional ``observation`` and ``thought``. A given ``trajectory_id`` is ignored: the id
  is always the content hash.

A bad record raises :class:`InputError` naming file, line and field (``traj[4].tool_calls[0]
.function.arguments``); nothing is skipped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from schemas.errors import InputError
from schemas.pairs import Provenance
from schemas.readers.base import Record, RowContext, json_type
from schemas.readers.containers import container_of, iter_json_array, iter_jsonl, iter_parquet
from schemas.rows import STEP_KINDS, TRAJECTORY_SCHEMA, Step, Trajectory, tool_call_text

TAU_BENCH = "tau-bench"
PREFAB = "prefab-trajectory"


def sniff_trajectory(value: Any) -> str | None:
    """``"tau-bench"``, ``"prefab-trajectory"`` or None for a record of neither shape."""
    if not isinstance(value, dict):
        return None
    if "traj" in value and "info" in value:
        return TAU_BENCH
    if "steps" in value and "instruction" in value:
        return PREFAB
    return None


def read_trajectories(path: str | Path, *, strict: bool = False) -> pa.Table:
    """Every trajectory in ``path`` (JSONL, JSON array or Parquet), in file order.

    The first bad record raises :class:`InputError` with its file, line and field.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", file=str(path))
    container = container_of(path)
    iterate = {"jsonl": iter_jsonl, "json": iter_json_array, "parquet": iter_parquet}.get(container)
    if iterate is None:
        raise InputError(f"trajectories cannot be read from a {container} container", file=str(path))
    ctx = RowContext(file=str(path), strict=strict)
    rows = [parse_trajectory(record, ctx).to_row() for record in iterate(path)]
    if not rows:
        raise InputError("no trajectories in the file", file=str(path))
    return pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA)


def parse_trajectory(record: Record, ctx: RowContext) -> Trajectory:
    if isinstance(record.value, InputError):
        raise record.value
    shape = sniff_trajectory(record.value)
    if shape == TAU_BENCH:
        trajectory = parse_tau_bench(record, ctx)
    elif shape == PREFAB:
        trajectory = parse_prefab(record, ctx)
    else:
        keys = ", ".join(sorted(record.value)[:8]) if isinstance(record.value, dict) else json_type(record.value)
        raise ctx.error(record, None, "not a trajectory: expected τ-bench fields (traj, info) or prefab "
                                      f"fields (instruction, steps); got {keys}")
    trajectory.provenance = Provenance(source_file=record.file, source_line=record.line,
                                       step=f"read:{shape}")
    return trajectory


# ---- τ-bench ------------------------------------------------------------------------------


def parse_tau_bench(record: Record, ctx: RowContext) -> Trajectory:
    row = record.value
    task_id = _task_id(record, ctx, row.get("task_id"), "task_id")
    reward = ctx.number(record, row, "reward")
    if reward is None:
        raise ctx.error(record, "reward", "missing field")
    info = _object(record, ctx, row.get("info"), "info")
    task = _object(record, ctx, info.get("task"), "info.task")
    instruction = ctx.text(record, task, "instruction") if "instruction" in task else None
    if instruction is None:
        raise ctx.error(record, "info.task.instruction", "missing field")
    if not instruction.strip():
        raise ctx.error(record, "info.task.instruction", "empty instruction")
    gold_actions = task.get("actions") or []
    if not isinstance(gold_actions, list):
        raise ctx.error(record, "info.task.actions", f"expected a list, got {json_type(gold_actions)}")
    traj = row.get("traj")
    if not isinstance(traj, list):
        raise ctx.error(record, "traj", f"expected a list of messages, got {json_type(traj)}")
    steps, final, system = _chat_steps(record, ctx, traj, "traj")
    metadata: dict[str, Any] = {
        "format": TAU_BENCH,
        "reward": reward,
        "trial": row.get("trial"),
        "user_id": task.get("user_id"),
        "ended_by": info.get("source"),
        "gold_actions": gold_actions,
        "gold_outputs": task.get("outputs") or [],
        "user_cost": info.get("user_cost"),
        "reward_info": info.get("reward_info"),  # null in some real rows: kept as null
    }
    if system is not None:
        metadata["system"] = system
    return Trajectory(instruction=instruction, steps=steps, outcome="success" if reward >= 1.0 else "failure",
                      task_id=task_id, final_observation=final, metadata=metadata)


def _chat_steps(record: Record, ctx: RowContext, messages: list[Any],
                where: str) -> tuple[list[Step], str | None, str | None]:
    """(steps, final observation, system prompt) of an OpenAI chat."""
    steps: list[Step] = []
    pending: list[str] = []  # user text since the last action
    open_calls: list[int] = []  # steps whose tool output has not come yet, in call order
    system = None
    for index, message in enumerate(messages):
        at = f"{where}[{index}]"
        if not isinstance(message, dict):
            raise ctx.error(record, at, f"expected a message object, got {json_type(message)}")
        role = message.get("role")
        if role == "system":
            if steps or pending or system is not None:
                raise ctx.error(record, f"{at}.role", "a system message after the conversation started")
            system = _text(record, ctx, message, "content", at)
        elif role == "user":
            open_calls.clear()  # calls nobody answered keep tool_output null
            pending.append(_text(record, ctx, message, "content", at))
        elif role == "assistant":
            open_calls.clear()
            observation = "\n\n".join(pending) if pending else None
            pending = []
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise ctx.error(record, f"{at}.content", f"expected text or null, got {json_type(content)}")
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ctx.error(record, f"{at}.tool_calls", f"expected a list, got {json_type(calls)}")
            if not calls:
                if content is None or not content.strip():
                    raise ctx.error(record, f"{at}.content", "an assistant message with neither text nor tool calls")
                steps.append(Step(observation, content))
                continue
            for number, call in enumerate(calls):
                name, arguments = _tool_call(record, ctx, call, f"{at}.tool_calls[{number}]")
                thought = content if number == 0 and content and content.strip() else None
                steps.append(Step.tool_call(name, arguments, observation=observation if number == 0 else None,
                                            thought=thought))
                open_calls.append(len(steps) - 1)
        elif role == "tool":
            if not open_calls:
                raise ctx.error(record, f"{at}.role", "a tool message with no tool call before it")
            step = steps[open_calls.pop(0)]
            name = message.get("name")
            if name is not None and name != step.tool_name:
                raise ctx.error(record, f"{at}.name", f"tool output of {name!r} answers a call to {step.tool_name!r}")
            step.tool_output = _text(record, ctx, message, "content", at, null_ok=True)
        else:
            raise ctx.error(record, f"{at}.role", f"unknown role {role!r}")
    if not steps:
        raise ctx.error(record, where, "no agent action (assistant message) in the trajectory")
    return steps, ("\n\n".join(pending) if pending else None), system


def _tool_call(record: Record, ctx: RowContext, call: Any, at: str) -> tuple[str, str]:
    if not isinstance(call, dict):
        raise ctx.error(record, at, f"expected a tool call object, got {json_type(call)}")
    function = call.get("function")
    if not isinstance(function, dict):
        raise ctx.error(record, f"{at}.function", f"expected an object, got {json_type(function)}")
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ctx.error(record, f"{at}.function.name", "missing tool name")
    return name, _arguments(record, ctx, function.get("arguments"), f"{at}.function.arguments")


def _arguments(record: Record, ctx: RowContext, value: Any, at: str) -> str:
    """Tool arguments as canonical JSON object text (key order kept)."""
    if value is None:
        raise ctx.error(record, at, "missing tool arguments")
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ctx.error(record, at, f"arguments are not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise ctx.error(record, at, f"arguments must be a JSON object, got {json_type(value)}")
    return json.dumps(value, ensure_ascii=False)


def _text(record: Record, ctx: RowContext, message: dict[str, Any], key: str, at: str,
          *, null_ok: bool = False) -> str:
    value = message.get(key)
    if value is None and null_ok:
        return ""
    if not isinstance(value, str):
        raise ctx.error(record, f"{at}.{key}", f"expected text, got {json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ctx.error(record, f"{at}.{key}", f"undecodable text ({exc.reason})") from None
    return value


def _object(record: Record, ctx: RowContext, value: Any, at: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ctx.error(record, at, f"expected an object, got {json_type(value)}")
    return value


def _task_id(record: Record, ctx: RowContext, value: Any, at: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ctx.error(record, at, f"expected an integer or text, got {json_type(value)}")
    return str(value)


# ---- prefab's own shape ---------------------------------------------------------------------


def parse_prefab(record: Record, ctx: RowContext) -> Trajectory:
    row = record.value
    instruction = ctx.text(record, row, "instruction")
    if not instruction.strip():
        raise ctx.error(record, "instruction", "empty instruction")
    task_id = _task_id(record, ctx, row.get("task_id"), "task_id")
    outcome = row.get("outcome")
    if outcome is not None and not isinstance(outcome, str):
        raise ctx.error(record, "outcome", f"expected 'success', 'failure' or text, got {json_type(outcome)}")
    final = row.get("final_observation")
    if final is not None and not isinstance(final, str):
        raise ctx.error(record, "final_observation", f"expected text, got {json_type(final)}")
    metadata = row.get("metadata")
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise ctx.error(record, "metadata", f"not a JSON object ({exc.msg})") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise ctx.error(record, "metadata", f"expected an object, got {json_type(metadata)}")
    raw_steps = row.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ctx.error(record, "steps", "expected a non-empty list of steps")
    steps = [_prefab_step(record, ctx, step, f"steps[{i}]") for i, step in enumerate(raw_steps)]
    for i, step in enumerate(steps[:-1]):
        if step.kind == "tool_call" and step.tool_output is None:
            raise ctx.error(record, f"steps[{i}].tool_output",
                            "a tool call with no output before the next step (only the last call may lack one)")
    return Trajectory(instruction=instruction, steps=steps, outcome=outcome, task_id=task_id,
                      final_observation=final, metadata=metadata or None)


def _prefab_step(record: Record, ctx: RowContext, value: Any, at: str) -> Step:
    if not isinstance(value, dict):
        raise ctx.error(record, at, f"expected a step object, got {json_type(value)}")
    for key in ("observation", "thought", "action", "tool_output", "tool_name"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise ctx.error(record, f"{at}.{key}", f"expected text, got {json_type(value[key])}")
    kind = value.get("kind") or ("tool_call" if value.get("tool_name") is not None else "reply")
    if kind not in STEP_KINDS:
        raise ctx.error(record, f"{at}.kind", f"unknown step kind {kind!r} (expected one of {', '.join(STEP_KINDS)})")
    if kind == "reply":
        action = value.get("action")
        if not isinstance(action, str) or not action.strip():
            raise ctx.error(record, f"{at}.action", "a reply step needs its text")
        for key in ("tool_name", "tool_arguments", "tool_output"):
            if value.get(key) is not None:
                raise ctx.error(record, f"{at}.{key}", "a reply step has no tool fields")
        return Step(value.get("observation"), action, value.get("thought"))
    name = value.get("tool_name")
    if not isinstance(name, str) or not name.strip():
        raise ctx.error(record, f"{at}.tool_name", "a tool_call step needs its tool name")
    arguments = _arguments(record, ctx, value.get("tool_arguments", {}), f"{at}.tool_arguments")
    step = Step.tool_call(name, arguments, observation=value.get("observation"), thought=value.get("thought"),
                          output=value.get("tool_output"))
    if value.get("action") is not None and value["action"] != tool_call_text(name, arguments):
        ctx.coerced["action: rewritten from the tool call"] += 1  # the structured call is the truth
    return step


__all__ = ["PREFAB", "TAU_BENCH", "parse_trajectory", "read_trajectories", "sniff_trajectory"]
