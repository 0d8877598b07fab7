"""prefab's machinery and its typed Python API.

``import factory`` stays cheap: the API functions import their modules on first use, so
the CLI and a CPU-only install never pay for torch or vllm they do not touch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> "module:attribute"
_API: dict[str, str] = {
    "Catalog": "factory.catalog:Catalog",
    "ingest": "factory.ingest:ingest",
    "generate": "factory.steps.api:generate",
    "filter": "factory.steps.api:filter",
    "train": "factory.trainer:train",
    "score": "factory.trainer:score",
    "evaluate": "factory.trainer:evaluate",
    "oof_scores": "factory.trainer:oof_scores",
    "load_model": "factory.trainer:load_model",
    "embed_texts": "factory.embed:embed_texts",
    "top_k_neighbours": "factory.embed:top_k_neighbours",
}


# subpackages reachable as attributes after a bare ``import factory`` (factory.catalog.load)
_SUBPACKAGES = ("audit", "catalog", "embed", "llm", "recipe", "steps", "trainer")


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"factory.{name}")
    target = _API.get(name)
    if target is None:
        raise AttributeError(f"module 'factory' has no attribute {name!r}")
    module_name, attribute = target.split(":")
    return getattr(importlib.import_module(module_name), attribute)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_API) + list(_SUBPACKAGES))


__all__ = list(_API)
