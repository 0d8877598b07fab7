"""OpenRubrics: contrastive rubric generation with preference-label consistency.

For each seed pair (prompt, chosen, rejected) an LLM writes a rubric (JSON-schema
constrained): **hard rules**, the explicit constraints of the prompt, and **principles**,
each concrete difference between the two answers abstracted into a general quality
criterion. A principle must not name the specific topic or either response; a simple
lexical test (:func:`specific_terms`) flags items that share a distinctive word (not a
stop word, not common rubric vocabulary) with the prompt or the responses (hard rules may
repeat the prompt's own words, since they restate its constraints, but not the
responses'). Offending items are stripped (``on_specific=strip``) or fail the seed
(``fail``); a rubric left without principles fails its seed.

Then **preference-label consistency**: a judge re-decides the pair using the rubric
(``judge_samples`` draws, the A/B order alternating by pair id and sample index so a
position preference cannot pass for agreement). A pair and its rubric are kept only when
the judge recovers the label (most votes for the chosen answer) and the pairs of the same
prompt are recovered at least ``min_group_accuracy`` of the time.

Storage: the catalog stores pairs, so the rubric travels with the kept pair as an extra
column ``rubric`` (``list<struct<kind, text, weight>>``, :data:`schemas.rows.RUBRIC_ITEM_TYPE`;
``kind`` is ``hard_rule`` or ``principle``). The committed version is the versioned rubric
table: :func:`rubric_rows` turns it into :data:`schemas.rows.RUBRIC_SCHEMA` rows (one per
pair, with ``rubric_id``, the prompt, the items and the pair's provenance), and the
``consistency`` filter conditions its judge on the column. Seeds that are ties, or whose
answers are equal, have no contrast and are skipped (counted, not failed).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from factory.steps import StepContext, StepResult, generator, param
from factory.steps.context import FAILED_SCHEMA
from factory.steps.llm import (
    Call,
    LLMMap,
    Planned,
    Template,
    ab_swapped,
    llm_plan,
    looks_refused,
    merge_usage,
    strict_object,
    template_sources,
)
from generators._text import chunks, prompt_ids_of
from schemas.prompts import prompt_text
from schemas.rows import RUBRIC_ITEM_TYPE, RUBRIC_SCHEMA, Rubric, RubricItem

RUBRIC_TYPE = pa.list_(RUBRIC_ITEM_TYPE)
_MAX_ITEMS = 10

WRITE_RUBRIC = Template(
    "rubric_write", "1",
    system=("You write grading rubrics for reward-model training. A rubric must let a grader who never saw "
            "these two responses tell a better answer to the prompt from a worse one."),
    user=("Prompt:\n<<<\n{prompt}\n>>>\n\nA preferred response:\n<<<\n{chosen}\n>>>\n\n"
          "A worse response:\n<<<\n{rejected}\n>>>\n\n"
          "Write a rubric for answers to this prompt.\n"
          "- hard_rules: the explicit constraints the prompt states (format, length, language, what must be "
          "included or avoided). Only what the prompt asks for; none if it states no constraint.\n"
          "- principles: for each concrete way the preferred response is better, one general quality criterion "
          "that would apply to many prompts. A principle must not mention the topic, names, numbers or wording "
          "of the prompt or of either response.\n"
          "Write each item as one sentence about 'the response'."),
    schema=strict_object({
        "hard_rules": {"type": "array", "items": {"type": "string"}, "maxItems": _MAX_ITEMS},
        "principles": {"type": "array", "items": {"type": "string"}, "maxItems": _MAX_ITEMS},
    }),
    max_tokens=1024,
)

JUDGE = Template(
    "rubric_judge", "1",
    system=("You are an impartial grader. Judge two responses to the same prompt with the given rubric only. "
            "The order of the responses says nothing about their quality."),
    user=("Prompt:\n<<<\n{prompt}\n>>>\n\nRubric:\n{rubric}\n\nResponse A:\n<<<\n{a}\n>>>\n\n"
          "Response B:\n<<<\n{b}\n>>>\n\n"
          "A response that breaks a hard rule loses to one that does not. Otherwise prefer the response that "
          "satisfies the principles better. Give brief reasoning, then the verdict."),
    schema=strict_object({"reasoning": {"type": "string"}, "verdict": {"type": "string", "enum": ["A", "B"]}}),
    max_tokens=512,
)


@dataclass(frozen=True)
class RubricsParams:
    max_rules: int = param(4, "keep at most this many hard rules per rubric", low=0, high=_MAX_ITEMS)
    max_principles: int = param(6, "keep at most this many principles per rubric", low=1, high=_MAX_ITEMS)
    on_specific: Literal["strip", "fail"] = param("strip", "an item that names the specific topic or a response: "
                                                           "strip it, or fail the seed")
    judge_samples: int = param(1, "judge draws per pair for the label-consistency check (A/B order alternates)",
                               low=1, high=16)
    min_group_accuracy: float = param(0.5, "keep only prompts whose pairs the judge recovers at least this often",
                                      low=0.0, high=1.0)
    temperature: float = param(0.0, "sampling temperature of the rubric writer", low=0.0, high=2.0)
    judge_temperature: float = param(0.0, "sampling temperature of the judge", low=0.0, high=2.0)
    max_tokens: int = param(1024, "reply token limit of the rubric writer", low=64)
    judge_max_tokens: int = param(512, "reply token limit of the judge", low=16)


# ---- the lexical specificity test --------------------------------------------------------------

_STOP = frozenset(["a", "about", "above", "after", "again", "against", "all", "also", "although", "am", "an", "and", "any", "are", "as", "at", "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "cannot", "could", "did", "do", "does", "doing", "done", "down", "during", "each", "either", "else", "even", "ever", "every", "few", "for", "from", "further", "had", "has", "have", "having", "he", "her", "here", "hers", "herself", "him", "himself", "his", "how", "however", "i", "if", "in", "into", "is", "it", "its", "itself", "just", "least", "less", "let", "like", "may", "me", "might", "more", "most", "much", "must", "my", "myself", "neither", "no", "nor", "not", "now", "of", "off", "often", "on", "once", "one", "only", "or", "other", "others", "otherwise", "our", "ours", "ourselves", "out", "over", "own", "per", "perhaps", "rather", "same", "shall", "she", "should", "since", "so", "some", "such", "than", "that", "the", "their", "theirs", "them", "themselves", "then", "there", "these", "they", "this", "those", "though", "through", "thus", "to", "too", "under", "until", "up", "upon", "us", "very", "was", "we", "were", "what", "whatever", "when", "where", "whether", "which", "while", "who", "whom", "whose", "why", "will", "with", "within", "without", "would", "yet", "you", "your", "yours", "yourself", "yourselves"])

# Words any rubric may use: about responses and their quality, not about a topic.
GENERIC = frozenset(["response", "responses", "answer", "answers", "reply", "replies", "user", "users", "question", "questions", "prompt", "prompts", "request", "requests", "requested", "requirement", "requirements", "instruction", "instructions", "task", "tasks", "asked", "asks", "query", "reader", "readers", "audience", "accurate", "accuracy", "accurately", "correct", "correctly", "correctness", "incorrect", "error", "errors", "mistake", "mistakes", "wrong", "true", "false", "fact", "facts", "factual", "factually", "claim", "claims", "truthful", "honest", "honesty", "verifiable", "verified", "evidence", "source", "sources", "clear", "clearly", "clarity", "concise", "concisely", "brevity", "brief", "briefly", "succinct", "complete", "completely", "completeness", "thorough", "thoroughly", "comprehensive", "relevant", "relevance", "irrelevant", "helpful", "helpfulness", "useful", "usefulness", "informative", "detail", "details", "detailed", "specific", "specifics", "information", "explanation", "explanations", "explain", "explains", "explaining", "explained", "example", "examples", "illustrate", "reasoning", "reason", "reasons", "logic", "logical", "logically", "coherent", "coherence", "consistent", "consistency", "contradiction", "contradictions", "structure", "structured", "organized", "organization", "order", "ordered", "sequence", "format", "formatting", "formatted", "layout", "length", "long", "longer", "short", "shorter", "tone", "style", "language", "wording", "word", "words", "phrase", "phrases", "sentence", "sentences", "paragraph", "paragraphs", "point", "points", "main", "key", "important", "essential", "core", "central", "directly", "direct", "address", "addresses", "addressed", "addressing", "fully", "provide", "provides", "provided", "providing", "include", "includes", "included", "including", "mention", "mentions", "mentioned", "avoid", "avoids", "avoiding", "unnecessary", "extra", "irrelevant", "filler", "redundant", "repetition", "repetitive", "content", "substance", "focus", "focused", "stay", "stays", "scope", "step", "steps", "final", "result", "results", "outcome", "value", "values", "number", "numbers", "numeric", "numerical", "figure", "figures", "calculation", "calculations", "compute", "computed", "arithmetic", "method", "methods", "approach", "approaches", "solution", "solutions", "solve", "solves", "solving", "safe", "safety", "safely", "harmful", "harm", "risk", "risks", "appropriate", "appropriately", "context", "contexts", "concept", "concepts", "topic", "topics", "subject", "matter", "general", "overall", "quality", "good", "better", "best", "well", "poor", "worse", "worst", "level", "high", "higher", "low", "lower", "simple", "simply", "plain", "easy", "understand", "understandable", "readable", "readability", "acknowledge", "acknowledges", "uncertainty", "limitations", "limitation", "caveat", "caveats", "assumption", "assumptions", "premise", "premises", "state", "states", "stated", "stating", "present", "presents", "presented", "presenting", "describe", "describes", "described", "description", "identify", "identifies", "identified", "define", "defines", "definition", "definitions", "list", "lists", "listed", "item", "items", "bullet", "bullets", "heading", "headings", "markdown", "code", "output", "outputs", "input", "inputs", "follow", "follows", "following", "followed", "comply", "complies", "constraint", "constraints", "rule", "rules", "guideline", "guidelines", "expected", "expectation", "exactly", "precise", "precisely", "precision", "complete", "correct", "amount", "count", "counts", "total", "totals", "answering", "answered", "respond", "responds", "responding", "given", "give", "gives", "giving", "offer", "offers", "use", "uses", "used", "using", "make", "makes", "making", "keep", "keeps", "kept", "ensure", "ensures", "maintain", "maintains", "without", "rather", "than", "instead", "whole", "part", "parts", "first", "last", "single", "multiple", "several", "many", "various", "relevantly", "necessary", "needed", "need", "needs", "intent", "intended", "purpose"])

_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s", "ly"):
        if len(word) > len(suffix) + 3 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


def distinctive_terms(text: str) -> set[str]:
    """Stems of the words that could name a topic: not stop words, not rubric vocabulary,
    at least four letters; numbers of two or more digits count too."""
    terms = set()
    for word in _WORD.findall(text.lower()):
        if word.isdigit():
            if len(word) >= 2:
                terms.add(word)
        elif len(word) >= 4 and word not in _STOP and word not in GENERIC:
            terms.add(_stem(word))
    return terms


def specific_terms(item: str, kind: str, prompt_terms: set[str], response_terms: set[str]) -> list[str]:
    """The distinctive words ``item`` shares with the pair (empty: it is general).

    A principle may share none with the prompt or the responses; a hard rule restates
    the prompt's constraints, so only words of the responses that the prompt lacks count.
    """
    own = distinctive_terms(item)
    named = own & (response_terms - prompt_terms) if kind == "hard_rule" else own & (prompt_terms | response_terms)
    return sorted(named)


def render_rubric(items: list[dict[str, Any]]) -> str:
    rules = [i["text"] for i in items if i["kind"] == "hard_rule"]
    principles = [i["text"] for i in items if i["kind"] == "principle"]
    lines = ["Hard rules:"] + ([f"{k}. {t}" for k, t in enumerate(rules, 1)] or ["(none)"])
    lines += ["Principles:"] + [f"{k}. {t}" for k, t in enumerate(principles, 1)]
    return "\n".join(lines)


# ---- the step -----------------------------------------------------------------------------------


def _seeds(table: pa.Table) -> tuple[list[int], list[int], list[int]]:
    """(usable, empty, no-contrast) row positions."""
    chosen = [c or "" for c in table.column("chosen").to_pylist()]
    rejected = [r or "" for r in table.column("rejected").to_pylist()]
    ties = [bool(t) for t in table.column("tie").to_pylist()]
    usable, empty, no_contrast = [], [], []
    for i in range(table.num_rows):
        if not chosen[i].strip() or not rejected[i].strip():
            empty.append(i)
        elif ties[i] or " ".join(chosen[i].split()) == " ".join(rejected[i].split()):
            no_contrast.append(i)
        else:
            usable.append(i)
    return usable, empty, no_contrast


def _write_calls(table: pa.Table, rows: list[int]) -> list[Call]:
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    return [Call(i, {"prompt": prompt_text(prompts[i]), "chosen": chosen[i], "rejected": rejected[i]}) for i in rows]


def _judge_calls(table: pa.Table, rubrics: dict[int, list[dict[str, Any]]], samples: int) -> list[Call]:
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    pair_ids = table.column("pair_id").to_pylist()
    calls = []
    for i, items in rubrics.items():
        for k in range(samples):
            swapped = ab_swapped(pair_ids[i], k)
            a, b = (rejected[i], chosen[i]) if swapped else (chosen[i], rejected[i])
            calls.append(Call(i, {"prompt": prompt_text(prompts[i]), "rubric": render_rubric(items), "a": a, "b": b},
                              sample=k, tag=swapped))
    return calls


@llm_plan("generator", "rubrics", needs="a chat model with JSON-schema structured outputs, to write rubrics and judge")
def plan_rubrics(table: pa.Table, ctx: StepContext[RubricsParams]) -> list[Planned]:
    params = ctx.params
    usable, _, _ = _seeds(table)
    stand_in = [{"kind": "principle", "text": "(the rubric written in the first stage)", "weight": 1.0}]
    return [Planned(WRITE_RUBRIC, _write_calls(table, usable), temperature=params.temperature,
                    max_tokens=params.max_tokens),
            Planned(JUDGE, _judge_calls(table, dict.fromkeys(usable, stand_in), params.judge_samples), exact=False,
                    temperature=params.judge_temperature, max_tokens=params.judge_max_tokens)]


# batch_rows=None: the per-prompt accuracy check must see every pair of a prompt, wherever it
# sits in the table; the LLM work still runs a chunk of seeds at a time.
@generator("rubrics", params=RubricsParams, version="2", backend="required", batch_rows=None,
           templates=template_sources(WRITE_RUBRIC, JUDGE), columns=("rubric",))
def rubrics(table: pa.Table, ctx: StepContext[RubricsParams]) -> StepResult:
    """Contrastive rubrics (hard rules + principles) kept where a judge recovers the label (OpenRubrics)."""
    params = ctx.params
    judged, failed, usage = [], [], []
    stats: Counter[str] = Counter()
    stripped: Counter[str] = Counter()
    for start, stop in chunks(table.num_rows):
        chunk_judged, chunk_failed, chunk_stats, chunk_stripped, chunk_usage = _rubrics_chunk(
            table.slice(start, stop - start), ctx)
        judged.append(chunk_judged.set_column(0, "row", pc.add(chunk_judged.column("row"), start)))
        failed.append(chunk_failed.set_column(0, "row", pc.add(chunk_failed.column("row"), start)))
        stats.update(chunk_stats)
        stripped.update(chunk_stripped)
        usage.extend(chunk_usage)
    verdicts = pl.from_arrow(pa.concat_tables([JUDGED_SCHEMA.empty_table(), *judged]))
    assert isinstance(verdicts, pl.DataFrame)
    # The label-consistency check per prompt, over all of the prompt's pairs in the table.
    ids = prompt_ids_of(table).take(pa.array(verdicts["row"].to_numpy(), pa.int64()))
    verdicts = verdicts.with_columns(pl.Series("prompt_id", ids),
                                     (pl.col("votes_for") * 2 > pl.col("votes")).alias("recovered"))
    verdicts = verdicts.with_columns(pl.col("recovered").mean().over("prompt_id").alias("group_accuracy"))
    good_group = pl.col("group_accuracy") >= params.min_group_accuracy
    kept = verdicts.filter(pl.col("recovered") & good_group).sort("row")
    take = pa.array(kept["row"].to_numpy(), pa.int64())
    columns: dict[str, Any] = {
        name: table.column(name).take(take)
        for name in ("prompt", "chosen", "rejected", "tie", "margin", "votes", "weight", "attribute",
                     "attribute_scores", "task", "metadata") if name in table.column_names
    }
    columns["parent_ids"] = pa.array([[p] for p in table.column("pair_id").take(take).to_pylist()],
                                     pa.list_(pa.string()))
    columns["generated"] = pa.array(["none"] * kept.height, pa.string())
    columns["method"] = pa.array([f"rubric:recovered:{f}/{n}" if params.judge_samples > 1 else "rubric:recovered"
                                  for f, n in zip(kept["votes_for"], kept["votes"], strict=True)], pa.string())
    columns["rubric"] = kept["rubric"].to_arrow().cast(RUBRIC_TYPE)
    recovered = int(verdicts["recovered"].sum())
    out_stats = {
        "seeds_usable": stats["seeds_usable"],
        "skipped_no_contrast": stats["skipped_no_contrast"],
        "rubrics_written": stats["rubrics_written"],
        "items_stripped": dict(stripped),
        "judged": verdicts.height,
        "label_recovered": recovered,
        "label_not_recovered": verdicts.height - recovered,
        "dropped_by_group_accuracy": verdicts.filter(pl.col("recovered") & ~good_group).height,
        "kept": kept.height,
    }
    return StepResult(pa.table(columns), pa.concat_tables([FAILED_SCHEMA.empty_table(), *failed]), out_stats,
                      merge_usage(*usage))


JUDGED_SCHEMA = pa.schema([("row", pa.int64()), ("votes_for", pa.int64()), ("votes", pa.int64()),
                           ("rubric", RUBRIC_TYPE)])


def _rubrics_chunk(table: pa.Table, ctx: StepContext[RubricsParams]
                   ) -> tuple[pa.Table, pa.Table, Counter[str], Counter[str], list[dict[str, Any]]]:
    """Write and judge the rubrics of a chunk of seeds: the judged rows (chunk positions,
    votes for the chosen answer, the rubric), failed rows, counts, stripped items, usage."""
    params = ctx.params
    writer = LLMMap(ctx, what="an LLM to write rubrics")
    judge = LLMMap(ctx, role="judge", what="an LLM judge")
    usable, empty, no_contrast = _seeds(table)
    prompts = table.column("prompt").to_pylist()
    chosen = table.column("chosen").to_pylist()
    rejected = table.column("rejected").to_pylist()
    stripped: Counter[str] = Counter()

    terms = {i: (distinctive_terms(prompt_text(prompts[i])), distinctive_terms(f"{chosen[i]}\n{rejected[i]}"))
             for i in usable}
    kept_items: dict[int, list[dict[str, Any]]] = {}

    def check(value: dict, call: Call) -> str | None:
        written_texts = [t for t in value["hard_rules"] + value["principles"] if t.strip()]
        if written_texts and all(looks_refused(t) for t in written_texts):
            return f"refused: {written_texts[0][:80]!r}"
        prompt_terms, response_terms = terms[call.row]
        items, offenders = [], []
        for kind, texts in (("hard_rule", value["hard_rules"]), ("principle", value["principles"])):
            for text in texts:
                text = " ".join(text.split())
                if not text:
                    continue
                named = specific_terms(text, kind, prompt_terms, response_terms)
                if named:
                    offenders.append(f"{kind} {text[:60]!r} names {', '.join(named[:3])}")
                    stripped[kind] += 1
                    continue
                items.append({"kind": kind, "text": text, "weight": 1.0})
        if offenders and params.on_specific == "fail":
            return "rubric names the specific topic or response: " + "; ".join(offenders[:3])
        rules = [i for i in items if i["kind"] == "hard_rule"][: params.max_rules]
        principles = [i for i in items if i["kind"] == "principle"][: params.max_principles]
        if not principles:
            return ("no general principle left" + (" (every one named the topic or a response: "
                                                   + "; ".join(offenders[:3]) + ")" if offenders else ""))
        kept_items[call.row] = rules + principles
        return None

    writer.run(WRITE_RUBRIC, _write_calls(table, usable), check=check, temperature=params.temperature,
               max_tokens=params.max_tokens)
    written = {i: items for i, items in kept_items.items() if not writer.failed(i)}
    verdicts = judge.run(JUDGE, _judge_calls(table, written, params.judge_samples),
                         temperature=params.judge_temperature, max_tokens=params.judge_max_tokens)
    votes: dict[int, list[int]] = {}
    for reply in verdicts:
        if reply.ok:
            picked_chosen = (reply.value["verdict"] == "A") != bool(reply.call.tag)
            votes.setdefault(reply.call.row, []).append(1 if picked_chosen else -1)
    # A pair is judged only when every draw answered: a partial vote is no vote.
    judged = {i: v for i, v in votes.items() if i in written and not judge.failed(i)}
    rows = sorted(judged)
    table_out = pa.table({
        "row": pa.array(rows, pa.int64()),
        "votes_for": pa.array([sum(v > 0 for v in judged[i]) for i in rows], pa.int64()),
        "votes": pa.array([len(judged[i]) for i in rows], pa.int64()),
        "rubric": pa.array([written[i] for i in rows], RUBRIC_TYPE),
    }, schema=JUDGED_SCHEMA)
    counts = Counter({"seeds_usable": len(usable), "skipped_no_contrast": len(no_contrast),
                      "rubrics_written": len(written)})
    failed_reasons = {i: "needs a non-empty chosen and rejected answer" for i in empty}
    for i, reasons in judge.failures.items():
        failed_reasons[i] = "; ".join(reasons)
    return table_out, writer.failed_table(failed_reasons), counts, stripped, [writer.usage, judge.usage]


def rubric_rows(pairs: pa.Table) -> pa.Table:
    """A version made by ``rubrics`` as :data:`schemas.rows.RUBRIC_SCHEMA` rows (one per pair)."""
    from schemas.pairs import Provenance

    if "rubric" not in pairs.column_names:
        raise ValueError("this table has no 'rubric' column: make it with `prefab generate rubrics`")
    rows = []
    for row in pairs.select(["pair_id", "prompt", "rubric", "provenance"]).to_pylist():
        items = [RubricItem(i["kind"], i["text"], i["weight"]) for i in row["rubric"] or []]
        provenance = Provenance(**{k: v for k, v in (row["provenance"] or {}).items() if k != "parent_ids"},
                                parent_ids=list((row["provenance"] or {}).get("parent_ids") or []))
        rows.append(Rubric(row["prompt"], items, row["pair_id"], provenance).to_row())
    return pa.Table.from_pylist(rows, schema=RUBRIC_SCHEMA)
