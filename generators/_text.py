"""Text helpers shared by the Crome generators (``causal`` and ``neutral``).

Rule-based rewrites must touch exactly what they mean to touch, so everything here is
about finding spans reliably: code (never rewritten), list blocks (items, markers and
the gaps between them, so a list can be reassembled byte for byte), sentence and line
boundaries, numbers, and the content words a neutral rewrite has to keep. Donor picking
(another seed's prompt or answer) lives here too: it spans the whole seed table, reading
texts a chunk at a time, so a generator's output depends neither on row order nor on how
the table is split (output assembly, which merges the pairs repeated seeds make, is in
:mod:`generators._assembly`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


# ---- table-wide work in bounded memory ---------------------------------------------------------

# Rows held as Python objects at once. The steps read the whole table (cross-row work must
# not depend on how it is split), but texts are only ever materialised a chunk at a time.
CHUNK_ROWS = 4096


def chunks(n: int, rows: int | None = None) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``rows`` (default :data:`CHUNK_ROWS`) covering ``range(n)``."""
    rows = rows or CHUNK_ROWS
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def column_or(table: pa.Table, name: str, default: Any = None) -> pa.ChunkedArray | pa.Array:
    """``table[name]``, or a column of ``default`` when the table lacks it."""
    if name in table.column_names:
        return table.column(name)
    return pa.array([default] * table.num_rows, pa.string() if default is None else None)


def prompt_ids_of(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """The ``prompt_id`` column, computed from the prompts when the table lacks it."""
    if "prompt_id" in table.column_names:
        return table.column("prompt_id")
    from schemas.pairs import content_ids

    return content_ids(table)[1]


def take_rows(column: pa.ChunkedArray | pa.Array, indices: np.ndarray | Sequence[int]) -> pa.Array:
    """``column[indices]``, reading only the chunks the indices fall in.

    ``ChunkedArray.take`` concatenates every chunk first: on a memory-mapped table that
    copies the whole column into memory for each call."""
    positions = np.asarray(indices, dtype=np.int64)
    if isinstance(column, pa.Array):
        return column.take(pa.array(positions, pa.int64()))
    if column.num_chunks == 1:
        return column.chunk(0).take(pa.array(positions, pa.int64()))
    if not len(positions):
        return pa.array([], column.type)
    offsets = np.cumsum([0] + [len(chunk) for chunk in column.chunks])
    which = np.searchsorted(offsets, positions, side="right") - 1
    order = np.argsort(which, kind="stable")
    bounds = np.searchsorted(which[order], np.arange(column.num_chunks + 1))
    parts = [column.chunk(k).take(pa.array(positions[order[a:b]] - offsets[k], pa.int64()))
             for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)) if b > a]
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    return pa.concat_arrays(parts).take(pa.array(inverse, pa.int64()))


def rows_at(table: pa.Table, indices: np.ndarray, columns: Sequence[str]) -> dict[str, list[Any]]:
    """The named columns at ``indices`` as Python lists (missing columns read as nulls)."""
    return {name: take_rows(column_or(table, name), indices).to_pylist() for name in columns}


def uniforms(ids: pa.ChunkedArray | pa.Array, row_uniform: Callable[[Sequence[str], str], np.ndarray],
             salt: str) -> np.ndarray:
    """``row_uniform`` of a whole id column, a chunk at a time."""
    parts = [row_uniform(ids.slice(a, b - a).to_pylist(), salt) for a, b in chunks(len(ids))]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)


def row_mask(table: pa.Table, columns: Sequence[str], test: Callable[[dict[str, Any]], Any],
             dtype: type = bool) -> np.ndarray:
    """``test(row)`` for every row (a dict of ``columns``), a chunk at a time."""
    out = np.zeros(table.num_rows, dtype=dtype)
    for a, b in chunks(table.num_rows):
        part = table.slice(a, b - a)
        values = {name: column_or(part, name).to_pylist() for name in columns}
        out[a:b] = [test(dict(zip(columns, row, strict=True))) for row in zip(*values.values(), strict=True)]
    return out


# ---- donors: another seed's prompt or answer, chosen deterministically -------------------------


