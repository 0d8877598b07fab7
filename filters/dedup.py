"""Duplicates and contamination: exact, near (MinHash or embedding neighbours), and n-gram
overlap with evaluation sets.

Scores (stored with the version, one row per input pair):

- ``exact_of``: pair id of the first earlier pair with the same normalised content;
- ``near_similarity`` / ``near_of``: the highest similarity to an earlier pair and that
  pair's id (0 and null with ``near=none``);
- ``contamination`` / ``contaminated_by``: the share of the prompt's word n-grams found in
  an evaluation set, and the evaluation pair (``ref:pair_id``) that shares the most.

The decision drops exact duplicates, near duplicates at or above ``near_threshold`` and
contaminated pairs at or above ``contamination_threshold``; the first occurrence is kept.

A pair is compared part by part: the prompt and, with ``content=pair``, both answers (in a
fixed order, so a swapped label is still the same comparison). Two pairs' similarity is the
*lowest* of their part similarities, so pairs that share a long prompt (multi-turn
conversations, RAG contexts, a generator's many pairs per seed) but answer differently are
not near duplicates. MinHash estimates each part's Jaccard similarity of word shingles;
``near=embedding`` takes each part's MiniLM cosine, at the part's start and at its end
(the encoder reads 256 tokens; a longer part is alike only when its first and its last
256 tokens both are). Exact duplicates are collapsed first:
near duplicates are searched among one representative per exact-content group, over every
earlier representative (embedding) or every LSH candidate (MinHash).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from factory.embed import Embedder
from factory.embed.ray_embed import EmbedRequest
from factory.steps import Decision, StepContext, StepResult, filter_step, param
from schemas.prompts import prompt_text

_WORD = re.compile(r"\w+", re.UNICODE)

# Default similarity at or above which a pair is a near duplicate; the audit counts near
# duplicates with the same number so the two never disagree.
NEAR_DUPLICATE_THRESHOLD = 0.85


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation dropped, whitespace collapsed (for n-gram matching)."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def canonical(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed; punctuation kept, since "." and "," are
    different answers (master keys differ by nothing else)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def tokens(text: str) -> list[str]:
    """Words, or for a text without any (".", ":", "") the text itself as one token."""
    words = normalise(text).split()
    return words or [canonical(text)]


def ngrams(words: list[str], n: int) -> list[str]:
    if len(words) < n:
        return [" ".join(words)] if words else []
    return [" ".join(words[i: i + n]) for i in range(len(words) - n + 1)]


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def decide_dedup(scores: pa.Table, params: DedupParams) -> Decision:
    frame = pl.from_arrow(scores)
    near = pl.col("near_of").is_not_null() & (pl.col("near_similarity") >= params.near_threshold)
    contaminated = pl.col("contamination") >= params.contamination_threshold
    decided = frame.select(
        pl.when(pl.col("exact_of").is_not_null() | near | contaminated)
        .then(pl.lit("drop")).otherwise(pl.lit("keep")).alias("action"),
        pl.when(pl.col("exact_of").is_not_null())
        .then(pl.format("exact duplicate of {}", pl.col("exact_of")))
        .when(near)
        .then(pl.format("near duplicate of {} (similarity {})", pl.col("near_of"),
                        pl.col("near_similarity").round(3)))
        .when(contaminated)
        .then(pl.format("contaminated: {} of prompt n-grams found in {}", pl.col("contamination").round(3),
                        pl.col("contaminated_by")))
        .otherwise(pl.lit(None, dtype=pl.String)).alias("reason"),
    )
    return Decision(decided["action"].to_arrow(), decided["reason"].to_arrow())


@dataclass(frozen=True)
class DedupParams:
    content: Literal["pair", "prompt"] = param(
        "pair", "what makes two rows duplicates: the whole pair (prompt and both answers) or the prompt alone")
    near: Literal["minhash", "embedding", "none"] = param(
        "minhash", "near-duplicate detector: MinHash over word shingles, MiniLM cosine of each part, or none")
    near_threshold: float = param(NEAR_DUPLICATE_THRESHOLD,
                                  "similarity at or above which a pair is a near duplicate (the lowest "
                                  "of its prompt's and answers' similarities to an earlier pair)",
                                  low=0.0, high=1.0, decision=True)
    embedder: Embedder = param("minilm", "near=embedding: who embeds the parts (minilm, minilm-onnx: the "
                                         "same vectors via ONNX Runtime; static: model2vec, far faster, "
                                         "cosines run higher: near_threshold ~0.94)")
    shingle: int = param(3, "words per MinHash shingle", low=1)
    num_perm: int = param(128, "MinHash permutations", low=16)
    candidate_threshold: float = param(0.5, "MinHash LSH band threshold for candidate pairs (scores below "
                                            "it read as 0)", low=0.05, high=1.0)
    bucket_candidates: int = param(32, "MinHash: each row is compared with at most this many earliest "
                                       "rows of each LSH bucket it shares (thousands of near copies of "
                                       "one text would otherwise make a quadratic number of pairs)", low=1)
    against: list[str] = param([], "evaluation sets to decontaminate against: catalog refs or files",
                               ref=True)
    ngram: int = param(8, "words per n-gram for contamination (shorter prompts compare whole)", low=1)
    contamination_threshold: float = param(0.5, "share of a prompt's n-grams found in an evaluation set "
                                                "at or above which the pair is dropped",
                                           low=0.0, high=1.0, decision=True)

    def __post_init__(self) -> None:
        if self.candidate_threshold > self.near_threshold and self.near == "minhash":
            raise ValueError(f"parameter 'candidate_threshold' ({self.candidate_threshold}) must not exceed "
                             f"'near_threshold' ({self.near_threshold})")


def _components(table: pa.Table, params: DedupParams) -> list[list[str]]:
    """The parts compared, prompts first: a pair is a duplicate of another when every part is,
    the prompt and both answers (taken in a fixed order, so a swapped label is still the same
    comparison)."""
    components = [[prompt_text(p, roles=False) for p in table.column("prompt").to_pylist()]]
    if params.content == "pair":
        chosen = [canonical(t) for t in table.column("chosen").to_pylist()]
        rejected = [canonical(t) for t in table.column("rejected").to_pylist()]
        components += [[min(c, r) for c, r in zip(chosen, rejected, strict=True)],
                       [max(c, r) for c, r in zip(chosen, rejected, strict=True)]]
    return components


def _exact_of(components: list[list[str]], pair_ids: list[str]) -> list[str | None]:
    keys = ["\x00".join(canonical(part[i]) for part in components) for i in range(len(pair_ids))]
    return _exact(keys, pair_ids)


def _representatives(exact_of: list[str | None]) -> list[int]:
    """One row per exact-content group (its first): near duplicates are searched among these."""
    return [i for i, first in enumerate(exact_of) if first is None]


def dedup_embeds(table: pa.Table, ctx: StepContext[DedupParams]) -> Iterator[EmbedRequest]:
    """What ``near=embedding`` embeds (for ``--engine ray``): each part of every representative,
    at its start and at its end."""
    # Ray actors encode with MiniLM on torch; another embedder's vectors are made on the driver.
    if ctx.params.near != "embedding" or ctx.params.embedder != "minilm":
        return
    components = _components(table, ctx.params)
    representatives = _representatives(_exact_of(components, table.column("pair_id").to_pylist()))
    if len(representatives) < 2:
        return
    for part in components:
        yield EmbedRequest([part[i] for i in representatives], keep=("start", "end"))


# version 3: embedding near duplicates compare each part (was one string cut at 256 tokens)
# and search every earlier exact-content representative (was a k=16 window)
# version 4: MinHash compares a row with the first `bucket_candidates` rows of each LSH bucket
# (was every earlier row of the bucket: quadratic in a bucket of near copies, 22 GiB at 1M pairs)
@filter_step("dedup", params=DedupParams, decide=decide_dedup, version="4", embeds=dedup_embeds)
def dedup(table: pa.Table, ctx: StepContext[DedupParams]) -> StepResult:
    """Exact and near duplicates, and contamination with evaluation sets (n-gram overlap)."""
    params = ctx.params
    pair_ids = table.column("pair_id").to_pylist()
    components = _components(table, params)
    prompts = components[0]
    exact_of = _exact_of(components, pair_ids)
    if params.near == "minhash":
        near_similarity, near_of = _near_minhash(components, pair_ids, exact_of, params)
    elif params.near == "embedding":
        near_similarity, near_of = _near_embedding(components, pair_ids, exact_of, ctx)
    else:
        near_similarity, near_of = np.zeros(len(pair_ids)), [None] * len(pair_ids)
    contamination, contaminated_by, matched = _contamination(prompts, params, ctx)

    scores = pa.table({
        "exact_of": pa.array(exact_of, pa.string()),
        "near_similarity": pa.array(near_similarity, pa.float64()),
        "near_of": pa.array(near_of, pa.string()),
        "contamination": pa.array(contamination, pa.float64()),
        "contaminated_by": pa.array(contaminated_by, pa.string()),
    })
    stats = {"exact_duplicates": sum(x is not None for x in exact_of),
             "against": {label: rows for label, rows in matched.items()}}
    return StepResult(scores, None, stats)


def _exact(normalised: list[str], pair_ids: list[str]) -> list[str | None]:
    frame = pl.DataFrame({"text": normalised, "pair_id": pair_ids}).with_row_index("row")
    first = frame.group_by("text", maintain_order=True).agg(pl.col("pair_id").first().alias("first_id"),
                                                            pl.col("row").first().alias("first_row"))
    joined = frame.join(first, on="text", how="left").sort("row")
    return joined.select(
        pl.when(pl.col("row") != pl.col("first_row")).then(pl.col("first_id")).otherwise(None)
    ).to_series().to_list()


def _shingles(text: str, size: int) -> set[bytes]:
    return {s.encode("utf-8") for s in ngrams(tokens(text), size)} or {b""}


# Rows whose shingles are hashed at once, and shingle hashes permuted at once: a permuted
# block is (shingles x num_perm) uint32, 32k x 128 x 4 B = 16 MiB, so memory stays bounded by
# the signature matrices whatever the table's size.
_CHUNK_ROWS = 2048
_CHUNK_SHINGLES = 1 << 15


def _sha1_32(shingles: Iterable[bytes]) -> np.ndarray:
    """datasketch's default shingle hash (the first 4 bytes of SHA-1, little-endian)."""
    digests = b"".join(hashlib.sha1(s).digest()[:4] for s in shingles)
    return np.frombuffer(digests, dtype="<u4").astype(np.uint32)


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser (uint32 arithmetic wraps, as intended)."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The affine permutations of datasketch's MinHash(num_perm, seed) (scheme "affine32",
    its default), so signatures equal the ones datasketch computes, bit for bit."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def _signatures(hashes: list[np.ndarray], perm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """One MinHash signature row (uint32) per row's shingle hashes, permuted in blocks of
    about ``_CHUNK_SHINGLES`` hashes."""
    a, b = perm
    lengths = np.fromiter((len(h) for h in hashes), dtype=np.int64, count=len(hashes))
    flat = _fmix32(np.concatenate(hashes))
    ends = np.cumsum(lengths)
    out = np.empty((len(hashes), len(a)), dtype=np.uint32)
    block = (ends - 1) // _CHUNK_SHINGLES  # rows of a block are consecutive
    cuts = np.flatnonzero(np.diff(block)) + 1
    for rows in np.split(np.arange(len(hashes)), cuts):
        first = int(ends[rows[0]] - lengths[rows[0]])
        permuted = np.multiply(flat[first:int(ends[rows[-1]]), None], a)
        permuted += b  # in place: one block-sized array at a time
        out[rows] = np.minimum.reduceat(permuted, ends[rows] - lengths[rows] - first, axis=0)
    return out


def _combined_signatures(components: list[list[str]], params: DedupParams) -> np.ndarray:
    """Every row's signature of all its parts' shingles together (each tagged with its part),
    built ``_CHUNK_ROWS`` rows at a time: no row's shingles outlive its chunk."""
    n = len(components[0])
    perm = _permutations(params.num_perm, 1)
    out = np.empty((n, params.num_perm), np.uint32)
    for start in range(0, n, _CHUNK_ROWS):
        rows = range(start, min(start + _CHUNK_ROWS, n))
        tagged: list[list[np.ndarray]] = [[] for _ in rows]
        for k, part in enumerate(components):
            tag = b"%d\x00" % k  # the same shingle in two parts is two different shingles
            for hashes, i in zip(tagged, rows, strict=True):
                hashes.append(_sha1_32(tag + s for s in _shingles(part[i], params.shingle)))
        out[start:rows.stop] = _signatures([np.concatenate(h) for h in tagged], perm)
    return out


