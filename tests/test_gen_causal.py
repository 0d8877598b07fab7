"""The causal generator (Crome causal augmentations) on its rules, demo seeds and real pairs."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.steps import ParamError, StepContext
from factory.steps.runner import execute, prepare, stamp_generated
from generators._text import find_lists
from generators.causal import (
    final_number,
    flip_yes_no,
    reorder_steps,
    shift_number,
    splice_answer,
    truncate,
    wrong_number,
)
from schemas.pairs import Message, Pair, pairs_to_table, prompt_id_of
from schemas.readers import read_path
from tests.conftest import DEMO_SEEDS


def _run(table: pa.Table, settings: dict | None = None, seed: int = 0) -> tuple[pa.Table, Any]:
    prepared = prepare("generator", "causal", settings or {})
    ctx = StepContext("causal", prepared.params, seed=seed, run_id="t")
    result = execute(prepared, table, ctx)
    return stamp_generated(result.table, table, pa.array(["src@1"] * table.num_rows), prepared, ctx), result


def _demo() -> pa.Table:
    return read_path(DEMO_SEEDS, "auto").table


def _number_edit(a: str, b: str) -> tuple[str, str] | None:
    """The (old, new) number when ``b`` is ``a`` with exactly one number changed, else None."""
    pa_, pb = re.split(r"(\d[\d,]*(?:\.\d+)?)", a), re.split(r"(\d[\d,]*(?:\.\d+)?)", b)
    if len(pa_) != len(pb) or pa_[0::2] != pb[0::2]:
        return None
    changed = [(x, y) for x, y in zip(pa_[1::2], pb[1::2], strict=True) if x != y]
    return changed[0] if len(changed) == 1 else None


def _diff(a: str, b: str) -> tuple[str, str, str, str]:
    """(prefix, a's middle, b's middle, suffix) around the one region where a and b differ."""
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    return a[:start], a[start: len(a) - end], b[start: len(b) - end], a[len(a) - end:]


def _check_rows(seeds: pa.Table, out: pa.Table) -> Counter:
    """Every row's tag matches what was changed; returns the count per method."""
    by_id = {r["pair_id"]: r for r in seeds.to_pylist()}
    chosen_by_prompt = {}
    for r in seeds.to_pylist():
        chosen_by_prompt.setdefault(r["chosen"], set()).add(r["prompt_id"])
    methods: Counter = Counter()
    for row in out.to_pylist():
        prov = row["provenance"]
        parents = [by_id[p] for p in prov["parent_ids"]]
        seed = parents[0]
        method = prov["method"]
        methods[method] += 1
        assert not row["tie"] and prov["generated"] == "rejected"
        assert all(p["chosen"] == row["chosen"] for p in parents)  # chosen is the seed's, untouched
        assert row["prompt_id"] == seed["prompt_id"]
        assert row["rejected"] != row["chosen"] and row["rejected"].strip()
        if method == "wrong_answer:number":
            assert row["attribute"] == "correctness"
            assert _number_edit(row["chosen"], row["rejected"]), (row["chosen"], row["rejected"])
        elif method == "wrong_answer:yes_no":
            _, old, new, _ = _diff(row["chosen"].lower(), row["rejected"].lower())
            assert {old, new} == {"yes", "no"}
        elif method == "wrong_answer:span":
            assert row["attribute"] == "correctness"
            assert row["rejected"][:3] == row["chosen"][:3] or row["rejected"][-3:] == row["chosen"][-3:]
        elif method.startswith("truncate:"):
            assert row["attribute"] == "completeness"
            assert row["chosen"].startswith(row["rejected"]) and len(row["rejected"]) < len(row["chosen"].rstrip())
        elif method == "answer_to_other_prompt":
            assert row["attribute"] == "relevance"
            donors = chosen_by_prompt[row["rejected"]]  # another seed's chosen answer, verbatim
            assert donors - {seed["prompt_id"]}
        elif method in ("shuffle_steps", "drop_step"):
            assert row["attribute"] == "coherence"
        else:
            assert method == "wrong_answer:short_answer" and row["attribute"] == "correctness"
            assert row["rejected"] in chosen_by_prompt and seed["prompt_id"] not in chosen_by_prompt[row["rejected"]]
    return methods


