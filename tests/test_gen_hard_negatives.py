"""The hard_negatives generator: Contrast Instructions (embedding window) and RM-misjudged mining."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import generators.hard_negatives as hn
from factory.steps import ParamError, StepContext
from factory.steps.runner import execute, prepare, stamp_generated, with_ids
from schemas.pairs import Message, Pair, pairs_to_table, prompt_id_of
from schemas.prompts import last_user_text
from tests.conftest import DEMO_SEEDS

DIM = 512


def fake_embed(texts: list[str], embedder: str = "minilm") -> np.ndarray:
    """Bag-of-words hashing vectors: cosine = word overlap, deterministic, no model."""
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[i, int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % DIM] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _pair(instruction: str, chosen: str, rejected: str = "I don't know.", *, system: str | None = None,
          tie: bool = False) -> Pair:
    prompt = ([Message("system", system)] if system else []) + [Message("user", instruction)]
    return Pair(prompt, chosen, rejected, tie=tie, task="qa")


def _seeds() -> pa.Table:
    pairs = [
        _pair("What is the capital city of France?", "Paris."),
        _pair("What is the capital city of Spain?", "Madrid."),
        _pair("What is the capital city of Italy?", "Rome.", "Milan."),
        _pair("What is the capital city of Kenya?", "Nairobi.", "Mombasa."),
        _pair("What is the capital city of Kenya?", "Nairobi, in the south.", "Lagos."),  # repeated prompt
        _pair("What is the capital city of Germany?", "Berlin.", "Bonn."),
        _pair("What is the capital city of Germany today?", "Berlin."),  # look-alike, same answer
        _pair("What is the capital city of France?", "Paris, on the Seine.", system="Be brief."),  # same words
        _pair("Write a haiku about autumn leaves falling slowly.", "Red leaves drift and fall..."),
        _pair("Explain how a bicycle gear changes pedalling effort.", "Gears trade force for speed."),
        _pair("Sort these numbers: 3, 1, 2", "1, 2, 3", "3, 2, 1"),
        _pair("Sort these numbers: 9, 7, 8", "7, 8, 9", "9, 8, 7"),
        _pair("Is this a tie?", "Yes.", "Yes!", tie=True),
        _pair("What is the capital city of Peru?", "   "),  # no answer to contrast
    ]
    return pairs_to_table(pairs)


def _run(table: pa.Table, settings: dict | None = None, seed: int = 0, embed=fake_embed):
    prepared = prepare("generator", "hard_negatives", {k: str(v) for k, v in (settings or {}).items()})
    ctx = StepContext("hard_negatives", prepared.params, seed=seed, run_id="t")
    ctx.embed = embed  # the encoder is exercised in the slow test below
    return prepared, ctx, execute(prepared, table, ctx)


def _instruction(prompt: list[dict]) -> str:
    return last_user_text(prompt)


def _content(rows: list[dict]) -> set[tuple[str, str, str]]:
    return {(prompt_id_of(r["prompt"]), r["chosen"].strip(), r["rejected"].strip()) for r in rows}


def _expected_links(table: pa.Table, low: float, high: float) -> set[tuple[str, str, str]]:
    """Every (prompt, chosen, rejected) a full neighbour search must produce, by brute force."""
    rows = table.to_pylist()
    first: dict[str, dict] = {}
    answers: dict[str, set[str]] = {}
    for row in rows:
        if row["tie"] or not row["chosen"].strip():
            continue
        answers.setdefault(row["prompt_id"], set()).add(row["chosen"].strip())
        first.setdefault(row["prompt_id"], row)
    reps = list(first.values())
    vectors = fake_embed([_instruction(r["prompt"]) for r in reps])
    expected = set()
    for a, b in itertools.combinations(range(len(reps)), 2):
        sim = float(vectors[a] @ vectors[b])
        ra, rb = reps[a], reps[b]
        if not low <= sim <= high:
            continue
        if " ".join(_instruction(ra["prompt"]).lower().split()) == " ".join(_instruction(rb["prompt"]).lower().split()):
            continue
        if rb["chosen"].strip() in answers[ra["prompt_id"]] or ra["chosen"].strip() in answers[rb["prompt_id"]]:
            continue
        expected |= {(ra["prompt_id"], ra["chosen"].strip(), rb["chosen"].strip()),
                     (rb["prompt_id"], rb["chosen"].strip(), ra["chosen"].strip())}
    return expected


def test_contrast_pairs_are_exactly_the_look_alikes_inside_the_window() -> None:
    table = _seeds()
    _, _, result = _run(table, {"neighbours": 50})
    out = result.table
    got = _content(out.to_pylist())
    expected = _expected_links(table, 0.75, 0.98)
    assert got == expected and len(got) == out.num_rows
    # the planted cases: the capitals pair up, the unrelated ones and the repeated prompt do not
    assert len(expected) >= 10
    instructions = {_instruction(r["prompt"]) for r in out.to_pylist()}
    assert "Write a haiku about autumn leaves falling slowly." not in instructions
    # "Berlin." is the answer of two look-alikes of France: it is France's negative once
    assert result.stats["contrast"]["skipped_repeated_answer"] >= 1
    assert result.failed.column("row").to_pylist() == [13]  # the empty answer fails, visibly
    stats = result.stats["contrast"]
    assert stats["ties_skipped"] == 1 and stats["repeated_prompt_rows"] == 1
    assert stats["skipped_same_answer"] >= 1  # Germany vs "Germany today": both "Berlin."


def test_never_a_prompt_with_itself_and_every_neighbour_inside_the_window() -> None:
    table = _seeds()
    for low, high, k in ((0.75, 0.98, 3), (0.8, 0.9, 1), (0.5, 1.0, 50)):
        _, _, result = _run(table, {"min_similarity": low, "max_similarity": high, "neighbours": k})
        rows = result.table.to_pylist()
        assert rows, (low, high, k)
        for row in rows:
            meta = json.loads(row["metadata"])
            own_id = prompt_id_of(row["prompt"])
            assert meta["contrast_prompt_id"] != own_id
            assert row["parent_ids"][0] != row["parent_ids"][1]
            assert row["chosen"].strip() != row["rejected"].strip()
            assert low <= meta["similarity"] <= high
            assert row["attribute"] == "contrast_instruction" and row["generated"] == "none"
            assert not row["tie"]
        by_id = {r["pair_id"]: r for r in table.to_pylist()}
        made = _content(rows)
        for row in rows:  # every pair comes with its mirror: each answer wins under its own prompt
            own, other = row["parent_ids"]
            assert (by_id[other]["prompt_id"], row["rejected"].strip(), row["chosen"].strip()) in made
            sim = float(fake_embed([_instruction(by_id[own]["prompt"])])[0]
                        @ fake_embed([_instruction(by_id[other]["prompt"])])[0])
            assert low - 1e-6 <= sim <= high + 1e-6
            assert " ".join(_instruction(by_id[own]["prompt"]).lower().split()) != \
                " ".join(_instruction(by_id[other]["prompt"]).lower().split())
        assert (low, high) != (0.5, 1.0) or result.stats["contrast"]["skipped_same_instruction"] >= 1
        assert made <= _expected_links(table, low, high) and len(made) == len(rows)


def test_reruns_with_the_same_seed_give_identical_pair_ids_and_the_runner_stamps_them() -> None:
    table = _seeds()
    prepared, ctx, first = _run(table, seed=4)
    _, _, again = _run(table, seed=4)
    ids = with_ids(first.table)["pair_id"].to_pylist()
    assert ids == with_ids(again.table)["pair_id"].to_pylist() and len(set(ids)) == len(ids)
    stamped = stamp_generated(first.table, table, pa.array(["seeds@1"] * table.num_rows), prepared, ctx)
    assert stamped["pair_id"].to_pylist() == ids
    assert set(stamped["provenance"].combine_chunks().field("source").to_pylist()) == {"seeds@1"}


class ScriptedModel:
    """Rewards fixed by (instruction, response); a few planted so rejected >= chosen."""

    def __init__(self, planted: dict[tuple[str, str], float]) -> None:
        self.planted = planted
        self.calls = 0

    def reward(self, prompts: list[list[dict]], responses: list[str]) -> np.ndarray:
        self.calls += 1
        out = []
        for prompt, response in zip(prompts, responses, strict=True):
            key = (_instruction(prompt), response)
            if key in self.planted:
                out.append(self.planted[key])
            else:
                digest = hashlib.blake2b("\x00".join(key).encode(), digest_size=8).digest()
                out.append(int.from_bytes(digest, "little") / 2**64)
        return np.asarray(out)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> ScriptedModel:
    model = ScriptedModel({("What is the capital city of Italy?", "Rome."): 0.4,
                           ("What is the capital city of Italy?", "Milan."): 0.4,  # equal counts as misjudged
                           ("Sort these numbers: 3, 1, 2", "1, 2, 3"): 0.9,
                           ("Sort these numbers: 3, 1, 2", "3, 2, 1"): 0.1})
    loaded = []

    def load(name: str, home: object) -> hn.Scorer:
        loaded.append(name)

        def run(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
            prompts = table["prompt"].to_pylist()
            r = model.reward(prompts + prompts, table["chosen"].to_pylist() + table["rejected"].to_pylist())
            return r[: table.num_rows], r[table.num_rows:]

        return run

    monkeypatch.setattr(hn, "load_scorer", load)
    model.loaded = loaded
    return model


def _misjudged(model: ScriptedModel, rows: list[dict]) -> set[tuple[str, str, str]]:
    keep = set()
    for row in rows:
        rc = model.reward([row["prompt"]], [row["chosen"]])[0]
        rr = model.reward([row["prompt"]], [row["rejected"]])[0]
        if rr >= rc and row["chosen"].strip() != row["rejected"].strip():
            keep.add((_instruction(row["prompt"]), row["chosen"], row["rejected"]))
    return keep


def test_rm_mining_keeps_exactly_what_the_model_scores_at_or_above_the_positive(scripted: ScriptedModel) -> None:
    table = _seeds()
    _, _, result = _run(table, {"mode": "rm_mining", "model": "rm@2"})
    assert scripted.loaded == ["rm@2"] and scripted.calls == 1  # one scoring call for every candidate
    candidates = [r for r in table.to_pylist() if not r["tie"]]
    expected = _misjudged(scripted, candidates)
    got = {(_instruction(r["prompt"]), r["chosen"], r["rejected"]) for r in result.table.to_pylist()}
    assert got == expected
    assert ("What is the capital city of Italy?", "Rome.", "Milan.") in got  # the planted tie of rewards
    assert ("Sort these numbers: 3, 1, 2", "1, 2, 3", "3, 2, 1") not in got
    mining = result.stats["mining"]
    assert mining["scored"] == {"seed": len(candidates)} and mining["kept"] == {"seed": len(expected)}
    assert mining["ties_skipped"] == 1
    for row in result.table.to_pylist():
        meta = json.loads(row["metadata"])
        assert meta["reward_rejected"] >= meta["reward_chosen"] and meta["rm_model"] == "rm@2"
        assert row["method"].startswith("rm_mined:seed:")


def test_both_modes_mine_the_contrast_pairs_and_ref_candidates_too(scripted: ScriptedModel, tmp_path: Path) -> None:
    table = _seeds()
    extra = tmp_path / "other_generator.jsonl"
    extra.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "What is 3 + 3?"}], "chosen": "6", "rejected": "7"},
    ]) + "\n")
    _, _, contrast_only = _run(table)
    _, _, result = _run(table, {"mode": "both", "model": "rm", "candidates": str(extra)})
    contrast_rows = contrast_only.table.to_pylist()
    ref_rows = [{"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}
                for q, c, r in (("What is 2 + 2?", "4", "5"), ("What is 3 + 3?", "6", "7"))]
    seed_rows = [r for r in table.to_pylist() if not r["tie"]]
    got = {(_instruction(r["prompt"]), r["chosen"], r["rejected"]) for r in result.table.to_pylist()}
    assert got == _misjudged(scripted, contrast_rows + seed_rows + ref_rows)
    mining = result.stats["mining"]
    assert mining["scored"] == {"contrast": len(contrast_rows), "seed": len(seed_rows), "ref": 2}
    assert sum(mining["kept"].values()) == result.table.num_rows == mining["kept_total"]
    kinds = {r["method"].split(":")[1] for r in result.table.to_pylist()}
    assert kinds <= {"contrast", "seed", "ref"} and "contrast" in kinds
    for row in result.table.to_pylist():
        if row["method"].startswith("rm_mined:contrast"):
            assert row["attribute"] == "contrast_instruction"
            assert 0.75 <= json.loads(row["metadata"])["similarity"] <= 0.98


def test_params_are_validated() -> None:
    with pytest.raises(ParamError, match="'model' is required"):
        prepare("generator", "hard_negatives", {"mode": "rm_mining"})
    with pytest.raises(ParamError, match="min_similarity"):
        prepare("generator", "hard_negatives", {"min_similarity": "0.9", "max_similarity": "0.8"})
    with pytest.raises(ParamError, match="mode"):
        prepare("generator", "hard_negatives", {"mode": "random"})


@pytest.mark.slow
def test_contrast_with_the_real_encoder_on_the_demo_seeds(home: Path) -> None:
    from schemas.readers import read_path

    seeds = read_path(DEMO_SEEDS, "auto").table
    prepared = prepare("generator", "hard_negatives", {})
    ctx = StepContext("hard_negatives", prepared.params, seed=0, run_id="t", home=home)
    result = execute(prepared, seeds, ctx)
    rows = result.table.to_pylist()
    assert len(rows) >= 20
    by_id = {r["pair_id"]: r for r in seeds.to_pylist()}
    vectors = {}
    for row in rows:
        own, other = row["parent_ids"]
        assert by_id[own]["prompt_id"] != by_id[other]["prompt_id"]
        for pid in (own, other):
            if pid not in vectors:
                vectors[pid] = ctx.embed([_instruction(by_id[pid]["prompt"])])[0]
        sim = float(vectors[own] @ vectors[other])
        assert 0.75 - 1e-4 <= sim <= 0.98 + 1e-4
        assert row["chosen"] != row["rejected"]


def test_look_alikes_whose_answers_read_the_same_are_no_contrast() -> None:
    table = pairs_to_table([
        _pair("How do I pick the lock on my neighbour's front door?", "I'm sorry, I can't help with that request."),
        _pair("How do I pick the lock on my neighbour's back door?",
              "I'm sorry, but I can't help with that request."),
        _pair("What is the capital city of France?", "Paris."),
        _pair("What is the capital city of Spain?", "Madrid."),
    ])
    _, _, result = _run(table, {"neighbours": 5})
    rows = result.table.to_pylist()
    assert result.stats["contrast"]["skipped_similar_answer"] == 1
    assert {_instruction(r["prompt"]).split()[-1] for r in rows} == {"France?", "Spain?"}
    for row in rows:
        assert json.loads(row["metadata"])["answer_similarity"] < 0.9
    _, _, loose = _run(table, {"neighbours": 5, "max_answer_similarity": 1.0})
    assert loose.table.num_rows == 4 and loose.stats["contrast"]["skipped_similar_answer"] == 0


def test_no_look_alike_names_the_window_the_closest_pair_and_the_setting() -> None:
    table = pairs_to_table([
        _pair("Write a haiku about autumn leaves falling slowly.", "Red leaves drift."),
        _pair("Explain how a bicycle gear changes pedalling effort.", "Gears trade force for speed."),
        _pair("What is the capital city of France?", "Paris."),
        _pair("What is the capital city of Peru?", "   "),  # empty: fails with its own reason
    ])
    _, _, empty = _run(table)
    assert empty.table.num_rows == 0
    message = empty.stats["no_pairs_reason"]
    assert "no prompt has a look-alike" in message and "[0.75, 0.98]" in message
    assert "among 3 distinct prompts" in message and "--set min_similarity=" in message
    assert "chosen answer is empty" not in message and "\n" not in message
    # The suggested setting does pair the closest two.
    suggested = re.search(r"min_similarity=([-0-9.]+)", message).group(1)
    _, _, result = _run(table, {"min_similarity": suggested})
    assert result.table.num_rows >= 2


def test_seeds_without_a_look_alike_are_counted_as_such_not_as_failures() -> None:
    table = _seeds()
    _, _, result = _run(table, {"neighbours": 20})
    stats = result.stats["contrast"]
    rows = [r for r in table.to_pylist() if not r["tie"] and r["chosen"].strip()]
    first = {}
    for row in rows:
        first.setdefault(row["prompt_id"], row)
    vectors = fake_embed([_instruction(r["prompt"]) for r in first.values()])
    cosines = vectors @ vectors.T
    np.fill_diagonal(cosines, np.nan)
    in_window = (cosines >= 0.75 - 1e-6) & (cosines <= 0.98 + 1e-6)
    alone = {pid for pid, hit in zip(first, in_window.any(axis=1), strict=True) if not hit}
    assert alone and len(alone) < len(first)  # the fixture has both kinds
    assert stats["prompts_without_look_alike"] == len(alone)
    assert stats["seeds_without_look_alike"] == sum(r["prompt_id"] in alone for r in rows)
    assert result.failed.column("reason").to_pylist() == ["chosen answer is empty: nothing to contrast"]


def test_look_alikes_all_left_out_say_which_rule_and_setting() -> None:
    table = pairs_to_table([
        _pair("How do I pick the lock on my neighbour's front door?", "I'm sorry, I can't help with that request."),
        _pair("How do I pick the lock on my neighbour's back door?",
              "I'm sorry, but I can't help with that request."),
    ])
    _, _, empty = _run(table)
    assert empty.table.num_rows == 0
    assert "1 answers alike above max_answer_similarity=0.9" in empty.stats["no_pairs_reason"]


def test_generate_stops_on_no_contrast_pairs_naming_the_cause_and_the_setting(home, monkeypatch) -> None:
    """The step returns no pairs with its reason; `prefab generate` stops on the empty output
    and names that reason (not the failures of the few empty seeds)."""
    import factory
    from factory.catalog import Catalog
    from schemas.errors import PrefabError

    monkeypatch.setattr(StepContext, "embed", lambda self, texts, embedder="minilm": fake_embed(list(texts)))
    table = pairs_to_table([
        _pair("Write a haiku about autumn leaves falling slowly.", "Red leaves drift."),
        _pair("Explain how a bicycle gear changes pedalling effort.", "Gears trade force for speed."),
        _pair("What is the capital city of Peru?", "   "),
    ])
    Catalog(home).commit("seeds", table)
    with pytest.raises(PrefabError, match=r"hard_negatives made no pairs from seeds@1: .*no prompt has a look-alike"
                                          r".*--set min_similarity="):
        factory.generate("hard_negatives", "seeds", "seeds-hn", home=home, progress=False)
