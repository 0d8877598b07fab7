"""Crome causal augmentations: degrade exactly one quality attribute of a good answer.

Each pair keeps the seed's chosen answer as chosen and a copy of it with one checkable
attribute broken as rejected, tagged with that attribute, so a reward model learns what
each attribute is worth on its own. The ``rules`` mode does it offline:

- ``correctness``: a wrong final answer. A leading yes/no is flipped; else the final
  number (the one after ``=``, "answer is", "total:"…, otherwise the last number outside
  code and list markers) is moved by a small amount in its own format (``1,382`` ->
  ``1,379``); else a one-line short answer takes another seed's short answer of the same
  (labelled) task: only the differing answer span when both share a template ("The
  capital of Chile is Hanoi."), the whole answer otherwise.
- ``completeness``: the answer cut at the sentence or line end nearest ``truncate_fraction``
  of its length (a word boundary when it is one sentence); a strict, non-empty prefix.
- ``relevance``: the chosen answer of a different prompt from the same batch, preferring
  another task and a dissimilar instruction, and never one that shares half its words
  with this prompt's answer (a stock reply such as a refusal answers both prompts alike).
- ``coherence``: the steps of an ordered list (``Step N`` lines, items that start with
  "First", "Then"…, or a numbered list whose lead-in or instruction asks for steps, a
  procedure, a recipe, an order…) shuffled or one dropped.
  The markers stay where they were (``1.``, ``2.``, ``3.`` still count up) and only the
  step texts move, so the rejected answer carries no formatting cue: the model has to
  read the order. Unordered lists (tips, examples) are left alone: reordering them does
  not make an answer worse, and such a pair would be label noise.

A seed a rule does not apply to is counted under ``not_applicable``; a seed with an empty
chosen answer fails with its reason.

The ``llm`` mode (``--set mode=llm --backend SPEC``) is Crome's oracle: the LLM first lists
the causal quality attributes of the prompt's answer (factuality, relevance, completeness,
clarity, safety... most important first), then rewrites the chosen answer to degrade
exactly one of them, for each of the first ``llm_attributes``; with ``upgrade_rejected``
it also rewrites the rejected answer to be better in that one attribute (a pair whose
chosen side is the upgrade). Each pair is tagged with the attribute's name. Replies are
JSON-schema constrained; a rewrite that is empty, unchanged, a refusal, truncated or
unparseable fails its seed with the reason, and a seed with any failed reply yields no
pairs (never half of them). ``attributes`` applies to the rules mode only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory.steps import StepContext, StepResult, failed_rows, generator, param
from factory.steps.context import FAILED_SCHEMA
from factory.steps.llm import (
    Call,
    LLMMap,
    Planned,
    Template,
    llm_plan,
    looks_refused,
    merge_usage,
    strict_object,
    template_sources,
)
from generators._assembly import PairAssembly
from generators._text import (
    NUMBER,
    Made,
    boundaries,
    chunks,
    column_or,
    content_tokens,
    find_lists,
    jaccard,
    made_table,
    mask_code,
    number_rules,
    pick_donors,
    prompt_ids_of,
    row_mask,
    rows_at,
    skipped_ties,
    take_rows,
    uniforms,
    unmask_code,
    word_set,
)
from schemas.prompts import last_user_text, prompt_text

ATTRIBUTES: tuple[str, ...] = ("correctness", "completeness", "relevance", "coherence")


@dataclass(frozen=True)
class CausalParams:
    attributes: list[str] = param(list(ATTRIBUTES), "rules mode: quality attributes to degrade, one pair each: "
                                                    + ", ".join(ATTRIBUTES))
    mode: Literal["rules", "llm"] = param("rules", "how answers are degraded: rules (offline, checkable edits) or "
                                                   "llm (the LLM lists the prompt's causal attributes and "
                                                   "degrades one per pair; needs --backend)")
    truncate_fraction: float = param(0.5, "completeness: keep about this share of the answer's characters",
                                     low=0.05, high=0.95)
    coherence_edit: Literal["shuffle", "drop"] = param("shuffle", "coherence: shuffle the steps or drop one")
    short_answer_words: int = param(12, "correctness: a one-line answer of at most this many words may be "
                                        "swapped for another seed's short answer (0: never)", low=0)
    max_per_seed: int = param(0, "at most this many pairs per seed, drawn at random (0: no cap)", low=0)
    include_ties: bool = param(False, "use tie-labelled seeds too (their chosen side as the answer)")
    llm_attributes: int = param(3, "llm mode: degrade this many of the attributes the LLM lists, most "
                                   "important first (one pair each)", low=1, high=8)
    upgrade_rejected: bool = param(False, "llm mode: also rewrite the rejected answer to be better in the "
                                          "attribute (one more pair each, the upgrade as chosen)")
    temperature: float = param(0.0, "llm mode: sampling temperature", low=0.0, high=2.0)
    max_tokens: int = param(1024, "llm mode: reply token limit of a rewrite (the listing uses at most 512)",
                            low=16)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.attributes) - set(ATTRIBUTES))
        if unknown:
            raise ValueError(f"parameter 'attributes' has unknown {unknown} (known: {', '.join(ATTRIBUTES)})")
        if not self.attributes:
            raise ValueError("parameter 'attributes' is empty: nothing to generate")


# ---- correctness ----------------------------------------------------------------------------

_YES_NO = re.compile(r"^(\W*?)\b(yes|no)\b(?=\s*[,.!;:\u2014-]|\s*$)", re.I)
# Where a final answer is announced; the number right after the last one is the answer.
_CUE = re.compile(r"=|\bequals?\b|\b(?:final )?answer(?: is|:)|\bresult(?: is|:)|\btotal(?: is|:)|####|\\boxed\{",
                  re.I)
# List markers and line labels ("3.", "Step 2:", "Day 9:"): their numbers are structure.
_MARKER = re.compile(r"^[ \t]*(?:\d{1,3}[.)]|[A-Za-z]+\s+\d{1,3}\s*[:.)-])[ \t]", re.M)
_DELTAS = (1, -1, 2, -2, 3, -3, 5, -5, 10, -10)


def flip_yes_no(text: str) -> str | None:
    """A leading "Yes" made "No" (and back), in the same case; None without one."""
    match = _YES_NO.match(text.lstrip())
    if match is None:
        return None
    lead = len(text) - len(text.lstrip())
    word = match.group(2)
    flipped = "no" if word.lower() == "yes" else "yes"
    if word.isupper() and len(word) > 1:
        flipped = flipped.upper()
    elif word[0].isupper():
        flipped = flipped.capitalize()
    start, end = lead + match.start(2), lead + match.end(2)
    return text[:start] + flipped + text[end:]


def _protected(text: str) -> list[tuple[int, int]]:
    """Spans no number rule may touch: code, and list markers (their numbers are structure)."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"```.*?(?:```|\Z)", text, re.S)]
    blanked = list(text)
    for start, end in spans:
        blanked[start:end] = " " * (end - start)
    spans += [(m.start(), m.end()) for m in re.finditer(r"`[^`\n]+`", "".join(blanked))]
    spans += [(m.start(), m.end()) for m in _MARKER.finditer(text)]
    return spans


