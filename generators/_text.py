"""Text helpers shared by the Crome generators (``causal`` and ``neutral``).

Rule-based rewrites must touch exactly what they mean to touch, so everything here is
about finding spans reliably: code (never rewritten), list blocks (items, markers and
the gaps between them, so a list can be reassembled byte for byte), sentence and line
boundaries, numbers, and the content words a neutral rewrite has to keep. Donor picking
(another seed's prompt or answer) lives here too because both generators need it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# ---- code: masked before any rewrite, restored after -------------------------------------

# An unterminated fence runs to the end: a truncated answer still has its code protected.
_FENCE = re.compile(r"```.*?(?:```|\Z)", re.S)
_INLINE_CODE = re.compile(r"`[^`\n]+`")
_SLOT = re.compile("\ue000(\\d+)\ue001")


def mask_code(text: str) -> tuple[str, list[str]]:
    """``text`` with fenced and inline code replaced by one-line placeholders, and the code."""
    slots: list[str] = []

    def keep(match: re.Match[str]) -> str:
        slots.append(match.group(0))
        return f"\ue000{len(slots) - 1}\ue001"

    return _INLINE_CODE.sub(keep, _FENCE.sub(keep, text)), slots


def unmask_code(text: str, slots: Sequence[str]) -> str:
    return _SLOT.sub(lambda m: slots[int(m.group(1))], text)


def code_spans(text: str) -> list[str]:
    """Every fenced and inline code span, in order (what a neutral rewrite must keep verbatim)."""
    return mask_code(text)[1]


def is_code_only(text: str) -> bool:
    masked, slots = mask_code(text)
    return bool(slots) and not re.search(r"[^\W_]", _SLOT.sub("", masked))


# ---- lists ------------------------------------------------------------------------------

_ITEM = re.compile(
    r"^(?P<indent>[ \t]*)(?P<marker>(?:\d{1,3}[.)]|[-*+\u2022]|[Ss]tep\s+\d{1,3}\s*[:.)-]))(?P<space>[ \t]+)(?P<body>\S.*)$"
)


def _family(marker: str) -> str:
    if marker[:1] in "Ss":
        return "step"
    return "numbered" if marker[:1].isdigit() else "bullet"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


@dataclass
class ListBlock:
    """A run of list items at one indent, reassembled exactly by :meth:`render`.

    ``markers[i]`` is item i's prefix (indent, marker and the space after it), ``bodies[i]``
    its text (first line plus indented continuation lines, sub-lists included) and
    ``gaps[i]`` the blank lines that follow it inside the block.
    """

    start: int  # first line index
    end: int  # one past the last line index
    kind: str  # numbered | bullet | step
    markers: list[str]
    bodies: list[str]
    gaps: list[str]

    def render(self, bodies: Sequence[str] | None = None) -> list[str]:
        """The block's lines, with ``bodies`` in the item slots (markers and gaps stay put)."""
        bodies = self.bodies if bodies is None else bodies
        text = "".join(m + b + "\n" + g for m, b, g in zip(self.markers, bodies, self.gaps, strict=False))
        return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")


def find_lists(lines: Sequence[str], min_items: int = 2) -> list[ListBlock]:
    """The top-level list blocks in ``lines`` with at least ``min_items`` items."""
    blocks: list[ListBlock] = []
    i, n = 0, len(lines)
    while i < n:
        first = _ITEM.match(lines[i])
        if first is None:
            i += 1
            continue
        indent, family = len(first.group("indent")), _family(first.group("marker"))
        markers, bodies, gaps = [], [], []
        j = i
        while j < n:
            item = _ITEM.match(lines[j])
            if item is None or len(item.group("indent")) != indent or _family(item.group("marker")) != family:
                break
            markers.append(item.group("indent") + item.group("marker") + item.group("space"))
            body = [item.group("body")]
            j += 1
            blanks: list[str] = []
            while j < n:
                line = lines[j]
                if not line.strip():
                    blanks.append(line)
                    j += 1
                    continue
                if _indent(line) > indent:
                    body.extend(blanks + [line])  # a continuation or a sub-list belongs to the item
                    blanks = []
                    j += 1
                    continue
                break
            bodies.append("\n".join(body))
            gaps.append("".join(b + "\n" for b in blanks))
            nxt = _ITEM.match(lines[j]) if j < n else None
            if nxt is None or len(nxt.group("indent")) != indent or _family(nxt.group("marker")) != family:
                j -= len(blanks)  # trailing blank lines are outside the block
                gaps[-1] = ""
                break
        if len(bodies) >= min_items:
            blocks.append(ListBlock(i, j, family, markers, bodies, gaps))
        i = max(j, i + 1)
    return blocks


