"""Per-version key index: (pair_id, prompt_id, verdict hash) beside the data file.

It lets a diff of million-row versions read a few narrow columns instead of every
response text. Hash values depend on the hashing engine, so the index records which one
made it and a diff falls back to the data files when two indexes disagree on that.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

HASHER_KEY = b"prefab.verdict_hash"
HASHER = f"duckdb-{duckdb.__version__}".encode()

# The verdict of a row: which side won, tie, margin and votes. Shared with the diff's
# fallback over data files so both paths hash identically.
VERDICT_SQL = "hash(chosen, tie, margin, votes)"


def build_index(table: pa.Table) -> pa.Table:
    connection = duckdb.connect()
    try:
        connection.execute("SET threads = 2")
        pairs = table.select(["pair_id", "prompt_id", "chosen", "tie", "margin", "votes"])  # noqa: F841
        index = connection.sql(
            f"SELECT pair_id, prompt_id, {VERDICT_SQL} AS verdict FROM pairs"
        ).to_arrow_table()
    finally:
        connection.close()
    return index.replace_schema_metadata({HASHER_KEY: HASHER})


def hasher_of(path: str) -> bytes | None:
    metadata = pq.read_schema(path).metadata or {}
    return metadata.get(HASHER_KEY)
