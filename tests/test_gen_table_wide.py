"""Generators that merge repeated seeds or borrow from other seeds see the whole table.

``master_keys``, ``causal`` and ``neutral`` merge equal pairs made from repeated seeds and
pick donors (another seed's answer or prompt) across rows. Their output must not depend on
where a seed sits in the table or on how the table is cut into chunks: equal seeds at rows
0 and 4096 make one pair each, not two under one ``pair_id``.
"""

from __future__ import annotations

import random

import pyarrow as pa
import pytest

import generators._text as text_helpers
from factory.steps import StepContext
from factory.steps.runner import execute, prepare, stamp_generated
from schemas.pairs import Message, Pair, pairs_to_table

STEPS = ["master_keys", "causal", "neutral"]
# Fewer rules keep the 4,100-row runs short; each still merges repeats and borrows from other seeds.
FAST = {"master_keys": {"keys_per_pair": "2"}, "causal": {},
        "neutral": {"transforms": "unrelated_prompt,preamble,markdown_on"}}

# Templates with their own words, so donors from another template read differently.
TEMPLATES = [
    ("math", "How many apples does Sam have if he starts with {a} and buys {b} more?",
     "Sam starts with {a} apples. He buys {b} more. So he has {s} apples.", "Sam has {t} apples."),
    ("travel", "Which train leaves platform {a} for the coast, and when does coach {b} depart?",
     "The coastal train leaves platform {a} at noon. Coach {b} departs ten minutes later.",
     "Trains never leave platform {a}."),
    ("cooking", "Give me the steps to bake loaf number {a} at {b} degrees.",
     "Steps:\n1. Preheat the oven to {b} degrees.\n2. Knead the dough for loaf {a}.\n3. Bake for {s} minutes.",
     "Just bake it."),
    ("history", "Who founded settlement {a} in the year {b}?",
     "Settlement {a} was founded in {b} by traders. They came from the river valley.",
     "Nobody founded it."),
    ("flags", "What colour is the flag of {name}?", "The flag of {name} is {colour}.", "It has no flag."),
]
COLOURS = ["red", "blue", "green", "yellow", "white", "black", "orange"]


def _pair(k: int) -> Pair:
    task, question, chosen, rejected = TEMPLATES[k % len(TEMPLATES)]
    a, b = k // len(TEMPLATES), 3 + k % 7
    name = "".join(chr(ord("a") + int(d, 7)) for d in _base7(k)).capitalize() + "land"
    values = {"a": a, "b": b, "s": a + b, "t": a + b + 1, "name": name, "colour": COLOURS[k % len(COLOURS)]}
    return Pair([Message("user", question.format(**values))], chosen.format(**values), rejected.format(**values),
                task=task)


def _base7(k: int) -> str:
    digits = ""
    while True:
        k, d = divmod(k, 7)
        digits = str(d) + digits
        if not k:
            return digits


def _seeds(n: int, repeat: tuple[int, int] | None = None) -> pa.Table:
    pairs = [_pair(k) for k in range(n)]
    if repeat:
        pairs[repeat[1]] = pairs[repeat[0]]
    return pairs_to_table(pairs)


def _run(step: str, table: pa.Table, settings: dict | None = None) -> pa.Table:
    prepared = prepare("generator", step, settings or {})
    assert prepared.spec.batch_rows is None  # the runner hands the step the whole table
    ctx = StepContext(step, prepared.params, seed=0, run_id="t")
    result = execute(prepared, table, ctx)
    return stamp_generated(result.table, table, pa.array(["src@1"] * table.num_rows), prepared, ctx)


def _labels(out: pa.Table) -> set[tuple]:
    rows = out.select(["pair_id", "chosen", "rejected", "tie", "attribute"]).to_pylist()
    parents = out["provenance"].combine_chunks().field("parent_ids").to_pylist()
    return {(*r.values(), tuple(p)) for r, p in zip(rows, parents, strict=True)}


@pytest.mark.parametrize("step", STEPS)
def test_equal_seeds_at_rows_0_and_4096_make_each_pair_once(step: str) -> None:
    table = _seeds(4100, repeat=(0, 4096))
    out = _run(step, table, FAST[step])
    ids = out["pair_id"].to_pylist()
    assert len(ids) == len(set(ids))
    seed_id = table["pair_id"][0].as_py()
    from_seed = [p for p in out["provenance"].combine_chunks().field("parent_ids").to_pylist() if seed_id in p]
    assert from_seed and all(p.count(seed_id) == 1 for p in from_seed)