def _part_signatures(components: list[list[str]], rows: np.ndarray, params: DedupParams) -> list[np.ndarray]:
    """Per part, the signatures of the given rows only (those in a candidate pair), in chunks."""
    perm = _permutations(params.num_perm, 2)
    out = [np.empty((len(rows), params.num_perm), np.uint32) for _ in components]
    for start in range(0, len(rows), _CHUNK_ROWS):
        chunk = rows[start:start + _CHUNK_ROWS].tolist()
        for k, part in enumerate(components):
            hashes = [_sha1_32(_shingles(part[i], params.shingle)) for i in chunk]
            out[k][start:start + len(chunk)] = _signatures(hashes, perm)
    return out


@lru_cache(maxsize=16)
def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's LSH (bands, rows per band) for the threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def _candidates(combined: np.ndarray, rows: np.ndarray, bands: tuple[int, int],
                per_bucket: int) -> pl.DataFrame:
    """Pairs (row, earlier) of the given rows (ascending) whose signatures agree on a whole
    LSH band, ``earlier`` among the first ``per_bucket`` rows of that band's bucket.

    Memory: at most rows x per_bucket pairs per band, and their union over the bands (kept
    unique as it grows); a bucket of m near copies makes m x per_bucket pairs, not m^2 / 2."""
    b, r = bands
    found = pl.DataFrame(schema={"row": pl.Int64, "row_earlier": pl.Int64})
    for band in range(b):
        keys = np.ascontiguousarray(combined[rows, band * r:(band + 1) * r])
        _, bucket = np.unique(keys.view(np.dtype((np.void, 4 * r))).ravel(), return_inverse=True)
        frame = (pl.DataFrame({"bucket": bucket.ravel(), "row": rows.astype(np.int64)})
                 .filter(pl.len().over("bucket") > 1)
                 .with_columns(pl.int_range(pl.len()).over("bucket").alias("rank")))
        firsts = frame.filter(pl.col("rank") < per_bucket).select("bucket", pl.col("row").alias("row_earlier"))
        pairs = (frame.join(firsts, on="bucket").filter(pl.col("row_earlier") < pl.col("row"))
                 .select("row", "row_earlier"))
        found = pl.concat([found, pairs]).unique()
    return found