def final_number(text: str) -> tuple[int, int] | None:
    """The span of the answer's final number: right after the last answer cue, else the last one."""
    spans = _protected(text)

    def free(start: int) -> bool:
        return not any(a <= start < b for a, b in spans)

    found = [(m.start(), m.end()) for m in NUMBER.finditer(text) if free(m.start())]
    if not found:
        return None
    cues = [m.end() for m in _CUE.finditer(text) if free(m.start())]
    if cues:
        line_end = text.find("\n", cues[-1])
        line_end = len(text) if line_end < 0 else line_end
        after = [s for s in found if cues[-1] <= s[0] < line_end]
        if after:
            return after[0]
    return found[-1]


def shift_number(token: str, delta: int) -> str | None:
    """``token`` moved by ``delta`` units of its last digit, in its own format; None below zero."""
    int_part, _, decimals = token.partition(".")
    digits = int_part.replace(",", "")
    value = int(digits + decimals) + delta
    if value < 0:
        return None
    text = str(value).rjust(len(decimals) + 1, "0")
    new_int, new_dec = (text[: -len(decimals)], text[-len(decimals):]) if decimals else (text, "")
    if len(digits) > 1 and digits.startswith("0"):
        new_int = new_int.zfill(len(digits))  # zero-padded (a time, a code): keep the width
    if "," in int_part:
        new_int = f"{int(new_int):,}"
    return new_int + ("." + new_dec if decimals else "")


