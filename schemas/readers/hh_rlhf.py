"""Anthropic HH-RLHF: two whole transcripts that share every turn but the last.

The prompt is the shared conversation up to the last assistant marker both transcripts
agree on; each response is what follows it. A few real rows diverge earlier (HH's inline
"Human:" quirk) or continue for more turns: they are kept with the whole remainder as the
response and counted under warnings, never silently trimmed.
"""

from __future__ import annotations

import re

from schemas.pairs import Message, Pair, Provenance
from schemas.readers.base import Record, RowContext
from schemas.readers.registry import register_reader

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


def looks_like_hh(value: object) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("chosen"), str)
        and isinstance(value.get("rejected"), str)
        and value["chosen"].lstrip(" ").startswith(HUMAN)
        and "prompt" not in value
    )


def split_transcript(text: str) -> list[Message]:
    parts = _TURN.split(text)
    messages = []
    # parts = [preamble, role, content, role, content, ...]
    for role, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append(Message("user" if role == "Human" else "assistant", content.strip()))
    return messages


def _common_prefix_length(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    index = 0
    while index < limit and a[index] == b[index]:
        index += 1
    return index


@register_reader("hh-rlhf", containers=("jsonl", "json"), sniff=looks_like_hh,
                 description="Anthropic HH-RLHF transcripts (chosen/rejected whole dialogues)")
def parse_hh(record: Record, ctx: RowContext) -> Pair:
    value = record.value
    if not isinstance(value, dict):
        raise ctx.error(record, None, "expected a JSON object")
    chosen_text = ctx.text(record, value, "chosen")
    rejected_text = ctx.text(record, value, "rejected")
    for name, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not text.lstrip(" ").startswith(HUMAN):
            raise ctx.error(record, name, "not an HH transcript (must start with '\\n\\nHuman:')")
    shared = _common_prefix_length(chosen_text, rejected_text)
    cut = chosen_text.rfind(ASSISTANT, 0, shared)
    if cut < 0:
        raise ctx.error(record, "chosen", "transcripts share no assistant turn marker")
    prompt = split_transcript(chosen_text[:cut])
    if not prompt or prompt[-1].role != "user":
        raise ctx.error(record, "chosen", "shared prefix does not end with a human turn")
    chosen = chosen_text[cut + len(ASSISTANT):].strip()
    rejected = rejected_text[cut + len(ASSISTANT):].strip()
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        if HUMAN in response or ASSISTANT in response:
            ctx.warn(record, name, "response_spans_turns", "response continues for more turns")
    ctx.check_responses(record, chosen, rejected, ("chosen", "rejected"), tie=False)
    return Pair(
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        provenance=Provenance(source_file=record.file, source_line=record.line),
        metadata=ctx.keep_unknown(value, _FIELDS, None),
    )


_FIELDS = frozenset({"chosen", "rejected"})
