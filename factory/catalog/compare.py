"""Diff two versions by pair_id, in SQL over their Parquet files (no Python loops).

- added / removed: comparisons (pair_ids) only one side has;
- changed: the same comparison relabelled (the other side won, or a tie appeared or went),
  re-annotated (same label, another margin, votes, weight, attribute or attribute scores),
  or, under a prompt both sides have, a pair whose responses were replaced (a removed
  and an added pair matched up within the prompt).
- repeats_changed: the same labels and annotations, judged another number of times (a
  dedup that dropped repeated judgments); neither changed nor unchanged.
A pair_id's judgments are compared as sets of distinct labels and verdicts.
"""

from __future__ import annotations

from typing import Any

import duckdb

from factory.catalog.catalog import Catalog
from factory.catalog.index import HASHER, LABEL_SQL, VERDICT_SQL, hasher_of

_VERDICTS = """
CREATE TEMP TABLE {name} AS
SELECT pair_id, any_value(prompt_id) AS prompt_id,
       -- the sets of distinct labels and verdicts, order-insensitive and cheaper than lists
       sum(DISTINCT {label}::HUGEINT) AS labels, sum(DISTINCT {verdict}::HUGEINT) AS verdicts,
       count(*) AS copies
FROM read_parquet(?) GROUP BY pair_id
"""


def diff(catalog: Catalog, ref_a: str, ref_b: str, *, sample: int = 5) -> dict[str, Any]:
    a, b = catalog.resolve(ref_a), catalog.resolve(ref_b)
    connection = duckdb.connect()
    try:
        connection.execute(f"SET threads = {max(1, _cpu_count())}")
        connection.execute("SET preserve_insertion_order = false")
        indexes = [catalog.checked_paths(info, role="index") for info in (a, b)]
        hashers = {hasher_of(str(p)) for paths in indexes for p in paths}
        use_index = all(indexes) and len(hashers) == 1 and HASHER in hashers
        for name, info in (("va", a), ("vb", b)):
            paths = catalog.checked_paths(info, role="index" if use_index else "data")
            verdict, label = ("verdict", "label") if use_index else (VERDICT_SQL, LABEL_SQL)
            connection.execute(_VERDICTS.format(name=name, verdict=verdict, label=label),
                               [[str(p) for p in paths]])
        connection.execute("""
            CREATE TEMP TABLE joined AS
            SELECT pair_id, coalesce(va.prompt_id, vb.prompt_id) AS prompt_id,
                   CASE WHEN vb.pair_id IS NULL THEN 'a' WHEN va.pair_id IS NULL THEN 'b'
                        WHEN va.labels <> vb.labels THEN 'relabelled'
                        WHEN va.verdicts <> vb.verdicts THEN 'reannotated'
                        WHEN va.copies <> vb.copies THEN 'repeats' ELSE 'same' END AS side
            FROM va FULL OUTER JOIN vb USING (pair_id);
            -- Within a prompt both versions have, pair up removed and added comparisons:
            -- those are edits of a response, not unrelated additions.
            CREATE TEMP TABLE edited AS
            WITH ranked AS (
                SELECT pair_id, prompt_id, side,
                       row_number() OVER (PARTITION BY prompt_id, side ORDER BY pair_id) AS k
                FROM joined WHERE side IN ('a', 'b'))
            SELECT ra.pair_id AS old_pair_id, rb.pair_id AS new_pair_id, prompt_id
            FROM ranked ra JOIN ranked rb USING (prompt_id, k) WHERE ra.side = 'a' AND rb.side = 'b';
        """)
        by_side = dict(connection.execute("SELECT side, count(*) FROM joined GROUP BY side").fetchall())
        edited = connection.execute("SELECT count(*) FROM edited").fetchone()[0]

        def ids(query: str) -> list[str]:
            return [r[0] for r in connection.execute(query + f" ORDER BY 1 LIMIT {int(sample)}").fetchall()]

        samples = {
            "added": ids("SELECT pair_id FROM joined WHERE side = 'b' "
                         "AND pair_id NOT IN (SELECT new_pair_id FROM edited)"),
            "removed": ids("SELECT pair_id FROM joined WHERE side = 'a' "
                           "AND pair_id NOT IN (SELECT old_pair_id FROM edited)"),
            "relabelled": ids("SELECT pair_id FROM joined WHERE side = 'relabelled'"),
            "reannotated": ids("SELECT pair_id FROM joined WHERE side = 'reannotated'"),
            "repeats_changed": ids("SELECT pair_id FROM joined WHERE side = 'repeats'"),
            "responses_changed": ids("SELECT old_pair_id || ' -> ' || new_pair_id FROM edited"),
        }
    finally:
        connection.close()
    relabelled, reannotated = by_side.get("relabelled", 0), by_side.get("reannotated", 0)
    return {
        "a": a.ref, "b": b.ref, "rows_a": a.rows, "rows_b": b.rows,
        "added": by_side.get("b", 0) - edited, "removed": by_side.get("a", 0) - edited,
        "changed": relabelled + reannotated + edited, "relabelled": relabelled, "reannotated": reannotated,
        "responses_changed": edited, "repeats_changed": by_side.get("repeats", 0),
        "unchanged": by_side.get("same", 0), "sample": samples,
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
