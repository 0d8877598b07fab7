"""Spec parsing, pricing, rate limiting, structured parsing, the scripted backend."""

from __future__ import annotations

import asyncio
import time

import pytest

from factory.llm import (
    OK,
    PARSE_ERROR,
    LLMError,
    OpenAIBackend,
    PriceTable,
    Request,
    SamplingParams,
    backend_from_spec,
    parse_spec,
)
from factory.llm.pricing import estimate_cost
from factory.llm.ratelimit import Budget, TokenBucket
from factory.llm.structured import parse_json_reply, strict_json_schema, strict_schema_problem
from factory.llm.testing import ScriptedBackend


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFAB_HOME", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-unit")


def test_parse_spec_keeps_slashes_and_colons_in_model():
    assert parse_spec("openai:qwen2.5:7b?base_url=http://h:11434/v1&concurrency=8") == (
        "openai", "qwen2.5:7b", {"base_url": "http://h:11434/v1", "concurrency": "8"})
    assert parse_spec("vllm:org/model") == ("vllm", "org/model", {})
    for bad in ("openai", "openai:", ":m", "openai:?x=1"):
        with pytest.raises(LLMError):
            parse_spec(bad)


def test_backend_from_spec_openai_options():
    b = backend_from_spec("openai:gpt-4o-mini?base_url=http://127.0.0.1:9/v1&concurrency=64"
                          "&rpm=600&tpm=100000&timeout=30&max_retries=3&max_cost=2.5"
                          "&price_in=1&price_out=3&cache=0")
    assert isinstance(b, OpenAIBackend)
    assert (b.base_url, b.concurrency, b.rpm, b.tpm, b.timeout, b.max_retries) == (
        "http://127.0.0.1:9/v1", 64, 600.0, 100000.0, 30.0, 3)
    assert b.budget.max_cost == 2.5 and b.cache is None
    assert b.price.input_per_m == 1 and b.price.output_per_m == 3
    with pytest.raises(LLMError, match="unknown option 'concurency'"):
        backend_from_spec("openai:m?base_url=http://x/v1&concurency=3")
    with pytest.raises(LLMError, match="unknown backend kind"):
        backend_from_spec("anthropic:claude")
    with pytest.raises(LLMError, match="both price_in and price_out"):
        backend_from_spec("openai:m?base_url=http://x/v1&price_in=1")


def test_price_table_prefix_match_and_override():
    t = PriceTable({"my-model": (1.0, 2.0)})
    assert t.get("gpt-4o-mini-2024-07-18") == t.get("gpt-4o-mini")
    assert t.get("gpt-4o-2024-08-06").input_per_m == t.get("gpt-4o").input_per_m
    assert t.get("my-model").cost(1_000_000, 500_000) == pytest.approx(2.0)
    assert t.get("unknown") is None
    reqs = [Request([{"role": "user", "content": "x" * 400}], SamplingParams(max_tokens=100), n=2)]
    # 400 chars ~ 100 tokens + overhead; completion bound = 2 x 100
    assert estimate_cost(reqs, t.get("my-model"), "my-model") == pytest.approx(
        (105 * 1.0 + 200 * 2.0) / 1e6)


def test_budget_reservations():
    b = Budget(1.0)
    assert b.try_reserve(0.6)
    assert not b.try_reserve(0.6) and b.closed  # would overshoot: closes for everyone
    b.settle(0.6, 0.5)
    assert b.spent == 0.5 and b.reserved == 0.0
    assert Budget(None).try_reserve(1e9)


def test_token_bucket_rate():
    async def go() -> float:
        bucket = TokenBucket(per_minute=600)  # 10/s, burst 10
        t0 = time.monotonic()
        for _ in range(25):
            await bucket.acquire()
        return time.monotonic() - t0

    elapsed = asyncio.run(go())
    assert 1.3 < elapsed < 2.0


@pytest.mark.parametrize(
    "text, ok",
    [('{"a": 1}', True), ('```json\n{"a": 1}\n```', True), ('{"a": "1"}', False),
     ('{"a": 1, "b": 2}', False), ("{}", False), ("not json", False), ('{"a": true}', False)],
)
def test_parse_json_reply(text, ok):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    obj, err = parse_json_reply(text, schema)
    assert (err is None) == ok and ((obj == {"a": 1}) if ok else obj is None)


