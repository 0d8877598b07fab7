"""The reader registry: a new input format is one module plus one decorator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.pairs import Pair
from schemas.readers.base import Record, RowContext

RowParser = Callable[[Record, RowContext], Pair]


@dataclass(frozen=True)
class ReaderSpec:
    name: str
    parse: RowParser
    containers: tuple[str, ...]
    description: str
    # Given the first record of a file, does it have this format's shape?
    sniff: Callable[[Any], bool] | None = None
    accepts_column_map: bool = False


READERS: dict[str, ReaderSpec] = {}


def register_reader(
    name: str,
    *,
    containers: tuple[str, ...],
    description: str,
    sniff: Callable[[Any], bool] | None = None,
    accepts_column_map: bool = False,
) -> Callable[[RowParser], RowParser]:
    def decorate(parse: RowParser) -> RowParser:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        READERS[name] = ReaderSpec(name, parse, containers, description, sniff, accepts_column_map)
        return parse

    return decorate
