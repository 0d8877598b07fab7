"""The trajectory reader (τ-bench and prefab JSONL) and the trajectories generator (UI-Genie)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.steps import ParamError, StepContext
from factory.steps.runner import execute, prepare, with_ids
from generators.trajectories import (
    goal_step,
    history_prompt,
    make_negatives,
    render_action,
    render_trajectory,
    validate_steps,
)
from schemas.errors import InputError
from schemas.readers.trajectories import read_trajectories
from schemas.rows import STEP_TYPE, TRAJECTORY_SCHEMA
from tests.conftest import REPO

DEMO_DIR = REPO / "examples" / "trajectories"
DEMO = DEMO_DIR / "demo_trajectories.jsonl"
TAU = "trajectories/tau-bench-airline-gpt4o.jsonl"


def _ctx(settings: dict | None = None, seed: int = 0) -> tuple[object, StepContext]:
    prepared = prepare("generator", "trajectories", settings or {})
    return prepared, StepContext("trajectories", prepared.params, seed=seed, run_id="t")


def _negatives(table: pa.Table, settings: dict | None = None, seed: int = 0):
    _, ctx = _ctx(settings, seed)
    return make_negatives(table, ctx)


def _by_id(table: pa.Table) -> dict[str, dict]:
    return {r["trajectory_id"]: r for r in table.to_pylist()}


# ---- a small τ-bench-shaped file with every quirk the README lists ----------------------


def _tau_row(**overrides) -> dict:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_user_details",
                                                             "arguments": "{\"user_id\": \"u1\"}"}}
    row = {
        "task_id": 7, "reward": 0.0, "trial": 2,
        "info": {"task": {"user_id": "u1", "instruction": "You are u1. Cancel reservation R1.",
                          "actions": [{"name": "cancel_reservation", "kwargs": {"reservation_id": "R1"}}],
                          "outputs": []},
                 "source": "cancel_reservation", "user_cost": 0.01, "reward_info": None},
        "traj": [
            {"role": "user", "content": "Please cancel R1."},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_user_details", "content": "{\"id\": \"u1\"}"},
            {"role": "assistant", "content": "Let me check both.", "tool_calls": [
                {**call, "function": {"name": "think", "arguments": "{\"thought\": \"x\"}"}},
                {**call, "function": {"name": "get_reservation_details", "arguments": {"reservation_id": "R1"}}},
            ]},
            {"role": "tool", "tool_call_id": "call_1", "name": "think", "content": ""},
            {"role": "tool", "tool_call_id": "call_1", "name": "get_reservation_details", "content": "Error: nope"},
            {"role": "assistant", "content": "Cancelling.", "tool_calls": [
                {**call, "function": {"name": "cancel_reservation", "arguments": "{\"reservation_id\": \"R1\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "name": "cancel_reservation", "content": "{\"ok\": true}"},
        ],
    }
    row.update(overrides)
    return row


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_tau_bench_quirks_are_kept_not_dropped(tmp_path: Path) -> None:
    success = _tau_row(task_id=7, reward=1.0, trial=0)
    system_first = _tau_row(traj=[{"role": "system", "content": "POLICY"}] + _tau_row()["traj"][:2]
                            + [_tau_row()["traj"][2], {"role": "assistant", "content": "Done."},
                               {"role": "user", "content": "Bye ###STOP###"}])
    path = _write_jsonl(tmp_path / "tau.jsonl", [success, _tau_row(), system_first])
    table = read_trajectories(path)
    assert table.schema.equals(TRAJECTORY_SCHEMA)
    rows = table.to_pylist()
    assert [r["outcome"] for r in rows] == ["success", "failure", "failure"]
    assert rows[0]["task_id"] == "7" and rows[0]["instruction"] == "You are u1. Cancel reservation R1."
    steps = rows[1]["steps"]
    assert [s["tool_name"] for s in steps] == ["get_user_details", "think", "get_reservation_details",
                                              "cancel_reservation"]
    # outputs matched by position although every call reuses the id "call_1"
    assert [s["tool_output"] for s in steps] == ['{"id": "u1"}', "", "Error: nope", '{"ok": true}']
    assert steps[0]["observation"] == "Please cancel R1." and steps[1]["observation"] is None
    assert steps[1]["thought"] == "Let me check both." and steps[2]["thought"] is None  # text once per turn
    assert steps[3]["thought"] == "Cancelling."
    assert json.loads(steps[2]["tool_arguments"]) == {"reservation_id": "R1"}  # object arguments accepted
    assert rows[1]["final_observation"] is None  # the run ended on a tool message
    meta = json.loads(rows[1]["metadata"])
    assert meta["reward_info"] is None and meta["gold_actions"][0]["name"] == "cancel_reservation"
    assert meta["ended_by"] == "cancel_reservation"
    assert rows[2]["final_observation"] == "Bye ###STOP###"
    assert json.loads(rows[2]["metadata"])["system"] == "POLICY"
    assert rows[0]["provenance"]["source_line"] == 1 and rows[0]["provenance"]["step"] == "read:tau-bench"
    assert all(validate_steps(r["steps"]) == [] for r in rows)
    # the original source file is one JSON array, system message included: same trajectories
    array = tmp_path / "tau.json"
    array.write_text(json.dumps([success, _tau_row(), system_first], indent=1))
    assert read_trajectories(array)["trajectory_id"].to_pylist() == table["trajectory_id"].to_pylist()


@pytest.mark.parametrize(("bad", "field", "words"), [
    (_tau_row(traj=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "think", "arguments": "{not json"}}]}]),
     "traj[1].tool_calls[0].function.arguments", "not valid JSON"),
    (_tau_row(traj=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "think", "arguments": "[1, 2]"}}]}]),
     "traj[1].tool_calls[0].function.arguments", "JSON object"),
    (_tau_row(traj=[{"role": "user", "content": "hi"}, {"role": "tool", "name": "think", "content": ""}]),
     "traj[1].role", "no tool call before it"),
    (_tau_row(traj=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]),
     "traj[1].content", "neither text nor tool calls"),
    (_tau_row(traj=[{"role": "user", "content": "only the user spoke"}]), "traj", "no agent action"),
    (_tau_row(info={"task": {"user_id": "u1"}}), "info.task.instruction", "missing"),
    (_tau_row(reward="high"), "reward", "expected a number"),
    ({"instruction": "Do it.", "steps": [{"kind": "tool_call", "tool_arguments": {}}]},
     "steps[0].tool_name", "tool name"),
    ({"instruction": "Do it.", "steps": [{"kind": "tool_call", "tool_name": "a", "tool_arguments": {}},
                                         {"kind": "reply", "action": "done"}]},
     "steps[0].tool_output", "no output"),
    ({"instruction": "Do it.", "steps": [{"kind": "reply", "action": "ok", "tool_output": "x"}]},
     "steps[0].tool_output", "no tool fields"),
    ({"instruction": "Do it.", "steps": [{"kind": "dance"}]}, "steps[0].kind", "unknown step kind"),
    ({"prompt": "not a trajectory"}, None, "not a trajectory"),
])
def test_a_malformed_line_fails_naming_file_line_and_field(tmp_path: Path, bad: dict, field: str | None,
                                                           words: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [_tau_row(), bad, _tau_row()])
    with pytest.raises(InputError) as caught:
        read_trajectories(path)
    error = caught.value
    assert (error.file, error.line, error.field) == (str(path), 2, field)
    assert words in error.reason
    assert str(path) in str(error) and "line 2" in str(error)


def test_broken_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [_tau_row(), _tau_row(), "{\"task_id\": 1, "])
    with pytest.raises(InputError, match=r"bad\.jsonl, line 3: invalid JSON"):
        read_trajectories(path)


# ---- the demo set --------------------------------------------------------------------------


def test_demo_set_is_what_its_script_writes_and_reads_back() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_trajectories", DEMO_DIR / "make_demo_trajectories.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    expected = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in module.all_runs())
    assert DEMO.read_text(encoding="utf-8") == expected, "rerun examples/trajectories/make_demo_trajectories.py"
    table = read_trajectories(DEMO)
    assert table.num_rows == 20
    assert Counter(table["outcome"].to_pylist()) == {"success": 10, "failure": 10}
    assert pc.count_distinct(table["task_id"]).as_py() == 8
    assert pc.count_distinct(table["trajectory_id"]).as_py() == 20
    assert all(validate_steps(steps) == [] for steps in table["steps"].to_pylist())


def test_goal_marker_from_gold_actions_and_outputs() -> None:
    rows = _by_id(read_trajectories(DEMO))
    for row in rows.values():
        meta = json.loads(row["metadata"])
        goal = goal_step(row["steps"], meta)
        if row["task_id"] == "cancel-1" and row["outcome"] == "success":
            assert row["steps"][goal]["tool_name"] == "cancel_reservation"
        if row["task_id"] == "fare-4" and row["outcome"] == "success":
            assert "612" in row["steps"][goal]["action"]  # the reply that states the gold output
    assert goal_step([{"kind": "reply", "action": "hi"}], {}) is None


def test_corruptions_keep_the_step_structure_valid_and_do_what_they_say() -> None:
    table = read_trajectories(DEMO)
    rows = _by_id(table)
    negatives, failed, stats = _negatives(table, {"max_per_trajectory": "2", "extra_steps": "2"})
    assert failed == []
    assert set(stats["made"]) == {"truncation", "wrong_instruction", "continuation", "action_replacement",
                                  "natural"} and all(stats["made"].values())
    step_list = pa.list_(STEP_TYPE)
    for n in negatives:
        assert validate_steps(n.steps) == [], (n.kind, n.method)
        pa.array([n.steps], step_list)  # still fits the trajectory schema
        if n.kind in ("truncation", "continuation", "action_replacement"):
            assert len(n.parent_ids) >= 1 and rows[n.parent_ids[0]]["outcome"] == "success"
        source = rows[n.parent_ids[0]]["steps"]
        if n.kind == "truncation":
            goal = goal_step(source, json.loads(rows[n.parent_ids[0]]["metadata"]))
            assert 1 <= len(n.steps) < len(source) and n.steps == source[: len(n.steps)]
            assert goal is None or len(n.steps) <= goal  # cut before the goal was reached
            assert n.rejected == render_trajectory(n.steps, 600)
        elif n.kind == "continuation":
            assert n.steps[: len(source)] == source and len(n.steps) == len(source) + 2
            assert all(s["kind"] == "tool_call" and s["tool_output"] is not None for s in n.steps[len(source):])
            assert not any(s["tool_name"].startswith(("get", "search", "think")) for s in n.steps[len(source):])
            assert n.rejected.startswith(n.chosen + "\n")
        elif n.kind == "action_replacement":
            t = len(n.steps) - 1
            assert n.steps[:t] == source[:t] and n.steps[t] != source[t]
            assert n.chosen == render_action(source[t]) and n.rejected == render_action(n.steps[t])
            assert n.prompt == history_prompt(rows[n.parent_ids[0]]["instruction"], source, t, 600)
            assert n.prompt[-1]["role"] in ("user", "tool") and n.task == "agent_step"
        elif n.kind == "wrong_instruction":
            own, other = rows[n.parent_ids[0]], rows[n.parent_ids[1]]
            assert own["task_id"] != other["task_id"] and other["outcome"] == "success"
            assert n.prompt == [{"role": "user", "content": own["instruction"]}]
            assert n.rejected == render_trajectory(other["steps"], 600)
        if n.kind != "action_replacement":
            assert n.prompt == [{"role": "user", "content": rows[n.parent_ids[0]]["instruction"]}]
            assert n.chosen == render_trajectory(source, 600)


def test_truncation_stops_before_the_goal_even_at_full_fraction() -> None:
    table = read_trajectories(DEMO)
    rows = _by_id(table)
    negatives, _, stats = _negatives(table, {"kinds": "truncation", "truncate_min": "1", "truncate_max": "1"})
    assert stats["made"]["truncation"] == len(negatives) == 10
    for n in negatives:
        source = rows[n.parent_ids[0]]
        goal = goal_step(source["steps"], json.loads(source["metadata"]))
        assert goal is not None  # every demo success has gold actions or outputs
        assert len(n.steps) == goal  # everything up to, not including, the goal step


def test_natural_pairs_pair_success_and_failure_of_the_same_task_only() -> None:
    table = read_trajectories(DEMO)
    rows = _by_id(table)
    negatives, _, stats = _negatives(table, {"kinds": "natural", "max_natural_per_task": "0"})
    natural = [n for n in negatives if n.kind == "natural"]
    assert len(natural) == len(negatives)
    for n in natural:
        success, failure = (rows[i] for i in n.parent_ids)
        assert success["task_id"] == failure["task_id"]
        assert (success["outcome"], failure["outcome"]) == ("success", "failure")
        assert n.chosen == render_trajectory(success["steps"], 600)
        assert n.rejected == render_trajectory(failure["steps"], 600) and n.generated == "none"
    # every success x failure combination of a task, and nothing for a task with no success
    outcomes = Counter((r["task_id"], r["outcome"]) for r in rows.values())
    tasks = {t for t, _ in outcomes}
    assert len(natural) == sum(outcomes[(t, "success")] * outcomes[(t, "failure")] for t in tasks)
    assert stats["failures_without_success"] == 1  # insurance-7 has only a failed run
    capped, _, _ = _negatives(table, {"kinds": "natural", "max_natural_per_task": "1"})
    assert Counter(rows[n.parent_ids[0]]["task_id"] for n in capped) == dict.fromkeys(
        [t for t in tasks if outcomes[(t, "success")] and outcomes[(t, "failure")]], 1)


def test_reruns_with_the_same_seed_give_identical_pair_ids() -> None:
    table = read_trajectories(DEMO)
    settings = {"max_per_trajectory": "2"}

    def ids(seed: int) -> list[str]:
        prepared, ctx = _ctx(settings, seed)
        return with_ids(execute(prepared, table, ctx).table)["pair_id"].to_pylist()

    first = ids(5)
    assert first == ids(5)
    assert first != ids(6)  # the seed does drive the draws
    assert len(set(first)) == len(first)  # no pair twice


def test_generator_output_table_and_failed_rows() -> None:
    table = read_trajectories(DEMO)
    rows = table.to_pylist()
    broken = dict(rows[0], trajectory_id="broken", steps=[{**rows[0]["steps"][0], "kind": "tool_call",
                                                           "tool_name": "x", "tool_arguments": "[]"}])
    table = pa.Table.from_pylist(rows + [broken], schema=TRAJECTORY_SCHEMA)
    prepared, ctx = _ctx()
    result = execute(prepared, table, ctx)
    assert result.failed.column("row").to_pylist() == [20]
    assert "not a JSON object" in result.failed.column("reason")[0].as_py()
    out = result.table
    assert {"prompt", "chosen", "rejected", "tie", "attribute", "task", "parent_ids", "generated",
            "method"} <= set(out.column_names)
    assert not any(out["tie"].to_pylist())
    assert set(out["generated"].to_pylist()) == {"rejected", "none"}
    assert result.stats["pairs"] == out.num_rows == sum(result.stats["made"].values())


def test_params_are_validated() -> None:
    with pytest.raises(ParamError, match="unknown kind 'shuffle'"):
        prepare("generator", "trajectories", {"kinds": "truncation,shuffle"})
    with pytest.raises(ParamError, match="truncate_min"):
        prepare("generator", "trajectories", {"truncate_min": "0.8", "truncate_max": "0.2"})
    assert validate_steps([]) == ["no steps"]
    assert validate_steps([{"kind": "tool_call", "tool_name": "a", "tool_arguments": "{}", "tool_output": None},
                           {"kind": "reply", "action": "ok"}]) == ["step 0: tool call without output before step 1"]


# ---- the real τ-bench file -------------------------------------------------------------------


@pytest.mark.realdata
def test_reader_on_the_real_tau_bench_file(shared_data: Path) -> None:
    table = read_trajectories(shared_data / TAU)
    assert table.num_rows == 200
    assert Counter(table["outcome"].to_pylist()) == {"success": 84, "failure": 116}
    assert pc.count_distinct(table["task_id"]).as_py() == 50
    assert pc.count_distinct(table["trajectory_id"]).as_py() == 200
    rows = table.to_pylist()
    steps = [s for r in rows for s in r["steps"]]
    assert len(steps) == 2454  # one per assistant message (each holds at most one call)
    calls = [s for s in steps if s["kind"] == "tool_call"]
    assert len(calls) == 1164 and all(s["tool_output"] is not None for s in calls)
    assert sum(s["thought"] is not None for s in calls) == 90  # tool-call turns that carry text
    assert sum(s["tool_output"] == "" for s in calls) == 92  # the think tool's empty outputs
    assert sum(json.loads(r["metadata"])["reward_info"] is None for r in rows) == 5
    assert sum(r["final_observation"] is not None for r in rows) == 149  # the rest end on a tool message
    assert all(validate_steps(r["steps"]) == [] for r in rows)


@pytest.mark.realdata
def test_generator_on_the_real_tau_bench_file(shared_data: Path) -> None:
    table = read_trajectories(shared_data / TAU)
    rows = _by_id(table)
    negatives, failed, stats = _negatives(table)
    assert failed == [] and stats["successes"] == 84 and stats["failures"] == 116
    assert all(validate_steps(n.steps) == [] for n in negatives)
    natural = [n for n in negatives if n.kind == "natural"]
    assert all(rows[a]["task_id"] == rows[b]["task_id"] for a, b in (n.parent_ids for n in natural))
    # 26 tasks have both outcomes; up to 4 pairs each
    assert len({rows[n.parent_ids[0]]["task_id"] for n in natural}) == 26
    solved = {r["task_id"] for r in rows.values() if r["outcome"] == "success"}
    assert stats["failures_without_success"] == 56 == sum(
        r["outcome"] == "failure" and r["task_id"] not in solved for r in rows.values())  # 14 tasks x 4
    for kind in ("truncation", "wrong_instruction", "continuation", "action_replacement"):
        assert stats["made"][kind] >= 75, (kind, stats)
