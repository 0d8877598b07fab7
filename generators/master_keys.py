"""Master-key negatives (One Token to Fool LLM-as-a-Judge).

Generative judges and reward models are fooled by content-free replies — a lone space or
punctuation mark, a reasoning opener such as "Thought process:", the word for "solution"
in another language — and by answers cut after their first sentence of reasoning. Each
seed pair yields pairs whose chosen answer is the seed's chosen answer and whose rejected
answer is such a key, tagged ``master_key:<family>``; trained on, they teach an RM to
score keys below real answers, and held out, they probe its false-positive rate.

Every key is short, so an RM can learn "short loses" instead of "content-free loses" and
trade a length bias for its robustness. ``length_matched`` stretches a share of the keys
to about the chosen answer's length with filler that says nothing about any prompt: the
same key, now as long as a real answer, must still lose.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from factory.steps import StepContext, StepResult, failed_rows, generator, param
from generators._assembly import PairAssembly
from generators._text import MADE_SCHEMA, chunks, column_or, prompt_ids_of

# The keys the paper lists: blank, punctuation, reasoning openers, and multilingual ones.
DEFAULT_KEYS: list[str] = [
    " ", ".", ",", ":",
    "Thought process:", "Let's solve this problem step by step.", "Solution",
    "解", "かいせつ", "Respuesta",
]

# Content-free sentences: no fact, no step, nothing specific to any prompt.
FILLER: tuple[str, ...] = (
    "Let me think about this carefully.",
    "There are several things to consider here.",
    "It is important to look at this from every angle.",
    "Let's take it one step at a time.",
    "This depends on a few factors.",
    "With that in mind, we can work towards the answer.",
    "Keeping the question in view helps here.",
    "Each part of the question matters.",
)

_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s|\n")


def key_family(key: str) -> str:
    """``blank``, ``punctuation``, ``multilingual`` (non-Latin or non-English) or ``reasoning_opener``."""
    if not key.strip():
        return "blank"
    if all(unicodedata.category(ch).startswith("P") or ch.isspace() for ch in key):
        return "punctuation"
    if any(ord(ch) > 127 for ch in key) or key.strip().lower() in {"respuesta", "solución", "lösung", "réponse"}:
        return "multilingual"
    return "reasoning_opener"


def stretched(key: str, target_chars: int, start: int) -> str:
    """``key`` followed by filler sentences (from ``FILLER[start]`` on, cycling) until it is
    at least ``target_chars`` long; the key alone when it already is."""
    head, filler, i = key.strip(), "", start

    def joined() -> str:
        return f"{head}\n{filler}" if head and filler else head or filler

    while len(joined()) < target_chars:
        filler = f"{filler} {FILLER[i % len(FILLER)]}".strip()
        i += 1
    return joined() if filler else key


def first_sentence(text: str) -> str | None:
    """The answer cut after its first sentence (or line); None when that is the whole answer."""
    stripped = text.strip()
    match = _SENTENCE_END.search(stripped)
    if match is None:
        return None
    head = stripped[: match.start()].strip()
    return head if head and len(head) < len(stripped) else None


@dataclass(frozen=True)
class MasterKeysParams:
    keys: list[str] = param(DEFAULT_KEYS, "master-key responses to use as rejected answers "
                                          "(JSON list for keys with commas or spaces)")
    first_sentence: bool = param(True, "also reject the chosen answer cut after its first sentence")
    keys_per_pair: int = param(0, "keys drawn per seed pair (0: every key)", low=0)
    include_ties: bool = param(False, "use tie-labelled seeds too (their chosen side as the answer)")
    length_matched: float = param(0.0, "share of key pairs whose key is stretched with content-free filler to "
                                       "about the chosen answer's length (so length is not the tell)",
                                  low=0.0, high=1.0)

    def __post_init__(self) -> None:
        if not self.keys and not self.first_sentence:
            raise ValueError("parameter 'keys' is empty and first_sentence is off: nothing to generate")


# batch_rows=None: repeated seeds are merged over the whole table (the rows are still built
# a chunk at a time), so the output does not depend on how the runner would split it.
@generator("master_keys", params=MasterKeysParams, version="3", batch_rows=None)
def master_keys(table: pa.Table, ctx: StepContext[MasterKeysParams]) -> StepResult:
    """Rejected answers made of master keys and first-sentence cuts (One Token to Fool).

    Memory: the seeds are memory-mapped and read a chunk of rows at a time; across the
    table it holds about 100 bytes per made pair (see :class:`~generators._assembly.PairAssembly`;
    the keys and cuts themselves are spilled to disk) and gives its pairs out a chunk at a time.
    """
    params = ctx.params
    # Seeds that repeat a prompt and chosen answer (repeated judgments, anywhere in the table)
    # would make the same pair again: make it once, naming every seed as a parent. The copy
    # kept is the least seed id's, so the output does not depend on row order either.
    assembly = PairAssembly(table, ordered=True, home=ctx.home)
    prompt_ids = prompt_ids_of(table)
    empty: list[int] = []
    ties = 0
    for start, stop in chunks(table.num_rows):
        seeds = pl.from_arrow(pa.table({
            "pair_id": table.column("pair_id").slice(start, stop - start),
            "prompt_id": prompt_ids.slice(start, stop - start),
            "chosen": table.column("chosen").slice(start, stop - start),
            "tie": table.column("tie").slice(start, stop - start),
            "task": column_or(table, "task").slice(start, stop - start),
        })).with_row_index("row", offset=start)
        assert isinstance(seeds, pl.DataFrame)
        seeds = seeds.with_columns(pl.col("row").cast(pl.Int64), pl.col("chosen").fill_null(""),
                                   pl.col("tie").fill_null(False))
        answered = pl.col("chosen").str.strip_chars() != ""
        empty += seeds.filter(~answered)["row"].to_list()
        ties += seeds.filter(pl.col("tie") & answered).height
        usable = seeds.filter(answered if params.include_ties else answered & ~pl.col("tie"))
        assembly.add(_made(_keys_for(usable, ctx)))
    assembly.finish()
    methods = assembly.value_counts("method")
    failed = failed_rows(empty, ["chosen answer is empty: no answer to protect"] * len(empty))
    stats = {"keys": sum(c for m, c in methods.items() if m != "first_sentence"),
             "length_matched": sum(c for m, c in methods.items() if m.startswith("length_matched")),
             "first_sentence": methods.get("first_sentence", 0),
             "skipped_ties": 0 if params.include_ties else ties,
             "duplicates_merged": assembly.counts["duplicates_merged"]}
    return StepResult(assembly.tables(), failed, stats)


def _made(rows: pl.DataFrame) -> pa.Table:
    """A chunk's key pairs as made pairs (their rule orders a seed's pairs)."""
    n = rows.height
    return pa.table({
        "row": rows["row"].to_arrow().cast(pa.int64()),
        "prompt_row": rows["row"].to_arrow().cast(pa.int64()),
        "chosen": rows["chosen"].to_arrow().cast(pa.string()),
        "rejected": rows["rejected"].to_arrow().cast(pa.string()),
        "tie": pa.repeat(pa.scalar(False), n),
        "attribute": rows["attribute"].to_arrow().cast(pa.string()),
        "method": rows["method"].to_arrow().cast(pa.string()),
        "generated": pa.repeat(pa.scalar("rejected"), n),
        "task": rows["task"].to_arrow().cast(pa.string()),
        "rule": rows["rule"].to_arrow().cast(pa.int64()),
    }, schema=MADE_SCHEMA)


def _keys_for(usable: pl.DataFrame, ctx: StepContext[MasterKeysParams]) -> pl.DataFrame:
    """The key pairs and first-sentence cuts of a chunk of usable seeds; ``rule`` orders a seed's pairs."""
    params = ctx.params
    keys = pl.DataFrame({
        "rejected": params.keys,
        "attribute": [f"master_key:{key_family(k)}" for k in params.keys],
        "method": [f"master_key:{k!r}" for k in params.keys],
        "rule": list(range(len(params.keys))),
    }, schema={"rejected": pl.String, "attribute": pl.String, "method": pl.String, "rule": pl.Int64})
    rows = usable.join(keys, how="cross")
    # A seed whose answer already is the key gives no contrast.
    rows = rows.filter(pl.col("chosen").str.strip_chars() != pl.col("rejected").str.strip_chars())
    if params.keys_per_pair and params.keys_per_pair < len(params.keys):
        draw = ctx.row_uniform([f"{p}\x00{m}" for p, m in zip(rows["pair_id"], rows["method"], strict=True)], "keys")
        rows = (rows.with_columns(pl.Series("draw", draw))
                .with_columns(pl.col("draw").rank("ordinal").over("row").alias("rank"))
                .filter(pl.col("rank") <= params.keys_per_pair)
                .drop("draw", "rank"))
    if params.length_matched > 0 and rows.height:
        rows = _stretch_some(rows, params.length_matched, ctx)
    parts = [rows]
    if params.first_sentence:
        cuts = usable.with_columns(
            pl.col("chosen").map_elements(first_sentence, return_dtype=pl.String).alias("rejected")
        ).filter(pl.col("rejected").is_not_null()).with_columns(
            pl.lit("master_key:first_sentence").alias("attribute"),
            pl.lit("first_sentence").alias("method"),
            pl.lit(len(params.keys), pl.Int64).alias("rule"),
        )
        parts.append(cuts)
    return pl.concat(parts, how="diagonal_relaxed")


def _stretch_some(rows: pl.DataFrame, share: float, ctx: StepContext[MasterKeysParams]) -> pl.DataFrame:
    """Stretch the keys of a seeded ``share`` of the rows to their chosen answer's length."""
    ids = [f"{p}\x00{m}" for p, m in zip(rows["pair_id"], rows["method"], strict=True)]
    pick = ctx.row_uniform(ids, "length_matched") < share
    start = ctx.row_choice(ids, len(FILLER), "filler")
    keys, chosen = rows["rejected"].to_list(), rows["chosen"].to_list()
    rejected = [stretched(k, len(c.strip()), int(s)) if p else k
                for k, c, s, p in zip(keys, chosen, start, pick, strict=True)]
    method = [f"length_matched:{m}" if p else m for m, p in zip(rows["method"], pick, strict=True)]
    return rows.with_columns(pl.Series("rejected", rejected, pl.String), pl.Series("method", method, pl.String))
