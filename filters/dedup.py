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
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
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


# Rows read from the table, shingled and hashed at once (a chunk's texts, shingles and
# hashes are the only per-text Python objects alive), and shingle hashes permuted at once: a
# permuted block is (shingles x num_perm) uint32, 32k x 128 x 4 B = 16 MiB.
_CHUNK_ROWS = 2048
_CHUNK_SHINGLES = 1 << 15


def _chunks(table: pa.Table, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """``_CHUNK_ROWS`` rows of the table at a time (only the given ascending ``rows`` if
    any), with their positions: no column is ever read whole into Python objects."""
    for start in range(0, table.num_rows, _CHUNK_ROWS):
        chunk = table.slice(start, _CHUNK_ROWS)
        positions = np.arange(start, start + chunk.num_rows, dtype=np.int64)
        if rows is not None:
            positions = rows[np.searchsorted(rows, start):np.searchsorted(rows, start + chunk.num_rows)]
            if not len(positions):
                continue
            chunk = chunk.take(pa.array(positions - start))
        yield positions, chunk


def _prompts(chunk: pa.Table) -> list[str]:
    return [prompt_text(p, roles=False) for p in chunk.column("prompt").to_pylist()]


def _answers(chunk: pa.Table) -> tuple[list[str], list[str]]:
    """Both answers canonicalised, the lower first: a fixed order, so a swapped label is
    still the same comparison."""
    chosen = [canonical(t) for t in chunk.column("chosen").to_pylist()]
    rejected = [canonical(t) for t in chunk.column("rejected").to_pylist()]
    return ([min(c, r) for c, r in zip(chosen, rejected, strict=True)],
            [max(c, r) for c, r in zip(chosen, rejected, strict=True)])


def _part_count(content: str) -> int:
    return 3 if content == "pair" else 1


def _parts(chunk: pa.Table, content: str) -> list[list[str]]:
    """The parts compared, prompts first: a pair is a duplicate of another when every part
    is, the prompt and (``content=pair``) both answers."""
    return [_prompts(chunk), *_answers(chunk)] if content == "pair" else [_prompts(chunk)]


def _part(chunk: pa.Table, k: int) -> list[str]:
    return _prompts(chunk) if k == 0 else _answers(chunk)[k - 1]


def _content_digests(parts: list[list[str]]) -> np.ndarray:
    """(rows, 2) uint64: each row's exact-content key (its canonical parts joined by NUL)
    as a 16-byte BLAKE2b digest, so grouping never holds the keys themselves."""
    keys = ("\x00".join(canonical(part[i]) for part in parts) for i in range(len(parts[0])))
    digests = b"".join(hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest() for key in keys)
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 2)


@dataclass
class _Scan:
    """What one chunked pass over the table keeps of each row."""

    digests: np.ndarray  # (n, 2) uint64, see _content_digests
    signatures: np.ndarray | None  # (n, num_perm) uint32 combined MinHash, near=minhash only
    contamination: np.ndarray  # (n,) float64
    contaminated_by: pa.Array  # (n,) string


def _scan(table: pa.Table, params: DedupParams, *, signatures: bool,
          owner: dict[int, str] | None = None, matched: dict[str, int] | None = None) -> _Scan:
    """One pass over the table, ``_CHUNK_ROWS`` rows at a time: content digests, combined
    MinHash signatures (``signatures``) and contamination against ``owner`` (n-gram hash ->
    evaluation pair; ``matched`` counts the rows each evaluation set contaminates)."""
    n = table.num_rows
    scan = _Scan(np.empty((n, 2), np.uint64),
                 np.empty((n, params.num_perm), np.uint32) if signatures else None,
                 np.zeros(n), pa.nulls(n, pa.string()))
    perm = _permutations(params.num_perm, 1)
    contaminated_by = []
    for positions, chunk in _chunks(table):
        rows = slice(int(positions[0]), int(positions[-1]) + 1)
        parts = _parts(chunk, params.content)
        scan.digests[rows] = _content_digests(parts)
        if scan.signatures is not None:
            scan.signatures[rows] = _combined_signatures(parts, params.shingle, perm)
        if owner:
            shares, by = _contamination(parts[0], owner, matched, params.ngram)
            scan.contamination[rows] = shares
            contaminated_by.append(pa.array(by, pa.string()))
    if contaminated_by:
        scan.contaminated_by = pa.concat_arrays(contaminated_by)
    return scan