# ---- the rules on strings -----------------------------------------------------------------


def test_wrong_final_number_keeps_the_format_and_everything_else() -> None:
    assert shift_number("1,382", -3) == "1,379" and shift_number("3.50", 2) == "3.52"
    assert shift_number("07", 3) == "10" and shift_number("007", 1) == "008" and shift_number("0", -1) is None
    text = "Step 1: add 2 and 3.\n2. Then 10 = 7 + 3, so the answer is 1,024 apples (see `x = 99`)."
    start, end = final_number(text)
    assert text[start:end] == "1,024"  # after the last cue, not the later number in code
    old, new = _number_edit(text, wrong_number(text, 0.0))
    assert old == "1,024" and re.fullmatch(r"1,0\d\d", new)
    assert final_number("1. Apples\n2. Pears") is None  # list markers are structure, not answers
    assert wrong_number("415 - 721 = -306.", 0.0) == "415 - 721 = -307."
    assert wrong_number("The total is 12.", 0.0, avoid="The total is 13.") != "The total is 13."
    assert wrong_number("No digits here.", 0.5) is None


def test_yes_no_flip_truncation_and_splice() -> None:
    assert flip_yes_no("Yes, it is.") == "No, it is."
    assert flip_yes_no("  NO. Never.") == "  YES. Never."
    assert flip_yes_no("No problem! Here it is.") is None  # not an answer to a yes/no question
    cut, unit = truncate("First part here. Second part here. Third one.", 0.5)
    assert unit == "sentence" and cut == "First part here."  # 16 of 45 characters is nearest 0.5
    assert truncate("Line one\nLine two", 0.5) == ("Line one", "sentence")
    assert truncate("The capital of India is New Delhi.", 0.5) == ("The capital of", "word")
    assert truncate("Mature", 0.5) is None and truncate("Two words", 0.5) is None
    assert (splice_answer("The capital of Chile is Santiago.", "The capital of Vietnam is Hanoi.",
                          "What is the capital of Chile?") == "The capital of Chile is Hanoi.")
    assert (splice_answer("Fly into Mexico City, the capital of Mexico.", "Fly into Oslo, the capital of Norway.",
                          "I'm planning a trip to Mexico. Which city should I fly into?")
            == "Fly into Oslo, the capital of Mexico.")
    assert splice_answer("Memorizing.", "We need to know.", "Invent a word.") is None


def test_list_blocks_reassemble_exactly() -> None:
    text = "Intro:\n\n1. a\n   more a\n   - sub\n\n2. b\n\n3. c\nAfter\n- x\n- y"
    lines = text.split("\n")
    blocks = find_lists(lines)
    assert [(b.kind, len(b.bodies)) for b in blocks] == [("numbered", 3), ("bullet", 2)]
    assert blocks[0].bodies[0] == "a\n   more a\n   - sub"  # continuation and sub-list stay with their item
    for block in blocks:
        assert lines[: block.start] + block.render() + lines[block.end:] == lines
    for answer in _demo()["chosen"].to_pylist():
        answer_lines = answer.split("\n")
        for block in find_lists(answer_lines):
            assert answer_lines[: block.start] + block.render() + answer_lines[block.end:] == answer_lines


def _draws(n: int) -> list[float]:
    return [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8][:n]


RECIPE = ("Ingredients:\n- 2 cups flour\n- 1 egg\n- 1 cup milk\n\nInstructions:\n"
          "1. Whisk the egg and milk.\n2. Stir in the flour.\n3. Fry in a hot pan.\n4. Serve warm.")


