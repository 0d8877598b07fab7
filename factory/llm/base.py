"""The backend protocol and the machinery every backend shares: cache lookup, in-batch
de-duplication, streaming in completion order, progress and the sync wrappers.

A backend implements one coroutine generator, ``_agenerate(requests, stop, save)``, that
yields ``(position, Response)`` as each uncached request finishes, and honours the
:class:`~factory.llm.stopping.StopRequest` it is given: once ``stop.requested`` it
dispatches nothing new, lets what is in flight finish, and returns. ``save(position,
response)`` makes a result durable at once; a backend whose results can queue up before
they are yielded (a worker pool) calls it before dispatching more work, so that a killed
run has at most one unsaved answer per worker. Whatever was not saved is saved when it is
yielded. Everything else lives here, including the signal handling of the sync wrappers
(see :mod:`factory.llm.stopping`: the first Ctrl+C/SIGTERM drains the in-flight requests
into the cache and then raises KeyboardInterrupt; a second one aborts at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .cache import RequestCache
from .progress import BatchProgress
from .stopping import StopRequest, stop_on_signals
from .structured import parse_json_reply
from .types import CACHEABLE_STATUSES, OK, PARSE_ERROR, TRUNCATED, Choice, Request, Response

CACHE_FOLD_INTERVAL_S = 2.0


@runtime_checkable
class Backend(Protocol):
    """What generators and judges program against."""

    kind: str
    model: str

    def astream(
        self, requests: Sequence[Request], *, progress: bool | None = None,
        stop: StopRequest | None = None,
    ) -> AsyncIterator[tuple[int, Response]]: ...

    def stream(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> Iterator[tuple[int, Response]]: ...

    def run_batch(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> list[Response]: ...


def classify_reply(choices: list[Choice], json_schema: dict[str, Any] | None) -> tuple[str, str | None]:
    """Parse structured replies in place and return the ``(status, error)`` of a reply.

    A choice cut at the token limit makes the reply TRUNCATED even when it parses: a
    judgment or response that was cut off must never pass as a complete answer. It wins
    over PARSE_ERROR because it is the cause, and re-asking with the same limit would only
    cut it again (so the openai backend does not spend parse retries on it).
    """
    status, error = OK, None
    if json_schema is not None:
        for c in choices:
            c.parsed, err = parse_json_reply(c.text, json_schema)
            if err and error is None:
                status, error = PARSE_ERROR, err
    cut = sum(c.finish_reason == "length" for c in choices)
    if cut:
        note = f"{cut} of {len(choices)} choices stopped at the token limit (finish_reason=length)"
        status, error = TRUNCATED, f"{note}; {error}" if error else note
    return status, error


def backend_identity(backend: Any) -> dict[str, Any] | None:
    """What makes two backends give different answers to one request, exactly as the
    request cache keys it (model name plus :meth:`BaseBackend.cache_identity`); ``None``
    for no backend. Results made with an LLM are keyed by this, never by the spec text."""
    if backend is None:
        return None
    identity = getattr(backend, "cache_identity", None)
    fields = identity() if callable(identity) else {"kind": getattr(backend, "kind", type(backend).__name__)}
    return {"model": getattr(backend, "model", None), **fields}


def _resolve_cache(cache: RequestCache | str | os.PathLike[str] | bool | None) -> RequestCache | None:
    if cache is None or cache is False:
        return None
    if cache is True:
        return RequestCache()
    if isinstance(cache, RequestCache):
        return cache
    return RequestCache(Path(cache))


class BaseBackend:
    kind = "base"

    def __init__(
        self,
        model: str,
        *,
        cache: RequestCache | str | os.PathLike[str] | bool | None = True,
        progress: bool | None = None,
        desc: str | None = None,
    ):
        self.model = model
        self.cache = _resolve_cache(cache)
        self.progress = progress
        self.desc = desc or f"{self.kind}:{model}"
        # Cumulative usage of this backend object (not counting cache hits).
        # ``truncated`` counts results (fresh or cached) cut at the token limit.
        self.usage: dict[str, float] = {
            "requests": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
            "truncated": 0,
        }

    # -- cache identity -------------------------------------------------------------------
    def cache_settings(self) -> dict[str, Any]:
        """Backend settings that change the answer to a request (besides the request
        itself); overridden by backends. Settings that only change speed stay out, so
        tuning them keeps the cache."""
        return {}

    def cache_identity(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.cache_settings()}

    def request_key(self, request: Request) -> str:
        return request.key(self.model, self.cache_identity())

    # -- to implement -------------------------------------------------------------------
    def _agenerate(
        self, requests: list[Request], stop: StopRequest, save: Callable[[int, Response], None]
    ) -> AsyncIterator[tuple[int, Response]]:
        raise NotImplementedError

    def _before_run(self, requests: list[Request]) -> None:
        """Hook to refuse a run before anything is sent (budget check)."""

    # -- shared machinery ---------------------------------------------------------------
    async def _fold_periodically(self) -> None:
        while True:
            await asyncio.sleep(CACHE_FOLD_INTERVAL_S)
            with contextlib.suppress(Exception):  # a busy lock just delays the fold
                await asyncio.to_thread(self.cache.flush)

    async def astream(
        self, requests: Sequence[Request], *, progress: bool | None = None,
        stop: StopRequest | None = None,
    ) -> AsyncIterator[tuple[int, Response]]:
        """Yield ``(index, Response)`` in completion order; cache hits come first.

        ``stop``: once ``stop.request()`` is called, nothing new is dispatched, the requests
        in flight finish (and are cached) and the stream ends early, without raising. The
        sync wrappers wire it to SIGINT/SIGTERM.
        """
        stop = stop if stop is not None else StopRequest()
        requests = list(requests)
        identity = self.cache_identity()
        keys = [r.key(self.model, identity) for r in requests]
        hits = await asyncio.to_thread(self.cache.get_many, keys) if self.cache else {}
        positions: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k not in hits:
                positions.setdefault(k, []).append(i)
        todo_keys = list(positions)
        todo = [requests[positions[k][0]] for k in todo_keys]
        self._before_run(todo)

        bar = BatchProgress(len(requests), desc=self.desc,
                            enabled=self.progress if progress is None else progress)
        stop.progress_bar = bar.enabled
        folder = None
        final = 0
        try:
            for i, k in enumerate(keys):
                if k in hits:
                    if stop.requested:
                        return
                    self.usage["cache_hits"] += 1
                    self.usage["truncated"] += hits[k].status == TRUNCATED
                    bar.update(hits[k])
                    yield i, hits[k]
            if not todo or stop.requested:
                return
            if self.cache is not None:
                folder = asyncio.create_task(self._fold_periodically())
            saved: set[int] = set()

            def save(j: int, resp: Response) -> None:
                if self.cache is not None and j not in saved:
                    self.cache.put(todo_keys[j], self.model, resp)
                    saved.add(j)

            async for j, resp in self._agenerate(todo, stop, save):
                final += resp.status in CACHEABLE_STATUSES
                k = todo_keys[j]
                save(j, resp)  # a no-op when the backend saved it already
                self.usage["requests"] += 1
                self.usage["prompt_tokens"] += resp.prompt_tokens
                self.usage["completion_tokens"] += resp.completion_tokens
                self.usage["cost"] += resp.cost
                self.usage["truncated"] += resp.status == TRUNCATED
                for i in positions[k]:
                    bar.update(resp)
                    yield i, resp
        finally:
            stop.unfinished = len(todo) - final
            if folder is not None:
                folder.cancel()
            if self.cache is not None:
                # Results are already durable in the journal; folding now just keeps the
                # DuckDB file current. A lock held elsewhere must not turn into a crash here.
                with contextlib.suppress(Exception):
                    self.cache.flush()
            bar.close()

    def stream(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> Iterator[tuple[int, Response]]:
        """Sync version of :meth:`astream`. Ctrl+C or SIGTERM stops cleanly: nothing new is
        sent, the requests in flight finish and are cached, then KeyboardInterrupt is raised
        (a second signal aborts at once). See :mod:`factory.llm.stopping`."""
        stop = StopRequest()
        return _iterate_sync(lambda: self.astream(requests, progress=progress, stop=stop), stop)

    async def arun_batch(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> list[Response]:
        out: list[Any] = [None] * len(requests)
        async for i, r in self.astream(requests, progress=progress):
            out[i] = r
        return out

    def run_batch(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> list[Response]:
        """All responses in input order (every request gets one, failures included).

        Ctrl+C/SIGTERM: see :meth:`stream` -- finished work is cached, KeyboardInterrupt."""
        out: list[Any] = [None] * len(requests)
        for i, r in self.stream(requests, progress=progress):
            out[i] = r
        return out

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _iterate_sync(make_agen, stop: StopRequest) -> Iterator[Any]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        yield from _iterate_in_runner(make_agen, stop)
    else:
        # Called from inside an event loop (e.g. a notebook): drive it on a private thread.
        yield from _iterate_in_thread(make_agen, stop)


def _iterate_in_runner(make_agen, stop: StopRequest) -> Iterator[Any]:
    # Our handlers are installed before the Runner runs anything, so asyncio.Runner does not
    # install its own (it cancels at the first SIGINT; we drain first, see stopping.py).
    with stop_on_signals(stop), asyncio.Runner() as runner:
        agen = make_agen()

        async def step() -> Any:
            stop.attach(asyncio.current_task())
            return await agen.__anext__()

        try:
            while not stop.aborted:
                stop.driving = True
                try:
                    item = runner.run(step())
                except StopAsyncIteration:
                    break
                except asyncio.CancelledError:
                    if stop.aborted:  # second signal: the step was cancelled, cleanup ran
                        break
                    raise
                finally:
                    stop.driving = False
                yield item
        finally:
            # Consumer gone, or aborted between two items: cancel workers, fold the cache.
            with contextlib.suppress(RuntimeError, StopAsyncIteration):
                runner.run(agen.aclose())
    if stop.requested:
        raise stop.interrupt()


_DONE = object()


def _iterate_in_thread(make_agen, stop: StopRequest) -> Iterator[Any]:
    q: queue.Queue = queue.Queue(maxsize=1024)
    gone = threading.Event()

    def put(item: Any) -> bool:
        while True:
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                if gone.is_set():
                    return False

    async def pump() -> None:
        stop.attach(asyncio.current_task())
        agen = make_agen()
        try:
            async for item in agen:
                if not put(item) or gone.is_set():
                    break
        finally:
            await agen.aclose()

    def target() -> None:
        try:
            asyncio.run(pump())
            put(_DONE)
        except BaseException as e:  # surfaced in the consumer thread
            put(e)

    # stop.driving stays False: the loop is on another thread, so a second signal raises
    # KeyboardInterrupt in the waiting consumer at once (and cancels the pump).
    with stop_on_signals(stop):
        t = threading.Thread(target=target, name="prefab-llm", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    if stop.aborted and isinstance(item, asyncio.CancelledError):
                        break
                    raise item
                yield item
        finally:
            gone.set()
            if t.is_alive():
                stop.cancel_soon()
    if stop.requested:
        raise stop.interrupt()