def _first_rows(digests: np.ndarray) -> np.ndarray:
    """Each row's first row with the same content (itself for the first of its group)."""
    frame = pl.DataFrame({"high": digests[:, 0], "low": digests[:, 1]}).with_row_index("row")
    return frame.select(pl.col("row").min().over("high", "low")).to_series().to_numpy().astype(np.int64)


def _ids_at(pair_ids: pa.ChunkedArray | pa.Array, rows: np.ndarray) -> pa.Array:
    """The pair id at each row position, null where the position is -1."""
    picked = pair_ids.take(pa.array(rows, mask=rows < 0))
    if isinstance(picked, pa.ChunkedArray):
        picked = picked.combine_chunks()
    return picked.cast(pa.string())


def _representatives(table: pa.Table, params: DedupParams) -> np.ndarray:
    """One row per exact-content group (its first): near duplicates are searched among these."""
    first = _first_rows(_scan(table, params, signatures=False).digests)
    return np.flatnonzero(first == np.arange(len(first)))


def _part_texts(table: pa.Table, rows: np.ndarray, k: int) -> list[str]:
    """Part ``k`` (0 the prompt, 1 and 2 the answers) of the given ascending rows."""
    return [text for _, chunk in _chunks(table, rows) for text in _part(chunk, k)]


def dedup_embeds(table: pa.Table, ctx: StepContext[DedupParams]) -> Iterator[EmbedRequest]:
    """What ``near=embedding`` embeds (for ``--engine ray``): each part of every representative,
    at its start and at its end, ``_EMBED_ROWS`` representatives' texts of one part at a time,
    as :func:`_embedded_parts` asks for them (the vectors reach it through the cache)."""
    # Ray actors encode with MiniLM on torch; another embedder's vectors are made on the driver.
    if ctx.params.near != "embedding" or ctx.params.embedder != "minilm":
        return
    representatives = _representatives(table, ctx.params)
    if len(representatives) < 2:
        return
    for k in range(_part_count(ctx.params.content)):
        for first in range(0, len(representatives), _EMBED_ROWS):
            yield EmbedRequest(_part_texts(table, representatives[first:first + _EMBED_ROWS], k),
                               keep=("start", "end"))