def strip_list_markers(text: str) -> str:
    """``text`` without list markers (their numbers are structure, not content)."""
    return "\n".join(_ITEM.sub(lambda m: m.group("indent") + m.group("body"), line) for line in text.split("\n"))


# ---- sentences and boundaries -------------------------------------------------------------

_ABBREVIATIONS = {"e.g.", "i.e.", "etc.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "no.", "approx.", "fig.",
                  "u.s.", "u.k.", "inc.", "ltd.", "jr.", "sr.", "prof."}
_SENTENCE_END = re.compile(r"[.!?]+[\"')\]\u201d\u2019]*(?=\s)")


def sentence_ends(text: str) -> list[int]:
    """Offsets just after each sentence-ending mark that is followed by whitespace."""
    ends = []
    for match in _SENTENCE_END.finditer(text):
        word = text[: match.end()].rsplit(None, 1)[-1].lower()
        if word in _ABBREVIATIONS or match.group(0).startswith("..") or re.fullmatch(r"[a-z]\.", word):
            continue
        ends.append(match.end())
    return ends


def split_sentences(paragraph: str) -> list[str]:
    """A one-paragraph text cut into its sentences (whitespace between them dropped)."""
    out, start = [], 0
    for end in sentence_ends(paragraph):
        piece = paragraph[start:end].strip()
        if piece:
            out.append(piece)
        start = end
    tail = paragraph[start:].strip()
    if tail:
        out.append(tail)
    return out


def boundaries(text: str) -> list[int]:
    """Offsets where a cut leaves whole sentences or lines: sentence ends and line ends."""
    marks = set(sentence_ends(text)) | {m.start() for m in re.finditer("\n", text)}
    return sorted(marks)


# ---- numbers and words ----------------------------------------------------------------------

# An unsigned number: 1382, 1,382, 3.50; not part of a word (x2, 2nd) or of a dotted version.
NUMBER = re.compile(r"(?<![\w.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\w|[.,]\d)")
_WORD = re.compile(r"[^\W_]+")


def numbers(text: str) -> list[str]:
    """Numbers outside list markers, in order."""
    return NUMBER.findall(strip_list_markers(text))


def content_tokens(text: str) -> Counter[str]:
    """Lower-cased words and numbers, list markers left out: what a neutral rewrite keeps."""
    return Counter(_WORD.findall(strip_list_markers(text).lower()))


def keeps_content(original: str | tuple[Counter[str], Counter[str]], rewrite: str) -> bool:
    """True when ``rewrite`` has every word, number and code span of ``original``.

    ``original`` may be given as :func:`content_of` it, to check many rewrites of one text.
    """
    tokens, code = content_of(original) if isinstance(original, str) else original
    if tokens - content_tokens(rewrite):
        return False
    return not code - Counter(code_spans(rewrite))


def content_of(text: str) -> tuple[Counter[str], Counter[str]]:
    """The words and the code spans of ``text``, as :func:`keeps_content` compares them."""
    return content_tokens(text), Counter(code_spans(text))


def word_set(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if len(w) > 2)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def last_user_text(prompt: Sequence[dict[str, str]] | None) -> str:
    """The instruction the answer responds to: the last user message (else the last one)."""
    if not prompt:
        return ""
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message.get("content") or ""
    return prompt[-1].get("content") or ""


# ---- donors: another seed's prompt or answer, chosen deterministically -------------------------


