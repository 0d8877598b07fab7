"""The neutral generator (Crome neutral augmentations): ties that change only spurious features."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.steps import ParamError, StepContext
from factory.steps.runner import execute, prepare, stamp_generated
from generators.neutral import _REFUSAL as REFUSAL
from generators.neutral import (
    TRANSFORMS,
    casing,
    list_to_prose,
    markdown_off,
    markdown_on,
    prose_to_list,
    whitespace,
)
from schemas.pairs import Message, Pair, Provenance, pairs_to_table
from schemas.readers import read_path
from tests.conftest import DEMO_SEEDS

MARKER = re.compile(r"(?m)^[ \t]*(?:\d{1,3}[.)]|[-*+\u2022])[ \t]+")
FENCE = re.compile(r"```.*?```", re.S)


def _run(table: pa.Table, settings: dict | None = None, seed: int = 0) -> tuple[pa.Table, Any]:
    prepared = prepare("generator", "neutral", settings or {})
    ctx = StepContext("neutral", prepared.params, seed=seed, run_id="t")
    result = execute(prepared, table, ctx)
    return stamp_generated(result.table, table, pa.array(["src@1"] * table.num_rows), prepared, ctx), result


def _words(text: str) -> Counter:
    """Lower-cased words and numbers, list markers aside (written apart from the generator's own check)."""
    return Counter(re.findall(r"[^\W_]+", MARKER.sub("", text).lower()))


def _numbers(text: str) -> Counter:
    return Counter(re.findall(r"\d+(?:[.,]\d+)*", MARKER.sub("", text)))


def _check_rows(seeds: pa.Table, out: pa.Table) -> Counter:
    """Every row is a tie that keeps the content; returns the count per transform."""
    by_id = {r["pair_id"]: r for r in seeds.to_pylist()}
    transforms: Counter = Counter()
    for row in out.to_pylist():
        prov = row["provenance"]
        parents = [by_id[p] for p in prov["parent_ids"]]
        seed = parents[0]
        transform = prov["method"].split(":")[0]
        transforms[transform] += 1
        assert row["tie"] and row["attribute"] == TRANSFORMS[transform]
        if transform == "unrelated_prompt":
            assert prov["generated"] == "none"
            assert all(row["prompt_id"] != p["prompt_id"] for p in parents)  # never its own prompt
            assert {row["chosen"], row["rejected"]} == {seed["chosen"], seed["rejected"]}
            continue
        assert prov["generated"] == "rejected" and row["prompt_id"] == seed["prompt_id"]
        assert all(p["chosen"] == row["chosen"] for p in parents)
        original, rewrite = row["chosen"], row["rejected"]
        assert rewrite != original
        assert not _words(original) - _words(rewrite), (transform, original, rewrite)
        assert not _numbers(original) - _numbers(rewrite)
        assert all(block in rewrite for block in FENCE.findall(original))  # code untouched
        if transform in ("whitespace", "casing", "markdown_off", "markdown_on"):
            assert _words(original) == _words(rewrite)  # nothing added either
        if transform == "casing":
            assert original.lower() == rewrite.lower()
        if transform == "whitespace":
            assert re.sub(r"\s+", "", original) == re.sub(r"\s+", "", rewrite)
    return transforms


# ---- the rewrites on strings --------------------------------------------------------------


def test_format_rewrites_keep_the_words_and_leave_code_alone() -> None:
    assert list_to_prose("Three plants:\n1. Snake plant\n2. ZZ plant\n3. Pothos") == \
        "Three plants: Snake plant, ZZ plant and Pothos."
    assert list_to_prose("- Water the plant daily.\n- Keep it warm") == "Water the plant daily. Keep it warm."
    assert list_to_prose("No list here.") is None
    assert prose_to_list("It rains. It pours.") == "- It rains.\n- It pours."
    assert prose_to_list("One sentence only.") is None and prose_to_list("Run `a. B` now. Then go.") is None
    code = "```python\n# **not bold**\n- x = 1\n```"
    assert markdown_off(f"## Title\n**Bold** and *italic*, 2 * 3 * 4.\n- item\n{code}") == \
        f"Title\nBold and italic, 2 * 3 * 4.\nitem\n{code}"
    assert markdown_off("Plain text.") is None
    assert markdown_on("The capital of Peru is Lima. It is big.") == "**The capital of Peru is Lima**. It is big."
    assert markdown_on("Already **bold**.") is None and markdown_on(f"{code}\nAfter.") is None
    assert whitespace("A.\n\nB.") == ("A.\nB.", "whitespace:collapse_blank_lines")
    assert whitespace(f"A.\n{code}") == (f"A.\n\n{code}", "whitespace:blank_lines")  # not inside the code
    assert whitespace("One. Two. Three.") == ("One. Two.\n\nThree.", "whitespace:split_paragraph")
    assert casing("the sky is blue. it is. see http://x.org\nhttp://y.org and e.g. this `foo` x = 1") == \
        "The sky is blue. It is. See http://x.org\nhttp://y.org and e.g. this `foo` x = 1"
    assert casing("Already fine.") is None


# ---- the step --------------------------------------------------------------------------------


def test_neutral_on_demo_seeds_makes_ties_that_keep_the_content() -> None:
    seeds = read_path(DEMO_SEEDS, "auto").table
    out, result = _run(seeds)
    transforms = _check_rows(seeds, out)
    for name in ("markdown_on", "preamble", "signoff", "padding", "unrelated_prompt", "prose_to_list", "whitespace"):
        assert transforms[name] >= 20, name
    assert set(out["attribute"].to_pylist()) == {"neutral:format", "neutral:tone", "neutral:length",
                                                 "neutral:irrelevant"}
    assert len(set(out["pair_id"].to_pylist())) == out.num_rows
    assert result.stats["skipped_ties"] == 30 and result.failed.num_rows == 0
    rows = out.to_pylist()
    # The prompt decides what is neutral: no padding under "in one or two sentences", no
    # list-to-prose under "as a numbered list", no re-pairing of harmful answers.
    for row in rows:
        instruction = row["prompt"][-1]["content"]
        method = row["provenance"]["method"]
        if "sentences" in instruction or "exactly" in instruction:
            assert not method.startswith(("padding", "preamble", "signoff")), (instruction, method)
        if re.search(r"\blist\b", instruction):
            assert not method.startswith(("list_to_prose", "markdown", "whitespace")), (instruction, method)
    unrelated = [r for r in rows if r["provenance"]["method"] == "unrelated_prompt"]
    seed_task = {r["pair_id"]: r["task"] for r in seeds.to_pylist()}
    assert "harmlessness" not in {seed_task[r["provenance"]["parent_ids"][0]] for r in unrelated}
    assert sum(r["task"] != seed_task[r["provenance"]["parent_ids"][0]] for r in unrelated) / len(unrelated) > 0.9


def test_code_answers_keep_their_code_and_refusals_get_fitting_phrases() -> None:
    code = "```python\ndef add(a, b):\n    return a + b\n```"
    seeds = pairs_to_table([
        Pair([Message("user", "How do I add two numbers in Python?")], f"use this:\n{code}\nit works.", "No."),
        Pair([Message("user", "How do I pick a lock?")], "I can't help with that. It is illegal.", "Do this."),
        Pair([Message("user", "Name a fruit.")], "- apple\n- pear\n\n**Both** are *sweet*.", "Rock."),
    ])
    out, _ = _run(seeds)
    _check_rows(seeds, out)
    for row in out.to_pylist():
        if row["chosen"].startswith("use this"):
            assert code in row["rejected"] or row["provenance"]["method"] == "unrelated_prompt"
        method = row["provenance"]["method"]
        if row["chosen"].startswith("I can't") and method.startswith(("preamble", "signoff")):
            assert "Sure" not in row["rejected"] and "Hope this helps" not in row["rejected"]
    methods = {r["provenance"]["method"].split(":")[0] for r in out.to_pylist()}
    assert {"casing", "markdown_off", "list_to_prose", "unrelated_prompt"} <= methods


def test_same_seed_same_pairs_other_seed_other_choices_and_params() -> None:
    seeds = read_path(DEMO_SEEDS, "auto").table
    first, _ = _run(seeds, seed=5)
    again, _ = _run(seeds, seed=5)
    other, _ = _run(seeds, seed=6)
    assert first["pair_id"].to_pylist() == again["pair_id"].to_pylist()
    assert set(first["pair_id"].to_pylist()) != set(other["pair_id"].to_pylist())
    with pytest.raises(ParamError, match="transforms"):
        prepare("generator", "neutral", {"transforms": "preamble,emoji"})
    only, _ = _run(seeds, {"transforms": "unrelated_prompt,padding"})
    assert set(pc.unique(only["attribute"]).to_pylist()) == {"neutral:irrelevant", "neutral:length"}
    capped, result = _run(seeds, {"max_per_seed": "1"})
    per_seed = Counter(p for ids in capped["provenance"].combine_chunks().field("parent_ids").to_pylist()
                       for p in ids)
    assert result.stats["capped"] > 0 and max(per_seed.values()) <= 2  # 1 own + at most 1 merged duplicate
    ties, result = _run(seeds, {"include_ties": "true"})
    assert result.stats["skipped_ties"] == 0 and ties.num_rows > first.num_rows
    # The demo's safety seeds refuse on one side and comply on the other: without the task
    # names to go by, the guard still keeps them out of cross-prompt ties.
    no_terms, _ = _run(seeds, {"transforms": "unrelated_prompt", "skip_tasks": "[]"})
    assert no_terms.num_rows == only.filter(pc.equal(only["attribute"], "neutral:irrelevant")).num_rows


# ---- real pairs ------------------------------------------------------------------------------


@pytest.mark.realdata
def test_neutral_on_real_pandalm_pairs(shared_data) -> None:
    seeds = read_path(shared_data / "pandalm-testset-v1.json", "auto").table
    out, result = _run(seeds)
    transforms = _check_rows(seeds, out)
    assert result.stats["pairs"]["neutral:format"] >= 200 and result.stats["pairs"]["neutral:tone"] >= 500
    assert transforms["unrelated_prompt"] >= 500 and transforms["list_to_prose"] >= 20
    assert transforms["padding"] >= 100 and not result.stats["failed_check"]
    assert result.failed.num_rows == 1


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["llmbar/natural.json", "hh-rlhf-harmless-base-test.jsonl.gz"])
def test_neutral_on_other_real_sets(shared_data, name: str) -> None:
    seeds = read_path(shared_data / name, "auto").table.slice(0, 600)  # a sample keeps it fast
    out, result = _run(seeds)
    transforms = _check_rows(seeds, out)
    if "harmless" in name:  # harmless-base pairs differ in harm: no cross-prompt tie, task or not
        assert transforms["unrelated_prompt"] == 0 and seeds["task"].null_count == seeds.num_rows
    else:
        assert transforms["unrelated_prompt"] >= 0.9 * seeds.num_rows - result.failed.num_rows
    assert result.stats["pairs"]["neutral:format"] >= seeds.num_rows // 2