@pytest.mark.parametrize("step", STEPS)
def test_output_does_not_depend_on_chunking_or_row_order(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    table = _seeds(240, repeat=(3, 200))
    settings = {"max_per_seed": "2"} if step != "master_keys" else {"keys_per_pair": "3", "length_matched": "0.5"}
    whole = _labels(_run(step, table, settings))
    order = list(range(table.num_rows))
    random.Random(7).shuffle(order)
    shuffled = _labels(_run(step, table.take(pa.array(order)), settings))
    monkeypatch.setattr(text_helpers, "CHUNK_ROWS", 16)  # many small chunks and donor blocks
    chunked = _labels(_run(step, table, settings))
    assert whole == shuffled == chunked
    assert len({r[0] for r in whole}) == len(whole)  # and no pair_id twice


def _straddling_seeds() -> pa.Table:
    """400 seeds with repeats on both sides of 64-row chunk boundaries: exact copies, and seeds
    that share a prompt and chosen answer but not the rejected one (their pairs merge)."""
    pairs = [_pair(k) for k in range(400)]
    for a, b in ((63, 64), (5, 191), (250, 399)):
        pairs[b] = pairs[a]
    for a, b in ((127, 128), (30, 300)):
        pairs[b] = Pair(pairs[a].prompt, pairs[a].chosen, f"Another wrong answer, number {b}.", task=pairs[a].task)
    return pairs_to_table(pairs)


@pytest.mark.parametrize("step", STEPS)
def test_a_chunked_run_gives_exactly_the_pairs_of_a_single_chunk_run(step: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import generators._assembly as assembly

    table = _straddling_seeds()
    # No cap per seed: seeds that share a prompt and chosen answer then make the same pairs.
    settings = {} if step != "master_keys" else {"keys_per_pair": "3", "length_matched": "0.5"}
    prepared = prepare("generator", step, settings)

    def run() -> tuple[int, list[tuple], dict]:
        ctx = StepContext(step, prepared.params, seed=0, run_id="t")
        result = prepared.spec.fn(table, ctx)
        chunks = list(result.table)  # the output as the step gives it, a chunk at a time
        out = stamp_generated(pa.concat_tables(chunks), table, pa.array(["src@1"] * table.num_rows), prepared, ctx)
        parents = out["provenance"].combine_chunks().field("parent_ids").to_pylist()
        rows = [(*r.values(), tuple(p)) for r, p in
                zip(out.select(["pair_id", "chosen", "rejected"]).to_pylist(), parents, strict=True)]
        return len(chunks), rows, result.stats

    monkeypatch.setattr(text_helpers, "CHUNK_ROWS", 1_000_000)
    monkeypatch.setattr(assembly, "OUTPUT_ROWS", 1_000_000)
    one_chunk, single, single_stats = run()
    monkeypatch.setattr(text_helpers, "CHUNK_ROWS", 64)
    monkeypatch.setattr(assembly, "OUTPUT_ROWS", 50)
    many_chunks, chunked, chunked_stats = run()
    assert one_chunk == 1 and many_chunks > 3
    assert chunked == single  # same pairs, ids and parents, in the same order
    assert chunked_stats == single_stats
    assert len({r[0] for r in single}) == len(single)
    ids = table["pair_id"].to_pylist()
    for a, b in ((127, 128), (30, 300)):  # merged across a chunk boundary: one pair, both seeds its parents
        assert any(set(r[3]) == {ids[a], ids[b]} for r in single)


@pytest.mark.parametrize("step", STEPS)
def test_a_run_leaves_no_spilled_texts_behind(step: str, home) -> None:
    import factory
    from factory.catalog import Catalog

    Catalog(home).commit("seeds", _straddling_seeds())
    made = factory.generate(step, "seeds", "out", settings=FAST[step], home=home, progress=False)
    assert made["rows_generated"] > 0
    assert not list((home / "steps").glob("spill-*"))


@pytest.mark.parametrize("step", STEPS)
def test_seeds_that_make_no_pair_give_an_empty_output(step: str) -> None:
    table = _seeds(5)
    table = table.set_column(table.schema.get_field_index("tie"), "tie", pa.array([True] * 5))  # ties are skipped
    out = _run(step, table, FAST[step])
    assert out.num_rows == 0
