"""The canonical preference-pair row: one Arrow schema and the typed Python model that builds it.

A pair's identity (``pair_id``) is a content hash of the prompt and the *unordered* set of
its two responses. The verdict (which side is chosen, tie, margin, votes) is a label on
that identity, so a flipped label keeps its ``pair_id``: diffs show it as a change and
label-noise audits can track it across versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

ROLES = ("system", "user", "assistant", "tool")

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

ATTRIBUTE_SCORE_TYPE = pa.struct(
    [("attribute", pa.string()), ("chosen", pa.float64()), ("rejected", pa.float64())]
)

PROVENANCE_TYPE = pa.struct(
    [
        ("source", pa.string()),  # dataset the row came from, e.g. "hh-rlhf" or "seeds@3"
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("step", pa.string()),  # generator / filter / reader that produced the row
        ("step_version", pa.string()),
        ("params_hash", pa.string()),
        ("model", pa.string()),
        ("template_hash", pa.string()),
        ("seed", pa.int64()),
        ("run_id", pa.string()),
        ("parent_ids", pa.list_(pa.string())),
    ]
)

PAIR_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("tie", pa.bool_(), nullable=False),
        pa.field("margin", pa.float64()),
        # Per-annotator votes relative to (chosen, rejected): +1 chosen, -1 rejected, 0 tie.
        pa.field("votes", pa.list_(pa.int8())),
        pa.field("weight", pa.float64()),
        pa.field("attribute", pa.string()),  # quality attribute a causal augmentation changed
        pa.field("attribute_scores", pa.list_(ATTRIBUTE_SCORE_TYPE)),
        pa.field("task", pa.string()),  # free-form task type, e.g. "math", "harmless", "code"
        pa.field("provenance", PROVENANCE_TYPE),
        pa.field("metadata", pa.string()),  # JSON object with source-specific extras
    ]
)

PAIR_COLUMNS: tuple[str, ...] = tuple(PAIR_SCHEMA.names)


def _digest(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def prompt_id_of(prompt: Sequence[dict[str, str]]) -> str:
    """Content hash of a chat prompt (role and content of every message, in order)."""
    return _digest([[m["role"], m["content"]] for m in prompt])


def pair_id_of(prompt: Sequence[dict[str, str]], response_a: str, response_b: str) -> str:
    """Content hash of a prompt and its two responses, independent of which one won."""
    return _digest([[[m["role"], m["content"]] for m in prompt], sorted((response_a, response_b))])


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Provenance:
    source: str | None = None
    source_file: str | None = None
    source_line: int | None = None
    step: str | None = None
    step_version: str | None = None
    params_hash: str | None = None
    model: str | None = None
    template_hash: str | None = None
    seed: int | None = None
    run_id: str | None = None
    parent_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PROVENANCE_TYPE.names}


@dataclass
class Pair:
    """One preference judgment: under ``prompt``, ``chosen`` beats ``rejected`` (or ties)."""

    prompt: list[Message]
    chosen: str
    rejected: str
    tie: bool = False
    margin: float | None = None
    votes: list[int] | None = None
    weight: float | None = None
    attribute: str | None = None
    attribute_scores: list[dict[str, Any]] | None = None
    task: str | None = None
    provenance: Provenance = field(default_factory=Provenance)
    metadata: dict[str, Any] | None = None

    @property
    def prompt_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.prompt]

    @property
    def pair_id(self) -> str:
        return pair_id_of(self.prompt_dicts, self.chosen, self.rejected)

    def to_row(self) -> dict[str, Any]:
        prompt = self.prompt_dicts
        return {
            "pair_id": pair_id_of(prompt, self.chosen, self.rejected),
            "prompt_id": prompt_id_of(prompt),
            "prompt": prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "tie": self.tie,
            "margin": self.margin,
            "votes": self.votes,
            "weight": self.weight,
            "attribute": self.attribute,
            "attribute_scores": self.attribute_scores,
            "task": self.task,
            "provenance": self.provenance.as_dict(),
            "metadata": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True)
            if self.metadata
            else None,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Pair:
        provenance = row.get("provenance") or {}
        return cls(
            prompt=[Message(m["role"], m["content"]) for m in row["prompt"]],
            chosen=row["chosen"],
            rejected=row["rejected"],
            tie=bool(row.get("tie")),
            margin=row.get("margin"),
            votes=row.get("votes"),
            weight=row.get("weight"),
            attribute=row.get("attribute"),
            attribute_scores=row.get("attribute_scores"),
            task=row.get("task"),
            provenance=Provenance(
                **{k: provenance.get(k) for k in PROVENANCE_TYPE.names if k != "parent_ids"},
                parent_ids=list(provenance.get("parent_ids") or []),
            ),
            metadata=json.loads(row["metadata"]) if row.get("metadata") else None,
        )


def pairs_to_table(pairs: Iterable[Pair]) -> pa.Table:
    """Build a table in the canonical schema from typed pairs."""
    return pa.Table.from_pylist([p.to_row() for p in pairs], schema=PAIR_SCHEMA)


def empty_pair_table() -> pa.Table:
    return PAIR_SCHEMA.empty_table()


def conform(table: pa.Table) -> pa.Table:
    """Return ``table`` with exactly the canonical columns, in order, cast to their types.

    Missing optional columns are added as nulls; a missing required column raises.
    """
    columns = []
    for schema_field in PAIR_SCHEMA:
        if schema_field.name in table.column_names:
            columns.append(table.column(schema_field.name).cast(schema_field.type))
        elif schema_field.nullable:
            columns.append(pa.nulls(table.num_rows, schema_field.type))
        else:
            raise ValueError(f"table lacks required column {schema_field.name!r}")
    return pa.Table.from_arrays(columns, schema=PAIR_SCHEMA)
