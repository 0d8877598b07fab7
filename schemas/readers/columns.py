"""Column-shaped rows: TRL's prompt/chosen/rejected (string or conversational) and prefab's own.

One parser serves TRL JSONL, generic JSONL, Parquet and `datasets` folders; they differ only
in the container. Optional columns: tie, margin, votes, weight, attribute, attribute_scores,
task, metadata, and prefab's own provenance and ids, so a canonical export reads back whole.
Any other column is kept in metadata and counted (``unknown_columns_kept``).
"""

from __future__ import annotations

import json
from typing import Any

from schemas.pairs import PAIR_COLUMNS, PROVENANCE_TYPE, Message, Pair, Provenance
from schemas.readers.base import Record, RowContext, json_type
from schemas.readers.registry import register_reader

# Every column this reader takes (the canonical row's); `--map` may name only these.
COLUMN_FIELDS = frozenset(PAIR_COLUMNS)
_PROVENANCE_INTEGERS = frozenset({"source_line", "seed"})


def looks_like_columns(value: object) -> bool:
    return isinstance(value, dict) and {"chosen", "rejected"} <= value.keys()


def _completion(ctx: RowContext, record: Record, value: dict[str, Any], key: str) -> tuple[str, list[Message] | None]:
    """A response column: text, or TRL's conversational list of messages."""
    raw = ctx.require(record, value, key)
    if isinstance(raw, list):
        messages = ctx.messages(record, raw, key)
        return "", messages
    return ctx.text(record, value, key), None