def _near_minhash(components: list[list[str]], pair_ids: list[str], exact_of: list[str | None],
                  params: DedupParams) -> tuple[np.ndarray, list[str | None]]:
    """Candidates from LSH over all parts' shingles; the score is the lowest per-part Jaccard
    estimate, so two pairs that share a prompt and an answer but differ in the other
    answer are not duplicates. Each row is compared with the earlier exact-content
    representatives it shares a band with (the first ``bucket_candidates`` of each bucket);
    ties go to the earliest.

    Memory: the combined signatures, rows x num_perm x 4 bytes (0.5 GiB at 1M pairs and
    128 permutations), the band buckets, the candidate pairs (at most rows x
    ``bucket_candidates`` per band) and the per-part signatures of
    the rows in a candidate pair only; no shingle outlives its chunk. Same hashes as
    datasketch's MinHash and the same LSH bands, so the same candidates and estimates as
    indexing datasketch objects one by one."""
    n = len(pair_ids)
    representatives = np.array([i for i in range(n) if exact_of[i] is None], dtype=np.int64)
    pairs = _candidates(_combined_signatures(components, params), representatives,
                        _bands(params.candidate_threshold, params.num_perm), params.bucket_candidates)
    row, earlier = pairs["row"].to_numpy(), pairs["row_earlier"].to_numpy()
    involved = np.unique(np.concatenate([row, earlier]))
    parts = _part_signatures(components, involved, params)
    at_row, at_earlier = np.searchsorted(involved, row), np.searchsorted(involved, earlier)
    agree = np.full(len(row), params.num_perm, dtype=np.int64)
    for start in range(0, len(row), _CHUNK_SHINGLES):  # candidate pairs compared a block at a time
        block = slice(start, start + _CHUNK_SHINGLES)
        for part in parts:
            same = np.count_nonzero(part[at_row[block]] == part[at_earlier[block]], axis=1)
            agree[block] = np.minimum(agree[block], same)
    best = (pl.DataFrame({"row": row, "earlier": earlier, "agree": agree})
            .filter(pl.col("agree") > 0)
            .sort(["row", "agree", "earlier"], descending=[False, True, False])
            .unique("row", keep="first"))
    similarity = np.zeros(n)
    near_of: list[str | None] = [None] * n
    for i, j, count in best.iter_rows():
        similarity[i], near_of[i] = float(count) / float(params.num_perm), pair_ids[j]
    return similarity, near_of


