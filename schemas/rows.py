"""Row kinds other than pairs: agent trajectories and rubrics."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from schemas.pairs import MESSAGE_TYPE, PROVENANCE_TYPE, Provenance, _digest, prompt_id_of

# One agent action and what surrounds it. ``observation`` is what the agent received right
# before acting from outside (a user message, a page); a tool's result belongs to the call
# that asked for it (``tool_output``), so a call and its output can never be separated.
STEP_TYPE = pa.struct(
    [
        ("observation", pa.string()),  # null when the agent acts right after its own tool call
        ("action", pa.string()),  # readable action: the reply text, or "call NAME {json args}"
        ("thought", pa.string()),  # text said alongside a tool call
        ("kind", pa.string()),  # "reply" | "tool_call"
        ("tool_name", pa.string()),
        ("tool_arguments", pa.string()),  # a JSON object, as text
        ("tool_output", pa.string()),  # null only when the run ended before the tool answered
    ]
)

STEP_KINDS = ("reply", "tool_call")

TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("trajectory_id", pa.string(), nullable=False),
        pa.field("task_id", pa.string()),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("steps", pa.list_(STEP_TYPE), nullable=False),
        # what came after the last action (e.g. the user's closing message); not an action
        pa.field("final_observation", pa.string()),
        pa.field("outcome", pa.string()),  # "success" | "failure" | free text
        pa.field("provenance", PROVENANCE_TYPE),
        pa.field("metadata", pa.string()),
    ]
)

RUBRIC_ITEM_TYPE = pa.struct(
    [("kind", pa.string()), ("text", pa.string()), ("weight", pa.float64())]
)

RUBRIC_SCHEMA = pa.schema(
    [
        pa.field("rubric_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("items", pa.list_(RUBRIC_ITEM_TYPE), nullable=False),
        pa.field("pair_id", pa.string()),  # the contrastive pair it was written from
        pa.field("provenance", PROVENANCE_TYPE),
    ]
)

def tool_call_text(name: str, arguments: str) -> str:
    """The readable form of a tool call, as stored in ``action``."""
    return f"call {name} {arguments}"


@dataclass
class Step:
    observation: str | None
    action: str
    thought: str | None = None
    kind: str = "reply"  # "reply" | "tool_call"
    tool_name: str | None = None
    tool_arguments: str | None = None  # JSON object text
    tool_output: str | None = None

    @classmethod
    def tool_call(cls, name: str, arguments: str, *, observation: str | None = None,
                  thought: str | None = None, output: str | None = None) -> Step:
        return cls(observation, tool_call_text(name, arguments), thought, "tool_call", name,
                   arguments, output)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in STEP_TYPE.names}


@dataclass
class Trajectory:
    instruction: str
    steps: list[Step]
    outcome: str | None = None
    task_id: str | None = None
    final_observation: str | None = None
    provenance: Provenance = field(default_factory=Provenance)
    metadata: dict[str, Any] | None = None

    def to_row(self) -> dict[str, Any]:
        steps = [s.to_dict() for s in self.steps]
        return {
            "trajectory_id": trajectory_id_of(self.task_id, self.instruction, steps, self.final_observation),
            "task_id": self.task_id,
            "instruction": self.instruction,
            "steps": steps,
            "final_observation": self.final_observation,
            "outcome": self.outcome,
            "provenance": self.provenance.as_dict(),
            "metadata": json.dumps(self.metadata, sort_keys=True, ensure_ascii=False) if self.metadata else None,
        }


def trajectory_id_of(task_id: str | None, instruction: str, steps: list[dict[str, Any]],
                     final_observation: str | None) -> str:
    """Content hash of what happened; like a pair's verdict, the outcome is a label on it."""
    return _digest([task_id, instruction, [[s.get(k) for k in STEP_TYPE.names] for s in steps],
                     final_observation])


RubricKind = Literal["hard_rule", "principle"]


@dataclass
class RubricItem:
    kind: RubricKind
    text: str
    weight: float = 1.0


@dataclass
class Rubric:
    prompt: list[dict[str, str]]
    items: list[RubricItem]
    pair_id: str | None = None
    provenance: Provenance = field(default_factory=Provenance)

    def to_row(self) -> dict[str, Any]:
        items = [{"kind": i.kind, "text": i.text, "weight": i.weight} for i in self.items]
        return {
            "rubric_id": _digest([self.prompt, items]),
            "prompt_id": prompt_id_of(self.prompt),
            "prompt": self.prompt,
            "items": items,
            "pair_id": self.pair_id,
            "provenance": self.provenance.as_dict(),
        }
