"""Parse and validate structured (JSON) replies without a jsonschema dependency.

Covers the schema subset that structured-output engines (OpenAI strict mode, xgrammar)
enforce: type, properties, required, additionalProperties, items, enum, const, anyOf.
A reply that fails here is retried by the backend and finally kept raw with status
``parse_error`` -- never dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "number": (int, float),
    "integer": (int,),
    "boolean": (bool,),
    "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if name in ("number", "integer") and isinstance(value, bool):
        return False  # bool is an int subclass in Python, not a JSON number
    if name == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES.get(name, (object,)))


def validate(value: Any, schema: dict[str, Any], path: str = "$") -> str | None:
    """Return the first violation as a readable message, or None when valid."""
    if "anyOf" in schema:
        errors = [validate(value, s, path) for s in schema["anyOf"]]
        if all(errors):
            return f"{path}: matches none of anyOf ({errors[0]})"
    t = schema.get("type")
    if t is not None:
        names = t if isinstance(t, list) else [t]
        if not any(_type_ok(value, n) for n in names):
            return f"{path}: expected {t}, got {type(value).__name__}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{path}: {value!r} not in enum {schema['enum']}"
    if "const" in schema and value != schema["const"]:
        return f"{path}: expected const {schema['const']!r}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in schema.get("required", []):
            if name not in value:
                return f"{path}: missing required property {name!r}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            if extra:
                return f"{path}: unexpected properties {sorted(extra)}"
        for name, sub in props.items():
            if name in value:
                err = validate(value[name], sub, f"{path}.{name}")
                if err:
                    return err
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            err = validate(item, schema["items"], f"{path}[{i}]")
            if err:
                return err
    return None


def parse_json_reply(text: str, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """Parse ``text`` as JSON (tolerating a ```json fence) and validate it against ``schema``.

    Returns ``(obj, None)`` on success and ``(None, error)`` otherwise.
    """
    m = _FENCE.match(text)
    candidate = m.group(1) if m else text
    try:
        obj = json.loads(candidate)
    except (json.JSONDecodeError, TypeError) as e:
        return None, f"invalid JSON: {e}"
    if schema:
        err = validate(obj, schema)
        if err:
            return None, f"schema violation: {err}"
    return obj, None
