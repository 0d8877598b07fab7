"""Graceful stop of a batch run on Ctrl+C (SIGINT) or SIGTERM.

A request that is in flight when a run is stopped has cost a server its work but has no
result to save, so a rerun must send it again. A stop that cancels everything at once
therefore re-sends up to ``concurrency`` requests. A graceful stop does not:

1. **First SIGINT/SIGTERM** -- the run stops dispatching: no worker takes another
   request and no new attempt starts. Attempts already on the wire are awaited, each
   bounded by its own per-request timeout, and their results go to the cache as usual.
   One line goes to stderr at once::

       prefab: stopping: waiting for 57 in-flight requests (Ctrl+C again to abort)

   When they are all in, the sync wrappers (``stream``/``run_batch``) raise
   :class:`KeyboardInterrupt` -- for SIGTERM too, so callers unwind the same way (the CLI
   maps it to exit 130). Requests never dispatched have no result and are simply not in
   the cache: a rerun sends exactly those, and nothing the server already answered.
   The vLLM backend finishes the chunk in the engine and starts no other.

   Retries (a decision): none is started after the stop, including the ones already
   sleeping in backoff or waiting for a rate limiter -- their wait is cut short and the
   request ends as ``cancelled`` (not cached; with its last error in ``error``). A
   backoff can last ``backoff_max`` or a server's ``retry-after`` (up to minutes), too
   long to hold a Ctrl+C for. Likewise an in-flight attempt that fails (or returns JSON
   that does not parse) during the drain is not retried. The rerun retries such a
   request: the server sees that body again, as it would have in an uninterrupted run.
2. **Second signal** -- abort: the in-flight requests are cancelled at once (their
   connections are dropped; a rerun sends them again) and KeyboardInterrupt is raised.
   When the event loop is blocked (a vLLM engine call) or is not running (the caller is
   between two items of ``stream``), the handler raises KeyboardInterrupt right where the
   main thread is, as plain Python does. A third signal always does.

Handlers are installed only while a sync wrapper runs, only from the main thread, never
over a signal that is ignored (``SIG_IGN``, e.g. a background job), and the previous
handlers are restored afterwards. A stop that arrives while the caller of ``stream`` is
busy between two items takes effect when it asks for the next one. Async callers of
``astream`` can drive the same drain themselves: pass ``stop=StopRequest()`` and call
``stop.request()`` (from any thread); ``astream`` then ends early without raising.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class StopRequest:
    """Shared by a signal handler (main thread) and a batch run (its event loop).

    Backends read :attr:`requested` before dispatching anything, keep :attr:`in_flight`
    current (or set :attr:`waiting_for`), set :attr:`blocking` around calls that block the
    event loop, and sleep through :meth:`wait` so that a stop wakes them.
    """

    def __init__(self) -> None:
        self.requested = False  # graceful: dispatch nothing new
        self.aborted = False  # cancel what is in flight
        self.signum: int | None = None
        self.in_flight = 0  # attempts on the wire (maintained by the backend)
        self.waiting_for: str | None = None  # or a description of what a stop waits for
        self.blocking = False  # the backend is in a call that blocks the event loop
        self.driving = False  # the event loop runs on the signalled (main) thread right now
        self.unfinished = 0  # requests left without a final answer (set by astream)
        self.progress_bar = False  # a progress bar owns the current stderr line
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None

    # -- from any thread (or a signal handler) ---------------------------------------------
    def request(self, signum: int | None = None) -> None:
        """Stop dispatching; what is in flight finishes and is cached."""
        if self.requested:
            return
        self.signum = signum
        self.requested = True
        self._soon(self._wake)

    def abort(self) -> None:
        """Cancel what is in flight now (the running step of the batch)."""
        self.requested = True
        self.aborted = True
        self._soon(self._wake)
        self.cancel_soon()

    def describe(self) -> str:
        if self.waiting_for:
            return f"waiting for {self.waiting_for} to finish"
        n = self.in_flight
        if n <= 0:
            return "no requests in flight"
        return f"waiting for {n} in-flight request{'s' if n != 1 else ''}"

    def interrupt(self) -> KeyboardInterrupt:
        """The exception the sync wrappers raise once the run has stopped."""
        name = signal.Signals(self.signum).name if self.signum else "stop request"
        if self.aborted:
            return KeyboardInterrupt(
                f"{name}: aborted; in-flight requests were cancelled, finished results are cached"
            )
        return KeyboardInterrupt(
            f"{name}: stopped once the in-flight requests had finished; {self.unfinished} "
            "requests were left without a final answer (with the cache on, a rerun sends only "
            "those)"
        )

    # -- from the event loop -----------------------------------------------------------------
    def attach(self, task: asyncio.Task | None = None) -> None:
        """Called by the driver at each step: the loop and task a stop must reach."""
        self._loop = asyncio.get_running_loop()
        self._task = task
        if self.requested:
            self._wake()
        if self.aborted and task is not None:  # an abort that came before there was a loop
            task.cancel()

    async def wait(self, timeout: float | None = None) -> bool:
        """Sleep up to ``timeout`` seconds; True (at once) if a stop is or gets requested."""
        if self.requested:
            return True
        event = self._event_here()
        if timeout is not None and timeout <= 0:
            return event.is_set()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def race(self, aw: Any) -> bool:
        """Await ``aw`` unless a stop comes first (then ``aw`` is cancelled); True if it ran."""
        if self.requested:
            with contextlib.suppress(AttributeError):
                aw.close()  # a coroutine never started: no "never awaited" warning
            return False
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._event_here().wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            return False
        task.result()  # re-raise its error, if any
        return True

    def cancel_task(self) -> None:
        """Cancel the attached step (call on its loop; see :meth:`cancel_soon`)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()

    def cancel_soon(self) -> None:
        """:meth:`cancel_task` from any thread or a signal handler."""
        self._soon(self.cancel_task)

    # -- internals ---------------------------------------------------------------------------
    def _event_here(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._event is None or self._event_loop is not loop:
            self._event, self._event_loop = asyncio.Event(), loop
        if self.requested:  # a request that raced the event's creation
            self._event.set()
        return self._event

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()

    def _soon(self, fn: Any) -> None:
        # call_soon_threadsafe is safe from a signal handler and from other threads; the
        # callback runs when the loop next turns (at once if it is waiting in select).
        for loop in {self._loop, self._event_loop} - {None}:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(fn)


def _say(message: str) -> None:
    # Called from a signal handler: the main thread may be inside a write to stderr (the
    # progress bar), and a buffered write re-entered raises. Fall back to the raw fd.
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except Exception:
        with contextlib.suppress(OSError):
            os.write(2, (message + "\n").encode())


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[StopRequest]:
    """Route SIGINT/SIGTERM to ``stop`` for the duration (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if not stop.requested:
            stop.request(signum)
            again = "Ctrl+C again" if signum == signal.SIGINT else "send it again"
            _say(("\n" if stop.progress_bar else "")
                 + f"prefab: stopping: {stop.describe()} ({again} to abort)")
            return
        first_abort = not stop.aborted
        stop.abort()
        if not first_abort or stop.blocking or not stop.driving:
            # Nothing on this thread would notice a cancellation soon: raise here.
            raise KeyboardInterrupt(stop.interrupt().args[0])

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old is None or old == signal.SIG_IGN:
                continue  # not installed from Python, or deliberately ignored: leave it
            signal.signal(sig, handler)
            previous[sig] = old
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