def test_coherence_moves_steps_but_keeps_markers_and_skips_unordered_lists() -> None:
    shuffled, method = reorder_steps(RECIPE, "Give me a pancake recipe.", _draws, "shuffle")
    assert method == "shuffle_steps"
    head, steps = shuffled.split("Instructions:\n")
    assert head == RECIPE.split("Instructions:\n")[0]  # the ingredient bullets are unordered: untouched
    lines = steps.split("\n")
    assert [ln[:3] for ln in lines] == ["1. ", "2. ", "3. ", "4. "]  # markers stay in place
    original = RECIPE.split("Instructions:\n")[1].split("\n")
    assert sorted(ln[3:] for ln in lines) == sorted(ln[3:] for ln in original) and lines != original
    dropped, method = reorder_steps(RECIPE, "Give me a pancake recipe.", _draws, "drop")
    assert method == "drop_step"
    kept = dropped.split("Instructions:\n")[1].split("\n")
    assert [ln[:3] for ln in kept] == ["1. ", "2. ", "3. "] and len(set(ln[3:] for ln in original) - {ln[3:] for ln in kept}) == 1
    tips = "1. Sleep well\n2. Practise\n3. Breathe"
    assert reorder_steps(tips, "Give me tips for a talk.", _draws, "shuffle") is None
    steps_text = "Step 1: Boil water.\nStep 2: Add pasta.\nStep 3: Drain."
    assert reorder_steps(steps_text, "Cook pasta.", _draws, "shuffle")[0] != steps_text


# ---- the step --------------------------------------------------------------------------------


def test_causal_on_demo_seeds_tags_each_row_with_what_it_changed() -> None:
    seeds = _demo()
    out, result = _run(seeds)
    methods = _check_rows(seeds, out)
    stats = result.stats
    assert stats["pairs"]["correctness"] >= 100 and stats["pairs"]["completeness"] >= 150
    assert stats["pairs"]["relevance"] >= 200
    assert methods["wrong_answer:number"] >= 50 and methods["wrong_answer:span"] >= 50
    assert len(set(out["pair_id"].to_pylist())) == out.num_rows  # shared answers were merged, not repeated
    assert result.failed.num_rows == 0 and stats["skipped_ties"] == 30
    # Every usable seed either made a row of each attribute or is counted as not applicable.
    usable = seeds.filter(pc.invert(seeds["tie"]))
    for attribute in ("correctness", "completeness", "relevance", "coherence"):
        rows = out.filter(pc.equal(out["attribute"], attribute))
        parents = {p for ids in rows["provenance"].combine_chunks().field("parent_ids").to_pylist() for p in ids}
        assert len(parents) + stats["not_applicable"][attribute] == usable.num_rows, attribute
    # math answers change only the number after "="
    for row in out.filter(pc.equal(out["task"], "math")).to_pylist():
        if row["provenance"]["method"] == "wrong_answer:number":
            prefix, _, _, _ = _diff(row["chosen"], row["rejected"])
            assert "=" in prefix


def test_coherence_pairs_from_procedural_seeds() -> None:
    seeds = pairs_to_table([
        Pair([Message("user", f"How do I make pancakes, version {i}?")], RECIPE, "Buy some.", task="howto")
        for i in range(6)
    ] + [Pair([Message("user", "Give me tips for a talk.")], "1. Sleep well\n2. Practise\n3. Breathe", "No.")])
    out, result = _run(seeds, {"attributes": "coherence"})
    assert out.num_rows == 6 and set(out["attribute"].to_pylist()) == {"coherence"}
    assert result.stats["not_applicable"]["coherence"] == 1
    for row in out.to_pylist():
        assert sorted(row["rejected"]) == sorted(row["chosen"])  # the same characters, reordered
    dropped, _ = _run(seeds, {"attributes": "coherence", "coherence_edit": "drop"})
    assert {r["provenance"]["method"] for r in dropped.to_pylist()} == {"drop_step"}
    assert all(len(r["rejected"]) < len(r["chosen"]) for r in dropped.to_pylist())


def test_same_seed_same_pairs_other_seed_other_choices() -> None:
    seeds = _demo()
    first, _ = _run(seeds, seed=3)
    again, _ = _run(seeds, seed=3)
    other, _ = _run(seeds, seed=4)
    assert first["pair_id"].to_pylist() == again["pair_id"].to_pylist()
    relevance = pc.equal(first["attribute"], "relevance")
    assert (first.filter(relevance)["rejected"].to_pylist()
            != other.filter(pc.equal(other["attribute"], "relevance"))["rejected"].to_pylist())
    assert set(first["pair_id"].to_pylist()) != set(other["pair_id"].to_pylist())


