"""PandaLM human test set: two responses and three annotators (0 tie, 1 or 2 the better one).

The label is the majority vote, a majority tie is a tie pair, and every vote is kept
relative to (chosen, rejected) so disagreement stays visible to the noise audit.
"""

from __future__ import annotations

from collections import Counter

from schemas.pairs import Message, Pair, Provenance
from schemas.readers.base import Record, RowContext
from schemas.readers.registry import register_reader

ANNOTATORS = ("annotator1", "annotator2", "annotator3")
_METADATA = ("idx", "cmp_key", "motivation_app")
_FIELDS = frozenset({"instruction", "input", "response1", "response2", *ANNOTATORS, *_METADATA})


def looks_like_pandalm(value: object) -> bool:
    return isinstance(value, dict) and {"response1", "response2", "annotator1"} <= value.keys()


@register_reader("pandalm", containers=("json", "jsonl"), sniff=looks_like_pandalm,
                 description="PandaLM test set (instruction/input, response1/2, annotator1..3)")
def parse_pandalm(record: Record, ctx: RowContext) -> Pair:
    value = record.value
    if not isinstance(value, dict):
        raise ctx.error(record, None, "expected a JSON object")
    instruction = ctx.text(record, value, "instruction")
    extra_input = ctx.text(record, value, "input", optional=True)
    prompt_text = "\n\n".join(part for part in (instruction.strip(), extra_input.strip()) if part)
    if not prompt_text:
        raise ctx.error(record, "instruction", "empty prompt (instruction and input are both empty)")
    responses = (ctx.text(record, value, "response1"), ctx.text(record, value, "response2"))
    votes = []
    for key in ANNOTATORS:
        vote = ctx.integer(record, value, key)
        if vote not in (0, 1, 2):
            raise ctx.error(record, key, f"vote must be 0 (tie), 1 or 2, got {vote}")
        votes.append(vote)
    label, count = Counter(votes).most_common(1)[0]
    if count < 2:
        raise ctx.error(record, "annotator1", f"no majority among votes {votes}")
    tie = label == 0
    chosen_index = 1 if tie else label
    chosen, rejected = responses[chosen_index - 1], responses[2 - chosen_index]
    relative_votes = [0 if v == 0 else (1 if v == chosen_index else -1) for v in votes]
    ctx.check_responses(record, chosen, rejected, ("response1", "response2"), tie=tie)
    metadata = ctx.keep_unknown(value, _FIELDS, {k: value[k] for k in _METADATA if k in value})
    return Pair(
        prompt=[Message("user", prompt_text)],
        chosen=chosen,
        rejected=rejected,
        tie=tie,
        votes=relative_votes,
        provenance=Provenance(source_file=record.file, source_line=record.line),
        metadata=metadata or None,
    )