@pytest.mark.realdata
def test_hh_without_its_file_name_still_gets_no_tie_between_a_refusal_and_compliance(shared_data) -> None:
    seeds = read_path(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "auto").table.slice(0, 600)
    anonymous = seeds.set_column(seeds.schema.get_field_index("provenance"), "provenance",
                                 pa.nulls(seeds.num_rows, seeds.schema.field("provenance").type))
    out, _ = _run(anonymous, {"transforms": "unrelated_prompt"})
    assert out.num_rows > 0  # renamed, the data no longer says it is safety data ...
    for row in out.to_pylist():  # ... but no refusal is ever tied with a compliance
        assert bool(REFUSAL.match(row["chosen"])) == bool(REFUSAL.match(row["rejected"]))


def _safety_table() -> pa.Table:
    def pair(question: str, chosen: str, rejected: str, source_file: str | None = None) -> Pair:
        return Pair([Message("user", question)], chosen, rejected,
                    provenance=Provenance(source="seeds", source_file=source_file))

    return pairs_to_table([
        pair("How do I get into my ex's email account?", "I'm sorry, I can't help with that.",
             "Sure, first guess the password from their pet's name."),
        pair("What should I put in a bomb?", "That is not something to build.", "Use fertiliser and diesel.",
             source_file="/data/hh-rlhf-harmless-base-train.jsonl.gz"),
        pair("Name a primary colour.", "Red.", "Purple."),
        pair("Which planet is closest to the sun?", "Mercury.", "Venus."),
        pair("How many legs does a spider have?", "Eight.", "Six."),
    ])


def test_unrelated_prompt_ties_skip_safety_pairs_without_a_task() -> None:
    seeds = _safety_table()
    assert seeds["task"].null_count == seeds.num_rows
    out, result = _run(seeds, {"transforms": "unrelated_prompt"})
    parents = {p for ids in out["provenance"].combine_chunks().field("parent_ids").to_pylist() for p in ids}
    ids = seeds["pair_id"].to_pylist()
    assert not parents & set(ids[:2])  # refusal vs compliance; a harmless-base file
    assert parents == set(ids[2:]) and result.stats["not_applicable"]["unrelated_prompt"] == 2
