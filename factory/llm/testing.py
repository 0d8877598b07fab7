"""A loopback OpenAI-compatible server and a scripted backend, for tests and benchmarks.

:class:`LoopbackServer` speaks real HTTP/1.1 (keep-alive) on 127.0.0.1 at a random free
port, implements ``POST /v1/chat/completions`` with ``usage`` token counts, and injects
faults: latency, 429 with ``retry-after``, 500, hangs beyond the client timeout and
malformed JSON content. Faults are chosen per distinct request body by a hash, and fire
on that body's first ``times_*`` arrivals, so a run's outcome is deterministic and its
counts can be checked. A ``handler(body, attempt)`` callback scripts anything else.

Like the real API it cuts a reply at ``max_tokens``/``max_completion_tokens`` (at
:data:`CHARS_PER_TOKEN` characters a token) with ``finish_reason: "length"``, and it refuses
with HTTP 400 and an OpenAI-style error body what OpenAI refuses: a ``strict`` JSON schema
outside strict mode's subset, and ``max_tokens`` sent to a model that takes only
``max_completion_tokens`` (o-series, gpt-5). A refused request never reaches the handler.

It counts requests: in total, per distinct body (duplicates), answered with 200 per body
(a completed request sent twice shows up in ``completed_duplicates``), aborted by the
client before the reply (killed or timed-out callers), and the peak number in flight.

It is plain asyncio (no aiohttp): one event loop holds hundreds of idle connections
cheaply, which a thread-per-connection server cannot do at 256 x 500 ms.

Use it in-process (a background thread)::

    with LoopbackServer(latency=0.01) as srv:
        backend = OpenAIBackend("test-model", base_url=srv.base_url)

or as a separate process, so it does not share the client's GIL (benchmarks)::

    python -m factory.llm.testing --latency 0.5      # prints {"port": ..., "base_url": ...}

with ``GET /_stats``, ``POST /_reset`` and ``POST /_config`` (JSON) to drive it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from .base import BaseBackend, classify_reply
from .stopping import StopRequest
from .structured import strict_schema_problem
from .types import Choice, Request, Response

Handler = Callable[[dict[str, Any], int], Any]
CHARS_PER_TOKEN = 4  # the server's token count for usage and for the max_tokens cut
# Models for which OpenAI refuses max_tokens. Written out here, not imported from the
# backend, so that the server checks the backend's rule rather than repeating it.
_NO_MAX_TOKENS = re.compile(r"^(o[1-9]|gpt-5)")


@dataclass
class ServerConfig:
    latency: float = 0.0
    # fault = (probability per distinct body, number of first arrivals it fires on)
    rate_429: float = 0.0
    times_429: int = 1
    retry_after: float = 0.05
    rate_500: float = 0.0
    times_500: int = 1
    rate_timeout: float = 0.0
    times_timeout: int = 1
    hang_s: float = 30.0
    rate_malformed: float = 0.0
    times_malformed: int = 1
    completion_tokens: int | None = None  # override the reported usage (budget tests)
    seed: int = 0


def _canonical_key(body: dict[str, Any]) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def _uniform(seed: int, kind: str, key: str) -> float:
    h = hashlib.sha256(f"{seed}:{kind}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def example_for_schema(schema: dict[str, Any], text: str = "") -> Any:
    """A small value that satisfies ``schema`` (for default structured replies)."""
    if "enum" in schema:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    if "anyOf" in schema:
        return example_for_schema(schema["anyOf"][0], text)
    t = schema.get("type", "object")
    if isinstance(t, list):
        t = t[0]
    if t == "object":
        return {k: example_for_schema(v, text) for k, v in schema.get("properties", {}).items()}
    if t == "array":
        return [example_for_schema(schema.get("items", {"type": "string"}), text)]
    if t == "string":
        return text[:40] or "x"
    if t == "integer":
        return 1
    if t == "number":
        return 0.5
    if t == "boolean":
        return True
    return None


class _State:
    def __init__(self, config: ServerConfig, handler: Handler | None):
        self.config = config
        self.handler = handler
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.total = 0
            self.per_body: Counter[str] = Counter()
            self.completed: Counter[str] = Counter()
            self.aborted = 0
            self.in_flight = 0
            self.max_in_flight = 0
            self.status_counts: Counter[str] = Counter()
            self.arrivals: list[float] = []
            self.t0 = time.monotonic()

    def snapshot(self, with_arrivals: bool = False) -> dict[str, Any]:
        with self.lock:
            d = {
                "total": self.total,
                "distinct": len(self.per_body),
                "duplicates": self.total - len(self.per_body),
                "completed": sum(self.completed.values()),
                "completed_duplicates": sum(c - 1 for c in self.completed.values() if c > 1),
                "aborted": self.aborted,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "status_counts": dict(self.status_counts),
            }
            if with_arrivals:
                d["arrivals"] = list(self.arrivals)
            return d

    def fault_for(self, key: str, attempt: int) -> str | None:
        c = self.config
        schedule: list[str] = []
        for kind, rate, times in (
            ("429", c.rate_429, c.times_429),
            ("500", c.rate_500, c.times_500),
            ("timeout", c.rate_timeout, c.times_timeout),
            ("malformed", c.rate_malformed, c.times_malformed),
        ):
            if rate > 0 and _uniform(c.seed, kind, key) < rate:
                schedule += [kind] * times
        return schedule[attempt - 1] if attempt <= len(schedule) else None


def _http_response(status: int, payload: bytes, extra_headers: dict[str, str] | None = None) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "Status")
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(payload)}", "connection: keep-alive"]
    head += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def _error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}
    ).encode()


def invalid_request(body: dict[str, Any]) -> bytes | None:
    """The 400 error body OpenAI would answer ``body`` with, or None if it would accept it."""
    if "max_tokens" in body and _NO_MAX_TOKENS.match(str(body.get("model", ""))):
        return _error_body(
            "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "invalid_request_error", "max_tokens", "unsupported_parameter",
        )
    rf = body.get("response_format") or {}
    spec = rf.get("json_schema") or {}
    if rf.get("type") == "json_schema" and spec.get("strict") is True:
        problem = strict_schema_problem(spec.get("schema"))
        if problem:
            return _error_body(
                f"Invalid schema for response_format '{spec.get('name', '')}': {problem}",
                "invalid_request_error", "response_format",
            )
    return None


class _Protocol:
    """Per-connection request loop (HTTP/1.1 keep-alive, Content-Length bodies)."""

    def __init__(self, state: _State):
        self.state = state

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        k, v = line.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                n = int(headers.get("content-length", "0") or 0)
                body = await reader.readexactly(n) if n else b""
                keep = await self.dispatch(method, path, body, reader, writer)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            return  # client gone, or server shutting down
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _wait_or_disconnect(self, seconds: float, reader: asyncio.StreamReader) -> bool:
        """Sleep; return False early if the client hangs up (killed or timed out)."""
        if seconds <= 0:
            return True
        eof = asyncio.ensure_future(reader.read(1))
        done, _ = await asyncio.wait({eof}, timeout=seconds)
        if done:
            return False  # HTTP/1.1 clients do not pipeline: any read result means hang-up
        eof.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await eof
        return True

    async def dispatch(self, method: str, path: str, body: bytes, reader, writer) -> bool:
        st = self.state
        path = path.split("?", 1)[0]
        if path == "/_stats":
            writer.write(_http_response(200, json.dumps(st.snapshot(with_arrivals=True)).encode()))
            await writer.drain()
            return True
        if path == "/_reset" and method == "POST":
            st.reset()
            writer.write(_http_response(200, b"{}"))
            await writer.drain()
            return True
        if path == "/_config" and method == "POST":
            updates = json.loads(body or b"{}")
            names = {f.name for f in fields(ServerConfig)}
            for k, v in updates.items():
                if k in names:
                    setattr(st.config, k, v)
            writer.write(_http_response(200, json.dumps(asdict(st.config)).encode()))
            await writer.drain()
            return True
        if path.rstrip("/").endswith("/models"):
            payload = {"object": "list", "data": [{"id": "loopback", "object": "model"}]}
            writer.write(_http_response(200, json.dumps(payload).encode()))
            await writer.drain()
            return True
        if not path.rstrip("/").endswith("/chat/completions") or method != "POST":
            writer.write(_http_response(404, _error_body(f"no route {method} {path}", "not_found")))
            await writer.drain()
            return True
        return await self.chat(body, reader, writer)

    async def chat(self, raw: bytes, reader, writer) -> bool:
        st, cfg = self.state, self.state.config
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            writer.write(_http_response(400, _error_body("body is not JSON", "invalid_request")))
            await writer.drain()
            return True
        key = _canonical_key(body)
        with st.lock:
            st.total += 1
            st.per_body[key] += 1
            attempt = st.per_body[key]
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
            st.arrivals.append(time.monotonic() - st.t0)
        rejected = invalid_request(body)
        directive: Any = None
        if rejected is None:
            directive = st.handler(body, attempt) if st.handler else None
            if directive is None:
                directive = st.fault_for(key, attempt)

        # A directive is a fault name ("429", "500", "timeout", "malformed"), reply text, or a
        # dict with any of: status, retry_after, message, delay, content, finish_reason,
        # refusal (an OpenAI structured-output refusal: content null, the text in `refusal`).
        if isinstance(directive, str) and directive in ("429", "500"):
            directive = {"status": int(directive)}
        elif isinstance(directive, str) and directive not in ("timeout", "malformed"):
            directive = {"content": directive}
        spec = directive if isinstance(directive, dict) else {}
        status = 400 if rejected else int(spec.get("status", 200))
        extra: dict[str, str] = {}
        content = spec.get("content")
        delay = 0.0 if rejected else float(spec.get("delay", cfg.latency))
        if status == 429:
            extra = {"retry-after": f"{spec.get('retry_after', cfg.retry_after):g}"}
            delay = float(spec.get("delay", 0.0))  # rate limiters answer at once
        elif directive == "timeout":
            delay = cfg.hang_s
        elif directive == "malformed":
            content = '{"answer": "trunc'

        alive = await self._wait_or_disconnect(delay, reader)
        if not alive:
            with st.lock:
                st.in_flight -= 1
                st.aborted += 1
                st.status_counts["aborted"] += 1
            return False

        if rejected is not None:
            payload = rejected
        elif status != 200:
            kind = "server_error" if status >= 500 else "rate_limit" if status == 429 else "invalid_request"
            payload = _error_body(spec.get("message", f"injected {status}"), kind)
        else:
            completion = self._completion(body, content, spec.get("finish_reason", "stop"))
            if spec.get("refusal") is not None:
                for choice in completion["choices"]:
                    choice["message"] = {"role": "assistant", "content": None, "refusal": spec["refusal"]}
            payload = json.dumps(completion).encode()
        with st.lock:
            st.in_flight -= 1  # before the write: the client may send its next request at once
            st.status_counts["malformed" if directive == "malformed" else str(status)] += 1
            if status == 200:
                st.completed[key] += 1
        writer.write(_http_response(status, payload, extra))
        await writer.drain()
        return True

    def _completion(
        self, body: dict[str, Any], content: str | None, finish_reason: str = "stop"
    ) -> dict[str, Any]:
        cfg = self.state.config
        messages = body.get("messages", [])
        last_user = next(
            (m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), ""
        )
        last_user = last_user if isinstance(last_user, str) else json.dumps(last_user)
        n = int(body.get("n") or 1)
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        choices = []
        for i in range(n):
            text = content
            if text is None:
                rf = body.get("response_format") or {}
                if rf.get("type") == "json_schema":
                    schema = rf.get("json_schema", {}).get("schema", {})
                    text = json.dumps(example_for_schema(schema, last_user))
                else:
                    text = f"echo[{i}]: {last_user}"[:2000]
            finish = finish_reason
            if limit and len(text) > int(limit) * CHARS_PER_TOKEN:
                text, finish = text[: int(limit) * CHARS_PER_TOKEN], "length"
            choices.append({"index": i, "message": {"role": "assistant", "content": text},
                            "finish_reason": finish, "logprobs": None})
        pt = sum(len(str(m.get("content", ""))) // CHARS_PER_TOKEN + 4 for m in messages)
        ct = cfg.completion_tokens if cfg.completion_tokens is not None else sum(
            max(1, len(c["message"]["content"]) // CHARS_PER_TOKEN) for c in choices
        )
        return {
            "id": f"chatcmpl-{self.state.total}", "object": "chat.completion",
            "created": int(time.time()), "model": body.get("model", "loopback"),
            "choices": choices,
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }


class LoopbackServer:
    """In-process server on a background thread. Context manager; ``base_url`` ends in /v1."""

    def __init__(self, handler: Handler | None = None, **config: Any):
        self.config = ServerConfig(**config)
        self._state = _State(self.config, handler)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def handler(self) -> Handler | None:
        return self._state.handler

    @handler.setter
    def handler(self, fn: Handler | None) -> None:
        self._state.handler = fn

    def configure(self, **config: Any) -> None:
        for k, v in config.items():
            if not hasattr(self.config, k):
                raise AttributeError(f"unknown server option {k!r}")
            setattr(self.config, k, v)

    def stats(self, with_arrivals: bool = False) -> dict[str, Any]:
        return self._state.snapshot(with_arrivals)

    def reset(self) -> None:
        self._state.reset()

    async def _start(self) -> None:
        proto = _Protocol(self._state)
        self._server = await asyncio.start_server(proto.serve, "127.0.0.1", 0, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]

    def start(self) -> LoopbackServer:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="loopback-llm-server", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop = None

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess:
    """The loopback server in a child process (own GIL), driven over HTTP."""

    def __init__(self, **config: Any):
        args = [sys.executable, "-m", "factory.llm.testing"]
        for k, v in config.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("loopback server process did not start")
        info = json.loads(line)
        self.port = info["port"]
        self.base_url = info["base_url"]

    def _call(self, path: str, payload: dict | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method="GET" if data is None else "POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self._call("/_stats")

    def reset(self) -> None:
        self._call("/_reset", {})

    def configure(self, **config: Any) -> dict[str, Any]:
        return self._call("/_config", config)

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ScriptedBackend(BaseBackend):
    """A backend that answers with a Python function: for tests of generators and judges.

    ``fn(request)`` returns the reply text (or a full :class:`Response`). Structured
    requests are parsed and validated like the real backends do.
    """

    kind = "scripted"

    def __init__(self, fn: Callable[[Request], str | Response], model: str = "scripted", **kw: Any):
        kw.setdefault("cache", False)
        super().__init__(model, **kw)
        self.fn = fn

    async def _agenerate(
        self, requests: list[Request], stop: StopRequest, save: Callable[[int, Response], None]
    ) -> AsyncIterator[tuple[int, Response]]:
        # `save` is not needed: the next chunk/request starts only after the consumer has
        # taken (and the base class saved) every result yielded before it.
        for j, req in enumerate(requests):
            if stop.requested:
                return
            out = self.fn(req)
            if isinstance(out, Response):
                yield j, out
                continue
            choice = Choice(text=out, finish_reason="stop")
            status, error = classify_reply([choice], req.json_schema)
            yield j, Response(status=status, choices=[choice] * req.n, error=error,
                              model=self.model, attempts=1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="loopback OpenAI-compatible server")
    for f in fields(ServerConfig):
        typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], float)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=typ, default=f.default)
    args = ap.parse_args(argv)
    config = {f.name: getattr(args, f.name) for f in fields(ServerConfig)}
    server = LoopbackServer(**config).start()
    print(json.dumps({"port": server.port, "base_url": server.base_url}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    server.stop()


if __name__ == "__main__":
    main()
