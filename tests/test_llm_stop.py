"""Graceful stop on SIGINT/SIGTERM: a stopped run re-sends nothing the server answered.

The batch runs in a child process through the real openai client against the loopback
server; the test signals it like a user (Ctrl+C) or a job scheduler (SIGTERM) would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from factory.llm import OK, Request, RequestCache, StopRequest
from factory.llm.testing import LoopbackServer, ScriptedBackend

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, signal, sys
    # A child of a background job may inherit SIGINT ignored; a user's shell would not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from factory.llm import OpenAIBackend, Request, SamplingParams
    base_url, n, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    b = OpenAIBackend("m", base_url=base_url, concurrency=concurrency, progress=False)
    reqs = [Request([{"role": "user", "content": f"q{i}"}], SamplingParams(max_tokens=4))
            for i in range(n)]
    if sys.argv[4:] == ["--wait"]:  # started early to pay the imports: run when stdin closes
        sys.stdin.read()
    try:
        out = b.run_batch(reqs)
    except KeyboardInterrupt as e:  # what the prefab CLI does
        print(json.dumps({"interrupted": str(e)}), flush=True)
        sys.exit(130)
    print(json.dumps({"statuses": [r.status for r in out], "cached": sum(r.cached for r in out)}),
          flush=True)
    """
)
STOPPING = re.compile(
    r"prefab: stopping: waiting for (\d+) in-flight requests? \((Ctrl\+C again|send it again) to abort\)"
)


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("PREFAB_HOME", str(path))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return path


def spawn(base_url: str, n: int, concurrency: int, wait: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, base_url, str(n), str(concurrency)] + ["--wait"] * wait,
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_until(cond, child: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert child is None or child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_at_half_then_rerun_sends_no_request_twice(home, sig):
    n, concurrency = 200, 16
    with LoopbackServer(latency=0.3) as srv:
        child = spawn(srv.base_url, n, concurrency)
        # The rerun is a fresh process that has touched nothing yet; starting it now only
        # overlaps its imports with the first run (it opens the cache once released).
        rerun = spawn(srv.base_url, n, concurrency, wait=True)
        wait_until(lambda: srv.stats()["completed"] >= n // 2, child)
        child.send_signal(sig)
        t0 = time.monotonic()
        out, err = child.communicate(timeout=10)
        drain_s = time.monotonic() - t0
        assert child.returncode == 130, err
        assert f"{signal.Signals(sig).name}: stopped once the in-flight requests had finished" in out
        [line] = [m for m in STOPPING.finditer(err)]
        assert 0 < int(line.group(1)) <= concurrency
        assert drain_s < 0.3 + 2.0  # one server latency, plus process exit
        first = srv.stats()
        # every request the server received was answered and read: nothing was dropped
        assert first["aborted"] == 0 and first["in_flight"] == 0
        assert first["completed"] == first["total"] == first["distinct"]
        saved = RequestCache(home / "llm_cache.duckdb").stats()["rows"]
        assert saved == first["total"] < n
        assert f"; {n - saved} requests were left without a final answer" in out

        srv.configure(latency=0.0)  # the rerun's answers need no realism, only its requests
        out, err = rerun.communicate(timeout=30)  # closes its stdin: the rerun starts
        assert rerun.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        total = srv.stats()
    assert report["statuses"] == [OK] * n  # every request has a result
    assert report["cached"] == saved
    assert total["total"] - first["total"] == n - saved  # the rerun sent only the missing ones
    assert total["distinct"] == n and total["duplicates"] == 0  # zero duplicates across both runs
    assert total["completed_duplicates"] == 0


def test_second_signal_aborts_at_once(home):
    # Every request takes 5 s: a graceful stop would wait; the second signal must not.
    n, concurrency = 40, 8
    with LoopbackServer(latency=5.0) as srv:
        child = spawn(srv.base_url, n, concurrency)
        wait_until(lambda: srv.stats()["in_flight"] == concurrency, child)
        child.send_signal(signal.SIGTERM)
        line = ""
        while "prefab: stopping" not in line:  # the first signal was taken as a graceful stop
            line = child.stderr.readline()
            assert line, "child exited without announcing the stop"
        assert STOPPING.search(line).group(1) == str(concurrency)
        t0 = time.monotonic()
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=10)
        assert time.monotonic() - t0 < 2.0  # in-flight requests were not awaited
        assert child.returncode == 130 and "aborted" in out
        wait_until(lambda: srv.stats()["aborted"] == concurrency, timeout=5)
        assert srv.stats()["completed"] == 0
    assert RequestCache(home / "llm_cache.duckdb").stats()["rows"] == 0


# -- handler bookkeeping (in-process, no server) ---------------------------------------------
def echo(req: Request) -> str:
    return req.messages[-1]["content"]


def test_handlers_are_installed_only_during_a_run_and_restored(home):
    seen = {}

    def probe(req: Request) -> str:
        seen["int"] = signal.getsignal(signal.SIGINT)
        seen["term"] = signal.getsignal(signal.SIGTERM)
        return "x"

    def custom(signum, frame):  # e.g. an application's own handler
        raise AssertionError("not called")

    previous = signal.signal(signal.SIGTERM, custom)
    try:
        ScriptedBackend(probe).run_batch([Request([{"role": "user", "content": "a"}])])
        assert seen["int"] is not signal.default_int_handler and seen["term"] is not custom
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is custom
        # an ignored signal stays ignored (nohup, background jobs)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ScriptedBackend(probe).run_batch([Request([{"role": "user", "content": "b"}])])
        assert seen["term"] == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_no_handlers_from_a_worker_thread(home):
    seen, errors = {}, []

    def probe(req: Request) -> str:
        seen["int"] = signal.getsignal(signal.SIGINT)
        return "x"

    def run() -> None:
        try:
            ScriptedBackend(probe).run_batch([Request([{"role": "user", "content": "t"}])])
        except BaseException as e:  # noqa: BLE001 -- reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(10)
    assert not errors and seen["int"] is signal.default_int_handler


def test_astream_with_a_stop_request_ends_early_without_raising(home):
    import asyncio

    stop = StopRequest()

    def fn(req: Request) -> str:
        if req.messages[-1]["content"] == "2":
            stop.request()
        return "x"

    async def main() -> list[int]:
        b = ScriptedBackend(fn)
        return [i async for i, _ in b.astream(
            [Request([{"role": "user", "content": str(i)}]) for i in range(6)], stop=stop)]

    assert asyncio.run(main()) == [0, 1, 2]
    assert stop.unfinished == 3
