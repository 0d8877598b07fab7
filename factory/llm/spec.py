"""Backend specs: the one-string form the CLI and recipes use to name a backend.

Syntax::

    KIND:MODEL[?key=value&key=value...]

    openai:gpt-4o-mini
    openai:gpt-4o-mini?concurrency=64&rpm=5000&tpm=2000000&max_cost=5
    openai:Qwen/Qwen2.5-7B-Instruct?base_url=http://localhost:8000/v1&concurrency=128
    openai:llama3?base_url=http://localhost:11434/v1&api_key_env=OLLAMA_KEY
    vllm:Qwen/Qwen2.5-7B-Instruct?tp=2&max_model_len=8192&gpu_memory_utilization=0.85

MODEL runs up to the first ``?`` and may contain ``/`` and ``:``. Values are URL-decoded.

openai keys: base_url, api_key_env (name of the env var holding the key; default
OPENAI_API_KEY), concurrency, rpm, tpm, timeout (s), max_retries, parse_retries,
max_cost (USD), price_in / price_out (USD per 1M tokens, override the price table),
cache (``0`` to disable, or a path to a cache file).

vllm keys: tp (tensor_parallel_size), chunk_size, max_tokens (the limit for requests that
set none; default 2048), cache, and any other key is passed to ``vllm.LLM`` (numbers and
true/false are converted).

Keys themselves are never accepted in a spec (``api_key=`` is an error): specs are stored
in lineage and shell history, keys belong in the environment.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from .base import BaseBackend
from .types import LLMError

_OPENAI_INT = {"concurrency", "max_retries", "parse_retries"}
_OPENAI_FLOAT = {"rpm", "tpm", "timeout", "max_cost", "price_in", "price_out"}
_OPENAI_STR = {"base_url", "api_key_env"}


def _scalar(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def _cache_option(value: str) -> Any:
    return False if value.lower() in ("0", "false", "off", "no") else (
        True if value.lower() in ("1", "true", "on", "yes") else value
    )


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"kind:model?a=1"`` -> ``("kind", "model", {"a": "1"})``."""
    kind, sep, rest = spec.partition(":")
    if not sep or not kind or not rest:
        raise LLMError(f"backend spec {spec!r}: expected KIND:MODEL[?key=value&...], e.g. openai:gpt-4o-mini")
    model, _, query = rest.partition("?")
    if not model:
        raise LLMError(f"backend spec {spec!r}: missing model name")
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    if "api_key" in options:
        raise LLMError(
            "backend spec must not contain api_key: put the key in an environment variable "
            "and name it with api_key_env=VAR (default OPENAI_API_KEY)"
        )
    return kind.strip().lower(), model, options


def backend_from_spec(spec: str, **overrides: Any) -> BaseBackend:
    """Build a backend from a spec string; ``overrides`` win over spec options."""
    kind, model, options = parse_spec(spec)
    if kind == "openai":
        from .openai_backend import OpenAIBackend

        kw: dict[str, Any] = {}
        price_in = price_out = None
        for k, v in options.items():
            if k in _OPENAI_INT:
                kw[k] = int(v)
            elif k == "price_in":
                price_in = float(v)
            elif k == "price_out":
                price_out = float(v)
            elif k in _OPENAI_FLOAT:
                kw[k] = float(v)
            elif k in _OPENAI_STR:
                kw[k] = v
            elif k == "cache":
                kw["cache"] = _cache_option(v)
            else:
                known = sorted(_OPENAI_INT | _OPENAI_FLOAT | _OPENAI_STR | {"cache"})
                raise LLMError(f"backend spec {spec!r}: unknown option {k!r} (known: {', '.join(known)})")
        if (price_in is None) != (price_out is None):
            raise LLMError(f"backend spec {spec!r}: give both price_in and price_out")
        if price_in is not None:
            kw["prices"] = {model: (price_in, price_out)}
        kw.update(overrides)
        return OpenAIBackend(model, **kw)
    if kind == "vllm":
        from .vllm_backend import VLLMBackend

        kw = {}
        for k, v in options.items():
            if k in ("tp", "tensor_parallel_size"):
                kw["tensor_parallel_size"] = int(v)
            elif k == "chunk_size":
                kw["chunk_size"] = int(v)
            elif k == "cache":
                kw["cache"] = _cache_option(v)
            else:
                kw[k] = _scalar(v)
        kw.update(overrides)
        return VLLMBackend(model, **kw)
    raise LLMError(f"backend spec {spec!r}: unknown backend kind {kind!r} (known: openai, vllm)")
