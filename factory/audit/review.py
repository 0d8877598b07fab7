"""The review loop: a reviewer's keep / flip / drop decisions from the audit report, applied.

A decisions file (what the report's "Save decisions" button downloads)::

    {"format": "prefab-review/1", "ref": "name@3",
     "decisions": [{"pair_id": "...", "row": 17, "action": "flip"}, ...]}

``row`` (the pair's position in the version) is optional; without it the action applies
to every row with that ``pair_id`` (repeated comparisons share an id). Rows not named are
kept. Flipping swaps chosen and rejected and negates the votes (the runner's own
``apply_decision``, so a review flips exactly as the noise filter does).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.errors import PrefabError

FORMAT = "prefab-review/1"
ACTIONS = ("keep", "flip", "drop")


class DecisionsError(PrefabError):
    """A decisions file that cannot be applied; the message is one line naming file and entry."""


def read_decisions(path: str | Path, table: pa.Table, ref: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Validate ``path`` against the version's rows; return one action per row and the file's facts."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DecisionsError(f"{path}: cannot read the decisions file ({exc.strerror or exc})") from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"line {exc.lineno}: " if isinstance(exc, json.JSONDecodeError) else ""
        raise DecisionsError(f"{path}: {where}not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("decisions"), list):
        raise DecisionsError(f"{path}: expected an object with a 'decisions' list (format {FORMAT})")
    if doc.get("format", FORMAT) != FORMAT:
        raise DecisionsError(f"{path}: format {doc.get('format')!r} is not {FORMAT!r}")
    if doc.get("ref") not in (None, ref):
        raise DecisionsError(f"{path}: the decisions were made on {doc['ref']}, not {ref}; "
                             f"pass {doc['ref']} as REF")
    pair_ids = table.column("pair_id").to_pylist()
    rows_of: dict[str, list[int]] = {}
    for i, pid in enumerate(pair_ids):
        rows_of.setdefault(pid, []).append(i)
    actions = np.full(len(pair_ids), "keep", dtype=object)
    decided_by: dict[int, int] = {}
    for k, entry in enumerate(doc["decisions"]):
        where = f"{path}: decisions[{k}]"
        if not isinstance(entry, dict):
            raise DecisionsError(f"{where}: expected an object with pair_id and action")
        pid, action, row = entry.get("pair_id"), entry.get("action"), entry.get("row")
        if action not in ACTIONS:
            raise DecisionsError(f"{where}: action {action!r} is not one of {', '.join(ACTIONS)}")
        if not isinstance(pid, str) or pid not in rows_of:
            raise DecisionsError(f"{where}: pair_id {pid!r} is not in {ref}")
        if row is None:
            targets = rows_of[pid]
        elif isinstance(row, int) and not isinstance(row, bool) and 0 <= row < len(pair_ids) and pair_ids[row] == pid:
            targets = [row]
        else:
            raise DecisionsError(f"{where}: row {row!r} of {ref} is not pair {pid}")
        for target in targets:
            if target in decided_by and actions[target] != action:
                raise DecisionsError(f"{where}: row {target} already has action {actions[target]!r} "
                                     f"from decisions[{decided_by[target]}]")
            actions[target], decided_by[target] = action, k
    counts = {a: int(sum(1 for r in decided_by if actions[r] == a)) for a in ACTIONS}
    facts = {"file": str(path), "sha256": hashlib.sha256(raw).hexdigest(), "entries": len(doc["decisions"]),
             "decided_rows": len(decided_by), **{f"decided_{a}": c for a, c in counts.items()},
             "reviewer": doc.get("reviewer")}
    return actions, facts


def apply_review(ref: str, decisions: str | Path, name: str, *, home: str | Path | None = None,
                 message: str = "") -> dict[str, Any]:
    """Apply a decisions file to ``ref`` and commit the result as ``name`` with the review in lineage."""
    from factory.catalog import Catalog
    from factory.steps.context import Decision
    from factory.steps.runner import apply_decision

    started = time.monotonic()
    catalog = Catalog(home)
    info = catalog.resolve(ref)
    table = catalog.read_table(info)
    actions, facts = read_decisions(decisions, table, info.ref)
    decision = Decision(pa.array(actions.tolist(), pa.string()), pa.nulls(len(actions), pa.string()))
    out, counts = apply_decision(table, decision, np.zeros(len(actions), dtype=bool))
    assert counts["rows_in"] == counts["rows_kept"] + counts["rows_dropped"]
    if counts["rows_kept"] == 0:
        raise DecisionsError(f"{decisions}: every row of {info.ref} would be dropped; nothing committed")
    lineage = {
        "command": "review",
        "review": facts,
        "rows_in": counts["rows_in"], "rows_kept": counts["rows_kept"], "rows_dropped": counts["rows_dropped"],
        "rows_flipped": counts["rows_flipped"], "rows_filtered": counts["rows_dropped"],
        "wall_seconds": round(time.monotonic() - started, 3),
    }
    result = catalog.commit(name, out, message=message or f"review of {info.ref} ({Path(decisions).name})",
                            lineage=lineage, parents=[info.ref])
    return {"ref": result.ref, "dataset": name, "version": result.version, "input": info.ref,
            "rows_in": counts["rows_in"], "rows_kept": counts["rows_kept"], "rows_dropped": counts["rows_dropped"],
            "rows_flipped": counts["rows_flipped"], "review": facts,
            "unchanged": bool(getattr(result, "unchanged", False))}
