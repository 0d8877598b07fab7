"""The dataset catalog: versions, lineage, tags, exports and registered reward models."""

from factory.catalog.catalog import (
    FAILURE_SCHEMA,
    Catalog,
    DataFileError,
    StagedData,
    VersionInfo,
    load,
)
from factory.catalog.compare import diff
from factory.catalog.db import CatalogBusy
from factory.catalog.exporters import EXPORT_FORMATS, export
from factory.catalog.integrity import gc, verify
from factory.catalog.refs import Ref, RefError, parse_ref

__all__ = [
    "EXPORT_FORMATS",
    "FAILURE_SCHEMA",
    "Catalog",
    "CatalogBusy",
    "DataFileError",
    "Ref",
    "RefError",
    "StagedData",
    "VersionInfo",
    "diff",
    "export",
    "gc",
    "load",
    "parse_ref",
    "verify",
]
