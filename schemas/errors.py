"""Errors that reach the user as one line: what was wrong and where (file, line, field)."""

from __future__ import annotations


class PrefabError(Exception):
    """Base of every error prefab reports to the user as a single line."""


class InputError(PrefabError):
    """Bad input data, located as precisely as the format allows."""

    def __init__(
        self,
        reason: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.file = file
        self.line = line
        self.field = field
        super().__init__(self.location_prefix() + reason)

    def location_prefix(self) -> str:
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if self.line is not None:
            parts.append(f"line {self.line}")
        if self.field is not None:
            parts.append(f"field {self.field!r}")
        return (", ".join(parts) + ": ") if parts else ""
