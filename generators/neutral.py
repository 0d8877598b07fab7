"""Crome neutral augmentations: tie pairs that differ only in spurious features.

A reward model that prefers an answer for its bullet points, its bold text, its length
or its friendliness has learnt a shortcut. Each pair here holds the seed's chosen answer
and a rewrite of it that changes one such feature and nothing else, labelled a tie
(trained with the tie loss: BCE of sigma(r_a - r_b) against 0.5). The ``rules`` mode:

- ``neutral:format`` — ``list_to_prose`` (a list joined into sentences), ``prose_to_list``
  (sentences as bullets), ``markdown_off`` (bold, italics, headers and bullet marks
  stripped), ``markdown_on`` (the lead sentence bolded), ``whitespace`` (blank lines
  collapsed or added, a paragraph split), ``casing`` (sentence starts capitalised);
- ``neutral:tone`` — ``preamble`` ("Sure! Here's the answer:") and ``signoff`` ("Hope
  this helps!");
- ``neutral:length`` — ``padding``: a sentence that restates the answer's first one;
- ``neutral:irrelevant`` — ``unrelated_prompt``: the seed's two answers re-paired under
  another seed's dissimilar prompt, where both are equally beside the point.

Code (fenced or inline) is never touched, and every rewrite is checked to keep every
word and number of the original (list markers aside); a rewrite that fails the check is
dropped and counted. A transform whose change the prompt itself asks about is skipped:
no format change when the instruction names a format (a list, a table, a poem…) or asks
for a text whose layout is part of it (an email, a rewrite), no added sentence
(preamble, sign-off, padding) when it limits length or wants only the answer, no tone
change when it asks about tone, no casing change when it asks about grammar or case. Seeds whose
answers may differ in safety get no unrelated-prompt pair: a harmful rejected answer stays
worse under any prompt, so that tie would be wrong. That is a seed whose task, attribute,
dataset or source file names safety data (``skip_tasks``: HH-RLHF's ``harmless-base``
file, say, whose reader leaves ``task`` empty), or whose one answer refuses and the other
does not.

The ``llm`` mode (``--set mode=llm --backend SPEC``) asks the LLM for the rewrite instead,
one per style in ``styles``: ``verbose`` and ``concise`` (``neutral:length``: the same
content in more or fewer words), ``format`` (``neutral:format``: list <-> prose, markdown)
and ``tone`` (``neutral:tone``). The same prompt guards apply (no format change when the
prompt names a format, no length change under a length limit, no tone change when it asks
about tone). A rewrite must keep every number and code span of the answer (a lexical
check: an LLM that drops a fact makes a wrong tie), be non-empty, changed and no refusal;
otherwise its seed fails with the reason, and a seed with any failed reply yields no pairs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
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
    Made,
    chunks,
    code_spans,
    column_or,
    content_of,
    find_lists,
    is_code_only,
    jaccard,
    keeps_content,
    made_table,
    mask_code,
    number_rules,
    numbers,
    pick_donors,
    prompt_ids_of,
    row_mask,
    rows_at,
    sentence_ends,
    skipped_ties,
    split_sentences,
    take_rows,
    uniforms,
    unmask_code,
    word_set,
)
from schemas.prompts import last_user_text, prompt_text

TRANSFORMS: dict[str, str] = {
    "list_to_prose": "neutral:format",
    "prose_to_list": "neutral:format",
    "markdown_off": "neutral:format",
    "markdown_on": "neutral:format",
    "whitespace": "neutral:format",
    "casing": "neutral:format",
    "preamble": "neutral:tone",
    "signoff": "neutral:tone",
    "padding": "neutral:length",
    "unrelated_prompt": "neutral:irrelevant",
}


# llm mode: style -> (attribute tag, what to change)
LLM_STYLES: dict[str, tuple[str, str]] = {
    "verbose": ("neutral:length", "Make it noticeably longer (about 1.5 times) by wording things more fully. "
                                  "Add no new facts, claims, steps, examples, advice or caveats."),
    "concise": ("neutral:length", "Make it noticeably shorter by tightening the wording. Drop no fact, claim, "
                                  "step, number, name or code, only redundant words."),
    "format": ("neutral:format", "Change only its formatting: a list becomes prose or prose becomes a list; "
                                 "add or remove markdown emphasis and headings. Keep the wording otherwise."),
    "tone": ("neutral:tone", "Change only its tone: more formal if it is casual, warmer and more conversational if "
                             "it is formal. Keep every piece of content."),
}


@dataclass(frozen=True)
class NeutralParams:
    transforms: list[str] = param(list(TRANSFORMS), "spurious changes to make, one tie pair each: "
                                                    + ", ".join(TRANSFORMS))
    mode: Literal["rules", "llm"] = param("rules", "how answers are rewritten: rules (offline, checked edits) or "
                                                   "llm (an LLM rewrites style or length only; needs --backend)")
    max_per_seed: int = param(0, "at most this many pairs per seed, drawn at random (0: no cap)", low=0)
    include_ties: bool = param(False, "use tie-labelled seeds too (their chosen side as the answer)")
    skip_tasks: list[str] = param(["harm", "safe", "toxic", "red_team", "red-team"],
                                  "no unrelated_prompt pair for seeds whose task, attribute, dataset or source "
                                  "file name contains one of these (safety data); nor where one answer refuses "
                                  "and the other does not")
    styles: list[str] = param(["verbose", "concise", "format", "tone"],
                              "llm mode: the rewrites to ask for, one tie pair each: verbose, concise, format, tone")
    temperature: float = param(0.0, "llm mode: sampling temperature", low=0.0, high=2.0)
    max_tokens: int = param(1024, "llm mode: reply token limit of a rewrite", low=16)

    def __post_init__(self) -> None:
        unknown_styles = sorted(set(self.styles) - set(LLM_STYLES))
        if unknown_styles:
            raise ValueError(f"parameter 'styles' has unknown {unknown_styles} (known: {', '.join(LLM_STYLES)})")
        if self.mode == "llm" and not self.styles:
            raise ValueError("parameter 'styles' is empty: nothing to generate")
        unknown = sorted(set(self.transforms) - set(TRANSFORMS))
        if unknown:
            raise ValueError(f"parameter 'transforms' has unknown {unknown} (known: {', '.join(TRANSFORMS)})")
        if not self.transforms:
            raise ValueError("parameter 'transforms' is empty: nothing to generate")


# ---- what the prompt asks for ---------------------------------------------------------------

_ASKS_FORMAT = re.compile(
    r"\b(?:lists?|listing|bullets?|bulleted|bullet points?|numbered|enumerate|itemi[sz]e|outline|tables?|"
    r"markdown|format(?:ted|ting)?|bold|headings?|headers?|json|csv|yaml|xml|html|paragraphs?|lines?|"
    r"poems?|poetry|haiku|limerick|verses?|lyrics|song|rhymes?|stanzas?|code|script|function)\b", re.I)
_ASKS_LENGTH = re.compile(
    r"\b(?:brief(?:ly)?|short(?:ly|er)?|concise(?:ly)?|succinct(?:ly)?|in short|summar\w*|tl;?dr|"
    r"(?:one|single|\d+|two|three|four|five) (?:words?|sentences?|lines?|paragraphs?|characters?|phrases?)|"
    r"exactly|at most|no more than|limit\w*|maximum)\b", re.I)
# The answer is itself a text to deliver (an email, a rewrite): its layout is part of it.
_ASKS_TEXT = re.compile(
    r"\b(?:write|compose|draft|rewrite|rephrase|paraphrase|translate|proofread|correct|edit|reply to|respond to|"
    r"email|letter|tweet|post|caption|review|story|essay|article|slogan|headline|title|template|signature)\b",
    re.I)
_ASKS_TONE = re.compile(r"\b(?:tone|polite(?:ly|ness)?|friendly|formal|informal|empath\w*|rude|casual|"
                        r"professional|style|voice)\b", re.I)
_ASKS_CASE = re.compile(r"\b(?:capitali[sz]\w*|case|upper|lower|grammar|grammatical\w*|spelling|"
                        r"punctuation|proofread\w*|typos?|correct)\b", re.I)
_ASKS_ONLY_ANSWER = re.compile(
    r"\b(?:only (?:answer|respond|reply|output|return|give|write|provide|say)|just (?:the|answer|give|say|output|"
    r"reply)|one word|single word|nothing else|no explanation|without (?:any )?explanation|json|yes or no|"
    r"true or false)\b", re.I)


_FORMAT_TRANSFORMS = ("list_to_prose", "prose_to_list", "markdown_off", "markdown_on", "whitespace")
_ADDING_TRANSFORMS = ("preamble", "signoff", "padding")  # they add a sentence: not under a length limit


# ---- the rewrites ----------------------------------------------------------------------------

_REFUSAL = re.compile(r"^\W*(?:i can(?:'|\u2019)?t|i cannot|i won(?:'|\u2019)t|i will not|i(?:'|\u2019)m sorry|sorry|"
                      r"i(?:'|\u2019)m not able|as an ai)\b", re.I)
PREAMBLES = ("Sure! Here's the answer:", "Happy to help!", "Great question!", "Of course!")
REFUSAL_PREAMBLES = ("Thanks for your question.", "I appreciate you asking.")
SIGNOFFS = ("Hope this helps!", "Let me know if you have any other questions.",
            "I hope this answers your question.", "Feel free to ask if anything is unclear.")
REFUSAL_SIGNOFFS = ("Let me know if there is anything else I can help with.",)
PADDING_LEADS = ("To sum up:", "In summary:", "To restate the main point:")


def _join(first: str, second: str, multiline: bool) -> str:
    return f"{first}\n\n{second}" if multiline else f"{first} {second}"


def list_to_prose(text: str) -> str | None:
    """The answer's first list as one paragraph: "A, B and C." for short items, else sentences."""
    masked, slots = mask_code(text)
    lines = masked.split("\n")
    blocks = find_lists(lines)
    if not blocks:
        return None
    block = blocks[0]
    items = [b.strip() for b in block.bodies]
    if any("\n" in b or "\ue000" in b for b in items):  # sub-lists and code do not fold into prose
        return None
    phrases = all(len(i.split()) <= 8 and not re.search(r"[.!?:;,]$", i) and "," not in i for i in items)
    if phrases:
        prose = ", ".join(items[:-1]) + " and " + items[-1] + "."
    else:
        prose = " ".join(i if re.search(r"[.!?]$", i) else i + "." for i in items)
    start = block.start
    head: list[str] = [prose]
    if start and lines[start - 1].rstrip().endswith(":"):  # "Here are three:" runs into the prose
        start -= 1
        head = [lines[start].rstrip() + " " + prose]
    return unmask_code("\n".join(lines[:start] + head + lines[block.end:]), slots)


