"""Backend for any OpenAI-compatible chat endpoint (OpenAI, ``vllm serve``, SGLang,
llama.cpp server, Ollama) through the official ``openai.AsyncOpenAI`` client.

What it adds over calling the client in a loop:

* bounded concurrency with a fixed pool of workers (a slow request never holds up the
  others, unlike batch-and-wait), optional RPM/TPM token buckets;
* its own retry loop (the client's is switched off) with exponential backoff and jitter,
  honouring ``retry-after``/``retry-after-ms`` on 429/503, retrying 408/409/5xx, timeouts
  and connection errors, and giving an explicit error status after ``max_retries``;
* structured outputs: ``response_format`` json_schema, ``strict`` only for schemas that
  OpenAI's strict mode accepts (:func:`~factory.llm.structured.strict_json_schema`); a
  reply that does not parse or validate is retried up to ``parse_retries`` times, then
  kept raw as ``parse_error``;
* a reply cut at the token limit (``finish_reason="length"``) ends as ``truncated``, not
  ``ok``, and is not retried (the same limit would cut it again);
* ``max_completion_tokens`` instead of ``max_tokens`` for the models that refuse the
  latter (o-series reasoning models, gpt-5 family);
* token and cost accounting (:mod:`factory.llm.pricing`) and a budget: ``max_cost``
  refuses a run whose estimate exceeds it and stops a run that reaches it (remaining
  requests end as ``budget_exceeded``; finished ones are cached);
* a graceful stop (:mod:`factory.llm.stopping`): on the first Ctrl+C/SIGTERM no worker
  takes another request and no new attempt starts, while the attempts already on the wire
  finish (each bounded by ``timeout``) and are cached. A request whose retry was pending
  (sleeping in backoff or waiting for a rate limiter) is not retried: it ends as
  ``cancelled``, which is not cached, so the rerun retries it -- a backoff can last up to
  ``backoff_max`` (or a server's ``retry-after``), too long to hold a stop for. Requests
  never taken have no result and are not in the cache: a rerun sends exactly those.

The API key is read from an environment variable only (``OPENAI_API_KEY`` unless
``api_key_env`` names another); it is never logged, never part of a cache key or cache
row, and redacted from error messages.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx2
import openai

from .base import BaseBackend, classify_reply
from .cache import RequestCache
from .pricing import Price, PriceTable, estimate_cost, estimate_tokens
from .ratelimit import Budget, TokenBucket
from .stopping import StopRequest
from .structured import strict_json_schema
from .types import (
    BUDGET_EXCEEDED,
    CACHEABLE_STATUSES,
    CANCELLED,
    ERROR,
    PARSE_ERROR,
    TIMEOUT,
    BudgetExceededError,
    Choice,
    LLMError,
    Request,
    Response,
)

CHAT_PATH = "/chat/completions"
CONNECTIONS_PER_CLIENT = 32
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 120.0
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,}|Bearer\s+\S+)")
OPENAI_BASE_URL = "https://api.openai.com/v1"
# Reasoning models answer 400 "Unsupported parameter: 'max_tokens'": they take
# max_completion_tokens (which also bounds the hidden reasoning tokens).
_COMPLETION_TOKENS_MODELS = re.compile(r"^(?:openai/)?(?:o\d+|gpt-5)(?:[-.].*)?$")


def uses_max_completion_tokens(model: str) -> bool:
    """True for o1, o3-mini, o4-mini, gpt-5, gpt-5-mini, gpt-5.1... (dated snapshots too)."""
    return _COMPLETION_TOKENS_MODELS.match(model) is not None


class OpenAIBackend(BaseBackend):
    kind = "openai"

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 16,
        rpm: float | None = None,
        tpm: float | None = None,
        timeout: float = 120.0,
        max_retries: int = 5,
        parse_retries: int = 2,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_cost: float | None = None,
        prices: Mapping[str, tuple[float, float] | Price] | None = None,
        cache: RequestCache | str | os.PathLike[str] | bool | None = True,
        progress: bool | None = None,
    ):
        super().__init__(model, cache=cache, progress=progress)
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.rpm = rpm
        self.tpm = tpm
        self.timeout = timeout
        self.max_retries = max_retries
        self.parse_retries = parse_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.prices = PriceTable(prices)
        self.price = self.prices.get(model)
        self.budget = Budget(max_cost)
        self._rpm_bucket = TokenBucket(rpm) if rpm else None
        self._tpm_bucket = TokenBucket(tpm) if tpm else None

    def cache_settings(self) -> dict[str, Any]:
        # Another endpoint may serve the same model name differently (a local `vllm serve`
        # with another quantisation, another provider); concurrency, rate limits, retries and
        # timeouts change nothing in an answer, so they stay out.
        return {"base_url": (self.base_url or OPENAI_BASE_URL).rstrip("/")}

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(model={self.model!r}, base_url={self.base_url!r}, "
            f"concurrency={self.concurrency}, rpm={self.rpm}, tpm={self.tpm})"
        )

    # -- helpers --------------------------------------------------------------------------
    def _api_key(self) -> str:
        # Read at use, never kept on the object: nothing that pickles, logs or reprs the
        # backend can carry the key. Local servers (vllm serve, Ollama) ignore it.
        return os.environ.get(self.api_key_env) or "EMPTY"

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env)
        if key and len(key) >= 4:
            text = text.replace(key, "***")
        return _KEY_PATTERN.sub("***", text)

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.price.cost(prompt_tokens, completion_tokens) if self.price else 0.0

    def require_key(self) -> None:
        """The hosted API needs a key; checked when a request is about to be sent, so that a
        dry run, a cost estimate or a rerun served from the cache work without one."""
        if not os.environ.get(self.api_key_env) and (
            self.base_url is None or "api.openai.com" in self.base_url
        ):
            raise LLMError(
                f"no API key: set the environment variable {self.api_key_env} "
                "(keys are read from the environment only, never from specs or files)"
            )

    def _before_run(self, requests: list[Request]) -> None:
        if requests:
            self.require_key()
        if self.budget.max_cost is None or not requests:
            return
        est = estimate_cost(requests, self.price, self.model)
        left = self.budget.max_cost - self.budget.spent
        if est > left:
            raise BudgetExceededError(
                f"estimated cost ${est:.4f} for {len(requests)} uncached requests to "
                f"{self.model} exceeds the budget left (${left:.4f} of max_cost "
                f"${self.budget.max_cost:.4f}); raise max_cost, lower max_tokens or send fewer "
                "requests (cached requests are free)"
            )

    def _make_clients(self) -> list[openai.AsyncOpenAI]:
        # httpcore scans its whole pool on every request and release, so one pool of 256
        # connections costs more CPU than the requests themselves. Several small pools
        # (one client per CONNECTIONS_PER_CLIENT workers) keep that scan short.
        n = max(1, -(-self.concurrency // CONNECTIONS_PER_CLIENT))
        per = -(-self.concurrency // n) + 2
        limits = httpx2.Limits(max_connections=per, max_keepalive_connections=per)
        return [
            openai.AsyncOpenAI(
                api_key=self._api_key(),
                base_url=self.base_url,
                max_retries=0,  # retries are ours: backoff, budget and accounting see each attempt
                timeout=self.timeout,
                http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=self.timeout),
            )
            for _ in range(n)
        ]

    def build_kwargs(self, req: Request) -> dict[str, Any]:
        """The JSON body of ``POST /chat/completions`` for one request."""
        p = req.params
        kw: dict[str, Any] = {"model": self.model, "messages": req.messages}
        if req.n != 1:
            kw["n"] = req.n
        if p.temperature is not None:
            kw["temperature"] = p.temperature
        if p.top_p is not None:
            kw["top_p"] = p.top_p
        if p.max_tokens is not None:
            limit = "max_completion_tokens" if uses_max_completion_tokens(self.model) else "max_tokens"
            kw[limit] = p.max_tokens
        if p.stop:
            kw["stop"] = list(p.stop)
        if req.effective_seed is not None:
            kw["seed"] = req.effective_seed
        if req.json_schema is not None:
            schema, strict = strict_json_schema(req.json_schema)
            kw["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": req.schema_name, "schema": schema, "strict": strict},
            }
        if p.extra:
            kw.update(p.extra)
        return kw

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None and 0 <= retry_after <= MAX_RETRY_AFTER_S:
            # The server said when; a little jitter keeps the retries from arriving in a herd.
            return retry_after * (1.0 + 0.1 * random.random())
        delay = min(self.backoff_max, self.backoff_base * (2**attempt))
        return delay * (0.5 + 0.5 * random.random())

    @staticmethod
    def _retry_after(err: openai.APIStatusError) -> float | None:
        headers = err.response.headers if err.response is not None else {}
        for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
            value = headers.get(name)
            if value is not None:
                try:
                    return float(value) * scale
                except ValueError:
                    continue
        return None

    # -- one request, all its attempts ---------------------------------------------------
    async def _acquire_rate(self, tokens: int) -> None:
        if self._rpm_bucket is not None:
            await self._rpm_bucket.acquire(1)
        if self._tpm_bucket is not None:
            await self._tpm_bucket.acquire(tokens)

    @staticmethod
    def _stopped(last: Response | None, attempts: int) -> Response:
        if attempts == 0 or last is None:
            error = "the run was stopped before this request was sent"
        else:
            error = f"the run was stopped before retry {attempts}; last attempt: {last.error}"
        return Response(status=CANCELLED, error=error)

    async def _run_one(
        self, client: openai.AsyncOpenAI, req: Request, stop: StopRequest | None = None
    ) -> Response:
        stop = stop if stop is not None else StopRequest()
        kw = self.build_kwargs(req)
        est_prompt, est_completion = estimate_tokens(req)
        est_cost = self._cost(est_prompt, est_completion)
        t0 = time.monotonic()
        attempts = failures = parse_failures = 0
        paid_prompt = paid_completion = 0
        cost = 0.0
        last: Response | None = None
        while True:
            if stop.requested:  # a stop starts no new attempt (first one or retry)
                last = self._stopped(last, attempts)
                break
            if not self.budget.try_reserve(est_cost):
                return Response(
                    status=BUDGET_EXCEEDED, model=self.model, attempts=attempts,
                    prompt_tokens=paid_prompt, completion_tokens=paid_completion, cost=cost,
                    latency_s=time.monotonic() - t0,
                    error=f"budget reached: spent ${self.budget.spent:.4f} of max_cost "
                    f"${self.budget.max_cost:.4f}",
                )
            if self._rpm_bucket is not None or self._tpm_bucket is not None:
                # A limiter can hold a request for long: a stop must not wait for it.
                ran = await stop.race(self._acquire_rate(est_prompt + est_completion))
                if not ran or stop.requested:
                    self.budget.settle(est_cost, 0.0)
                    last = self._stopped(last, attempts)
                    break
            attempts += 1
            retry_after = None
            actual = 0.0
            try:
                # client.post is the client's documented way to send a raw body: same auth,
                # timeouts and error types as chat.completions.create, without its per-call
                # TypedDict transform and pydantic model (over half of the client's CPU cost).
                stop.in_flight += 1
                try:
                    raw = await client.post(CHAT_PATH, body=kw, cast_to=httpx2.Response)
                finally:
                    stop.in_flight -= 1
                completion = json.loads(raw.content)
                if not isinstance(completion, dict):
                    raise ValueError(f"expected a JSON object, got {type(completion).__name__}")
            except openai.APITimeoutError:
                last = Response(status=TIMEOUT, error=f"no reply within {self.timeout}s")
            except openai.APIConnectionError as e:
                last = Response(status=ERROR, error=self._redact(f"connection error: {e}"))
            except openai.APIStatusError as e:
                last = Response(
                    status=ERROR, http_status=e.status_code,
                    error=self._redact(f"HTTP {e.status_code}: {e.message}"),
                )
                if e.status_code not in RETRYABLE_STATUS:
                    failures = self.max_retries  # a 400/401/404 will not get better
                retry_after = self._retry_after(e)
            except ValueError as e:  # not a chat completion body
                last = Response(status=ERROR, error=f"malformed response body: {e}")
            else:
                usage = completion.get("usage") or {}
                pt = usage.get("prompt_tokens", est_prompt)
                ct = usage.get("completion_tokens", est_completion)
                if self._tpm_bucket is not None:
                    self._tpm_bucket.adjust(pt + ct - est_prompt - est_completion)
                paid_prompt += pt
                paid_completion += ct
                actual = self._cost(pt, ct)
                cost += actual
                # A structured-output refusal comes with content null and the model's words
                # in `refusal`: keep them, or the row's failure would read "invalid JSON".
                choices = [
                    Choice(text=(c.get("message") or {}).get("content")
                           or (c.get("message") or {}).get("refusal") or "",
                           finish_reason=c.get("finish_reason"))
                    for c in completion.get("choices") or []
                ]
                status, error = classify_reply(choices, req.json_schema)
                last = Response(status=status, choices=choices, error=error, http_status=200)
                if status == PARSE_ERROR and parse_failures < self.parse_retries:
                    parse_failures += 1
                    self.budget.settle(est_cost, actual)
                    continue  # (a stop ends it as cancelled at the top: not cached, retried later)
            self.budget.settle(est_cost, actual)
            if last.status in CACHEABLE_STATUSES or failures >= self.max_retries:
                break
            failures += 1
            if await stop.wait(self._backoff(failures - 1, retry_after)):
                last = self._stopped(last, attempts)  # a stop cuts the backoff short
                break
        last.model = self.model
        last.attempts = attempts
        last.prompt_tokens = paid_prompt
        last.completion_tokens = paid_completion
        last.cost = cost
        last.latency_s = time.monotonic() - t0
        return last

    async def _agenerate(
        self, requests: list[Request], stop: StopRequest,
        save: Callable[[int, Response], None] | None = None,
    ) -> AsyncIterator[tuple[int, Response]]:
        clients = self._make_clients()
        # (position, Response) per finished request; None when a worker exits; an exception
        # when saving a result failed (the consumer raises it).
        results: asyncio.Queue[tuple[int, Response] | Exception | None] = asyncio.Queue()
        todo = iter(enumerate(requests))

        async def worker(client: openai.AsyncOpenAI) -> None:
            try:
                # Shared iterator: each request is taken by exactly one worker. After a stop
                # nothing more is taken; what was taken finishes (see the module docstring).
                while not stop.requested:
                    item = next(todo, None)
                    if item is None:
                        return
                    j, req = item
                    try:
                        resp = await self._run_one(client, req, stop)
                    except Exception as e:  # a bug must not hang the batch or drop the row
                        resp = Response(status=ERROR, model=self.model,
                                        error=self._redact(f"{type(e).__name__}: {e}"))
                    if save is not None:
                        # Durable before this worker sends anything else: results waiting in
                        # the queue for the consumer are never lost to a kill.
                        try:
                            save(j, resp)
                        except Exception as e:  # a cache that cannot write stops the run
                            results.put_nowait(e)
                            return
                    results.put_nowait((j, resp))
            finally:
                results.put_nowait(None)

        workers = [
            asyncio.create_task(worker(clients[w % len(clients)]))
            for w in range(min(self.concurrency, len(requests)))
        ]
        try:
            running = len(workers)
            while running:
                got = await results.get()
                if got is None:
                    running -= 1
                elif isinstance(got, Exception):
                    raise got
                else:
                    yield got
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            for client in clients:
                await client.close()
