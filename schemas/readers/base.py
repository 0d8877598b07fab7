"""What every reader shares: located records, value coercion, and the read report.

A reader turns one located record (file, line, parsed JSON value) into a :class:`Pair`
or raises :class:`InputError` naming the field. The driver in ``schemas.readers`` decides
whether an error stops the read or sends the row to quarantine; readers never drop a row.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from schemas.errors import InputError
from schemas.pairs import Message

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string()),
        pa.field("line", pa.int64()),
        pa.field("field", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("raw", pa.string()),
    ]
)


@dataclass(frozen=True)
class Record:
    """One input row and where it came from (line is 1-based; for Parquet, the row number)."""

    file: str
    line: int
    value: Any
    raw: str | None = None


@dataclass
class RowContext:
    """Per-read state a reader reports into: coercions made and warnings raised."""

    file: str
    strict: bool = False
    coerced: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    # Input columns no reader field takes, with the rows that had them (kept in metadata).
    unknown_columns: Counter[str] = field(default_factory=Counter)

    def error(self, record: Record, field_name: str | None, reason: str) -> InputError:
        return InputError(reason, file=record.file, line=record.line, field=field_name)

    def warn(self, record: Record, field_name: str | None, kind: str, reason: str) -> None:
        """A quirk real data has (kept by default); ``strict`` turns it into a row error."""
        if self.strict:
            raise self.error(record, field_name, f"{reason} (rejected by --strict)")
        self.warnings[kind] += 1

    def keep_unknown(
        self, value: dict[str, Any], known: frozenset[str] | set[str], metadata: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        """Columns the format does not define go into ``metadata``, counted, never dropped.

        A name the metadata already uses is stored as ``column:NAME`` so neither is lost.
        """
        unknown = [key for key in value if key not in known]
        if not unknown:
            return metadata
        metadata = dict(metadata or {})
        for key in unknown:
            metadata[key if key not in metadata else f"column:{key}"] = value[key]
            self.unknown_columns[key] += 1
        self.warnings["unknown_columns_kept"] += 1
        return metadata

    def require(self, record: Record, obj: dict[str, Any], key: str) -> Any:
        if key not in obj:
            raise self.error(record, key, "missing field")
        if obj[key] is None:
            raise self.error(record, key, "field is null")
        return obj[key]

    def text(self, record: Record, obj: dict[str, Any], key: str, *, optional: bool = False) -> str:
        """A text field; scalars of another type are coerced (and counted), never guessed."""
        if optional and obj.get(key) is None:
            return ""
        value = self.require(record, obj, key)
        if isinstance(value, str):
            return check_decodable(self, record, key, value)
        if isinstance(value, bool | int | float):
            self.coerced[f"{key}: {type(value).__name__} -> str"] += 1
            return str(value)
        raise self.error(record, key, f"expected text, got {json_type(value)}")

    def integer(self, record: Record, obj: dict[str, Any], key: str) -> int:
        value = self.require(record, obj, key)
        if isinstance(value, bool):
            raise self.error(record, key, f"expected an integer, got boolean {value}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            self.coerced[f"{key}: float -> int"] += 1
            return int(value)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            self.coerced[f"{key}: str -> int"] += 1
            return int(value.strip())
        raise self.error(record, key, f"expected an integer, got {json_type(value)} {value!r}")

    def number(self, record: Record, obj: dict[str, Any], key: str) -> float | None:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            raise self.error(record, key, f"expected a number, got boolean {value}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise self.error(record, key, f"expected a number, got {value!r}") from None
            self.coerced[f"{key}: str -> float"] += 1
            return number
        raise self.error(record, key, f"expected a number, got {json_type(value)}")

    def flag(self, record: Record, obj: dict[str, Any], key: str) -> bool:
        value = obj.get(key)
        if value is None:
            return False
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            self.coerced[f"{key}: int -> bool"] += 1
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            self.coerced[f"{key}: str -> bool"] += 1
            return value.strip().lower() == "true"
        raise self.error(record, key, f"expected true/false, got {value!r}")

    def messages(self, record: Record, value: Any, key: str) -> list[Message]:
        """A chat: a plain string is one user turn; a list must hold {role, content} dicts."""
        if isinstance(value, str):
            return [Message("user", check_decodable(self, record, key, value))]
        if not isinstance(value, list):
            raise self.error(record, key, f"expected text or a list of messages, got {json_type(value)}")
        result = []
        for index, message in enumerate(value):
            where = f"{key}[{index}]"
            if not isinstance(message, dict):
                raise self.error(record, where, f"expected a message object, got {json_type(message)}")
            role = self.text(record, message, "role") if "role" in message else None
            if role is None:
                raise self.error(record, f"{where}.role", "missing field")
            if role not in ("system", "user", "assistant", "tool"):
                raise self.error(record, f"{where}.role", f"unknown role {role!r}")
            content = message.get("content")
            if not isinstance(content, str):
                raise self.error(record, f"{where}.content", f"expected text, got {json_type(content)}")
            result.append(Message(role, check_decodable(self, record, f"{where}.content", content)))
        return result

    def check_responses(
        self, record: Record, chosen: str, rejected: str, fields: tuple[str, str], tie: bool
    ) -> None:
        """Shared response checks. Both empty carries no signal; one empty is a real label."""
        if not chosen.strip() and not rejected.strip():
            raise self.error(record, f"{fields[0]}/{fields[1]}", "both responses are empty")
        for text, name in ((chosen, fields[0]), (rejected, fields[1])):
            if not text.strip():
                self.warn(record, name, "empty_response", "empty response")
        if chosen == rejected and not tie:
            self.warn(
                record, fields[0], "identical_responses", "chosen and rejected are identical"
            )


def check_decodable(ctx: RowContext, record: Record, key: str, value: str) -> str:
    """JSON can smuggle lone surrogates (\\ud800) that no UTF-8 file can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ctx.error(record, key, f"undecodable text ({exc.reason} at character {exc.start})") from None
    return value


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def raw_text(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)[:10_000]
    except (TypeError, ValueError):
        return repr(value)[:10_000]