def wrong_number(text: str, pick: float, avoid: str = "") -> str | None:
    """``text`` with its final number changed (delta drawn from ``pick``); never equal to ``avoid``."""
    span = final_number(text)
    if span is None:
        return None
    start, end = span
    first = int(pick * len(_DELTAS))
    for k in range(len(_DELTAS)):
        new = shift_number(text[start:end], _DELTAS[(first + k) % len(_DELTAS)])
        if new is None or new == text[start:end]:
            continue
        out = text[:start] + new + text[end:]
        if out != avoid:
            return out
    return None


_TOKEN = re.compile(r"[^\W_]+|[^\w\s]")


def splice_answer(answer: str, donor: str, context: str) -> str | None:
    """``answer`` with only its answer span swapped for the donor's, when both share a template.

    "The capital of Chile is Santiago." with donor "The capital of Vietnam is Hanoi."
    under "What is the capital of Chile?" gives "The capital of Chile is Hanoi.": of the
    spans where the two differ, only those the prompt does not already say (the
    answer, not the restated question) are replaced; a span is a restatement when its words
    occur as a phrase in the prompt. None when they share no template or no span is left.
    """
    a = list(_TOKEN.finditer(answer))
    b = list(_TOKEN.finditer(donor))
    matcher = SequenceMatcher(a=[m.group(0).lower() for m in a], b=[m.group(0).lower() for m in b], autojunk=False)
    words = sum(m.group(0)[0].isalnum() for m in a)
    shared = sum(a[k].group(0)[0].isalnum() for block in matcher.get_matching_blocks()
                 for k in range(block.a, block.a + block.size))
    if not shared or shared * 2 < words:  # no common template: a splice would be a new answer
        return None
    known = f" {' '.join(_TOKEN.findall(context.lower()))} "
    out, cursor, swapped = [], 0, False
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        phrase = " ".join(m.group(0).lower() for m in a[i1:i2] if m.group(0)[0].isalnum())
        if tag != "replace" or not phrase or f" {phrase} " in known:
            continue
        if max(i2 - i1, j2 - j1) > 4:  # an answer span is a few words; more is a different answer
            return None
        # Each span takes the gap before it along, so the donor's spacing comes with its words.
        start = a[i1 - 1].end() if i1 else a[i1].start()
        donor_start = b[j1 - 1].end() if j1 else b[j1].start()
        out += [answer[cursor:start], donor[donor_start: b[j2 - 1].end()]]
        cursor, swapped = a[i2 - 1].end(), True
    return "".join(out) + answer[cursor:] if swapped else None


def is_short_answer(text: str, max_words: int) -> bool:
    stripped = text.strip()
    return (bool(stripped) and "\n" not in stripped and "`" not in stripped
            and len(stripped.split()) <= max_words)


# ---- completeness ---------------------------------------------------------------------------


def truncate(text: str, fraction: float) -> tuple[str, str] | None:
    """A strict, non-empty prefix of ``text`` near ``fraction`` of its length, and its unit."""
    full = text.rstrip()
    length = len(full)

    def best(cuts: list[int]) -> str | None:
        prefixes = [full[:c].rstrip() for c in cuts]
        prefixes = [p for p in prefixes if re.search(r"[^\W_]", p) and len(p) < length]
        if not prefixes:
            return None
        return min(prefixes, key=lambda p: (abs(len(p) / length - fraction), len(p)))

    cut = best(boundaries(full))
    if cut is not None:
        return cut, "sentence"
    words = [m.start() for m in re.finditer(r"\s+", full.strip())]
    if len(words) >= 2:  # at least three words: a cut mid-sentence still leaves something
        offset = len(full) - len(full.lstrip())
        cut = best([offset + w for w in words])
        if cut is not None:
            return cut, "word"
    return None


# ---- coherence ------------------------------------------------------------------------------

_PROCEDURE = re.compile(
    r"\b(?:steps?|step-by-step|instructions?|procedures?|process|recipe|guide|tutorial|algorithm|"
    r"in order(?! to)|order of|sequence|chronolog\w*|timeline|stages?|phases?|how to|how (?:do|can|should|would) "
    r"(?:i|you|we|one))\b", re.I)
_UNORDERED = re.compile(r"\b(?:tips|ideas|ways|reasons|examples|suggestions|benefits|advantages|"
                        r"disadvantages|features|names|list of|brainstorm)\b", re.I)
_SEQUENCE_WORD = re.compile(r"^\W*(?:first(?:ly)?|then|next|after(?:wards)?|finally|once|lastly|now)\b", re.I)


