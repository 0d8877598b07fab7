"""Ingest: read an external file into canonical pairs and commit it as a catalog version."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from factory.catalog import Catalog
from schemas.readers import OnError, read_path


def ingest(
    path: str | Path,
    name: str,
    *,
    format: str = "auto",
    on_error: OnError = "fail",
    strict: bool = False,
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    message: str = "",
    home: str | Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Read ``path`` and commit its pairs as the next version of ``name``.

    With ``on_error="fail"`` the first bad row raises and nothing is committed; with
    ``"quarantine"`` bad rows are stored with their reason next to the version.
    """
    started = time.monotonic()
    catalog = Catalog(home)
    result = read_path(path, format, on_error=on_error, strict=strict, column_map=column_map, split=split,
                       progress=progress)
    table = _with_source(result.table, name)
    params = {"path": str(path), "format": result.format, "on_error": on_error, "strict": strict,
              "column_map": column_map or {}, "split": split}
    lineage = {
        "command": "ingest",
        "params": params,
        "rows_in": result.rows_in,
        "rows_filtered": 0,
        "rows_quarantined": result.quarantined,
        "coerced": dict(result.coerced),
        "warnings": dict(result.warnings),
        "wall_seconds": round(time.monotonic() - started, 3),
    }
    info = catalog.commit(
        name, table, message=message or f"ingest {Path(path).name}", lineage=lineage,
        quarantine=result.quarantine,
    )
    return {"dataset": name, "version": info.version, "ref": info.ref, **result.summary(),
            "committed": info.rows, "ties": int(pc.sum(table["tie"]).as_py() or 0)}


def _with_source(table: pa.Table, name: str) -> pa.Table:
    """Stamp provenance.source with the dataset the rows were ingested as."""
    provenance = table.column("provenance").combine_chunks()
    fields = {f.name: provenance.field(f.name) for f in provenance.type}
    fields["source"] = pa.array([name] * table.num_rows, pa.string())
    rebuilt = pa.StructArray.from_arrays(list(fields.values()), fields=list(provenance.type))
    return table.set_column(table.schema.get_field_index("provenance"), "provenance", rebuilt)
