"""Dataset references: ``name`` (latest), ``name@N`` (version N) or ``name@tag``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.errors import PrefabError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class RefError(PrefabError):
    pass


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    tag: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        if self.tag is not None:
            return f"{self.name}@{self.tag}"
        return self.name


def check_name(name: str, what: str = "dataset name") -> str:
    if not NAME_PATTERN.match(name):
        raise RefError(f"invalid {what} {name!r}: use letters, digits, '_', '.', '-'")
    return name


def check_tag(tag: str) -> str:
    check_name(tag, "tag")
    if tag.isdigit():
        raise RefError(f"invalid tag {tag!r}: a tag cannot be a number (name@N means version N)")
    return tag


def parse_ref(text: str) -> Ref:
    name, _, selector = text.partition("@")
    check_name(name)
    if not selector:
        if "@" in text:
            raise RefError(f"invalid reference {text!r}: nothing after '@'")
        return Ref(name)
    if selector.isdigit():
        return Ref(name, version=int(selector))
    return Ref(name, tag=check_tag(selector))
