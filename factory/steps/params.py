"""Typed step parameters: one dataclass per step gives parsing, validation, help and hashing.

A step declares its parameters as a frozen dataclass whose fields use :func:`param`::

    @dataclass(frozen=True)
    class DedupParams:
        near_threshold: float = param(0.85, "Jaccard estimate at or above which a row is a near duplicate",
                                      low=0.0, high=1.0, decision=True)

From that one declaration come ``--set key=value`` parsing (:func:`parse_settings`), the
``--help`` text (:func:`describe`), recipe validation and the parameter hash that keys
provenance and the score cache. ``decision=True`` marks a threshold: changing it re-decides
from stored scores instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from schemas.errors import PrefabError


class ParamError(PrefabError):
    """A step parameter that is unknown, of the wrong type or out of range."""


_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    help: str = "",  # noqa: A002 - reads naturally at the declaration site
    *,
    low: float | None = None,
    high: float | None = None,
    decision: bool = False,
    ref: bool = False,
    model: bool = False,
) -> Any:
    """A dataclass field with the metadata that ``--help`` and validation read.

    ``ref=True`` marks dataset refs or file paths (a string or a list of them): the runner
    pins them (``name`` -> ``name@N``, a file -> its path, size and mtime) before hashing,
    so a new version of a referenced set never reuses scores made against the old one.
    ``model=True`` marks a reward model (a registered ``name``, ``name@N`` or a model
    folder): it is pinned the same way (``rm`` -> ``rm@3``, a folder -> its files' size and
    mtime), so a retrained model never reuses results of the old one.
    Mutable defaults (lists, dicts) are copied per instance.
    """
    metadata = {"help": help, "low": low, "high": high, "decision": decision, "ref": ref,
                "model": model}
    if isinstance(default, list | dict | set):
        frozen = json.loads(json.dumps(default)) if not isinstance(default, set) else sorted(default)
        return dataclasses.field(default_factory=lambda: type(default)(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    name: str
    type_name: str
    default: Any
    help: str
    decision: bool
    required: bool


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields_of(cls: type) -> list[ParamInfo]:
    hints = _hints(cls)
    infos = []
    for f in dataclasses.fields(cls):
        if f.default is not _MISSING:
            default = f.default
        elif f.default_factory is not _MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = _MISSING
        infos.append(ParamInfo(
            name=f.name, type_name=_type_name(hints[f.name]), default=default,
            help=f.metadata.get("help", ""), decision=bool(f.metadata.get("decision")),
            required=default is _MISSING,
        ))
    return infos


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (optional)"
    if origin is list:
        (inner,) = typing.get_args(tp) or (str,)
        return f"list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, step: str) -> Any:
    """Turn a CLI string (or a recipe/JSON value) into ``tp``; raise naming the key."""

    def fail(expected: str) -> ParamError:
        return ParamError(f"{step}: parameter {key!r} expects {expected}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _coerce(value, args[0], key, step)
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise fail("one of " + ", ".join(repr(c) for c in choices))
    if origin is list:
        (inner,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise fail(f"a JSON list ({exc.msg})") from None
            else:  # comma-separated; use a JSON list for items that contain commas or spaces
                value = [item.strip() for item in text.split(",") if item.strip()] if text else []
        if not isinstance(value, list | tuple):
            raise fail("a list")
        return [_coerce(item, inner, key, step) for item in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise fail("true or false")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise fail("an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise fail("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise fail("a number") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise fail("a string")
    return value


def build_params(cls: type, values: Mapping[str, Any], *, step: str) -> Any:
    """An instance of ``cls`` from raw values, validated; errors name the step and key."""
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        names = ", ".join(sorted(known)) or "none"
        raise ParamError(f"{step}: unknown parameter {unknown[0]!r} (known: {names})")
    coerced = {k: _coerce(v, hints[k], k, step) for k, v in values.items()}
    for name, f in known.items():
        if name not in coerced and f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
            raise ParamError(f"{step}: parameter {name!r} is required (--set {name}=...)")
    for name, value in coerced.items():
        low, high = known[name].metadata.get("low"), known[name].metadata.get("high")
        if isinstance(value, int | float) and not isinstance(value, bool):
            if low is not None and value < low:
                raise ParamError(f"{step}: parameter {name!r} must be >= {low}, got {value}")
            if high is not None and value > high:
                raise ParamError(f"{step}: parameter {name!r} must be <= {high}, got {value}")
    try:
        instance = cls(**coerced)
    except (ValueError, TypeError) as exc:  # a __post_init__ check: it names the key itself
        raise ParamError(f"{step}: {exc}") from None
    return instance


def parse_settings(items: Iterable[str]) -> dict[str, str]:
    """``["a=1", "b=x,y"]`` -> ``{"a": "1", "b": "x,y"}``; a malformed item fails naming it."""
    settings: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamError(f"--set expects KEY=VALUE, got {item!r}")
        key = key.strip()
        if key in settings:
            raise ParamError(f"--set {key} given twice")
        settings[key] = value
    return settings


def ref_fields(params: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(params) if f.metadata.get("ref")]


def model_fields(params: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(params) if f.metadata.get("model")]


def as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def params_hash(params: Any) -> str:
    """A stable hash of the parameter values (provenance; step keys use :mod:`factory.steps.identity`)."""
    text = json.dumps(as_dict(params), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def describe(cls: type) -> list[str]:
    """One line per parameter: name, type, default and its help."""
    lines = []
    for info in fields_of(cls):
        default = "required" if info.required else f"default {json.dumps(info.default, ensure_ascii=False)}"
        kind = ", threshold" if info.decision else ""
        lines.append(f"{info.name} ({info.type_name}, {default}{kind}): {info.help}".rstrip(": "))
    return lines
