"""The dataset catalog: versions, lineage, tags, exports and registered reward models.

Names load on first use, so code that needs only :mod:`factory.catalog.refs` (the trainer
checking a model name on a GPU box without DuckDB, ``prefab --help``) imports no DuckDB.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FAILURE_SCHEMA": "catalog", "Catalog": "catalog", "DataFileError": "catalog",
    "StagedData": "catalog", "VersionInfo": "catalog", "load": "catalog",
    "diff": "compare", "CatalogBusy": "db", "EXPORT_FORMATS": "exporters", "export": "exporters",
    "gc": "integrity", "verify": "integrity", "Ref": "refs", "RefError": "refs", "parse_ref": "refs",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'factory.catalog' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"factory.catalog.{module}"), name)
    globals()[name] = value
    return value
