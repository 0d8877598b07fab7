"""The dataset catalog: versions, lineage, tags, exports and registered reward models."""

from factory.catalog.catalog import Catalog, VersionInfo, default_home, load
from factory.catalog.db import CatalogBusy
from factory.catalog.export import EXPORT_FORMATS, export
from factory.catalog.refs import Ref, RefError, parse_ref

__all__ = [
    "EXPORT_FORMATS",
    "Catalog",
    "CatalogBusy",
    "Ref",
    "RefError",
    "VersionInfo",
    "default_home",
    "export",
    "load",
    "parse_ref",
]
