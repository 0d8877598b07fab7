"""LLM backends for generators and judges.

One interface (:class:`Backend`): a batch of :class:`Request` in, one :class:`Response`
per request out -- streamed in completion order by ``stream``/``astream`` or collected in
input order by ``run_batch``. Every backend shares a persistent DuckDB request cache, so
a crashed or interrupted run resumes without re-sending completed requests.

    from factory.llm import Request, SamplingParams, backend_from_spec
    backend = backend_from_spec("openai:gpt-4o-mini?concurrency=32&max_cost=2")
    responses = backend.run_batch([Request([{"role": "user", "content": "hi"}],
                                           SamplingParams(max_tokens=64))])

See :mod:`factory.llm.spec` for the spec syntax and :mod:`factory.llm.testing` for the
loopback server used by tests and benchmarks.
"""

from .base import Backend, BaseBackend, backend_identity
from .cache import RequestCache, default_cache_path
from .pricing import DEFAULT_PRICES, Price, PriceTable
from .spec import backend_from_spec, parse_spec
from .stopping import StopRequest
from .types import (
    BUDGET_EXCEEDED,
    CANCELLED,
    ERROR,
    OK,
    PARSE_ERROR,
    STATUSES,
    TIMEOUT,
    TRUNCATED,
    BudgetExceededError,
    CacheLockedError,
    Choice,
    LLMError,
    Message,
    MissingDependencyError,
    Request,
    Response,
    SamplingParams,
)


def __getattr__(name: str):
    # Backends import heavy clients (openai/httpx, vllm) only when asked for.
    if name == "OpenAIBackend":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend
    if name == "VLLMBackend":
        from .vllm_backend import VLLMBackend

        return VLLMBackend
    raise AttributeError(name)


__all__ = [
    "BUDGET_EXCEEDED", "CANCELLED", "DEFAULT_PRICES", "ERROR", "OK", "PARSE_ERROR", "STATUSES",
    "TIMEOUT", "TRUNCATED", "Backend", "BaseBackend", "BudgetExceededError", "CacheLockedError", "Choice",
    "LLMError", "Message", "MissingDependencyError", "OpenAIBackend", "Price", "PriceTable",
    "Request", "RequestCache", "Response", "SamplingParams", "StopRequest", "VLLMBackend",
    "backend_from_spec", "backend_identity",
    "default_cache_path", "parse_spec",
]