def prose_to_list(text: str) -> str | None:
    """A list-free, code-free answer of two or more sentences as one bullet per sentence."""
    masked, slots = mask_code(text)
    if slots or find_lists(masked.split("\n")) or re.search(r"^\s*#", masked, re.M):
        return None
    sentences = [s for line in masked.split("\n") for s in split_sentences(line)]
    if len(sentences) < 2:
        return None
    return "\n".join(f"- {s}" for s in sentences)


_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*|__(?=\S)(.+?)(?<=\S)__")
_ITALIC = re.compile(r"(?<![\w*])\*(?=[^\s*])([^*\n]+?)(?<=[^\s*])\*(?![\w*])")
_HEADER = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.*?)[ \t#]*$", re.M)
_BULLET = re.compile(r"^([ \t]*)[-*+\u2022][ \t]+(?=\S)", re.M)
_RULE = re.compile(r"^[ \t]*(?:-{3,}|\*{3,}|_{3,})[ \t]*$", re.M)


def markdown_off(text: str) -> str | None:
    """Bold, italics, headers, bullet marks and rules stripped; None when there were none."""
    masked, slots = mask_code(text)
    out = _BOLD.sub(lambda m: m.group(1) or m.group(2), masked)
    out = _ITALIC.sub(r"\1", out)
    out = _HEADER.sub(r"\1", out)
    out = _BULLET.sub(r"\1", out)
    out = _RULE.sub("", out)
    return unmask_code(out, slots) if out != masked else None


def markdown_on(text: str) -> str | None:
    """The lead sentence (or first list item's) set in bold, in an answer without bold."""
    masked, slots = mask_code(text)
    if "**" in masked or "__" in masked:
        return None
    lines = masked.split("\n")
    for index, line in enumerate(lines):
        if not re.search(r"[^\W_]", line) or "\ue000" in line:
            if line.strip():
                return None  # the answer opens with code: nothing to set in bold before it
            continue
        marker = re.match(r"^\s*(?:\d{1,3}[.)]|[-*+\u2022]|#{1,6})\s+|^\s*", line)
        lead = marker.group(0) if marker else ""
        body = line[len(lead):]
        sentence = split_sentences(body)[0] if body.strip() else ""
        core = re.sub(r"[.!?:;,]+$", "", sentence).rstrip()
        if not re.search(r"[^\W_]", core):
            return None
        at = body.find(core)
        lines[index] = lead + body[:at] + f"**{core}**" + body[at + len(core):]
        return unmask_code("\n".join(lines), slots)
    return None


def whitespace(text: str) -> tuple[str, str] | None:
    """Blank lines collapsed (or added between lines, or one paragraph split in two), code untouched."""
    masked, slots = mask_code(text)
    body = masked.strip()
    if re.search(r"\n[ \t]*\n", body):
        out, method = re.sub(r"\n(?:[ \t]*\n)+", "\n", masked), "whitespace:collapse_blank_lines"
    elif "\n" in body:
        out, method = masked.replace("\n", "\n\n"), "whitespace:blank_lines"
    else:
        ends = [e for e in sentence_ends(masked) if masked[e:].strip()]
        if not ends:
            return None
        cut = ends[len(ends) // 2]
        out, method = masked[:cut] + "\n\n" + masked[cut:].lstrip(), "whitespace:split_paragraph"
    return (unmask_code(out, slots), method) if out != masked else None


_START = re.compile(r"(?:^|(?<=\n))[ \t]*(?:(?:\d{1,3}[.)]|[-*+\u2022])[ \t]+)?")


def casing(text: str) -> str | None:
    """Sentence, line and item starts that open with a lower-case word capitalised."""
    masked, slots = mask_code(text)
    starts = {m.end() for m in _START.finditer(masked)}
    starts |= {e + len(masked[e:]) - len(masked[e:].lstrip()) for e in sentence_ends(masked)}
    chars = list(masked)
    changed = False
    for at in sorted(starts):
        # Plain lower-case words only: "iPhone", "x=", "f(x)", "http://", "e.g." and one-letter names stay.
        word = re.match(r"(?:[a-z]{2,}|a)(?![\w(=/@-]|[.:]\S)", masked[at:])
        if word:
            chars[at] = chars[at].upper()
            changed = True
    return unmask_code("".join(chars), slots) if changed else None


def _first_restatable(text: str) -> str | None:
    masked, _ = mask_code(text)
    for line in masked.split("\n"):
        if re.match(r"^\s*(?:\d{1,3}[.)]|[-*+\u2022]|#|\|)", line) or "\ue000" in line:
            continue
        for sentence in split_sentences(line):
            if sentence.endswith(".") and len(sentence.split()) >= 4:
                return sentence
    return None


# ---- llm mode ---------------------------------------------------------------------------------

REWRITE = Template(
    "neutral_rewrite", "1",
    system=("You rewrite assistant answers for reward-model training data. A rewrite changes only the "
            "requested surface feature; a reader must find it exactly as correct, complete, relevant and "
            "safe as the original."),
    user=("Prompt:\n<<<\n{prompt}\n>>>\n\nAnswer:\n<<<\n{answer}\n>>>\n\n{instruction}\n\n"
          "Keep every fact, number, name, step and code block exactly. Reply with the rewritten answer only."),
    schema=strict_object({"rewrite": {"type": "string"}}),
    max_tokens=1024,
)


def _style_applies(style: str, instruction: str, text: str) -> bool:
    """The prompt guards of the rules mode, per llm style: the tie must not touch what the prompt asks about."""
    if style == "format":
        return not (_ASKS_FORMAT.search(instruction) or _ASKS_TEXT.search(instruction))
    if style in ("verbose", "concise"):
        return not (_ASKS_LENGTH.search(instruction) or _ASKS_ONLY_ANSWER.search(instruction)
                    or is_code_only(text))
    return not _ASKS_TONE.search(instruction)  # tone


def _llm_calls(table: pa.Table, params: NeutralParams) -> tuple[list[Call], list[int], dict[str, int]]:
    chosen = [c or "" for c in table.column("chosen").to_pylist()]
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    prompts = table.column("prompt").to_pylist()
    empty = [i for i in range(table.num_rows) if not chosen[i].strip()]
    not_applicable = dict.fromkeys(params.styles, 0)
    calls = []
    for i in range(table.num_rows):
        if not chosen[i].strip() or (ties[i] and not params.include_ties):
            continue
        instruction = last_user_text(prompts[i])
        for style in params.styles:
            if _style_applies(style, instruction, chosen[i]):
                calls.append(Call(i, {"prompt": prompt_text(prompts[i]), "answer": chosen[i],
                                      "instruction": LLM_STYLES[style][1]}, tag=style))
            else:
                not_applicable[style] += 1
    return calls, empty, not_applicable


@llm_plan("generator", "neutral", needs="a chat model with JSON-schema structured outputs, for mode=llm")
def plan_neutral(table: pa.Table, ctx: StepContext[NeutralParams]) -> list[Planned]:
    if ctx.params.mode != "llm":
        return []
    calls, _, _ = _llm_calls(table, ctx.params)
    return [Planned(REWRITE, calls, temperature=ctx.params.temperature, max_tokens=ctx.params.max_tokens)]


def kept_facts(original: str, rewrite: str) -> list[str]:
    """Numbers and code spans of ``original`` that ``rewrite`` lost (empty: none)."""
    lost = sorted(set(numbers(original)) - set(numbers(rewrite)))
    lost += [c if len(c) <= 40 else c[:39] + "\u2026" for c in set(code_spans(original)) - set(code_spans(rewrite))]
    return lost


def _neutral_llm(table: pa.Table, ctx: StepContext[NeutralParams]) -> StepResult:
    """The llm mode, a chunk of seeds at a time; duplicates are merged over the whole table."""
    params = ctx.params
    assembly = _assembly(table, ctx)
    failed, usage = [], []
    not_applicable = dict.fromkeys(params.styles, 0)
    seeds_failed = 0
    for start, stop in chunks(table.num_rows):
        chunk = table.slice(start, stop - start)
        llm = LLMMap(ctx, what="an LLM (neutral mode=llm)")
        calls, empty, chunk_not_applicable = _llm_calls(chunk, params)
        for style, count in chunk_not_applicable.items():
            not_applicable[style] += count
        chosen = [c or "" for c in chunk.column("chosen").to_pylist()]
        tasks = column_or(chunk, "task").to_pylist()
        replies = llm.run(REWRITE, calls, check=_check_llm_rewrite, temperature=params.temperature,
                          max_tokens=params.max_tokens)
        made = [Made(r.call.row, r.call.row, chosen[r.call.row], r.value["rewrite"], True,
                     LLM_STYLES[r.call.tag][0], f"llm:{r.call.tag}", "rejected", tasks[r.call.row])
                for r in replies if r.ok and not llm.failed(r.call.row)]
        made.sort(key=lambda m: m.row)  # stable: a seed's pairs keep the order of its styles
        assembly.add(made_table(number_rules(made), offset=start))
        chunk_failed = llm.failed_table({i: "chosen answer is empty: nothing to rewrite" for i in empty})
        failed.append(chunk_failed.set_column(0, "row", pc.add(chunk_failed.column("row"), start)))
        usage.append(llm.usage)
        seeds_failed += len(llm.failures)
    counts = assembly.finish()
    stats = {
        "pairs": assembly.value_counts("attribute"),
        "methods": assembly.value_counts("method"),
        "not_applicable": not_applicable,
        "seeds_failed_llm": seeds_failed,
        "skipped_ties": 0 if params.include_ties else skipped_ties(table),
        **counts,
    }
    return StepResult(assembly.tables(), pa.concat_tables([FAILED_SCHEMA.empty_table(), *failed]), stats,
                      merge_usage(*usage))


def _assembly(table: pa.Table, ctx: StepContext[NeutralParams]) -> PairAssembly:
    """Where both modes put their pairs: merged over the whole table, capped per seed."""
    return PairAssembly(table, max_per_seed=ctx.params.max_per_seed, row_uniform=ctx.row_uniform, salt="cap",
                        home=ctx.home)


def _check_llm_rewrite(value: dict, call: Call) -> str | None:
    text, original = value["rewrite"], call.values["answer"]
    if not text.strip():
        return f"empty {call.tag} rewrite"
    if looks_refused(text) and not looks_refused(original):
        return f"refused the {call.tag} rewrite: {text.strip()[:80]!r}"
    if " ".join(text.split()) == " ".join(original.split()):
        return f"{call.tag} rewrite is the unchanged answer"
    lost = kept_facts(original, text)
    if lost:
        return f"{call.tag} rewrite changed the content (lost {', '.join(map(repr, lost[:5]))}): not a tie"
    return None


# ---- the step -------------------------------------------------------------------------------


# batch_rows=None: donors and duplicate merging span the whole table (texts are still read a
# chunk at a time), so the output does not depend on how the runner would split it.
@generator("neutral", params=NeutralParams, version="2", backend="optional", batch_rows=None,
           templates=template_sources(REWRITE))
def neutral(table: pa.Table, ctx: StepContext[NeutralParams]) -> StepResult:
    """Tie pairs that change only a spurious feature of the chosen answer (Crome neutral).

    Memory: the seeds are memory-mapped and their texts read a chunk of rows (or a block of
    donor candidates) at a time; across the table it holds a few numbers per seed (donor
    draws) and about 100 bytes per made pair (see :class:`~generators._assembly.PairAssembly`;
    rewritten answers are spilled to disk), and gives its pairs out a chunk at a time.
    """
    params = ctx.params
    if params.mode == "llm":
        return _neutral_llm(table, ctx)
    wanted = [t for t in TRANSFORMS if t in params.transforms]
    not_applicable = dict.fromkeys(wanted, 0)
    failed_check = dict.fromkeys(wanted, 0)
    assembly = _assembly(table, ctx)
    empty: list[int] = []
    for start, stop in chunks(table.num_rows):
        made, chunk_empty = _row_local_rewrites(table.slice(start, stop - start), ctx, wanted, not_applicable,
                                                failed_check)
        assembly.add(made_table(made, offset=start))
        empty += [start + i for i in chunk_empty]
    if "unrelated_prompt" in wanted:
        _unrelated_prompt_pairs(table, ctx, not_applicable, assembly)
    counts = assembly.finish()
    transforms: dict[str, int] = {}
    for method, count in assembly.value_counts("method").items():
        transform = method.split(":", 1)[0]
        transforms[transform] = transforms.get(transform, 0) + count
    stats = {
        "pairs": assembly.value_counts("attribute"),
        "transforms": transforms,
        "not_applicable": not_applicable,
        "failed_check": {k: v for k, v in failed_check.items() if v},
        "skipped_ties": 0 if params.include_ties else skipped_ties(table),
        **counts,
    }
    failed = failed_rows(empty, ["chosen answer is empty: nothing to rewrite"] * len(empty))
    return StepResult(assembly.tables(), failed, stats)


_RULE_ORDER = {transform: k for k, transform in enumerate(TRANSFORMS)}


def _row_local_rewrites(table: pa.Table, ctx: StepContext[NeutralParams], wanted: list[str],
                        not_applicable: dict[str, int], failed_check: dict[str, int]) -> tuple[list[Made], list[int]]:
    """The rewrites of each seed's own chosen answer, on a chunk; and the rows with none."""
    params = ctx.params
    n = table.num_rows
    pair_ids = table.column("pair_id").to_pylist()
    prompts = table.column("prompt").to_pylist()
    chosen = [c or "" for c in table.column("chosen").to_pylist()]
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    tasks = column_or(table, "task").to_pylist()
    instructions = [last_user_text(p) for p in prompts]

    empty = [i for i in range(n) if not chosen[i].strip()]
    usable = [i for i in range(n) if chosen[i].strip() and (params.include_ties or not ties[i])]
    made: list[Made] = []
    # One draw per seed and transform, so the phrase a seed gets does not move with others.
    draws = {name: ctx.row_uniform(pair_ids, name) for name in ("preamble", "signoff", "padding")}

    def add(i: int, transform: str, rewrite: str | None, method: str | None = None) -> None:
        if rewrite is None or rewrite.strip() == chosen[i].strip():
            not_applicable[transform] += 1
        elif not keeps_content(content[i], rewrite):
            failed_check[transform] += 1  # a rule's edge case: better no pair than a wrong tie
        else:
            made.append(Made(i, i, chosen[i], rewrite, True, TRANSFORMS[transform], method or transform,
                             "rejected", tasks[i], _RULE_ORDER[transform]))

    def pick(options: tuple[str, ...], i: int, transform: str) -> str:
        return options[min(int(draws[transform][i] * len(options)), len(options) - 1)]

    content = {i: content_of(chosen[i]) for i in usable}
    for i in usable:
        text, instruction = chosen[i], instructions[i]
        asks_format = bool(_ASKS_FORMAT.search(instruction))
        asks_length = bool(_ASKS_LENGTH.search(instruction))
        only_answer = bool(_ASKS_ONLY_ANSWER.search(instruction))
        asks_text = bool(_ASKS_TEXT.search(instruction))
        asks_tone = bool(_ASKS_TONE.search(instruction))
        asks_case = bool(_ASKS_CASE.search(instruction))
        multiline = "\n" in text.strip()
        refusal = bool(_REFUSAL.match(text))
        for transform in wanted:
            if transform == "unrelated_prompt":
                continue
            # The change must be one the prompt is indifferent to; else the tie would be wrong.
            if ((transform in _FORMAT_TRANSFORMS and (asks_format or asks_text))
                    or (transform in _ADDING_TRANSFORMS and (asks_length or only_answer or is_code_only(text)))
                    or (transform in ("preamble", "signoff") and asks_tone)
                    or (transform == "casing" and asks_case)):
                not_applicable[transform] += 1
                continue
            if transform == "list_to_prose":
                add(i, transform, list_to_prose(text))
            elif transform == "prose_to_list":
                add(i, transform, prose_to_list(text))
            elif transform == "markdown_off":
                add(i, transform, markdown_off(text))
            elif transform == "markdown_on":
                add(i, transform, markdown_on(text), "markdown_on:bold")
            elif transform == "whitespace":
                result = whitespace(text)
                add(i, transform, result[0] if result else None, result[1] if result else None)
            elif transform == "casing":
                add(i, transform, casing(text), "casing:capitalize")
            elif transform == "preamble":
                phrase = pick(REFUSAL_PREAMBLES if refusal else PREAMBLES, i, transform)
                add(i, transform, _join(phrase, text.strip(), multiline), f"preamble:{phrase}")
            elif transform == "signoff":
                phrase = pick(REFUSAL_SIGNOFFS if refusal else SIGNOFFS, i, transform)
                # After code or an unpunctuated answer ("Offensive") a sign-off gets its own paragraph.
                apart = multiline or not re.search(r"[.!?\"')\]\u201d]$", text.rstrip())
                add(i, transform, _join(text.rstrip(), phrase, apart), f"signoff:{phrase}")
            elif transform == "padding":
                sentence = _first_restatable(text)
                if sentence is None:
                    add(i, transform, None)
                    continue
                lead = pick(PADDING_LEADS, i, transform)
                apart = multiline or not re.search(r"[.!?\"')\]\u201d]$", text.rstrip())
                add(i, transform, _join(text.rstrip(), f"{lead} {sentence}", apart), "padding:restate")

    return made, empty


def differs_in_safety(row: dict[str, Any], terms: Sequence[str]) -> bool:
    """Whether a seed's two answers may differ in harm, so that under another prompt they are
    still not equally beside the point: its task or attribute names safety (``terms``), its
    dataset or source file does (HH-RLHF's harmless-base leaves ``task`` empty), or one answer
    refuses and the other does not."""
    provenance = row.get("provenance") or {}
    labels = (row.get("task"), row.get("attribute"), provenance.get("source"),
              PurePath(provenance.get("source_file") or "").name)
    named = " ".join(label for label in labels if label).lower()
    if any(term in named for term in terms):
        return True
    return bool(_REFUSAL.match(row.get("chosen") or "")) != bool(_REFUSAL.match(row.get("rejected") or ""))


def _unrelated_prompt_pairs(table: pa.Table, ctx: StepContext[NeutralParams],
                            not_applicable: dict[str, int], assembly: PairAssembly) -> None:
    """The seed's two answers re-paired as a tie under another seed's dissimilar prompt,
    drawn from the whole table; never for a seed whose answers may differ in safety."""
    params = ctx.params
    skip = tuple(s.lower() for s in params.skip_tasks)
    columns = ["chosen", "rejected", "tie", "task", "attribute", "provenance"]

    def eligible(row: dict[str, Any]) -> int:
        """-1: not a usable seed (counted elsewhere); 0: not applicable; 1: re-pair it."""
        chosen, rejected = (row["chosen"] or "").strip(), (row["rejected"] or "").strip()
        if not chosen or (row["tie"] and not params.include_ties):
            return -1
        return int(bool(rejected) and rejected != chosen and not differs_in_safety(row, skip))

    verdict = row_mask(table, columns, eligible, dtype=np.int8)
    rows = np.flatnonzero(verdict == 1)
    prompt_ids = prompt_ids_of(table)
    not_applicable["unrelated_prompt"] += int((verdict == 0).sum())

    def features(indices: np.ndarray) -> list[tuple[str, str | None, frozenset[str]]]:
        values = rows_at(table, indices, ["prompt", "task"])
        ids = take_rows(prompt_ids, indices).to_pylist()
        return [(p, t, word_set(last_user_text(prompt)))
                for p, t, prompt in zip(ids, values["task"], values["prompt"], strict=True)]

    def unrelated_score(mine: tuple, other: tuple) -> float | None:
        if mine[0] == other[0]:
            return None
        similarity = jaccard(mine[2], other[2])
        if similarity >= 0.3:  # a near-identical question could make one answer right again
            return None
        return 2.0 if mine[1] != other[1] else 1.0 - similarity

    positions = uniforms(table.column("pair_id"), ctx.row_uniform, "unrelated_prompt")
    donors = pick_donors(positions, rows, np.arange(table.num_rows), features, unrelated_score)
    not_applicable["unrelated_prompt"] += int((donors < 0).sum())
    found = np.flatnonzero(donors >= 0)
    for a, b in chunks(len(found)):
        own, given = rows[found[a:b]], donors[found[a:b]]
        seed = rows_at(table, own, ["chosen", "rejected"])
        donor_tasks = rows_at(table, given, ["task"])["task"]
        assembly.add(made_table([
            Made(i, j, chosen, rejected, True, TRANSFORMS["unrelated_prompt"], "unrelated_prompt", "none", task,
                 _RULE_ORDER["unrelated_prompt"])
            for i, j, chosen, rejected, task in zip(own.tolist(), given.tolist(), seed["chosen"], seed["rejected"],
                                                    donor_tasks, strict=True)]))
