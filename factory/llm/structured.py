"""Parse and validate structured (JSON) replies without a jsonschema dependency.

Covers the schema subset that structured-output engines (OpenAI strict mode, xgrammar)
enforce: type, properties, required, additionalProperties, items, enum, const, anyOf.
A reply that fails here is retried by the backend and finally kept raw with status
``parse_error`` -- never dropped.

It also decides whether a schema may be sent to OpenAI with ``strict: true``
(:func:`strict_json_schema`). Strict mode accepts only a subset of JSON Schema and answers
anything else with HTTP 400, so a schema outside it is sent non-strict (the model is asked
to follow it, and the reply is validated here like any other).
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


# OpenAI structured outputs, strict mode ("Supported schemas" in the OpenAI guide): these
# types and keywords only; the root is an object, not anyOf; every object sets
# additionalProperties: false and lists every property in required (optional fields are
# spelled as a union with null); at most 5000 properties and 10 levels of nesting.
STRICT_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
    "$ref", "$defs", "definitions", "description", "title",
    "pattern", "format",  # strings
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",  # numbers
    "minItems", "maxItems",  # arrays
})
STRICT_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
)
STRICT_MAX_PROPERTIES = 5000
STRICT_MAX_DEPTH = 10


def _is_object_schema(schema: dict[str, Any]) -> bool:
    t = schema.get("type")
    return t == "object" or (isinstance(t, list) and "object" in t) or "properties" in schema


def _subschemas(schema: dict[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """``(path step, sub-schema)`` for every place a schema can hold one."""
    out: list[tuple[tuple[str, ...], Any]] = []
    for defs in ("$defs", "definitions"):
        out += [((defs, name), sub) for name, sub in (schema.get(defs) or {}).items()]
    props = schema.get("properties")
    if isinstance(props, dict):
        out += [(("properties", name), sub) for name, sub in props.items()]
    if "items" in schema:
        out.append((("items",), schema["items"]))
    if isinstance(schema.get("anyOf"), list):
        out += [(("anyOf", str(i)), sub) for i, sub in enumerate(schema["anyOf"])]
    return out


def _strict_problem_at(schema: Any, ctx: tuple[str, ...], depth: int, count: list[int]) -> str | None:
    """``depth``: objects enclosing this schema; ``count``: properties seen so far."""
    where = f"In context={ctx!r}, "
    if not isinstance(schema, dict):
        return where + "schema must be a JSON object."
    for keyword in schema:
        if keyword not in STRICT_KEYWORDS:
            return where + f"'{keyword}' is not permitted."
    types = schema.get("type")
    for t in types if isinstance(types, list) else [] if types is None else [types]:
        if t not in STRICT_TYPES:
            return where + f"type '{t}' is not supported."
    if "format" in schema and schema["format"] not in STRICT_FORMATS:
        return where + f"format '{schema['format']}' is not supported."
    if "$ref" in schema and not str(schema["$ref"]).startswith("#"):
        return where + "only local references ('#...') are supported."
    if _is_object_schema(schema):
        depth += 1
        if depth > STRICT_MAX_DEPTH:
            return where + f"objects are nested more than {STRICT_MAX_DEPTH} levels deep."
        if schema.get("additionalProperties") is not False:
            return where + "'additionalProperties' is required to be supplied and to be false."
        props = schema.get("properties") or {}
        required = schema.get("required")
        missing = [k for k in props if not isinstance(required, list) or k not in required]
        if missing:
            return where + ("'required' is required to be supplied and to be an array including "
                            f"every key in properties. Missing '{missing[0]}'.")
        extra = [k for k in required or [] if k not in props]
        if extra:
            return where + f"Extra required key '{extra[0]}' supplied."
        count[0] += len(props)
        if count[0] > STRICT_MAX_PROPERTIES:
            return where + f"the schema has more than {STRICT_MAX_PROPERTIES} properties."
    for step, sub in _subschemas(schema):
        problem = _strict_problem_at(sub, (*ctx, *step), depth, count)
        if problem:
            return problem
    return None


def strict_schema_problem(schema: Any) -> str | None:
    """Why OpenAI would refuse ``schema`` in strict mode (an API-style message), or None."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return "In context=(), the root schema must be of type 'object'."
    if "anyOf" in schema:
        return "In context=(), the root schema must not use 'anyOf'."
    return _strict_problem_at(schema, (), 0, [0])


def _close_objects(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if _is_object_schema(out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for defs in ("$defs", "definitions", "properties"):
        if isinstance(out.get(defs), dict):
            out[defs] = {k: _close_objects(v) for k, v in out[defs].items()}
    if "items" in out:
        out["items"] = _close_objects(out["items"])
    if isinstance(out.get("anyOf"), list):
        out["anyOf"] = [_close_objects(v) for v in out["anyOf"]]
    return out


def strict_json_schema(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """``(schema to send, strict)`` for an OpenAI ``response_format``.

    The one rewrite made is lossless: an object that does not mention
    ``additionalProperties`` gets ``false`` -- strict decoding then returns exactly the
    declared fields, and every such reply is valid under the original schema. Anything that
    would change which replies are wanted (making optional fields required or nullable,
    dropping unsupported keywords such as ``minLength``) is not done: such a schema is sent
    unchanged and non-strict.
    """
    closed = _close_objects(schema)
    if strict_schema_problem(closed) is None:
        return closed, True
    return schema, False


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