def test_scripted_backend_for_generator_tests():
    b = ScriptedBackend(lambda r: '{"a": 1}' if r.json_schema else r.messages[-1]["content"].upper())
    out = b.run_batch([Request([{"role": "user", "content": "hi"}]),
                       Request([{"role": "user", "content": "j"}], json_schema={"type": "object"}),
                       Request([{"role": "user", "content": "k"}], json_schema={"type": "array"})])
    assert [r.status for r in out] == [OK, OK, PARSE_ERROR]
    assert out[0].text == "HI" and out[1].parsed == {"a": 1}


def _obj(props: dict, **kw) -> dict:
    return {"type": "object", "properties": props, "required": list(props),
            "additionalProperties": False, **kw}


def _nested(levels: int) -> dict:
    schema = _obj({"leaf": {"type": "string"}})
    for _ in range(levels - 1):
        schema = _obj({"child": schema})
    return schema


# Expectations written from OpenAI's "Supported schemas" rules for strict mode.
@pytest.mark.parametrize("schema", [
    _obj({"a": {"type": "string"}}),
    _obj({"a": {"type": ["string", "null"]}, "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]}}),
    _obj({"e": {"type": "string", "enum": ["A", "B"]}, "c": {"const": "x"},
          "d": {"type": "string", "format": "date-time", "pattern": "^[0-9]+"},
          "n": {"type": "number", "minimum": 0, "maximum": 1, "description": "a score"},
          "l": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}}),
    _obj({"p": {"$ref": "#/$defs/P"}}, **{"$defs": {"P": _obj({"x": {"type": "integer"}})}}),
    _obj({"kids": {"type": "array", "items": {"$ref": "#"}}}),  # recursion
    _nested(10),
])
def test_strict_mode_accepts(schema):
    assert strict_schema_problem(schema) is None
    assert strict_json_schema(schema) == (schema, True)


CLOSABLE = ("context=('properties', 'o'), 'additionalProperties'",
            "context=('$defs', 'P'), 'additionalProperties'")


@pytest.mark.parametrize("schema, problem", [
    ({"type": "array", "items": {"type": "string"}}, "root schema must be of type 'object'"),
    ({"type": "object", "anyOf": [_obj({"a": {"type": "string"}})]}, "must not use 'anyOf'"),
    (_obj({"a": {"type": "string"}}, additionalProperties=True), "'additionalProperties' is required"),
    ({**_obj({"a": {"type": "string"}, "b": {"type": "string"}}), "required": ["a"]}, "Missing 'b'"),
    ({**_obj({"a": {"type": "string"}}), "required": ["a", "z"]}, "Extra required key 'z'"),
    (_obj({"o": {"type": "object", "properties": {"x": {"type": "string"}}, "required": ["x"]}}),
     "context=('properties', 'o'), 'additionalProperties'"),
    (_obj({"p": {"$ref": "#/$defs/P"}}, **{"$defs": {"P": {"type": "object", "properties": {}}}}),
     "context=('$defs', 'P'), 'additionalProperties'"),
    (_obj({"a": {"type": "string", "minLength": 1}}), "'minLength' is not permitted"),
    (_obj({"a": {"type": "string", "default": "x"}}), "'default' is not permitted"),
    (_obj({"a": {"oneOf": [{"type": "string"}]}}), "'oneOf' is not permitted"),
    (_obj({"a": {"allOf": [{"type": "string"}]}}), "'allOf' is not permitted"),
    (_obj({"a": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}),
     "'uniqueItems' is not permitted"),
    (_obj({"a": {"type": "string", "format": "uri"}}), "format 'uri' is not supported"),
    (_obj({"a": {"type": "any"}}), "type 'any' is not supported"),
    (_obj({"a": {"type": "object", "patternProperties": {}, "additionalProperties": False}}),
     "'patternProperties' is not permitted"),
    (_nested(11), "nested more than 10 levels"),
])
def test_strict_mode_refuses(schema, problem):
    assert problem in strict_schema_problem(schema)
    sent, strict = strict_json_schema(schema)
    if problem in CLOSABLE:  # only additionalProperties was missing: closed, made strict
        assert strict and strict_schema_problem(sent) is None
    else:
        assert (sent, strict) == (schema, False)  # sent unchanged, non-strict


def test_strict_json_schema_closes_objects_without_touching_the_original():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}}},
              "required": ["a"]}
    sent, strict = strict_json_schema(schema)
    assert strict and sent["additionalProperties"] is False
    assert sent["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema and "additionalProperties" not in schema["properties"]["a"]