# version 3: embedding near duplicates compare each part (was one string cut at 256 tokens)
# and search every earlier exact-content representative (was a k=16 window)
# version 4: MinHash compares a row with the first `bucket_candidates` rows of each LSH bucket
# (was every earlier row of the bucket: quadratic in a bucket of near copies, 22 GiB at 1M pairs)
# version 5: near=embedding compares the vectors rounded to float16 (memory-mapped, for bounded
# memory at 1M pairs): similarities differ from version 4's float32 ones by ~1e-3, so a result
# stored by version 4 must not be reused
@filter_step("dedup", params=DedupParams, decide=decide_dedup, version="5", embeds=dedup_embeds)
def dedup(table: pa.Table, ctx: StepContext[DedupParams]) -> StepResult:
    """Exact and near duplicates, and contamination with evaluation sets (n-gram overlap).

    Memory: the table is read ``_CHUNK_ROWS`` rows at a time (its pages are the runner's
    memory map, which the kernel can drop); what is kept of every row is a 16-byte content
    digest, the scores, and with ``near=minhash`` the combined signatures (num_perm x 4
    bytes: 0.5 GiB at 1M pairs and 128 permutations), then the band buckets and the
    per-part signatures of the rows that share a bucket (see :func:`_near_minhash`).
    ``near=embedding`` holds ``_EMBED_ROWS`` representatives' texts of one part and their
    float32 vectors at a time, every vector as float16 in a memory map on disk, and while
    matching 8 x 33 x P bytes of candidates a representative (P compared parts, 3 to 6)
    plus one part's float32 index (4 x 384 bytes a representative): ~3 GiB at 1M
    representatives and 3 parts, whatever P (see :func:`_near_embedding`); contamination
    holds the evaluation sets' n-gram hashes. Measured at 1M pairs (~2 kB each, ``benchmarks/scale.py``), near=minhash: peak
    RSS 2,808 MiB, 1.6 GiB anonymous (per-part signatures of ~1M rows, band buckets) and
    1.2 GiB file-backed (the mapped table, libraries); was 13,042 MiB."""
    params = ctx.params
    owner, matched = _evaluation_ngrams(params, ctx)
    scan = _scan(table, params, signatures=params.near == "minhash", owner=owner, matched=matched)
    first = _first_rows(scan.digests)
    rows = np.arange(table.num_rows, dtype=np.int64)
    representatives = np.flatnonzero(first == rows)
    if params.near == "minhash":
        near_similarity, near_row = _near_minhash(table, scan, representatives, params)
    elif params.near == "embedding":
        near_similarity, near_row = _near_embedding(table, representatives, ctx)
    else:
        near_similarity, near_row = np.zeros(table.num_rows), np.full(table.num_rows, -1)
    pair_ids = table.column("pair_id")
    scores = pa.table({
        "exact_of": _ids_at(pair_ids, np.where(first == rows, -1, first)),
        "near_similarity": pa.array(near_similarity, pa.float64()),
        "near_of": _ids_at(pair_ids, near_row),
        "contamination": pa.array(scan.contamination, pa.float64()),
        "contaminated_by": scan.contaminated_by,
    })
    stats = {"exact_duplicates": table.num_rows - len(representatives), "against": matched}
    return StepResult(scores, None, stats)


def _shingles(text: str, size: int) -> set[bytes]:
    return {s.encode("utf-8") for s in ngrams(tokens(text), size)} or {b""}


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


