"""Per-version key index: (pair_id, prompt_id, verdict hash, label hash) beside the data file.

It lets a diff of million-row versions read a few narrow columns instead of every
response text. Hash values depend on the hashing engine and on which columns make a
verdict, so the index records both and a diff falls back to the data files when two
indexes disagree on them.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

HASHER_KEY = b"prefab.verdict_hash"

# The verdict of a row: every label on the comparison (which side won, tie, margin,
# votes, weight, the attribute a causal augmentation changed and the per-attribute
# scores). Shared with the diff's fallback over data files so both paths hash identically.
VERDICT_COLUMNS = ("chosen", "tie", "margin", "votes", "weight", "attribute", "attribute_scores")
# A tie's sides are interchangeable: which one is stored as "chosen" is no part of its verdict.
VERDICT_SQL = f"hash(CASE WHEN tie THEN NULL ELSE chosen END, {', '.join(VERDICT_COLUMNS[1:])})"
# The label alone: which side won, or a tie (whose sides are interchangeable). Two rows of a
# pair with equal labels but another margin or attribute are not a relabelling.
LABEL_SQL = "hash(tie, CASE WHEN tie THEN NULL ELSE chosen END)"
HASHER = f"duckdb-{duckdb.__version__}/verdict-v3".encode()

INDEX_SCHEMA = pa.schema(
    [("pair_id", pa.string()), ("prompt_id", pa.string()), ("verdict", pa.uint64()), ("label", pa.uint64())],
    metadata={HASHER_KEY: HASHER},
)


class IndexBuilder:
    """Index rows for one batch at a time, so a streamed commit indexes as it writes."""

    def __init__(self) -> None:
        self._connection = duckdb.connect()
        self._connection.execute("SET threads = 2")

    def batch(self, batch: pa.RecordBatch | pa.Table) -> pa.Table:
        pairs = batch.select(["pair_id", "prompt_id", *VERDICT_COLUMNS])  # noqa: F841 - read by SQL
        index = self._connection.sql(
            f"SELECT pair_id, prompt_id, {VERDICT_SQL} AS verdict, {LABEL_SQL} AS label FROM pairs"
        ).to_arrow_table()
        return index.cast(INDEX_SCHEMA)

    def close(self) -> None:
        self._connection.close()


def hasher_of(path: str) -> bytes | None:
    metadata = pq.read_schema(path).metadata or {}
    return metadata.get(HASHER_KEY)