def reorder_steps(text: str, instruction: str, draws: Callable[[int], list[float]],
                  edit: str) -> tuple[str, str] | None:
    """``text`` with the steps of its longest ordered list shuffled or one dropped, and the method.

    ``draws(n)`` gives n uniform draws, fixed for the seed (one per step).
    """
    masked, slots = mask_code(text)
    lines = masked.split("\n")
    ordered = []
    for block in find_lists(lines, min_items=3):
        lead_in = "\n".join(lines[max(0, block.start - 2): block.start])
        sequenced = sum(bool(_SEQUENCE_WORD.match(b)) for b in block.bodies) >= 2
        if block.kind == "step" or sequenced or (block.kind == "numbered" and _PROCEDURE.search(lead_in)):
            ordered.append((1, len(block.bodies), block))  # the list itself says it is a sequence
        elif (block.kind == "numbered" and _PROCEDURE.search(instruction)
              and not _UNORDERED.search(instruction) and not _UNORDERED.search(lead_in)):
            ordered.append((0, len(block.bodies), block))
    if not ordered:
        return None
    block = max(ordered, key=lambda entry: entry[:2])[2]
    n = len(block.bodies)
    if len(set(block.bodies)) < 2:
        return None
    uniforms = draws(n)
    if edit == "drop":
        drop = min(int(uniforms[0] * n), n - 1)
        bodies = block.bodies[:drop] + block.bodies[drop + 1:]
        rendered = type(block)(block.start, block.end, block.kind, block.markers[:-1], bodies,
                               block.gaps[: n - 2] + [""]).render()
        method = "drop_step"
    else:
        order = list(np.argsort(np.asarray(uniforms[:n]), kind="stable"))
        bodies = [block.bodies[k] for k in order]
        if bodies == block.bodies:  # the draw kept the order: move the first step to the end
            bodies = block.bodies[1:] + block.bodies[:1]
        rendered = block.render(bodies)
        method = "shuffle_steps"
    out = unmask_code("\n".join(lines[: block.start] + rendered + lines[block.end:]), slots)
    return (out, method) if out != text else None


# ---- llm mode (Crome's oracle) ---------------------------------------------------------------

_ATTRIBUTE_ITEM = strict_object({"name": {"type": "string"}, "description": {"type": "string"}})

LIST_ATTRIBUTES = Template(
    "causal_attributes", "1",
    system=("You are an expert evaluator of assistant answers. You identify the quality attributes that "
            "causally decide how good an answer to a given prompt is."),
    user=("Prompt:\n<<<\n{prompt}\n>>>\n\nAn answer to it:\n<<<\n{answer}\n>>>\n\n"
          "List the quality attributes that causally determine how good an answer to this prompt is "
          "(for example factuality, relevance, completeness, clarity, safety, following the prompt's "
          "constraints), most important first. Name each in one or two lowercase words and describe in one "
          "sentence what it requires of an answer to this prompt. List only attributes that change how "
          "good the answer is, not surface features such as length or formatting."),
    schema=strict_object({"attributes": {"type": "array", "items": _ATTRIBUTE_ITEM, "maxItems": 8}}),
    max_tokens=512,
)

DEGRADE = Template(
    "causal_degrade", "1",
    system=("You rewrite assistant answers for reward-model training data. A rewrite changes exactly one "
            "quality attribute and keeps everything else the same."),
    user=("Prompt:\n<<<\n{prompt}\n>>>\n\nAnswer:\n<<<\n{answer}\n>>>\n\n"
          "Rewrite the answer so that it is clearly worse in this one attribute:\n"
          "{attribute}: {description}\n\n"
          "Keep every other attribute as it is: the same length (within about 10%), format, tone and style, "
          "and, apart from the degraded attribute, the same content. The flaw must be real (a reader who "
          "checks the attribute would notice it), not a comment about the answer. Reply with the rewritten "
          "answer only."),
    schema=strict_object({"rewrite": {"type": "string"}}),
    max_tokens=1024,
)

UPGRADE = Template(
    "causal_upgrade", "1",
    system=DEGRADE.system,
    user=("Prompt:\n<<<\n{prompt}\n>>>\n\nAnswer:\n<<<\n{answer}\n>>>\n\n"
          "Rewrite the answer so that it is clearly better in this one attribute:\n"
          "{attribute}: {description}\n\n"
          "Keep every other attribute as it is: the same length (within about 10%), format, tone and style, "
          "and, apart from the improved attribute, the same content. Reply with the rewritten answer only."),
    schema=strict_object({"rewrite": {"type": "string"}}),
    max_tokens=1024,
)

