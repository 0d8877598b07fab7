"""Canonical row types, readers for external formats and row-level validation.

Depends on nothing else of prefab's.
"""

from schemas.errors import InputError, PrefabError
from schemas.pairs import (
    PAIR_COLUMNS,
    PAIR_SCHEMA,
    Message,
    Pair,
    Provenance,
    conform,
    content_ids,
    empty_pair_table,
    pair_id_of,
    pairs_to_table,
    prompt_id_of,
)
from schemas.rows import RUBRIC_SCHEMA, TRAJECTORY_SCHEMA

__all__ = [
    "PAIR_COLUMNS",
    "PAIR_SCHEMA",
    "RUBRIC_SCHEMA",
    "TRAJECTORY_SCHEMA",
    "InputError",
    "Message",
    "Pair",
    "PrefabError",
    "Provenance",
    "conform",
    "content_ids",
    "empty_pair_table",
    "pair_id_of",
    "pairs_to_table",
    "prompt_id_of",
]
