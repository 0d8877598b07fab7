"""The dedup filter's scores and decision on planted exact, near and contaminated pairs."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.steps import StepContext
from factory.steps.runner import execute, prepare
from filters.dedup import NEAR_DUPLICATE_THRESHOLD, ngrams, normalise
from schemas.pairs import Message, Pair, pairs_to_table
from schemas.prompts import prompt_text

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


def _reference_scores(table: pa.Table, ctx: StepContext) -> pa.Table:
    """The dedup scores as the whole-table implementation (version 5) computes them: every
    part of every row as Python lists, exact keys as whole strings, MinHash by datasketch,
    kept to show the chunked one gives the same scores bit for bit."""
    import polars as pl

    from filters.dedup import _hash64, canonical
    from schemas.prompts import prompt_text

    params = ctx.params
    pair_ids = table.column("pair_id").to_pylist()
    components = [[prompt_text(p, roles=False) for p in table.column("prompt").to_pylist()]]
    if params.content == "pair":
        chosen = [canonical(t) for t in table.column("chosen").to_pylist()]
        rejected = [canonical(t) for t in table.column("rejected").to_pylist()]
        components += [[min(c, r) for c, r in zip(chosen, rejected, strict=True)],
                       [max(c, r) for c, r in zip(chosen, rejected, strict=True)]]
    keys = ["\x00".join(canonical(part[i]) for part in components) for i in range(len(pair_ids))]
    frame = pl.DataFrame({"text": keys, "pair_id": pair_ids}).with_row_index("row")
    first = frame.group_by("text", maintain_order=True).agg(pl.col("pair_id").first().alias("first_id"),
                                                            pl.col("row").first().alias("first_row"))
    exact_of = (frame.join(first, on="text", how="left").sort("row")
                .select(pl.when(pl.col("row") != pl.col("first_row")).then(pl.col("first_id")).otherwise(None))
                .to_series().to_list())
    n = len(pair_ids)
    similarity, near_of = [0.0] * n, [None] * n
    if params.near == "minhash":
        similarity, near_of = _reference_near_minhash(components, pair_ids, exact_of, params)
    elif params.near == "embedding":
        similarity, near_of = _reference_near_embedding(components, pair_ids, exact_of, ctx)
    owner: dict[int, str] = {}
    for source in params.against:
        against, label = ctx.read_pairs(source)
        for pid, prompt in zip(against.column("pair_id").to_pylist(), against.column("prompt").to_pylist(),
                               strict=True):
            for gram in ngrams(normalise(prompt_text(prompt, roles=False)).split(), params.ngram):
                owner.setdefault(_hash64(gram), f"{label}:{pid}")
    shares, by = [], []
    for prompt in components[0]:
        grams = ngrams(normalise(prompt).split(), params.ngram)
        hits = [owner[h] for h in map(_hash64, grams) if h in owner]
        shares.append(len(hits) / len(grams) if grams and hits else 0.0)
        by.append(Counter(hits).most_common(1)[0][0] if grams and hits else None)
    return pa.table({"exact_of": pa.array(exact_of, pa.string()),
                     "near_similarity": pa.array(similarity, pa.float64()),
                     "near_of": pa.array(near_of, pa.string()),
                     "contamination": pa.array(shares, pa.float64()),
                     "contaminated_by": pa.array(by, pa.string())})


def _reference_near_embedding(components, pair_ids, exact_of, ctx, rounded=True):
    from factory.embed import best_earlier_match, embed_texts

    n = len(pair_ids)
    similarity, near_of = [0.0] * n, [None] * n
    representatives = [i for i, first in enumerate(exact_of) if first is None]
    if len(representatives) < 2:
        return similarity, near_of
    parts = []
    for part in components:
        texts = [part[i] for i in representatives]
        start = embed_texts(texts, home=ctx.home, embedder=ctx.params.embedder)
        end = embed_texts(texts, home=ctx.home, keep="end", embedder=ctx.params.embedder)
        parts += [start] if np.array_equal(start, end) else [start, end]
    # version 5 compares the vectors as stored: rounded to float16
    best, sims = best_earlier_match([part.astype(np.float16) if rounded else part for part in parts])
    for row, (j, s) in enumerate(zip(best.tolist(), sims.tolist(), strict=True)):
        if j >= 0:
            i = representatives[row]
            similarity[i], near_of[i] = s, pair_ids[representatives[j]]
    return similarity, near_of


def _planted_pairs(copies: int) -> list[Pair]:
    """Distinct pairs with near duplicates (an answer extended), exact duplicates (some only
    after case and whitespace are folded, some with the answers' labels swapped) and pairs
    sharing only their prompt; each copy lies far from its source, in another chunk."""
    prompts, firsts, seconds = [], [], []
    for c in range(copies):
        for t in TOPICS:
            prompts.append(f"Round {c}: write a short explanation of {t} for a curious twelve year old reader.")
            firsts.append(f"Here is how {t} work in round {c}: a clear account with three concrete examples, "
                          f"a diagram described in words and a summary of {t} for revision.")
            seconds.append(f"{t} are a thing (round {c}).")
    n = len(prompts)
    pairs = [_pair(p, a, b) for p, a, b in zip(prompts, firsts, seconds, strict=True)]
    pairs += [_pair(prompts[i], firsts[i] + " Thanks!", seconds[i]) for i in range(0, n, 3)]
    pairs += [_pair(prompts[i], f"Something else entirely, number {i}, about gardening and soil.", "No.")
              for i in range(1, n, 5)]
    pairs += [_pair(prompts[i], firsts[i], seconds[i]) for i in range(2, n, 7)]
    pairs += [_pair(prompts[i].upper() + "  ", seconds[i], firsts[i].upper()) for i in range(4, n, 11)]
    return pairs


def _evaluation_set(tmp_path, pairs: list[Pair]) -> str:
    path = tmp_path / "eval.jsonl"
    rows = [{"prompt": pairs[7].prompt[0].content, "chosen": "x", "rejected": "y"},
            {"prompt": " ".join(pairs[20].prompt[0].content.split()[:9]) + " and then some", "chosen": "a",
             "rejected": "b"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("content", ["pair", "prompt"])
def test_chunked_dedup_scores_as_the_whole_table_implementation_did(tmp_path, monkeypatch, content) -> None:
    import filters.dedup as dedup_module

    pairs = _planted_pairs(copies=3)
    against = _evaluation_set(tmp_path, pairs)
    whole = None
    # chunks (and candidate blocks) of 5 and 7 rows and permuted blocks of 64 shingles: every
    # planted copy lies in another chunk than its source, and rows straddle block boundaries
    for rows, shingles in ((5, 64), (7, 1 << 15), (4096, 1 << 15)):
        monkeypatch.setattr(dedup_module, "_CHUNK_ROWS", rows)
        monkeypatch.setattr(dedup_module, "_PAIR_BLOCK_ROWS", rows)
        monkeypatch.setattr(dedup_module, "_CHUNK_SHINGLES", shingles)
        table, result, _ = _scores(pairs, tmp_path / f"{rows}", against=against, content=content)
        if whole is None:
            whole = _reference_scores(table, StepContext("dedup", prepare(
                "filter", "dedup", {"against": against, "content": content}).params, home=tmp_path))
        assert result.table.equals(whole), (rows, result.table.to_pylist(), whole.to_pylist())
    scores = whole.to_pylist()
    near, shared = range(36, 36 + 12), range(36 + 12, 36 + 12 + 7)
    assert all(s["exact_of"] is not None for s in scores[shared.stop:])  # exact copies, folded and swapped
    assert len(scores) - shared.stop == 5 + 3
    if content == "pair":
        assert all(scores[i]["near_of"] is not None and scores[i]["near_similarity"] >= NEAR_DUPLICATE_THRESHOLD
                   for i in near)
        assert all(scores[i]["near_similarity"] < NEAR_DUPLICATE_THRESHOLD for i in shared)
    else:
        assert all(scores[i]["exact_of"] is not None for i in [*near, *shared])
    assert scores[7]["contamination"] == 1.0 and 0 < scores[20]["contamination"] < 1


def test_chunked_embedding_dedup_scores_as_the_whole_table_implementation_did(tmp_path, monkeypatch) -> None:
    import factory.embed
    import filters.dedup as dedup_module

    monkeypatch.setattr(factory.embed, "embed_texts", _bag_of_words)
    pairs = _planted_pairs(copies=3)
    whole = None
    for rows in (5, 4096):
        monkeypatch.setattr(dedup_module, "_CHUNK_ROWS", rows)
        table, result, _ = _scores(pairs, tmp_path / f"{rows}", near="embedding")
        if whole is None:
            whole = _reference_scores(table, StepContext("dedup", prepare(
                "filter", "dedup", {"near": "embedding"}).params, home=tmp_path))
        assert result.table.equals(whole), (rows, result.table.to_pylist(), whole.to_pylist())
    assert sum(s["near_of"] is not None for s in whole.to_pylist()) >= 12


def _bag_of_words(texts, *, keep="start", **_):  # noqa: ANN001, ANN202 - a deterministic stand-in embedder
    import hashlib

    out = np.zeros((len(texts), 64), np.float32)
    for row, text in enumerate(texts):
        words = text.split()
        for word in (words[:12] if keep == "start" else words[-12:]):
            out[row, hashlib.blake2b(word.encode(), digest_size=1).digest()[0] % 64] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_embedding_dedup_decides_as_float32_vectors_did(tmp_path, monkeypatch) -> None:
    # version 5 compares float16 vectors: the similarities move by ~1e-3, the decisions do not
    import factory.embed
    from filters.dedup import DedupParams

    monkeypatch.setattr(factory.embed, "embed_texts", _bag_of_words)
    pairs = _planted_pairs(copies=3)
    table, result, decision = _scores(pairs, tmp_path, near="embedding")
    ctx = StepContext("dedup", DedupParams(near="embedding"), home=tmp_path)
    components = [[prompt_text(p, roles=False) for p in table.column("prompt").to_pylist()]]
    chosen, rejected = table.column("chosen").to_pylist(), table.column("rejected").to_pylist()
    from filters.dedup import canonical

    chosen, rejected = [canonical(t) for t in chosen], [canonical(t) for t in rejected]
    components += [[min(c, r) for c, r in zip(chosen, rejected, strict=True)],
                   [max(c, r) for c, r in zip(chosen, rejected, strict=True)]]
    exact_of = result.table["exact_of"].to_pylist()
    similarity, near_of = _reference_near_embedding(components, table["pair_id"].to_pylist(), exact_of, ctx,
                                                    rounded=False)
    assert result.table["near_of"].to_pylist() == near_of
    np.testing.assert_allclose(result.table["near_similarity"].to_numpy(), similarity, atol=2e-3)
    threshold = NEAR_DUPLICATE_THRESHOLD
    old = ["drop" if e is not None or (n is not None and s >= threshold) else "keep"
           for e, n, s in zip(exact_of, near_of, similarity, strict=True)]
    assert decision.action.to_pylist() == old
    assert old.count("drop") >= 12 + 8


def _map_folders(home) -> list:
    return sorted((home / "steps").glob("spill-dedup-*")) if (home / "steps").exists() else []


def test_the_float16_maps_are_on_disk_while_matching_and_removed_after(tmp_path, monkeypatch) -> None:
    import factory.embed
    import filters.dedup as dedup_module

    monkeypatch.setattr(factory.embed, "embed_texts", _bag_of_words)
    monkeypatch.setattr(dedup_module, "_EMBED_ROWS", 7)  # parts written 7 representatives at a time
    seen = []
    real = factory.embed.best_earlier_match

    def matching(parts, **kwargs):  # noqa: ANN001, ANN202
        seen.append(([p.dtype for p in parts], [type(p) for p in parts],
                     [sorted(f.name for f in folder.iterdir()) for folder in _map_folders(tmp_path)]))
        return real(parts, **kwargs)

    monkeypatch.setattr(factory.embed, "best_earlier_match", matching)
    _scores(_planted_pairs(copies=2), tmp_path, near="embedding")
    dtypes, kinds, folders = seen[0]
    assert set(dtypes) == {np.dtype(np.float16)} and all(k is np.memmap for k in kinds)
    assert len(folders) == 1 and folders[0] == sorted(f"part{k}-{end}.npy" for k in range(3) for end in ("end", "start"))
    assert len(dtypes) == 6  # every part has a text longer than the stand-in encoder reads
    assert _map_folders(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_the_float16_maps_are_removed_after_an_error_or_ctrl_c(tmp_path, monkeypatch, error) -> None:
    import factory.embed
    import filters.dedup as dedup_module

    monkeypatch.setattr(dedup_module, "_EMBED_ROWS", 7)
    calls = []

    def failing(texts, **kwargs):  # noqa: ANN001, ANN202 - fails once some vectors are on disk
        calls.append(len(texts))
        if len(calls) == 5:
            assert len(list(_map_folders(tmp_path)[0].glob("*.npy"))) == 2
            raise error("stop")
        return _bag_of_words(texts, **kwargs)

    monkeypatch.setattr(factory.embed, "embed_texts", failing)
    with pytest.raises(error):
        _scores(_planted_pairs(copies=2), tmp_path, near="embedding")
    assert len(calls) == 5 and _map_folders(tmp_path) == []


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
        seen[-1] += len(found[0])
        return found

    dedup_module._candidates = counted
    try:
        drops = {}
        for k in (300, 32, 8):
            seen.append(0)
            drops[k] = _scores(copies, tmp_path / str(k), bucket_candidates=k)[2].action.to_pylist()
    finally:
        dedup_module._candidates = original
    every_earlier, default, few = seen
    bands, _ = dedup_module._bands(0.5, 128)
    assert every_earlier > 20_000 and few <= 300 * 8 * bands and few < every_earlier // 4
    assert drops[32] == drops[300] and drops[300].count("drop") > 290
    assert drops[8].count("drop") >= drops[300].count("drop") - 5