def _near_embedding(components: list[list[str]], pair_ids: list[str], exact_of: list[str | None],
                    ctx: StepContext[DedupParams]) -> tuple[np.ndarray, list[str | None]]:
    """Each part embedded on its own; among the exact-content representatives (rows that
    are not exact duplicates), every row's most similar earlier one by the lowest part cosine."""
    from factory.embed import best_earlier_match, embed_texts

    n = len(pair_ids)
    similarity = np.zeros(n)
    near_of: list[str | None] = [None] * n
    representatives = _representatives(exact_of)
    if len(representatives) < 2:
        return similarity, near_of
    # Each part at its start and at its end: the encoder reads 256 tokens, and two long
    # conversations that open alike but go on differently must not compare equal.
    parts = []
    for part in components:
        texts = [part[i] for i in representatives]
        start = embed_texts(texts, home=ctx.home, progress=ctx.progress, embedder=ctx.params.embedder)
        end = embed_texts(texts, home=ctx.home, progress=ctx.progress, keep="end",
                          embedder=ctx.params.embedder)
        parts += [start] if np.array_equal(start, end) else [start, end]  # no text was cut
    best, sims = best_earlier_match(parts)
    for row, (j, s) in enumerate(zip(best.tolist(), sims.tolist(), strict=True)):
        if j >= 0:
            i = representatives[row]
            similarity[i], near_of[i] = s, pair_ids[representatives[j]]
    return similarity, near_of


def _contamination(prompts: list[str], params: DedupParams,
                   ctx: StepContext[DedupParams]) -> tuple[list[float], list[str | None], dict[str, int]]:
    n = len(prompts)
    if not params.against:
        return [0.0] * n, [None] * n, {}
    owner: dict[int, str] = {}  # n-gram hash -> the first evaluation pair that has it
    matched: dict[str, int] = {}
    for source in params.against:
        table, label = ctx.read_pairs(source)
        matched[label] = 0
        for pid, prompt in zip(table.column("pair_id").to_pylist(), table.column("prompt").to_pylist(),
                               strict=True):
            for gram in ngrams(normalise(prompt_text(prompt, roles=False)).split(), params.ngram):
                owner.setdefault(_hash64(gram), f"{label}:{pid}")
    shares, by = [], []
    for prompt in prompts:
        grams = ngrams(normalise(prompt).split(), params.ngram)
        hits = [owner[h] for h in map(_hash64, grams) if h in owner]
        if not grams or not hits:
            shares.append(0.0)
            by.append(None)
            continue
        shares.append(len(hits) / len(grams))
        top = Counter(hits).most_common(1)[0][0]
        by.append(top)
        matched[top.rsplit(":", 1)[0]] += 1
    return shares, by, matched