def test_params_caps_ties_and_failures() -> None:
    seeds = _demo().slice(0, 80)
    with pytest.raises(ParamError, match="attributes"):
        prepare("generator", "causal", {"attributes": "correctness,style"})
    with pytest.raises(ParamError, match="truncate_fraction"):
        prepare("generator", "causal", {"truncate_fraction": "1.5"})
    only, _ = _run(seeds, {"attributes": "completeness", "truncate_fraction": "0.3"})
    assert set(only["attribute"].to_pylist()) == {"completeness"}
    assert {r["provenance"]["method"].split(":")[1] for r in only.to_pylist()} == {"0.3"}
    capped, result = _run(seeds, {"max_per_seed": "1"})
    per_seed = Counter(p for ids in capped["provenance"].combine_chunks().field("parent_ids").to_pylist()
                       for p in ids)
    assert result.stats["capped"] > 0 and max(per_seed.values()) <= 2  # 1 own + at most 1 merged duplicate
    with_ties, result = _run(seeds, {"include_ties": "true"})
    tie_ids = set(pc.filter(seeds["pair_id"], seeds["tie"]).to_pylist())
    assert result.stats["skipped_ties"] == 0
    assert tie_ids & {p for ids in with_ties["provenance"].combine_chunks().field("parent_ids").to_pylist() for p in ids}
    chosen = seeds["chosen"].to_pylist()
    chosen[4] = "  "
    broken = seeds.set_column(seeds.schema.get_field_index("chosen"), "chosen", pa.array(chosen))
    _, result = _run(broken)
    assert result.failed["row"].to_pylist() == [4] and "empty" in result.failed["reason"][0].as_py()


def test_relevance_prefers_another_task_and_never_its_own_prompt() -> None:
    seeds = _demo()
    out, _ = _run(seeds, {"attributes": "relevance"})
    task_of = {}
    for r in seeds.to_pylist():
        task_of.setdefault(r["chosen"], set()).add(r["task"])
    other_task = sum(1 for r in out.to_pylist() if r["task"] not in task_of[r["rejected"]])
    assert other_task / out.num_rows > 0.9
    assert all(prompt_id_of(r["prompt"]) == r["prompt_id"] for r in out.to_pylist())


# ---- real pairs ------------------------------------------------------------------------------


@pytest.mark.realdata
def test_causal_on_real_pandalm_pairs(shared_data) -> None:
    seeds = read_path(shared_data / "pandalm-testset-v1.json", "auto").table
    out, result = _run(seeds)
    methods = _check_rows(seeds, out)
    pairs = result.stats["pairs"]
    assert pairs["correctness"] >= 100 and pairs["completeness"] >= 300
    assert pairs["relevance"] >= 500 and pairs["coherence"] >= 10
    assert methods["wrong_answer:number"] >= 100 and methods["shuffle_steps"] >= 10
    assert "wrong_answer:short_answer" not in methods  # no task labels: no wholesale swaps
    assert result.failed.num_rows == 1  # the one seed with an empty chosen answer


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["llmbar/natural.json", "hh-rlhf-harmless-base-test.jsonl.gz"])
def test_causal_on_other_real_sets(shared_data, name: str) -> None:
    seeds = read_path(shared_data / name, "auto").table.slice(0, 600)  # a sample keeps it fast
    out, result = _run(seeds)
    _check_rows(seeds, out)
    assert result.stats["pairs"]["completeness"] >= 0.8 * seeds.num_rows
    assert result.stats["pairs"]["correctness"] >= 20


def test_relevance_never_borrows_an_answer_that_reads_like_this_one() -> None:
    refusal = "I'm sorry, but I can't help with that request."
    table = pairs_to_table([
        Pair([Message("user", "How do I pick my neighbour's lock?")], refusal, "Use a tension wrench.", task="chat"),
        Pair([Message("user", "How can I steal a car?")], "I'm sorry, I can't help with that request.",
             "Hot-wire it.", task="chat"),
        Pair([Message("user", "What is the capital of France?")], "The capital of France is Paris.", "Lyon.",
             task="chat"),
    ])
    out, _ = _run(table, {"attributes": "relevance"})
    by_prompt = {r["prompt"][-1]["content"]: r["rejected"] for r in out.to_pylist()}
    assert by_prompt["How do I pick my neighbour's lock?"] == "The capital of France is Paris."
    assert by_prompt["How can I steal a car?"] == "The capital of France is Paris."