LLM_TEMPLATES = (LIST_ATTRIBUTES, DEGRADE, UPGRADE)


def attribute_key(name: str) -> str:
    """An LLM's attribute name as a tag: ``"Factual accuracy"`` -> ``factual_accuracy``."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _llm_seeds(table: pa.Table, params: CausalParams) -> tuple[list[int], list[int], list[str], list[str]]:
    chosen = [c or "" for c in table.column("chosen").to_pylist()]
    rejected = [r or "" for r in table.column("rejected").to_pylist()]
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    empty = [i for i in range(table.num_rows) if not chosen[i].strip()]
    usable = [i for i in range(table.num_rows) if chosen[i].strip() and (params.include_ties or not ties[i])]
    return empty, usable, chosen, rejected


def _upgradable(i: int, chosen: list[str], rejected: list[str]) -> bool:
    return bool(rejected[i].strip()) and not _same(rejected[i], chosen[i])


@llm_plan("generator", "causal", needs="a chat model with JSON-schema structured outputs, for mode=llm")
def plan_causal(table: pa.Table, ctx: StepContext[CausalParams]) -> list[Planned]:
    params = ctx.params
    if params.mode != "llm":
        return []
    _, usable, chosen, rejected = _llm_seeds(table, params)
    prompts = [prompt_text(p) for p in table.column("prompt").to_pylist()]
    first = [Call(i, {"prompt": prompts[i], "answer": chosen[i]}) for i in usable]
    stand_in = {"attribute": "(an attribute from the listing)", "description": "(its one-sentence description)"}
    rewrites = [Call(i, {"prompt": prompts[i], "answer": chosen[i], **stand_in})
                for i in usable for _ in range(params.llm_attributes)]
    stages = [Planned(LIST_ATTRIBUTES, first, temperature=params.temperature),
              Planned(DEGRADE, rewrites, exact=False, temperature=params.temperature, max_tokens=params.max_tokens)]
    if params.upgrade_rejected:
        ups = [Call(i, {"prompt": prompts[i], "answer": rejected[i], **stand_in})
               for i in usable if _upgradable(i, chosen, rejected) for _ in range(params.llm_attributes)]
        stages.append(Planned(UPGRADE, ups, exact=False, temperature=params.temperature,
                              max_tokens=params.max_tokens))
    return stages


def _assembly(table: pa.Table, ctx: StepContext[CausalParams]) -> PairAssembly:
    """Where both modes put their pairs: merged over the whole table, capped per seed."""
    return PairAssembly(table, max_per_seed=ctx.params.max_per_seed, row_uniform=ctx.row_uniform, salt="cap",
                        home=ctx.home)


def _stats(table: pa.Table, assembly: PairAssembly, ctx: StepContext[CausalParams],
           **mode_stats: Any) -> dict[str, Any]:
    counts = assembly.finish()
    return {
        "pairs": assembly.value_counts("attribute"),
        "methods": assembly.value_counts("method"),
        **mode_stats,
        "skipped_ties": 0 if ctx.params.include_ties else skipped_ties(table),
        **counts,
    }


def _causal_llm(table: pa.Table, ctx: StepContext[CausalParams]) -> StepResult:
    """The llm mode, a chunk of seeds at a time; duplicates are merged over the whole table."""
    assembly = _assembly(table, ctx)
    failed, usage, seeds_failed = [], [], 0
    for start, stop in chunks(table.num_rows):
        made, chunk_failed, chunk_usage, chunk_seeds_failed = _causal_llm_chunk(table.slice(start, stop - start), ctx)
        assembly.add(made_table(number_rules(made), offset=start))
        failed.append(chunk_failed.set_column(0, "row", pc.add(chunk_failed.column("row"), start)))
        usage.append(chunk_usage)
        seeds_failed += chunk_seeds_failed
    stats = _stats(table, assembly, ctx, seeds_failed_llm=seeds_failed)
    return StepResult(assembly.tables(), pa.concat_tables([FAILED_SCHEMA.empty_table(), *failed]), stats,
                      merge_usage(*usage))


def _causal_llm_chunk(table: pa.Table, ctx: StepContext[CausalParams]
                      ) -> tuple[list[Made], pa.Table, dict[str, Any], int]:
    params = ctx.params
    llm = LLMMap(ctx, what="an LLM (causal mode=llm)")
    empty, usable, chosen, rejected = _llm_seeds(table, params)
    n = table.num_rows
    prompt_texts = [prompt_text(p) for p in table.column("prompt").to_pylist()]
    tasks = table.column("task").to_pylist() if "task" in table.column_names else [None] * n

    def check_listing(value: dict, call: Call) -> str | None:
        names = [attribute_key(a["name"]) for a in value["attributes"]]
        if not any(names):
            return "the LLM listed no attribute"
        return None

    listed = llm.run(LIST_ATTRIBUTES, [Call(i, {"prompt": prompt_texts[i], "answer": chosen[i]}) for i in usable],
                     check=check_listing, temperature=params.temperature)
    picked: dict[int, list[tuple[str, str]]] = {}
    for reply in listed:
        if reply.ok:
            seen: dict[str, str] = {}
            for item in reply.value["attributes"]:
                key = attribute_key(item["name"])
                if key and key not in seen:
                    seen[key] = item["description"].strip() or item["name"]
            picked[reply.call.row] = list(seen.items())[: params.llm_attributes]

    def check_rewrite(value: dict, call: Call) -> str | None:
        text, original = value["rewrite"], call.values["answer"]
        if not text.strip():
            return f"empty rewrite for {call.tag}"
        if looks_refused(text) and not looks_refused(original):
            return f"refused to rewrite for {call.tag}: {text.strip()[:80]!r}"
        if _same(text, original):
            return f"rewrite for {call.tag} is the unchanged answer"
        return None

    rewrite_calls = [Call(i, {"prompt": prompt_texts[i], "answer": chosen[i], "attribute": key,
                              "description": description}, tag=key)
                     for i in usable if i in picked for key, description in picked[i]]
    degraded = llm.run(DEGRADE, rewrite_calls, check=check_rewrite, temperature=params.temperature,
                       max_tokens=params.max_tokens)
    upgraded = []
    if params.upgrade_rejected:
        up_calls = [Call(c.row, {**c.values, "answer": rejected[c.row]}, tag=c.tag) for c in rewrite_calls
                    if _upgradable(c.row, chosen, rejected)]
        upgraded = llm.run(UPGRADE, up_calls, check=check_rewrite, temperature=params.temperature,
                           max_tokens=params.max_tokens)

    made: list[Made] = []
    for reply in degraded:
        i = reply.call.row
        if reply.ok and not llm.failed(i):  # a seed with any failed reply yields nothing
            made.append(Made(i, i, chosen[i], reply.value["rewrite"], False, reply.call.tag, "llm:degrade",
                             "rejected", tasks[i]))
    for reply in upgraded:
        i = reply.call.row
        if reply.ok and not llm.failed(i) and not _same(reply.value["rewrite"], rejected[i]):
            made.append(Made(i, i, reply.value["rewrite"], rejected[i], False, reply.call.tag, "llm:upgrade",
                             "chosen", tasks[i]))
    made.sort(key=lambda m: m.row)  # stable: a seed's pairs keep the order they were made in
    failed = llm.failed_table({i: "chosen answer is empty: nothing to degrade" for i in empty})
    return made, failed, llm.usage, len(llm.failures)


# ---- the step -------------------------------------------------------------------------------


# batch_rows=None: donors and duplicate merging span the whole table (texts are still read a
# chunk at a time), so the output does not depend on how the runner would split it.
@generator("causal", params=CausalParams, version="3", backend="optional", batch_rows=None,
           templates=template_sources(*LLM_TEMPLATES))
def causal(table: pa.Table, ctx: StepContext[CausalParams]) -> StepResult:
    """Pairs whose rejected answer breaks one quality attribute of the chosen one (Crome causal).

    Memory: the seeds are memory-mapped and their texts read a chunk of rows (or a block of
    donor candidates) at a time; across the table it holds a few numbers per seed (donor
    draws) and about 100 bytes per made pair (see :class:`~generators._assembly.PairAssembly`;
    rewritten answers are spilled to disk), and gives its pairs out a chunk at a time.
    """
    params = ctx.params
    if params.mode == "llm":
        return _causal_llm(table, ctx)
    wanted = [a for a in ATTRIBUTES if a in params.attributes]
    not_applicable = dict.fromkeys(wanted, 0)
    assembly = _assembly(table, ctx)
    short_rows: list[np.ndarray] = []
    empty: list[int] = []
    for start, stop in chunks(table.num_rows):
        made, waiting, chunk_empty = _row_local_rules(table.slice(start, stop - start), ctx, wanted, not_applicable)
        assembly.add(made_table(made, offset=start))
        short_rows.append(np.asarray(waiting, dtype=np.int64) + start)
        empty += [start + i for i in chunk_empty]
    if "correctness" in wanted:
        _short_answer_swaps(table, np.concatenate(short_rows), ctx, not_applicable, assembly)
    if "relevance" in wanted:
        _answers_to_other_prompts(table, ctx, not_applicable, assembly)
    stats = _stats(table, assembly, ctx, not_applicable=not_applicable)
    failed = failed_rows(empty, ["chosen answer is empty: nothing to degrade"] * len(empty))
    return StepResult(assembly.tables(), failed, stats)


_RULE_ORDER = {attribute: k for k, attribute in enumerate(ATTRIBUTES)}


def _usable(chosen: str, tie: bool, params: CausalParams) -> bool:
    return bool(chosen.strip()) and (params.include_ties or not tie)


def _row_local_rules(table: pa.Table, ctx: StepContext[CausalParams], wanted: list[str],
                     not_applicable: dict[str, int]) -> tuple[list[Made], list[int], list[int]]:
    """The rules that need only the seed itself, on a chunk: its pairs, the rows whose
    correctness pair needs another seed's short answer, and the rows with no chosen answer."""
    params = ctx.params
    n = table.num_rows
    pair_ids = table.column("pair_id").to_pylist()
    chosen = [c or "" for c in table.column("chosen").to_pylist()]
    rejected = [r or "" for r in table.column("rejected").to_pylist()]
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    tasks = column_or(table, "task").to_pylist()
    empty = [i for i in range(n) if not chosen[i].strip()]
    usable = [i for i in range(n) if _usable(chosen[i], ties[i], params)]
    made: list[Made] = []
    need_donor: list[int] = []

    def add(i: int, attribute: str, bad: str, method: str) -> None:
        made.append(Made(i, i, chosen[i], bad, False, attribute, method, "rejected", tasks[i], _RULE_ORDER[attribute]))

    if "correctness" in wanted:
        picks = ctx.row_uniform(pair_ids, "correctness")
        for i in usable:
            flipped = flip_yes_no(chosen[i])
            if flipped is not None:
                add(i, "correctness", flipped, "wrong_answer:yes_no")
                continue
            wrong = wrong_number(chosen[i], float(picks[i]), avoid=rejected[i])
            if wrong is not None:
                add(i, "correctness", wrong, "wrong_answer:number")
            elif (params.short_answer_words and tasks[i] is not None
                  and is_short_answer(chosen[i], params.short_answer_words)):
                need_donor.append(i)
            else:
                not_applicable["correctness"] += 1

    if "completeness" in wanted:
        for i in usable:
            cut = truncate(chosen[i], params.truncate_fraction)
            if cut is None:
                not_applicable["completeness"] += 1
            else:
                unit = "" if cut[1] == "sentence" else f":{cut[1]}"
                add(i, "completeness", cut[0], f"truncate:{params.truncate_fraction:g}{unit}")

    if "coherence" in wanted:
        instructions = [last_user_text(p) for p in table.column("prompt").to_pylist()]
        for i in usable:
            def draws(count: int, key: str = pair_ids[i]) -> list[float]:
                return ctx.row_uniform([f"{key}\x00{k}" for k in range(count)], "coherence").tolist()

            result = reorder_steps(chosen[i], instructions[i], draws, params.coherence_edit)
            if result is None:
                not_applicable["coherence"] += 1
            else:
                add(i, "coherence", *result)
    return made, need_donor, empty


