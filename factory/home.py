"""Where prefab keeps its state: one home folder for the catalog, caches and models."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_home(home: str | os.PathLike[str] | None = None) -> Path:
    """``home`` if given, else ``$PREFAB_HOME``, else ``./.prefab``."""
    if home is not None:
        return Path(home)
    return Path(os.environ.get("PREFAB_HOME") or ".prefab")
