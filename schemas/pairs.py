"""The canonical preference-pair row: one Arrow schema and the typed Python model that builds it.

A pair's identity (``pair_id``) is a content hash of the prompt and the *unordered* set of
its two responses. The verdict (which side is chosen, tie, margin, votes) is a label on
that identity, so a flipped label keeps its ``pair_id``: diffs show it as a change and
label-noise audits can track it across versions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np
import pyarrow as pa

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])

ATTRIBUTE_SCORE_TYPE = pa.struct(
    [("attribute", pa.string()), ("chosen", pa.float64()), ("rejected", pa.float64())]
)

PROVENANCE_TYPE = pa.struct(
    [
        ("source", pa.string()),  # dataset the row came from, e.g. "hh-rlhf" or "seeds@3"
        ("source_file", pa.string()),
        ("source_line", pa.int64()),
        ("step", pa.string()),  # generator / filter / reader that produced the row
        ("step_version", pa.string()),
        ("params_hash", pa.string()),
        ("model", pa.string()),
        ("template_hash", pa.string()),
        ("seed", pa.int64()),
        ("run_id", pa.string()),
        ("parent_ids", pa.list_(pa.string())),
        ("generated", pa.string()),  # which response a generator wrote: chosen|rejected|both|none
        ("method", pa.string()),  # how, e.g. "master_key:Solution" or "truncate:0.5"
    ]
)

PAIR_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(MESSAGE_TYPE), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("tie", pa.bool_(), nullable=False),
        pa.field("margin", pa.float64()),
        # Per-annotator votes relative to (chosen, rejected): +1 chosen, -1 rejected, 0 tie.
        pa.field("votes", pa.list_(pa.int8())),
        pa.field("weight", pa.float64()),
        pa.field("attribute", pa.string()),  # quality attribute a causal augmentation changed
        pa.field("attribute_scores", pa.list_(ATTRIBUTE_SCORE_TYPE)),
        pa.field("task", pa.string()),  # free-form task type, e.g. "math", "harmless", "code"
        pa.field("provenance", PROVENANCE_TYPE),
        pa.field("metadata", pa.string()),  # JSON object with source-specific extras
    ]
)

PAIR_COLUMNS: tuple[str, ...] = tuple(PAIR_SCHEMA.names)


def _digest(payload: Any) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def prompt_id_of(prompt: Sequence[dict[str, str]]) -> str:
    """Content hash of a chat prompt (role and content of every message, in order)."""
    return _digest([[m["role"], m["content"]] for m in prompt])


def pair_id_of(prompt: Sequence[dict[str, str]], response_a: str, response_b: str) -> str:
    """Content hash of a prompt and its two responses, independent of which one won."""
    return _digest([[[m["role"], m["content"]] for m in prompt], sorted((response_a, response_b))])


# Rows whose payloads are built and hashed together: a whole-table call holds about this
# many rows' payloads at a time, not the whole table's.
ID_BATCH_ROWS = 64 * 1024

# json.dumps(ensure_ascii=False) escapes quote, backslash and the control characters below
# 0x20, and nothing else. None of these bytes occurs inside a multi-byte UTF-8 sequence
# (whose bytes are all >= 0x80), so a scan of the raw bytes finds exactly the characters.
_JSON_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\", 8: "\\b", 9: "\\t", 10: "\\n", 12: "\\f", 13: "\\r"}


def _json_escape(byte: int) -> str:
    return _JSON_ESCAPES.get(byte, f"\\u{byte:04x}")


def content_ids(table: pa.Table | pa.RecordBatch) -> tuple[pa.Array, pa.Array]:
    """``(pair_id, prompt_id)`` of every row, computed column-wise.

    Equal to :func:`pair_id_of` / :func:`prompt_id_of` row by row: Arrow compute kernels
    concatenate each row's canonical JSON payload (strings escaped as ``json.dumps`` with
    ``ensure_ascii=False`` does, and only in the rows that need it) and only the sha256
    itself runs per row, over slices of one Arrow buffer. ``ID_BATCH_ROWS`` rows at a
    time, so a whole table's payloads never sit in memory together. Null text raises
    ``ValueError``: it has no id.
    """
    _refuse_null_text(table)
    pair_ids: list[pa.Array] = [pa.array([], pa.string())]
    prompt_ids: list[pa.Array] = [pa.array([], pa.string())]
    for start in range(0, table.num_rows, ID_BATCH_ROWS):
        pair_payloads, prompt_payloads = _json_payloads(table.slice(start, ID_BATCH_ROWS))
        pair_ids.append(_sha256_prefixes(pair_payloads))
        prompt_ids.append(_sha256_prefixes(prompt_payloads))
    if len(pair_ids) == 2:  # the common case, one slice: no concatenation copy
        return pair_ids[1], prompt_ids[1]
    return pa.concat_arrays(pair_ids), pa.concat_arrays(prompt_ids)


def _refuse_null_text(table: pa.Table | pa.RecordBatch) -> None:
    import pyarrow.compute as pc

    for name in ("prompt", "chosen", "rejected"):
        if table.column(name).null_count:
            raise ValueError(f"cannot hash a row whose {name!r} is null")
    messages = pc.list_flatten(table.column("prompt"))
    for part in ("role", "content"):
        if pc.struct_field(messages, part).null_count:
            raise ValueError(f"cannot hash a prompt message whose {part!r} is null")


def _json_payloads(table: pa.Table | pa.RecordBatch) -> tuple[pa.Array, pa.Array]:
    """Each row's canonical JSON, as ``(pair payloads, prompt payloads)`` string arrays.

    ``[[["role","content"],...],["a","b"]]`` with the responses in code-point order (UTF-8
    byte order is code-point order) and ``[["role","content"],...]``: what ``_digest``
    hashes. Large strings throughout: a batch's payloads may pass 2 GiB.
    """
    import pyarrow.compute as pc

    def text(value: str) -> pa.Scalar:
        return pa.scalar(value, pa.large_string())

    def join(*parts: pa.Array | pa.Scalar) -> pa.Array:
        return pc.binary_join_element_wise(*parts, text(""))

    prompt = _single_array(table.column("prompt"))
    messages = pc.list_flatten(prompt)
    items = join(text('["'), _json_strings(pc.struct_field(messages, "role")), text('","'),
                 _json_strings(pc.struct_field(messages, "content")), text('"]'))
    offsets = pc.subtract(prompt.offsets, prompt.offsets[0]).cast(pa.int64())
    prompt_json = join(text("["), pc.binary_join(pa.LargeListArray.from_arrays(offsets, items), text(",")), text("]"))
    chosen, rejected = _single_array(table.column("chosen")), _single_array(table.column("rejected"))
    swap = pc.greater(chosen, rejected)  # compared before escaping, as sorted() compares them
    chosen, rejected = _json_strings(chosen), _json_strings(rejected)
    first, second = pc.if_else(swap, rejected, chosen), pc.if_else(swap, chosen, rejected)
    pair_json = join(text("["), prompt_json, text(',["'), first, text('","'), second, text('"]]'))
    return pair_json, prompt_json


def _single_array(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def _offsets_and_data(strings: pa.Array) -> tuple[np.ndarray, memoryview]:
    """The ``len + 1`` int64 offsets of a large string array and its data buffer."""
    _, offsets, data = strings.buffers()
    bounds = np.frombuffer(offsets, dtype=np.int64)[strings.offset: strings.offset + len(strings) + 1]
    return bounds, memoryview(data if data is not None else b"")


def _json_strings(strings: pa.Array) -> pa.Array:
    """Each string as it stands between the quotes of its JSON literal, as a large string.

    Most text needs no escape at all, so the bytes are scanned first (cheap vector
    compares) and only rows holding a quote, backslash or control character are rewritten,
    one ``replace_substring`` per distinct character present.
    """
    import pyarrow.compute as pc

    strings = strings.cast(pa.large_string())
    if len(strings) == 0:
        return strings
    bounds, data = _offsets_and_data(strings)
    body = np.frombuffer(data, dtype=np.uint8)[bounds[0]: bounds[-1]]
    if not (body.size and (body.min() < 0x20 or (body == 0x22).any() or (body == 0x5C).any())):
        return strings
    # One False past the end, so every row's start is a valid index for reduceat.
    special = np.zeros(body.size + 1, dtype=bool)
    np.logical_or(body < 0x20, (body == 0x22) | (body == 0x5C), out=special[:-1])
    starts = bounds[:-1] - bounds[0]
    # reduceat gives an empty row its next byte, so empty rows are masked out.
    rows = np.flatnonzero(np.logical_or.reduceat(special, starts) & (bounds[1:] > bounds[:-1]))
    special = special[:-1]
    # Backslash first: the escapes written after it contain backslashes of their own.
    present = np.flatnonzero(np.bincount(body[special], minlength=256)).tolist()
    characters = sorted(present, key=lambda byte: byte != 0x5C)
    whole = len(rows) == len(strings)
    escaped = strings if whole else strings.take(pa.array(rows))
    for byte in characters:
        escaped = pc.replace_substring(escaped, chr(byte), _json_escape(byte))
    if whole:
        return escaped
    mask = np.zeros(len(strings), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(strings, pa.array(mask), escaped)


def _sha256_prefixes(texts: pa.Array) -> pa.Array:
    """The first 32 hex digits of each string's sha256, as a string array.

    Per row only the C hash of a slice of the one data buffer runs in Python: about
    0.4 µs of interpreter work per id, plus the hash itself (OpenSSL, ~1 GB/s).
    """
    if texts.null_count:
        raise ValueError("cannot hash null text")
    if texts.type != pa.large_string():
        texts = texts.cast(pa.large_string())
    count = len(texts)
    if count == 0:
        return pa.array([], pa.string())
    bounds, data = _offsets_and_data(texts)
    sha256 = hashlib.sha256
    digests = b"".join([sha256(data[start:end]).digest() for start, end in pairwise(bounds.tolist())])
    hexed = np.frombuffer(digests, dtype=np.uint8).reshape(count, 32)[:, :16].tobytes().hex().encode()
    string_offsets = np.arange(0, 32 * count + 1, 32, dtype=np.int32).tobytes()
    return pa.StringArray.from_buffers(count, pa.py_buffer(string_offsets), pa.py_buffer(hexed))


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass
class Provenance:
    source: str | None = None
    source_file: str | None = None
    source_line: int | None = None
    step: str | None = None
    step_version: str | None = None
    params_hash: str | None = None
    model: str | None = None
    template_hash: str | None = None
    seed: int | None = None
    run_id: str | None = None
    parent_ids: list[str] = field(default_factory=list)
    generated: str | None = None
    method: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in PROVENANCE_TYPE.names}


@dataclass
class Pair:
    """One preference judgment: under ``prompt``, ``chosen`` beats ``rejected`` (or ties)."""

    prompt: list[Message]
    chosen: str
    rejected: str
    tie: bool = False
    margin: float | None = None
    votes: list[int] | None = None
    weight: float | None = None
    attribute: str | None = None
    attribute_scores: list[dict[str, Any]] | None = None
    task: str | None = None
    provenance: Provenance = field(default_factory=Provenance)
    metadata: dict[str, Any] | None = None

    @property
    def prompt_dicts(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.prompt]

    @property
    def pair_id(self) -> str:
        return pair_id_of(self.prompt_dicts, self.chosen, self.rejected)

    def to_row(self, *, ids: bool = True) -> dict[str, Any]:
        """The row in ``PAIR_SCHEMA``. ``ids=False`` leaves pair_id/prompt_id null, for
        callers that hash a whole batch at once (:func:`content_ids`, a catalog commit)."""
        prompt = self.prompt_dicts
        return {
            "pair_id": pair_id_of(prompt, self.chosen, self.rejected) if ids else None,
            "prompt_id": prompt_id_of(prompt) if ids else None,
            "prompt": prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "tie": self.tie,
            "margin": self.margin,
            "votes": self.votes,
            "weight": self.weight,
            "attribute": self.attribute,
            "attribute_scores": self.attribute_scores,
            "task": self.task,
            "provenance": self.provenance.as_dict(),
            # default=str: Parquet and `datasets` rows can carry dates and other non-JSON types.
            "metadata": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True, default=str)
            if self.metadata
            else None,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Pair:
        provenance = row.get("provenance") or {}
        return cls(
            prompt=[Message(m["role"], m["content"]) for m in row["prompt"]],
            chosen=row["chosen"],
            rejected=row["rejected"],
            tie=bool(row.get("tie")),
            margin=row.get("margin"),
            votes=row.get("votes"),
            weight=row.get("weight"),
            attribute=row.get("attribute"),
            attribute_scores=row.get("attribute_scores"),
            task=row.get("task"),
            provenance=Provenance(
                **{k: provenance.get(k) for k in PROVENANCE_TYPE.names if k != "parent_ids"},
                parent_ids=list(provenance.get("parent_ids") or []),
            ),
            metadata=json.loads(row["metadata"]) if row.get("metadata") else None,
        )


def pairs_to_table(pairs: Iterable[Pair]) -> pa.Table:
    """Build a table in the canonical schema from typed pairs."""
    return pa.Table.from_pylist([p.to_row() for p in pairs], schema=PAIR_SCHEMA)


def empty_pair_table() -> pa.Table:
    return PAIR_SCHEMA.empty_table()


def conform(table: pa.Table | pa.RecordBatch, *, extra: bool = False) -> pa.Table:
    """Return ``table`` with the canonical columns, in order, cast to their types.

    Missing optional columns are added as nulls; a missing required column raises. With
    ``extra`` the other columns (a filter's scores, say) follow, as given; without, they
    are dropped.
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    columns = []
    for schema_field in PAIR_SCHEMA:
        if schema_field.name in table.column_names:
            columns.append(table.column(schema_field.name).cast(schema_field.type))
        elif schema_field.nullable:
            columns.append(pa.nulls(table.num_rows, schema_field.type))
        else:
            raise ValueError(f"table lacks required column {schema_field.name!r}")
    schema = PAIR_SCHEMA
    if extra:
        extras = [f for f in table.schema if f.name not in PAIR_SCHEMA.names]
        columns += [table.column(f.name) for f in extras]
        schema = pa.schema(list(PAIR_SCHEMA) + extras)
    return pa.Table.from_arrays(columns, schema=schema)


def generated_mask(table: pa.Table) -> np.ndarray:
    """True for rows a generator made: the step runner stamps the seed pairs each one came
    from (``provenance.parent_ids``) and which side it wrote (``provenance.generated``);
    ingested, human-labelled rows have neither. The one rule for "generated" everywhere
    (noise scoring, the trainer's augmentation weights, the audit's real/generated split)."""
    import pyarrow.compute as pc

    if "provenance" not in table.column_names:
        return np.zeros(table.num_rows, dtype=bool)
    provenance = table.column("provenance")
    fields = {f.name for f in provenance.type}
    made = pa.array(np.zeros(table.num_rows, dtype=bool))
    if "parent_ids" in fields:
        parents = pc.struct_field(provenance, "parent_ids")
        made = pc.or_(made, pc.fill_null(pc.greater(pc.list_value_length(parents), 0), False))
    if "generated" in fields:
        made = pc.or_(made, pc.is_valid(pc.struct_field(provenance, "generated")))
    return np.asarray(made.to_numpy(zero_copy_only=False), dtype=bool)
