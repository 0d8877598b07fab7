"""In-process vLLM backend (GPU): ``vllm.LLM.chat`` with the model's chat template,
per-request ``SamplingParams`` (n, temperature, top_p, max_tokens, seed, stop), structured
outputs and tensor parallelism.

vllm is imported lazily -- CPU installs never need it -- and a missing install says how to
get it. Requests go to the engine in chunks of ``chunk_size`` so that results stream to
the cache as each chunk finishes: a crash loses at most one chunk of work, while vLLM
still sees batches big enough to keep the GPU busy. The first Ctrl+C/SIGTERM stops after
the current chunk (its results are cached; later chunks are not started); a second one
interrupts the engine call at once (see :mod:`factory.llm.stopping`).

Structured outputs use ``StructuredOutputsParams(json=schema)`` (vLLM >= 0.11) and fall
back to ``GuidedDecodingParams(json=schema)`` on older releases.

Every request carries an explicit ``max_tokens``: the request's own, else the backend's
``max_tokens`` (default :data:`DEFAULT_MAX_TOKENS`). ``vllm.SamplingParams`` would
otherwise stop every reply at 16 tokens. A reply that stops at the limit (or at the
model's context length) has status ``truncated``, never ``ok``.

The cache key holds the engine settings that change answers (chat template, default
max_tokens and the ``vllm.LLM`` arguments such as revision, quantization, dtype,
generation_config); those that only change speed or memory (:data:`SPEED_ONLY_ENGINE_ARGS`)
stay out, so tuning them keeps the cache.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .base import BaseBackend, classify_reply
from .cache import RequestCache
from .stopping import StopRequest
from .types import ERROR, Choice, MissingDependencyError, Request, Response

INSTALL_HINT = "the vllm backend needs vLLM and a GPU: pip install 'prefab[vllm]'"
# Long enough for a judgment with its reasoning or a chat response; a request that needs
# more says so in its SamplingParams, and one that hits the limit is marked truncated.
DEFAULT_MAX_TOKENS = 2048
# vllm.LLM arguments that change speed, memory or placement but not the answers. Every
# other argument is part of the cache key: an unknown one costs a cache miss at worst,
# while leaving out one that matters (dtype, quantization, revision...) would serve
# answers from another engine. hf_token is a credential, kept out of everything.
SPEED_ONLY_ENGINE_ARGS = frozenset({
    "gpu_memory_utilization", "swap_space", "cpu_offload_gb", "enforce_eager",
    "max_num_seqs", "max_num_batched_tokens", "max_seq_len_to_capture", "block_size",
    "enable_prefix_caching", "enable_chunked_prefill", "disable_log_stats",
    "disable_custom_all_reduce", "distributed_executor_backend", "pipeline_parallel_size",
    "download_dir", "hf_token", "served_model_name", "compilation_config",
})


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise MissingDependencyError(f"{INSTALL_HINT} ({e})") from e
    return vllm


def make_vllm_sampling_params(**kw: Any) -> Any:
    """Turn backend-neutral sampling kwargs into a ``vllm.SamplingParams``."""
    vllm = import_vllm()
    structured = kw.pop("structured_outputs", None)
    if structured is not None:
        try:
            from vllm.sampling_params import StructuredOutputsParams

            kw["structured_outputs"] = StructuredOutputsParams(**structured)
        except ImportError:  # vLLM < 0.11
            from vllm.sampling_params import GuidedDecodingParams

            kw["guided_decoding"] = GuidedDecodingParams(**structured)
    return vllm.SamplingParams(**kw)


class VLLMBackend(BaseBackend):
    kind = "vllm"

    def __init__(
        self,
        model: str,
        *,
        tensor_parallel_size: int = 1,
        chunk_size: int = 512,
        chat_template: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        engine: Any = None,
        sampling_factory: Callable[..., Any] | None = None,
        cache: RequestCache | str | os.PathLike[str] | bool | None = True,
        progress: bool | None = None,
        **engine_kwargs: Any,
    ):
        """``engine`` injects a ready ``vllm.LLM`` (or a stand-in with the same ``chat``);
        ``max_tokens`` is the limit for requests that set none; ``engine_kwargs`` go to
        ``vllm.LLM`` (max_model_len, gpu_memory_utilization, dtype...)."""
        super().__init__(model, cache=cache, progress=progress)
        self.tensor_parallel_size = tensor_parallel_size
        self.chunk_size = chunk_size
        self.chat_template = chat_template
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        self.max_tokens = max_tokens
        self.engine_kwargs = engine_kwargs
        self._engine = engine
        self._sampling_factory = sampling_factory
        if engine is None:
            import_vllm()  # fail at construction, before any work is planned around it

    @property
    def engine(self) -> Any:
        if self._engine is None:
            vllm = import_vllm()
            self._engine = vllm.LLM(
                model=self.model, tensor_parallel_size=self.tensor_parallel_size,
                **self.engine_kwargs,
            )
        return self._engine

    def cache_settings(self) -> dict[str, Any]:
        engine = {k: v for k, v in self.engine_kwargs.items() if k not in SPEED_ONLY_ENGINE_ARGS}
        return {"chat_template": self.chat_template, "max_tokens": self.max_tokens,
                "engine": engine}

    def sampling_kwargs(self, req: Request) -> dict[str, Any]:
        p = req.params
        kw: dict[str, Any] = {"n": req.n}
        for name in ("temperature", "top_p"):
            value = getattr(p, name)
            if value is not None:
                kw[name] = value
        kw["max_tokens"] = p.max_tokens if p.max_tokens is not None else self.max_tokens
        if p.stop:
            kw["stop"] = list(p.stop)
        if req.effective_seed is not None:
            kw["seed"] = req.effective_seed
        kw.update(p.extra)
        if req.json_schema is not None:
            kw["structured_outputs"] = {"json": req.json_schema}
        return kw

    def sampling_params(self, req: Request) -> Any:
        factory = self._sampling_factory or make_vllm_sampling_params
        return factory(**self.sampling_kwargs(req))

    def parse_output(self, req: Request, out: Any, latency_s: float = 0.0) -> Response:
        """One ``RequestOutput`` -> Response (token counts from the engine's token ids)."""
        choices = [
            Choice(text=o.text, finish_reason=getattr(o, "finish_reason", None)) for o in out.outputs
        ]
        status, error = classify_reply(choices, req.json_schema)
        return Response(
            status=status, choices=choices, error=error, model=self.model, attempts=1,
            prompt_tokens=len(getattr(out, "prompt_token_ids", None) or []),
            completion_tokens=sum(len(getattr(o, "token_ids", None) or []) for o in out.outputs),
            latency_s=latency_s,
        )

    def _chat(self, reqs: list[Request], params: list[Any]) -> list[Any]:
        kwargs: dict[str, Any] = {"use_tqdm": False}
        if self.chat_template is not None:
            kwargs["chat_template"] = self.chat_template
        return self.engine.chat([r.messages for r in reqs], sampling_params=params, **kwargs)

    def _run_chunk(self, reqs: list[Request]) -> list[Response]:
        # Built outside the try: a bad option or a missing vllm is a configuration error
        # that must stop the run, not turn into per-request error rows.
        params = [self.sampling_params(r) for r in reqs]
        self.engine  # noqa: B018 -- load (or fail to load) the model outside the try as well
        t0 = time.monotonic()
        try:
            outs = self._chat(reqs, params)
            latency = (time.monotonic() - t0) / max(1, len(reqs))
            return [self.parse_output(r, o, latency) for r, o in zip(reqs, outs, strict=True)]
        except Exception as e:
            if len(reqs) == 1:
                return [Response(status=ERROR, model=self.model, attempts=1,
                                 error=f"{type(e).__name__}: {e}")]
        # One bad request (too long a prompt...) fails the whole call: isolate it.
        return [self._run_chunk([r])[0] for r in reqs]

    async def _agenerate(
        self, requests: list[Request], stop: StopRequest, save: Callable[[int, Response], None]
    ) -> AsyncIterator[tuple[int, Response]]:
        # `save` is not needed: the next chunk/request starts only after the consumer has
        # taken (and the base class saved) every result yielded before it.
        for start in range(0, len(requests), self.chunk_size):
            if stop.requested:  # graceful stop: the chunks not started stay unsent
                return
            chunk = requests[start : start + self.chunk_size]
            # The engine call blocks; it runs on this thread because vLLM expects to own it.
            # `blocking` tells a second signal to interrupt it directly: a cancellation
            # would only land once the chunk is done.
            stop.waiting_for = f"the current chunk of {len(chunk)} requests"
            stop.blocking = True
            try:
                responses = self._run_chunk(chunk)
            finally:
                stop.blocking = False
                stop.waiting_for = None
            for j, resp in enumerate(responses):
                yield start + j, resp
            await asyncio.sleep(0)  # let Ctrl+C/cancellation land between chunks