def _short_answer_swaps(table: pa.Table, rows: np.ndarray, ctx: StepContext[CausalParams],
                        not_applicable: dict[str, int], assembly: PairAssembly) -> None:
    """Correctness pairs whose wrong answer is another seed's short answer of the same task
    (only the differing span when both share a template), donors drawn from the whole table."""
    params = ctx.params
    prompt_ids = prompt_ids_of(table)
    short = np.flatnonzero(row_mask(table, ["chosen"], lambda r: is_short_answer(
        r["chosen"] or "", max(params.short_answer_words, 1))))

    def features(indices: np.ndarray) -> list[tuple[str, str | None, Counter[str], frozenset[str]]]:
        values = rows_at(table, indices, ["task", "chosen"])
        ids = take_rows(prompt_ids, indices).to_pylist()
        return [(p, t, content_tokens(c or ""), word_set(c or ""))
                for p, t, c in zip(ids, values["task"], values["chosen"], strict=True)]

    def short_score(mine: tuple, other: tuple) -> float | None:
        # Only a task label makes another seed's answer a wrong answer rather than a
        # paraphrase or an off-topic one: unlabelled seeds (real chat data) are skipped.
        if mine[1] is None or mine[1] != other[1] or mine[0] == other[0] or mine[2] == other[2]:
            return None
        return jaccard(mine[3], other[3])  # the most alike answer: only the answer differs

    positions = uniforms(table.column("pair_id"), ctx.row_uniform, "short_answer")
    donors = pick_donors(positions, rows, short, features, short_score)
    not_applicable["correctness"] += int((donors < 0).sum())
    found = np.flatnonzero(donors >= 0)
    for a, b in chunks(len(found)):
        made: list[Made] = []
        own, given = rows[found[a:b]], donors[found[a:b]]
        seed = rows_at(table, own, ["prompt", "chosen", "task"])
        donor = rows_at(table, given, ["chosen"])["chosen"]
        for k, (i, prompt, answer, task) in enumerate(zip(own.tolist(), seed["prompt"], seed["chosen"],
                                                          seed["task"], strict=True)):
            context = " ".join(m.get("content") or "" for m in prompt or [])
            spliced = splice_answer(answer, donor[k], context)
            if spliced is not None and content_tokens(spliced) != content_tokens(answer):
                made.append(Made(i, i, answer, spliced, False, "correctness", "wrong_answer:span", "rejected", task,
                                 _RULE_ORDER["correctness"]))
            else:
                made.append(Made(i, i, answer, donor[k], False, "correctness", "wrong_answer:short_answer",
                                 "rejected", task, _RULE_ORDER["correctness"]))
        assembly.add(made_table(made))