def pick_donors(positions: np.ndarray, rows: np.ndarray, candidates: np.ndarray,
                features: Callable[[np.ndarray], Sequence[Any]], score: Callable[[Any, Any], float | None], *,
                take: int = 8, window: int = 256, block: int | None = None) -> np.ndarray:
    """For each of ``rows``, the best of the first ``take`` acceptable candidates after it on a ring.

    ``positions`` are per-row hashes in [0, 1) (``ctx.row_uniform`` of the pair ids), so a
    row's walk order depends on the seed and the candidates present, never on row order or
    on how the table is split. ``features(indices)`` describes rows (read from the table a
    block at a time, so memory stays bounded); ``score(row_features, candidate_features)``
    is None to refuse a candidate, else higher is better; ties go to the one met first.
    ``window`` bounds the walk so the cost is O(rows * window). Returns the donor row of
    each row, -1 where there is none.
    """
    rows = np.asarray(rows, dtype=np.int64)
    pool = np.asarray(candidates, dtype=np.int64)
    out = np.full(len(rows), -1, dtype=np.int64)
    if pool.size == 0 or rows.size == 0:
        return out
    ring = pool[np.argsort(positions[pool], kind="stable")]
    size = len(ring)
    steps = min(window, size)
    starts = np.searchsorted(positions[ring], positions[rows], side="right") % size
    order = np.argsort(starts, kind="stable")
    for members in _ring_blocks(starts, order, block or CHUNK_ROWS):
        first, last = int(starts[members[0]]), int(starts[members[-1]])
        span = np.arange(first, last + steps) % size if last + steps - first < size else np.arange(size)
        needed = np.unique(np.concatenate([rows[members], ring[span]]))
        described = dict(zip(needed.tolist(), features(needed), strict=True))
        for k in members.tolist():
            row, start = int(rows[k]), int(starts[k])
            best, best_score, accepted = -1, -np.inf, 0
            mine = described[row]
            for step in range(steps):
                candidate = int(ring[(start + step) % size])
                if candidate == row:
                    continue
                value = score(mine, described[candidate])
                if value is None:
                    continue
                if value > best_score:
                    best, best_score = candidate, value
                accepted += 1
                if accepted >= take:
                    break
            out[k] = best
    return out


def _ring_blocks(starts: np.ndarray, order: np.ndarray, block: int) -> Iterator[np.ndarray]:
    """Rows in ring order, cut so a block spans at most ``block`` rows and ring positions."""
    begin = 0
    for end in range(1, len(order) + 1):
        if end == len(order) or end - begin >= block or starts[order[end]] - starts[order[begin]] >= block:
            yield order[begin:end]
            begin = end


# ---- made pairs (assembled into the output by generators._assembly) ---------------------


@dataclass
class Made:
    """One generated pair before assembly; rows index the seed table (or a chunk of it, which
    :func:`made_table` shifts to table positions)."""

    row: int  # the seed it came from
    prompt_row: int  # the seed whose prompt it is asked under (another seed's for a re-pairing)
    chosen: str
    rejected: str
    tie: bool
    attribute: str
    method: str
    generated: str
    task: str | None
    rule: int = 0  # its place among the seed's pairs (the order rules run in), for a stable output order


MADE_SCHEMA = pa.schema([
    ("row", pa.int64()), ("prompt_row", pa.int64()), ("chosen", pa.string()), ("rejected", pa.string()),
    ("tie", pa.bool_()), ("attribute", pa.string()), ("method", pa.string()), ("generated", pa.string()),
    ("task", pa.string()), ("rule", pa.int64()),
])


def made_table(made: Sequence[Made], offset: int = 0) -> pa.Table:
    """``made`` as columns (Arrow holds the texts from here on); ``offset`` shifts chunk-local rows."""
    return pa.table({
        "row": pa.array([m.row + offset for m in made], pa.int64()),
        "prompt_row": pa.array([m.prompt_row + offset for m in made], pa.int64()),
        **{name: pa.array([getattr(m, name) for m in made], MADE_SCHEMA.field(name).type)
           for name in MADE_SCHEMA.names if name not in ("row", "prompt_row")},
    }, schema=MADE_SCHEMA)


def number_rules(made: list[Made]) -> list[Made]:
    """Set each pair's ``rule`` to its place among its seed's pairs, in the order made."""
    seen: Counter[int] = Counter()
    for m in made:
        m.rule = seen[m.row]
        seen[m.row] += 1
    return made


def skipped_ties(table: pa.Table) -> int:
    """Tie-labelled seeds with a chosen answer (left out unless ``include_ties``)."""
    has_answer = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(pc.fill_null(table.column("chosen"), ""))), 0)
    return int(pc.sum(pc.and_(pc.fill_null(table.column("tie"), False), has_answer)).as_py() or 0)


def value_counts(values: pa.ChunkedArray | pa.Array) -> dict[str, int]:
    """``{value: count}`` of a string column, for the step's stats."""
    counts = pc.value_counts(values)
    return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
