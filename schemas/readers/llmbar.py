"""LLMBar and the sets it processed (MT-Bench, FairEval, LLMEval²): output_1/2 and label 1|2."""

from __future__ import annotations

from schemas.pairs import Message, Pair, Provenance
from schemas.readers.base import Record, RowContext
from schemas.readers.registry import register_reader


def looks_like_llmbar(value: object) -> bool:
    return isinstance(value, dict) and {"output_1", "output_2", "label"} <= value.keys()


@register_reader("llmbar", containers=("json", "jsonl"), sniff=looks_like_llmbar,
                 description="LLMBar format (input, output_1, output_2, label in {1, 2})")
def parse_llmbar(record: Record, ctx: RowContext) -> Pair:
    value = record.value
    if not isinstance(value, dict):
        raise ctx.error(record, None, "expected a JSON object")
    prompt_text = ctx.text(record, value, "input")
    if not prompt_text.strip():
        raise ctx.error(record, "input", "empty prompt")
    outputs = (ctx.text(record, value, "output_1"), ctx.text(record, value, "output_2"))
    label = ctx.integer(record, value, "label")
    if label not in (1, 2):
        raise ctx.error(record, "label", f"label must be 1 or 2, got {label}")
    chosen, rejected = outputs[label - 1], outputs[2 - label]
    ctx.check_responses(record, chosen, rejected, ("output_1", "output_2"), tie=False)
    return Pair(
        prompt=[Message("user", prompt_text)],
        chosen=chosen,
        rejected=rejected,
        provenance=Provenance(source_file=record.file, source_line=record.line),
        metadata=ctx.keep_unknown(value, _FIELDS, None),
    )


_FIELDS = frozenset({"input", "output_1", "output_2", "label"})