def _split_implicit_prompt(
    ctx: RowContext, record: Record, chosen: list[Message], rejected: list[Message]
) -> tuple[list[Message], str, str]:
    """TRL's implicit-prompt conversational form: the shared messages are the prompt."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    prompt = chosen[:shared]
    if not prompt:
        raise ctx.error(record, "chosen", "implicit prompt: chosen and rejected share no messages")
    return prompt, *(_single_reply(ctx, record, rest, key) for rest, key in
                     ((chosen[shared:], "chosen"), (rejected[shared:], "rejected")))


def _single_reply(ctx: RowContext, record: Record, messages: list[Message], key: str) -> str:
    if len(messages) != 1 or messages[0].role != "assistant":
        raise ctx.error(record, key, f"expected one assistant message, got {len(messages)} message(s)")
    return messages[0].content


def _attribute_scores(ctx: RowContext, record: Record, value: Any) -> list[dict[str, Any]] | None:
    """Per-attribute ratings: a list of {attribute, chosen, rejected} (prefab's own export)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ctx.error(record, "attribute_scores", f"expected a list, got {json_type(value)}")
    scores = []
    for index, item in enumerate(value):
        where = f"attribute_scores[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("attribute"), str):
            raise ctx.error(record, where, "expected {attribute, chosen, rejected}")
        scores.append({"attribute": item["attribute"], "chosen": ctx.number(record, item, "chosen"),
                       "rejected": ctx.number(record, item, "rejected")})
    return scores


def _provenance(ctx: RowContext, record: Record, value: Any) -> tuple[Provenance, dict[str, Any]]:
    """A canonical export's provenance, kept as it was; a plain file's: where the row was read.

    Also returns provenance fields this version does not know, for metadata.
    """
    here = Provenance(source_file=record.file, source_line=record.line)
    if value is None:
        return here, {}
    if not isinstance(value, dict):
        raise ctx.error(record, "provenance", f"expected an object, got {json_type(value)}")
    fields: dict[str, Any] = {}
    for name in PROVENANCE_TYPE.names:
        item = value.get(name)
        where = f"provenance.{name}"
        if item is None:
            continue
        if name == "parent_ids":
            if not isinstance(item, list) or not all(isinstance(i, str) for i in item):
                raise ctx.error(record, where, "expected a list of pair ids")
        elif name in _PROVENANCE_INTEGERS:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ctx.error(record, where, f"expected an integer, got {json_type(item)}")
        elif not isinstance(item, str):
            raise ctx.error(record, where, f"expected text, got {json_type(item)}")
        fields[name] = item
    unknown = {f"provenance.{key}": item for key, item in value.items() if key not in PROVENANCE_TYPE.names}
    if not fields:
        return here, unknown
    fields.setdefault("parent_ids", [])
    return Provenance(**fields), unknown


def _check_id(ctx: RowContext, record: Record, value: dict[str, Any], key: str, computed: str) -> None:
    """An id column read back from an export is recomputed; a differing one means edited content."""
    given = value.get(key)
    if given is not None and given != computed:
        ctx.warnings[f"{key}_recomputed"] += 1


@register_reader("trl", containers=("jsonl", "json", "parquet", "hf"), sniff=looks_like_columns,
                 accepts_column_map=True,
                 description="TRL preference rows: prompt/chosen/rejected, string or conversational")
def parse_columns(record: Record, ctx: RowContext) -> Pair:
    value = record.value
    if not isinstance(value, dict):
        raise ctx.error(record, None, f"expected an object with prompt/chosen/rejected, got {json_type(value)}")
    chosen, chosen_messages = _completion(ctx, record, value, "chosen")
    rejected, rejected_messages = _completion(ctx, record, value, "rejected")
    if value.get("prompt") is None:
        if chosen_messages is None or rejected_messages is None:
            raise ctx.error(
                record, "prompt",
                "missing field (string rows need a prompt; for HH transcripts use --format hh-rlhf)",
            )
        prompt, chosen, rejected = _split_implicit_prompt(ctx, record, chosen_messages, rejected_messages)
    else:
        prompt = ctx.messages(record, value["prompt"], "prompt")
        if chosen_messages is not None:
            chosen = _single_reply(ctx, record, chosen_messages, "chosen")
        if rejected_messages is not None:
            rejected = _single_reply(ctx, record, rejected_messages, "rejected")
    if not prompt or not any(m.content.strip() for m in prompt):
        raise ctx.error(record, "prompt", "empty prompt")
    tie = ctx.flag(record, value, "tie")
    ctx.check_responses(record, chosen, rejected, ("chosen", "rejected"), tie=tie)
    votes = value.get("votes")
    if votes is not None and (
        not isinstance(votes, list) or any(v not in (-1, 0, 1) or isinstance(v, bool) for v in votes)
    ):
        raise ctx.error(record, "votes", "votes must be a list of -1, 0 or 1")
    weight = ctx.number(record, value, "weight")
    if weight is not None and weight < 0:
        raise ctx.error(record, "weight", f"weight must be non-negative, got {weight}")
    metadata = value.get("metadata")
    if isinstance(metadata, str) and metadata:
        try:
            metadata = json.loads(metadata)
        except json.JSONDecodeError:
            raise ctx.error(record, "metadata", "metadata text is not JSON") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise ctx.error(record, "metadata", f"expected an object, got {json_type(metadata)}")
    provenance, unknown_provenance = _provenance(ctx, record, value.get("provenance"))
    pair = Pair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        tie=tie,
        margin=ctx.number(record, value, "margin"),
        attribute_scores=_attribute_scores(ctx, record, value.get("attribute_scores")),
        votes=votes,
        weight=weight,
        attribute=ctx.text(record, value, "attribute", optional=True) or None,
        task=ctx.text(record, value, "task", optional=True) or None,
        provenance=provenance,
        metadata=ctx.keep_unknown({**value, **unknown_provenance}, COLUMN_FIELDS, metadata or None) or None,
    )
    if "pair_id" in value or "prompt_id" in value:
        row = pair.to_row()
        _check_id(ctx, record, value, "pair_id", row["pair_id"])
        _check_id(ctx, record, value, "prompt_id", row["prompt_id"])
    return pair


# The same rows in other containers; named so `--format` can force the container.
for _name, _container in (("jsonl", "jsonl"), ("parquet", "parquet"), ("hf", "hf")):
    register_reader(_name, containers=(_container,), accepts_column_map=True,
                    description=f"prompt/chosen/rejected columns in a {_container} container"
                    " (rename with --map canonical=source)")(parse_columns)
