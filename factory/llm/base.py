"""The backend protocol and the machinery every backend shares: cache lookup, in-batch
de-duplication, streaming in completion order, progress and the sync wrappers.

A backend implements one coroutine generator, ``_agenerate(requests)``, that yields
``(position, Response)`` as each uncached request finishes. Everything else lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .cache import RequestCache
from .progress import BatchProgress
from .types import Request, Response

CACHE_FOLD_INTERVAL_S = 2.0


@runtime_checkable
class Backend(Protocol):
    """What generators and judges program against."""

    kind: str
    model: str

    def astream(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> AsyncIterator[tuple[int, Response]]: ...

    def stream(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> Iterator[tuple[int, Response]]: ...

    def run_batch(
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> list[Response]: ...


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
        self.usage: dict[str, float] = {
            "requests": 0, "cache_hits": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
        }

    # -- to implement -------------------------------------------------------------------
    def _agenerate(self, requests: list[Request]) -> AsyncIterator[tuple[int, Response]]:
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
        self, requests: Sequence[Request], *, progress: bool | None = None
    ) -> AsyncIterator[tuple[int, Response]]:
        """Yield ``(index, Response)`` in completion order; cache hits come first."""
        requests = list(requests)
        keys = [r.key(self.model) for r in requests]
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
        folder = None
        try:
            for i, k in enumerate(keys):
                if k in hits:
                    self.usage["cache_hits"] += 1
                    bar.update(hits[k])
                    yield i, hits[k]
            if not todo:
                return
            if self.cache is not None:
                folder = asyncio.create_task(self._fold_periodically())
            async for j, resp in self._agenerate(todo):
                k = todo_keys[j]
                if self.cache is not None:
                    self.cache.put(k, self.model, resp)
                self.usage["requests"] += 1
                self.usage["prompt_tokens"] += resp.prompt_tokens
                self.usage["completion_tokens"] += resp.completion_tokens
                self.usage["cost"] += resp.cost
                for i in positions[k]:
                    bar.update(resp)
                    yield i, resp
        finally:
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
        """Sync version of :meth:`astream`. Ctrl+C stops cleanly: finished work stays cached."""
        return _iterate_sync(lambda: self.astream(requests, progress=progress))

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
        """All responses in input order (every request gets one, failures included)."""
        out: list[Any] = [None] * len(requests)
        for i, r in self.stream(requests, progress=progress):
            out[i] = r
        return out

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _iterate_sync(make_agen) -> Iterator[Any]:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        yield from _iterate_in_runner(make_agen)
    else:
        # Called from inside an event loop (e.g. a notebook): drive it on a private thread.
        yield from _iterate_in_thread(make_agen)


def _iterate_in_runner(make_agen) -> Iterator[Any]:
    # asyncio.Runner turns SIGINT into cancellation of the running step, so the generator's
    # cleanup (cancel workers, fold the cache) runs before KeyboardInterrupt surfaces.
    with asyncio.Runner() as runner:
        agen = make_agen()
        try:
            while True:
                try:
                    item = runner.run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            with contextlib.suppress(RuntimeError, StopAsyncIteration):
                runner.run(agen.aclose())


_DONE = object()


def _iterate_in_thread(make_agen) -> Iterator[Any]:
    q: queue.Queue = queue.Queue(maxsize=1024)
    stop = threading.Event()

    async def pump() -> None:
        agen = make_agen()
        try:
            async for item in agen:
                q.put(item)
                if stop.is_set():
                    break
        finally:
            await agen.aclose()

    def target() -> None:
        try:
            asyncio.run(pump())
            q.put(_DONE)
        except BaseException as e:  # surfaced in the consumer thread
            q.put(e)

    t = threading.Thread(target=target, name="prefab-llm", daemon=True)
    t.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