def pick_donors(positions: np.ndarray, rows: Sequence[int], candidates: Sequence[int],
                score: Callable[[int, int], float | None], *, take: int = 8,
                window: int = 256) -> dict[int, int | None]:
    """For each of ``rows``, the best of the first ``take`` acceptable candidates after it on a ring.

    ``positions`` are per-row hashes in [0, 1) (``ctx.row_uniform`` of the pair ids), so a
    row's walk order depends on the seed and the candidates present, never on row order.
    ``score(row, candidate)`` is None to refuse a candidate, else higher is better; ties
    go to the one met first. ``window`` bounds the walk so a batch costs O(rows * window).
    """
    pool = np.asarray(candidates, dtype=np.int64)
    if pool.size == 0:
        return dict.fromkeys(rows)
    ring = pool[np.argsort(positions[pool], kind="stable")].tolist()
    starts = np.searchsorted(positions[ring], positions[list(rows)], side="right").tolist()
    out: dict[int, int | None] = {}
    for row, start in zip(rows, starts, strict=True):
        best, best_score, accepted = None, -np.inf, 0
        for step in range(min(window, len(ring))):
            candidate = ring[(start + step) % len(ring)]
            if candidate == row:
                continue
            value = score(row, candidate)
            if value is None:
                continue
            if value > best_score:
                best, best_score = candidate, value
            accepted += 1
            if accepted >= take:
                break
        out[row] = best
    return out


# ---- output assembly -------------------------------------------------------------------------


@dataclass
class Made:
    """One generated pair before assembly; rows index the seed batch."""

    row: int  # the seed it came from
    prompt_row: int  # the seed whose prompt it is asked under (another seed's for a re-pairing)
    chosen: str
    rejected: str
    tie: bool
    attribute: str
    method: str
    generated: str
    task: str | None


def assemble(seeds: pa.Table, made: Sequence[Made], *, prompt_ids: Sequence[str], pair_ids: Sequence[str],
             row_uniform: Callable[[Sequence[str], str], np.ndarray], max_per_seed: int,
             salt: str) -> tuple[pa.Table, dict[str, int]]:
    """The step's output table from ``made``: capped per seed, duplicates merged.

    Two seeds that share a prompt and an answer (common: one chosen answer against several
    rejected ones) yield the same rewrite; that pair is kept once with both seeds in
    ``parent_ids`` rather than emitted twice under one ``pair_id``.
    """
    ordered = sorted(made, key=lambda m: m.row)  # stable: a seed's rows keep their rule order
    capped = 0
    if max_per_seed:
        draws = row_uniform([f"{pair_ids[m.row]}\x00{m.method}" for m in ordered], salt)
        by_seed: dict[int, list[int]] = {}
        for index, m in enumerate(ordered):
            by_seed.setdefault(m.row, []).append(index)
        keep = set()
        for indexes in by_seed.values():
            keep.update(sorted(indexes, key=lambda k: draws[k])[:max_per_seed])
        capped = len(ordered) - len(keep)
        ordered = [m for k, m in enumerate(ordered) if k in keep]
    first: dict[tuple[str, str, str], int] = {}
    kept: list[Made] = []
    parents: list[list[str]] = []
    for m in ordered:
        key = (prompt_ids[m.prompt_row], *sorted((m.chosen, m.rejected)))
        if key in first:
            if pair_ids[m.row] not in parents[first[key]]:
                parents[first[key]].append(pair_ids[m.row])
            continue
        first[key] = len(kept)
        kept.append(m)
        parents.append([pair_ids[m.row]])
    prompt_rows = pa.array([m.prompt_row for m in kept], pa.int64())
    table = pa.table({
        "prompt": seeds.column("prompt").take(prompt_rows),
        "chosen": pa.array([m.chosen for m in kept], pa.string()),
        "rejected": pa.array([m.rejected for m in kept], pa.string()),
        "tie": pa.array([m.tie for m in kept], pa.bool_()),
        "attribute": pa.array([m.attribute for m in kept], pa.string()),
        "task": pa.array([m.task for m in kept], pa.string()),
        "parent_ids": pa.array(parents, pa.list_(pa.string())),
        "generated": pa.array([m.generated for m in kept], pa.string()),
        "method": pa.array([m.method for m in kept], pa.string()),
    })
    return table, {"capped": capped, "duplicates_merged": len(ordered) - len(kept)}


def value_counts(values: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """``{value: count}`` of a string column, for the step's stats."""
    counts = pc.value_counts(values)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
