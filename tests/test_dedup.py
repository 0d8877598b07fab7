"""The dedup filter's scores and decision on planted exact, near and contaminated pairs."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.steps import StepContext
from factory.steps.runner import execute, prepare
from filters.dedup import NEAR_DUPLICATE_THRESHOLD, ngrams, normalise
from schemas.pairs import Message, Pair, pairs_to_table

TOPICS = ["volcanoes", "tides", "photosynthesis", "the moon landing", "bread baking", "chess openings",
          "monsoon winds", "honey bees", "glaciers", "the printing press", "jazz", "coral reefs"]


def _pair(prompt: str, chosen: str, rejected: str) -> Pair:
    return Pair([Message("user", prompt)], chosen, rejected)


def _base() -> list[Pair]:
    return [_pair(f"Write a short explanation of {t} for a curious twelve year old reader.",
                  f"Here is how {t} work: a clear account with three concrete examples and a summary of {t}.",
                  f"{t} are a thing.") for t in TOPICS]


def _scores(pairs: list[Pair], tmp_path, **settings) -> tuple[pa.Table, object, object]:
    prepared = prepare("filter", "dedup", {k: str(v) for k, v in settings.items()})
    ctx = StepContext("dedup", prepared.params, home=tmp_path)
    table = pairs_to_table(pairs)
    result = execute(prepared, table, ctx)
    decision = prepared.spec.decide(result.table, prepared.params)
    return table, result, decision


def test_normalise_and_ngrams() -> None:
    assert normalise("  Hello,   WORLD!\n") == "hello world"
    assert ngrams(["a", "b", "c", "d"], 3) == ["a b c", "b c d"]
    assert ngrams(["a", "b"], 3) == ["a b"]


def test_planted_exact_and_near_duplicates_are_dropped_and_the_first_kept(tmp_path) -> None:
    pairs = _base()
    exact = _pair(pairs[3].prompt[0].content.upper() + "  ", pairs[3].chosen, pairs[3].rejected)  # same after normalising
    near_src = pairs[5]
    near = _pair(near_src.prompt[0].content, near_src.chosen + " Thanks!", near_src.rejected)
    rows = [*pairs, exact, near]
    table, result, decision = _scores(rows, tmp_path)
    scores = result.table.to_pylist()
    ids = table["pair_id"].to_pylist()
    assert scores[len(pairs)]["exact_of"] == ids[3]
    assert scores[len(pairs) + 1]["exact_of"] is None
    assert scores[len(pairs) + 1]["near_of"] == ids[5] and scores[len(pairs) + 1]["near_similarity"] >= 0.85
    actions = decision.action.to_pylist()
    assert actions == ["keep"] * len(pairs) + ["drop", "drop"]
    assert "exact duplicate of " + ids[3] == decision.reason[len(pairs)].as_py()
    assert decision.reason[len(pairs) + 1].as_py().startswith(f"near duplicate of {ids[5]}")
    # a stricter threshold than the planted similarity keeps the near duplicate, from the same scores
    stricter = prepare("filter", "dedup", {"near_threshold": "0.999"})
    assert stricter.spec.decide(result.table, stricter.params).action.to_pylist()[-1] == "keep"


def test_contamination_names_the_evaluation_pair(tmp_path) -> None:
    pairs = _base()
    eval_file = tmp_path / "eval.jsonl"
    leaked = pairs[7]
    rows = [{"prompt": leaked.prompt[0].content, "chosen": "x", "rejected": "y"},
            {"prompt": "An unrelated question about the history of maps?", "chosen": "a", "rejected": "b"}]
    eval_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table, result, decision = _scores(pairs, tmp_path, against=str(eval_file))
    contamination = result.table["contamination"].to_pylist()
    assert contamination[7] == 1.0
    assert max(c for i, c in enumerate(contamination) if i != 7) < 0.5
    assert result.table["contaminated_by"][7].as_py().startswith(f"{eval_file}:")
    assert pc.sum(pc.equal(decision.action, "drop")).as_py() == 1
    assert "contaminated" in decision.reason[7].as_py()


@pytest.mark.slow
def test_embedding_neighbours_find_a_paraphrased_pair(tmp_path) -> None:
    pairs = _base()
    source = pairs[2]
    paraphrase = _pair("For a curious 12-year-old, write a brief explanation of " + TOPICS[2] + ".",
                       source.chosen, source.rejected)
    table, result, decision = _scores([*pairs, paraphrase], tmp_path, near="embedding", near_threshold=0.9)
    last = result.table.to_pylist()[-1]
    assert last["near_of"] == table["pair_id"][2].as_py() and last["near_similarity"] >= 0.9
    assert decision.action.to_pylist() == ["keep"] * len(pairs) + ["drop"]
    # the first occurrence is never the one dropped: no earlier row names a later one
    assert all(row["near_of"] is None for row in result.table.to_pylist()[:1])


def _long_prompt() -> str:
    # ~700 tokens: a shared RAG-style context; everything that differs lies in the answers
    facts = [f"Fact {i}: the {t} section of the handbook lists {i + 3} numbered rules and a glossary."
             for i, t in enumerate(TOPICS * 3)]
    return "Read the handbook excerpt below, then answer the question.\n" + "\n".join(facts)


def test_embedding_pairs_sharing_a_long_prompt_with_unrelated_answers_are_kept(tmp_path) -> None:
    prompt = _long_prompt()
    pairs = [_pair(prompt, "Volcanoes erupt when magma pressure exceeds the strength of the crust.",
                   "I do not know anything about that."),
             _pair(prompt, "A sourdough starter needs flour, water and a warm kitchen for five days.",
                   "Bread is food."),
             _pair(prompt, "The Sicilian Defence answers 1.e4 with c5 and fights for d4 from the side.",
                   "Chess has pieces.")]
    _, result, decision = _scores(pairs, tmp_path, near="embedding")
    similarity = result.table["near_similarity"].to_pylist()
    assert max(similarity) < 0.6, similarity  # the prompt alone matches; the answers do not
    assert decision.action.to_pylist() == ["keep"] * 3


def test_embedding_long_prompts_that_open_alike_but_go_on_differently_are_kept(tmp_path) -> None:
    opening = _long_prompt()  # the first 256 tokens of both prompts are the same
    later = {t: " ".join(f"Turn {i}: tell me more about {t}, especially {t} in winter and {t} at night."
                         for i in range(25)) for t in ("glaciers", "jazz")}
    pairs = [_pair(opening + "\n" + later[t], "I'm sorry, I can't help with that.", "Sure.")
             for t in later]
    _, result, decision = _scores(pairs, tmp_path, near="embedding")
    assert result.table["near_similarity"][1].as_py() < NEAR_DUPLICATE_THRESHOLD
    assert decision.action.to_pylist() == ["keep", "keep"]


def test_embedding_near_duplicate_after_a_large_exact_cluster_is_found(tmp_path) -> None:
    pairs = _base()
    source = pairs[4]
    copies = [_pair(source.prompt[0].content, source.chosen, source.rejected) for _ in range(40)]
    near = _pair(source.prompt[0].content, source.chosen + " Thanks!", source.rejected)
    rows = [*pairs[:4], *copies, *pairs[5:], near]
    table, result, decision = _scores(rows, tmp_path, near="embedding")
    scores = result.table.to_pylist()
    ids = table["pair_id"].to_pylist()
    assert scores[-1]["exact_of"] is None
    assert scores[-1]["near_of"] == ids[4] and scores[-1]["near_similarity"] >= NEAR_DUPLICATE_THRESHOLD
    actions = decision.action.to_pylist()
    assert actions[4] == "keep" and actions[5:44] == ["drop"] * 39 and actions[-1] == "drop"
    assert actions.count("keep") == len(pairs)


def test_near_none_scores_exact_duplicates_only(tmp_path) -> None:
    pairs = _base()
    near = _pair(pairs[5].prompt[0].content, pairs[5].chosen + " Thanks!", pairs[5].rejected)
    table, result, decision = _scores([*pairs, pairs[3], near], tmp_path, near="none")
    assert result.table["near_similarity"].to_pylist() == [0.0] * (len(pairs) + 2)
    assert result.table["near_of"].null_count == len(pairs) + 2
    assert decision.action.to_pylist() == ["keep"] * len(pairs) + ["drop", "keep"]
    # a similarity of 0 with no earlier pair named is no near duplicate, even at threshold 0
    zero = prepare("filter", "dedup", {"near": "none", "near_threshold": "0"})
    assert zero.spec.decide(result.table, zero.params).action.to_pylist() == decision.action.to_pylist()


def test_near_duplicate_threshold_is_the_public_default() -> None:
    from filters.dedup import DedupParams

    assert DedupParams().near_threshold == NEAR_DUPLICATE_THRESHOLD == 0.85


def _reference_near_minhash(components, pair_ids, exact_of, params):
    """The MinHash search before signatures were chunked (datasketch objects for every row,
    whole-table shingle sets), kept to show the chunked one decides the same."""
    from datasketch import MinHash, MinHashLSH

    from filters.dedup import _shingles

    n = len(pair_ids)
    tagged = [set().union(*({b"%d\x00" % k + s for s in _shingles(part[i], params.shingle)}
                            for k, part in enumerate(components))) for i in range(n)]
    combined = MinHash.bulk(tagged, num_perm=params.num_perm, seed=1)
    per_part = [MinHash.bulk([_shingles(text, params.shingle) for text in part], num_perm=params.num_perm, seed=2)
                for part in components]
    lsh = MinHashLSH(threshold=params.candidate_threshold, num_perm=params.num_perm)
    similarity = [0.0] * n
    near_of = [None] * n
    for i, minhash in enumerate(combined):
        if exact_of[i] is not None:
            continue
        best, best_j = 0.0, None
        for j in lsh.query(minhash):
            estimate = min(part[i].jaccard(part[j]) for part in per_part)
            if estimate > best or (estimate == best and best_j is not None and j < best_j):
                best, best_j = estimate, j
        if best_j is not None:
            similarity[i], near_of[i] = best, pair_ids[best_j]
        lsh.insert(i, minhash)
    return similarity, near_of


def _planted_components(copies: int) -> tuple[list[list[str]], list[str], list[str | None]]:
    """Distinct pairs with near duplicates (an answer extended, a word changed, the prompt
    reworded at its end), exact duplicates and pairs sharing only their prompt."""
    prompts, firsts, seconds = [], [], []
    for c in range(copies):
        for t in TOPICS:
            prompts.append(f"Round {c}: write a short explanation of {t} for a curious twelve year old reader.")
            firsts.append(f"Here is how {t} work in round {c}: a clear account with three concrete examples, "
                          f"a diagram described in words and a summary of {t} for revision.")
            seconds.append(f"{t} are a thing (round {c}).")
    n = len(prompts)
    for i in range(0, n, 3):  # near duplicates of earlier rows, far from their source
        prompts.append(prompts[i])
        firsts.append(firsts[i] + " Thanks!")
        seconds.append(seconds[i])
    for i in range(1, n, 5):  # a shared prompt with unrelated answers
        prompts.append(prompts[i])
        firsts.append(f"Something else entirely, number {i}, about gardening and soil.")
        seconds.append("No.")
    for i in range(2, n, 7):  # exact duplicates
        prompts.append(prompts[i])
        firsts.append(firsts[i])
        seconds.append(seconds[i])
    components = [prompts, [min(a, b) for a, b in zip(firsts, seconds, strict=True)],
                  [max(a, b) for a, b in zip(firsts, seconds, strict=True)]]
    pair_ids = [f"p{i}" for i in range(len(prompts))]
    keys = ["\x00".join(part[i] for part in components) for i in range(len(prompts))]
    from filters.dedup import _exact

    return components, pair_ids, _exact(keys, pair_ids)


def test_chunked_minhash_decides_as_the_whole_table_implementation_did() -> None:
    from filters.dedup import DedupParams, _near_minhash

    components, pair_ids, exact_of = _planted_components(copies=2)
    params = DedupParams()
    similarity, near_of = _near_minhash(components, pair_ids, exact_of, params)
    ref_similarity, ref_near_of = _reference_near_minhash(components, pair_ids, exact_of, params)
    assert near_of == ref_near_of
    assert similarity.tolist() == ref_similarity  # same hashes, so the same estimates exactly
    planted = range(24, 24 + 8)
    assert all(near_of[i] is not None and similarity[i] >= params.near_threshold for i in planted)
    shared_prompt = range(32, 32 + 5)
    assert all(similarity[i] < params.near_threshold for i in shared_prompt)


def test_near_duplicates_are_found_across_signature_chunks(monkeypatch) -> None:
    import filters.dedup as dedup_module

    components, pair_ids, exact_of = _planted_components(copies=3)
    params = dedup_module.DedupParams()
    whole = dedup_module._near_minhash(components, pair_ids, exact_of, params)
    # chunks of 5 rows and permuted blocks of 64 shingles: every planted pair (source at i,
    # copy at 36 + i / 3) lies in different chunks, and rows straddle block boundaries
    monkeypatch.setattr(dedup_module, "_CHUNK_ROWS", 5)
    monkeypatch.setattr(dedup_module, "_CHUNK_SHINGLES", 64)
    chunked = dedup_module._near_minhash(components, pair_ids, exact_of, params)
    assert chunked[1] == whole[1] and chunked[0].tolist() == whole[0].tolist()
    copy_of_first = 36
    assert chunked[1][copy_of_first] == pair_ids[0] and chunked[0][copy_of_first] >= params.near_threshold
    assert chunked[1] == _reference_near_minhash(components, pair_ids, exact_of, params)[1]


def test_a_bucket_of_many_near_copies_makes_a_bounded_number_of_candidate_pairs(tmp_path) -> None:
    # 300 near copies of one pair share LSH buckets: comparing each with every earlier copy made
    # 300 * 299 / 2 pairs per band (22 GiB at 1M pairs of a real set); each is now compared with
    # the first `bucket_candidates` copies of each bucket, and finds the same duplicates.
    from filters import dedup as dedup_module

    source = _base()[0]
    copies = [_pair(source.prompt[0].content + f" Reader number {i}.", source.chosen, source.rejected)
              for i in range(300)]
    seen: list[int] = []
    original = dedup_module._candidates

    def counted(*args):  # noqa: ANN002, ANN202 - passes through
        found = original(*args)
        seen.append(found.height)
        return found

    dedup_module._candidates = counted
    try:
        drops = {k: _scores(copies, tmp_path / str(k), bucket_candidates=k)[2].action.to_pylist()
                 for k in (300, 32, 8)}
    finally:
        dedup_module._candidates = original
    every_earlier, default, few = seen
    bands, _ = dedup_module._bands(0.5, 128)
    assert every_earlier > 20_000 and few <= 300 * 8 * bands and few < every_earlier // 4
    assert drops[32] == drops[300] and drops[300].count("drop") > 290
    assert drops[8].count("drop") >= drops[300].count("drop") - 5
