"""Request and response types shared by every LLM backend.

A :class:`Request` is everything that determines a model's answer (messages, sampling
parameters, ``n``, seed, sample index, optional JSON schema); its :meth:`Request.key`
is the request-cache key. A :class:`Response` always comes back, also for failures:
``status`` says what happened, so no row is ever dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from schemas.errors import PrefabError

Message = dict[str, Any]

# Statuses. OK, PARSE_ERROR and TRUNCATED are final answers from the model and are cached.
# TRUNCATED: a choice stopped at the token limit (finish_reason "length"). It is cached
# because it *is* the answer for those parameters (max_tokens is part of the key, so a
# larger limit is a new request); it is never OK, so callers and progress counts see it.
OK = "ok"
PARSE_ERROR = "parse_error"
TRUNCATED = "truncated"
ERROR = "error"
TIMEOUT = "timeout"
BUDGET_EXCEEDED = "budget_exceeded"
CANCELLED = "cancelled"
CACHEABLE_STATUSES = frozenset({OK, PARSE_ERROR, TRUNCATED})
STATUSES = (OK, PARSE_ERROR, TRUNCATED, ERROR, TIMEOUT, BUDGET_EXCEEDED, CANCELLED)

# 2: keys include the backend (kind and output-changing engine settings).
CACHE_KEY_VERSION = 2


@dataclass(frozen=True)
class SamplingParams:
    """Decoding parameters. ``None`` means "the server's/engine's default"."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    # Backend-specific extras (e.g. ``top_k``, ``repetition_penalty``); part of the cache key.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if v is not None and k != "extra"}
        if "stop" in d:
            d["stop"] = list(d["stop"])
        if self.extra:
            d["extra"] = dict(self.extra)
        return d


@dataclass
class Request:
    """One chat request.

    ``sample_index`` distinguishes repeated draws of the same prompt (it is part of the
    cache key, and when ``seed`` is set the seed sent is ``seed + sample_index`` so each
    draw is reproducible yet different).
    """

    messages: list[Message]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    sample_index: int = 0
    seed: int | None = None
    json_schema: dict[str, Any] | None = None
    schema_name: str = "response"

    @property
    def effective_seed(self) -> int | None:
        return None if self.seed is None else self.seed + self.sample_index

    def key_payload(self, model: str, backend: dict[str, Any] | None = None) -> dict[str, Any]:
        return {
            "v": CACHE_KEY_VERSION,
            "backend": backend or {},
            "model": model,
            "messages": self.messages,
            "params": self.params.to_dict(),
            "n": self.n,
            "seed": self.seed,
            "sample_index": self.sample_index,
            "json_schema": self.json_schema,
        }

    def key(self, model: str, backend: dict[str, Any] | None = None) -> str:
        """Stable content hash: same backend settings + model + request -> same key, in any
        process. ``backend`` is :meth:`BaseBackend.cache_identity` (kind and the engine
        settings that change answers), so two backends never share entries they would
        answer differently."""
        blob = json.dumps(
            self.key_payload(model, backend), sort_keys=True, separators=(",", ":"),
            ensure_ascii=False, default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class Choice:
    text: str
    parsed: Any = None
    finish_reason: str | None = None


@dataclass
class Response:
    """The outcome of one request; ``status`` is always set."""

    status: str
    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_s: float = 0.0
    attempts: int = 0
    error: str | None = None
    http_status: int | None = None
    model: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def text(self) -> str | None:
        return self.choices[0].text if self.choices else None

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.choices]

    @property
    def parsed(self) -> Any:
        return self.choices[0].parsed if self.choices else None

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason if self.choices else None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> str:
        # Hand-rolled instead of dataclasses.asdict: this runs once per result on the hot path.
        d = {
            "status": self.status,
            "choices": [
                {"text": c.text, "parsed": c.parsed, "finish_reason": c.finish_reason}
                for c in self.choices
            ],
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
            "latency_s": self.latency_s,
            "attempts": self.attempts,
            "error": self.error,
            "http_status": self.http_status,
            "model": self.model,
        }
        return json.dumps(d, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, blob: str, *, cached: bool = False) -> Response:
        d = json.loads(blob)
        d["choices"] = [Choice(**c) for c in d.get("choices", [])]
        return cls(**d, cached=cached)


class LLMError(PrefabError):
    """Base class for configuration/usage errors of the LLM layer (not per-request failures)."""


class BudgetExceededError(LLMError):
    """Raised before a run whose estimated cost exceeds ``max_cost``."""


class MissingDependencyError(LLMError, ImportError):
    pass


class CacheLockedError(LLMError):
    pass