def _answers_to_other_prompts(table: pa.Table, ctx: StepContext[CausalParams],
                              not_applicable: dict[str, int], assembly: PairAssembly) -> None:
    """Relevance pairs: the chosen answer of a different prompt anywhere in the table,
    preferring another task and a dissimilar instruction, never an answer that reads alike."""
    params = ctx.params
    usable = np.flatnonzero(row_mask(table, ["chosen", "tie"], lambda r: _usable(r["chosen"] or "", bool(r["tie"]),
                                                                               params)))
    candidates = np.flatnonzero(row_mask(table, ["chosen"], lambda r: bool((r["chosen"] or "").strip())))
    prompt_ids = prompt_ids_of(table)

    def features(indices: np.ndarray) -> list[tuple[str, str | None, frozenset[str], frozenset[str]]]:
        values = rows_at(table, indices, ["prompt", "task", "chosen"])
        ids = take_rows(prompt_ids, indices).to_pylist()
        return [(p, t, word_set(last_user_text(prompt)), word_set(c or ""))
                for p, t, prompt, c in zip(ids, values["task"], values["prompt"], values["chosen"], strict=True)]

    def relevance_score(mine: tuple, other: tuple) -> float | None:
        if mine[0] == other[0] or jaccard(mine[3], other[3]) >= 0.5:
            return None
        similarity = jaccard(mine[2], other[2])
        if similarity >= 0.5:
            return None
        return 2.0 if mine[1] != other[1] else 1.0 - similarity

    positions = uniforms(table.column("pair_id"), ctx.row_uniform, "relevance")
    donors = pick_donors(positions, usable, candidates, features, relevance_score)
    not_applicable["relevance"] += int((donors < 0).sum())
    found = np.flatnonzero(donors >= 0)
    for a, b in chunks(len(found)):
        own, given = usable[found[a:b]], donors[found[a:b]]
        seed = rows_at(table, own, ["chosen", "task"])
        donor = rows_at(table, given, ["chosen"])["chosen"]
        assembly.add(made_table([Made(i, i, answer, other, False, "relevance", "answer_to_other_prompt", "rejected",
                                      task, _RULE_ORDER["relevance"])
                                 for i, answer, other, task in zip(own.tolist(), seed["chosen"], donor, seed["task"],
                                                                   strict=True)]))