def _combined_signatures(parts: list[list[str]], shingle: int, perm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Each row's signature of all its parts' shingles together (each tagged with its part)."""
    tagged: list[list[np.ndarray]] = [[] for _ in parts[0]]
    for k, part in enumerate(parts):
        tag = b"%d\x00" % k  # the same shingle in two parts is two different shingles
        for hashes, text in zip(tagged, part, strict=True):
            hashes.append(_sha1_32(tag + s for s in _shingles(text, shingle)))
    return _signatures([np.concatenate(h) for h in tagged], perm)


@lru_cache(maxsize=16)
def _bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """datasketch's LSH (bands, rows per band) for the threshold."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


# Rows whose candidate pairs are formed, compared and reduced to each row's best at once: at
# most rows x bucket_candidates x bands pairs (4k x 32 x 25 = 3.3M, ~100 MiB with their
# signature comparisons).
_PAIR_BLOCK_ROWS = 4096


@dataclass
class _Band:
    """One LSH band's buckets of the rows searched (by position in those rows): the bucket of
    each (-1 when no other row shares it), and per bucket its first ``bucket_candidates``
    positions, ascending: ``firsts[offsets[b]:offsets[b + 1]]``."""

    bucket: np.ndarray  # (rows,) int32
    offsets: np.ndarray  # (shared buckets + 1,) int64
    firsts: np.ndarray  # int32


def _bands_of(combined: np.ndarray, rows: np.ndarray, bands: tuple[int, int], per_bucket: int) -> list[_Band]:
    """The LSH buckets of the given rows (ascending) in every band: rows whose signatures
    agree on a whole band share its bucket. Memory: ~12 bytes a row per band."""
    b, r = bands
    out = []
    for band in range(b):
        keys = np.ascontiguousarray(combined[rows, band * r:(band + 1) * r])
        _, bucket, sizes = np.unique(keys.view(np.dtype((np.void, 4 * r))).ravel(), return_inverse=True,
                                     return_counts=True)
        del keys
        shared = sizes > 1
        bucket = np.where(shared, np.cumsum(shared) - 1, -1)[bucket.ravel()].astype(np.int32)
        sizes = sizes[shared]
        order = np.argsort(bucket, kind="stable")[len(rows) - int(sizes.sum()):]  # -1 sorts first
        rank = np.arange(len(order)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        kept = np.minimum(sizes, per_bucket)
        out.append(_Band(bucket, np.concatenate([[0], np.cumsum(kept)]).astype(np.int64),
                         order[rank < per_bucket].astype(np.int32)))
    return out


def _candidates(bands: list[_Band], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidate pairs (position, earlier position) of the positions in [start, stop),
    unique and sorted: ``earlier`` shares a band's bucket with ``position`` and is among the
    first ``bucket_candidates`` of that bucket. A bucket of m near copies makes m x
    bucket_candidates pairs, not m^2 / 2."""
    found = []
    for band in bands:
        bucket = band.bucket[start:stop]
        at = np.flatnonzero(bucket >= 0)
        lo, hi = band.offsets[bucket[at]], band.offsets[bucket[at] + 1]
        counts = hi - lo
        position = np.repeat(at + start, counts)
        earlier = band.firsts[np.arange(int(counts.sum())) + np.repeat(lo - (np.cumsum(counts) - counts), counts)]
        keep = earlier < position
        found.append(position[keep].astype(np.int64) << 32 | earlier[keep].astype(np.int64))
    pairs = np.unique(np.concatenate(found))
    return pairs >> 32, pairs & 0xFFFFFFFF


def _part_signatures(table: pa.Table, rows: np.ndarray, params: DedupParams) -> list[np.ndarray]:
    """Per part, the signatures of the given ascending rows, by a chunked pass over them."""
    perm = _permutations(params.num_perm, 2)
    out = [np.empty((len(rows), params.num_perm), np.uint32) for _ in range(_part_count(params.content))]
    for positions, chunk in _chunks(table, rows):
        first = int(np.searchsorted(rows, positions[0]))
        for signatures, part in zip(out, _parts(chunk, params.content), strict=True):
            signatures[first:first + len(positions)] = _signatures([_sha1_32(_shingles(text, params.shingle)) for text in part], perm)
    return out


def _near_minhash(table: pa.Table, scan: _Scan, representatives: np.ndarray,
                  params: DedupParams) -> tuple[np.ndarray, np.ndarray]:
    """Candidates from LSH over all parts' shingles; the score is the lowest per-part Jaccard
    estimate, so two pairs that share a prompt and an answer but differ in the other
    answer are not duplicates. Each row is compared with the earlier exact-content
    representatives it shares a band with (the first ``bucket_candidates`` of each bucket);
    ties go to the earliest. Returns each row's similarity and its match's row (-1: none).

    Memory: the combined signatures (taken from ``scan``, freed once the band buckets are
    found), the band buckets (~12 bytes a row per band), the per-part signatures of the
    rows that share a bucket (parts x num_perm x 4 bytes a row: 1.5 GiB at 1M such rows),
    and one block of ``_PAIR_BLOCK_ROWS`` rows' candidate pairs; no shingle outlives its
    chunk. Same hashes as datasketch's MinHash and the same LSH bands, so the same
    candidates and estimates as indexing datasketch objects one by one."""
    n = table.num_rows
    similarity, near_row = np.zeros(n), np.full(n, -1, dtype=np.int64)
    combined, scan.signatures = scan.signatures, None
    bands = _bands_of(combined, representatives, _bands(params.candidate_threshold, params.num_perm),
                      params.bucket_candidates)
    del combined
    involved = np.zeros(len(representatives), dtype=bool)
    for band in bands:
        involved |= band.bucket >= 0
    involved = np.flatnonzero(involved)
    if not len(involved):
        return similarity, near_row
    parts = _part_signatures(table, representatives[involved], params)
    slot = np.full(len(representatives), -1, dtype=np.int64)
    slot[involved] = np.arange(len(involved))
    for start in range(0, len(representatives), _PAIR_BLOCK_ROWS):
        position, earlier = _candidates(bands, start, start + _PAIR_BLOCK_ROWS)
        if not len(position):
            continue
        agree = np.full(len(position), params.num_perm, dtype=np.int64)
        for first in range(0, len(position), _CHUNK_SHINGLES):  # pairs compared a block at a time
            block = slice(first, first + _CHUNK_SHINGLES)
            at_row, at_earlier = slot[position[block]], slot[earlier[block]]
            for signatures in parts:
                same = np.count_nonzero(signatures[at_row] == signatures[at_earlier], axis=1)
                agree[block] = np.minimum(agree[block], same)
        best = (pl.DataFrame({"row": position, "earlier": earlier, "agree": agree})
                .filter(pl.col("agree") > 0)
                .sort(["row", "agree", "earlier"], descending=[False, True, False])
                .unique("row", keep="first"))
        rows = representatives[best["row"].to_numpy()]
        similarity[rows] = best["agree"].to_numpy() / float(params.num_perm)
        near_row[rows] = representatives[best["earlier"].to_numpy()]
    return similarity, near_row


# Representatives whose part texts are read and embedded at once: their texts and float32
# vectors (65,536 x 384 x 4 B = 96 MiB, twice with the ends) are all that is held of them
# before they go, as float16, to the part's memory map.
_EMBED_ROWS = 65_536


def _map_folder(home: Path | None) -> tempfile.TemporaryDirectory:
    """A fresh folder for the memory-mapped vectors, under ``home``'s ``steps`` folder (where
    ``catalog gc`` finds what a killed run left, as it does the generators' spills) or,
    without a home, the system's temporary folder."""
    folder = None if home is None else Path(home) / "steps"
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix="spill-dedup-", dir=folder)


def _embedded_parts(table: pa.Table, representatives: np.ndarray, ctx: StepContext[DedupParams],
                    folder: Path) -> list[np.ndarray]:
    """Each part of the representatives embedded at its start and at its end, as read-only
    float16 memory maps in ``folder`` (the end only where some text of the part is cut by
    the encoder), ``_EMBED_ROWS`` representatives at a time."""
    from factory.embed import embed_texts

    parts = []
    for k in range(_part_count(ctx.params.content)):
        paths = (folder / f"part{k}-start.npy", folder / f"part{k}-end.npy")
        maps: list[np.ndarray] = []
        cut = False
        for first in range(0, len(representatives), _EMBED_ROWS):
            texts = _part_texts(table, representatives[first:first + _EMBED_ROWS], k)
            start = embed_texts(texts, home=ctx.home, progress=ctx.progress, embedder=ctx.params.embedder)
            end = embed_texts(texts, home=ctx.home, progress=ctx.progress, keep="end",
                              embedder=ctx.params.embedder)
            del texts
            if not maps:
                maps = [np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                  shape=(len(representatives), start.shape[1]))
                        for path in paths]
            cut = cut or not np.array_equal(start, end)
            maps[0][first:first + len(start)] = start
            maps[1][first:first + len(end)] = end
            del start, end
        while maps:  # flushed and unmapped; read back below
            maps.pop().flush()
        parts += [np.load(path, mmap_mode="r") for path in (paths if cut else paths[:1])]  # no text was cut
    return parts


def _near_embedding(table: pa.Table, representatives: np.ndarray,
                    ctx: StepContext[DedupParams]) -> tuple[np.ndarray, np.ndarray]:
    """Each part embedded on its own; among the exact-content representatives (rows that
    are not exact duplicates), every row's most similar earlier one by the lowest part cosine.
    Returns each row's similarity and its match's row (-1: none).

    The vectors are stored as float16 in memory maps (a temporary ``spill-dedup-*`` folder
    under the home's ``steps`` folder, removed when the step ends, also on an error or
    Ctrl+C), whatever the number of rows, so the similarities are those of the rounded
    vectors (within ~1e-3 of float32's) for small and large sets alike.

    Memory, m representatives of P compared parts (P = 3 to 6: prompt and answers, each
    twice when the encoder cuts some of its texts), dimension d (384 for minilm): while
    embedding, ``_EMBED_ROWS`` rows' texts and float32 vectors (~200 MiB); while matching
    (see :func:`factory.embed.index.approximate_best_earlier`), 8 x 33 x P bytes a row of
    candidates (0.8 GiB at 1M rows and 3 parts) and one part's index, a float32 copy of
    that part (4 d bytes a row: 1.5 GiB at 1M rows), plus the mapped pages of the part
    being read (2 d bytes a row, file-backed: the kernel can drop them); never all parts'
    vectors in memory. Below ``EXACT_BELOW`` (20,000) rows the exact comparison holds
    float32 copies of all parts (at most 20,000 x 4 d x P bytes, 184 MiB)."""
    from factory.embed import best_earlier_match

    n = table.num_rows
    similarity, near_row = np.zeros(n), np.full(n, -1, dtype=np.int64)
    if len(representatives) < 2:
        return similarity, near_row
    # Each part at its start and at its end: the encoder reads 256 tokens, and two long
    # conversations that open alike but go on differently must not compare equal.
    folder = _map_folder(ctx.home)
    parts: list[np.ndarray] = []
    try:
        parts = _embedded_parts(table, representatives, ctx, Path(folder.name))
        best, sims = best_earlier_match(parts)
    finally:
        del parts  # unmap before the files go
        folder.cleanup()
    found = np.flatnonzero(best >= 0)
    similarity[representatives[found]] = sims[found]
    near_row[representatives[found]] = representatives[best[found]]
    return similarity, near_row


def _evaluation_ngrams(params: DedupParams,
                       ctx: StepContext[DedupParams]) -> tuple[dict[int, str], dict[str, int]]:
    """Every evaluation set's prompt n-gram hashes, each with the first evaluation pair that
    has it (``label:pair_id``), and a zero count of contaminated rows per set."""
    owner: dict[int, str] = {}
    matched: dict[str, int] = {}
    for source in params.against:
        table, label = ctx.read_pairs(source)
        matched[label] = 0
        for pid, prompt in zip(table.column("pair_id").to_pylist(), table.column("prompt").to_pylist(),
                               strict=True):
            for gram in ngrams(normalise(prompt_text(prompt, roles=False)).split(), params.ngram):
                owner.setdefault(_hash64(gram), f"{label}:{pid}")
    return owner, matched


def _contamination(prompts: list[str], owner: dict[int, str], matched: dict[str, int],
                   ngram: int) -> tuple[list[float], list[str | None]]:
    """Each prompt's share of n-grams found in an evaluation set and the evaluation pair
    that has most of them; ``matched`` counts the prompts per set."""
    shares, by = [], []
    for prompt in prompts:
        grams = ngrams(normalise(prompt).split(), ngram)
        hits = [owner[h] for h in map(_hash64, grams) if h in owner]
        if not grams or not hits:
            shares.append(0.0)
            by.append(None)
            continue
        shares.append(len(hits) / len(grams))
        top = Counter(hits).most_common(1)[0][0]
        by.append(top)
        matched[top.rsplit(":", 1)[0]] += 1
    return shares, by
