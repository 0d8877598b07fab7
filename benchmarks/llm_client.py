"""LLM client benchmark: prefab's OpenAI backend vs a bare AsyncOpenAI loop vs distilabel.

    python benchmarks/llm_client.py            # full run (a few minutes)
    python benchmarks/llm_client.py --quick    # smaller run (~1 minute)

The loopback server (factory.llm.testing) runs in its own process so it does not share
the client's event loop or GIL. Sections:

1. throughput: N chat requests, 500 ms server latency, at concurrency 64 and 256.
   efficiency = ideal time (N x latency / concurrency) / measured wall time; client CPU is
   the benchmark process's CPU time per request.
2. faults: 10% 429 (retry-after), 5% 500, 2% malformed JSON on structured requests;
   every request must end with a result or an explicit error status, and counts must add up.
3. stop and resume: a child process runs the batch, is stopped at 50% and is run again;
   the server counts the request bodies it received twice. Two ways to stop it:
   graceful (SIGINT, i.e. Ctrl+C: the requests in flight finish and are saved, nothing new
   is sent) and hard (SIGKILL: the requests in flight are lost and sent again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factory.llm import OpenAIBackend, Request, SamplingParams  # noqa: E402
from factory.llm.testing import ServerProcess  # noqa: E402

MODEL = "loopback-model"
# The loopback server cuts replies at max_tokens (4 characters a token) like a real one; 64
# leaves every echoed prompt whole, so the runs measure complete answers.
MAX_TOKENS = 64
SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"type": "string", "enum": ["A", "B"]}, "reason": {"type": "string"}},
    "required": ["verdict", "reason"],
    "additionalProperties": False,
}


def prompts(tag: str, n: int) -> list[str]:
    return [f"{tag} question {i}: which answer is better?" for i in range(n)]


# -- clients --------------------------------------------------------------------------------
def run_bare(base_url: str, texts: list[str], concurrency: int) -> None:
    import openai

    async def main() -> None:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0)
        sem = asyncio.Semaphore(concurrency)

        async def one(text: str) -> None:
            async with sem:
                await client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": text}],
                    max_tokens=MAX_TOKENS,
                )

        await asyncio.gather(*(one(t) for t in texts))
        await client.close()

    asyncio.run(main())


def run_prefab(base_url: str, texts: list[str], concurrency: int, home: str) -> list:
    backend = OpenAIBackend(
        MODEL, base_url=base_url, concurrency=concurrency, cache=Path(home) / "llm_cache.duckdb",
        progress=False,
    )
    reqs = [Request([{"role": "user", "content": t}], SamplingParams(max_tokens=MAX_TOKENS))
            for t in texts]
    return backend.run_batch(reqs)


def _stub_requests_if_missing() -> None:
    # distilabel 1.5.3 imports `requests` at package import time, only for its image
    # generation models; this venv lacks it. The LLM path never calls it, so a stub module
    # lets the benchmark run without changing the environment.
    try:
        import requests  # noqa: F401
    except ImportError:
        import types

        sys.modules["requests"] = types.ModuleType("requests")


def run_distilabel(base_url: str, texts: list[str], batch_size: int) -> None:
    import logging

    logging.getLogger("distilabel").setLevel(logging.ERROR)
    _stub_requests_if_missing()
    from distilabel.models.llms import OpenAILLM

    llm = OpenAILLM(model=MODEL, base_url=base_url, api_key="bench", max_retries=0)
    llm.load()
    # What a distilabel Task does with input_batch_size=B: one generate() per batch of B rows.
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        llm.generate(inputs=[[{"role": "user", "content": t}] for t in chunk], max_new_tokens=MAX_TOKENS)


# -- sections ------------------------------------------------------------------------------
CLIENTS = ("bare", "prefab", "distilabel")
LABELS = {
    "bare": "bare AsyncOpenAI + semaphore",
    "prefab": "prefab OpenAIBackend",
    "distilabel": "distilabel OpenAILLM, batch = concurrency",
}


def measure_main(args: argparse.Namespace) -> None:
    """Child process: warm up, then time one client on one workload; print JSON."""
    import warnings

    warnings.filterwarnings("ignore")

    def run(texts: list[str]) -> None:
        if args.measure == "bare":
            run_bare(args.base_url, texts, args.concurrency)
        elif args.measure == "prefab":
            with tempfile.TemporaryDirectory() as home:
                out = run_prefab(args.base_url, texts, args.concurrency, home)
                assert all(r.ok for r in out), Counter(r.status for r in out)
        else:
            run_distilabel(args.base_url, texts, args.concurrency)

    # Warm-up (imports, first connections, lazy code paths) is not part of the measurement.
    run(prompts(f"warmup-{args.tag}", args.concurrency))
    texts = prompts(args.tag, args.n)
    cpu0, t0 = time.process_time(), time.perf_counter()
    run(texts)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"wall": wall, "cpu": cpu}), flush=True)


def throughput(server: ServerProcess, n64: int, n256: int, latency: float, with_distilabel: bool) -> list[dict]:
    rows = []
    server.configure(latency=latency, rate_429=0, rate_500=0, rate_malformed=0, rate_timeout=0)
    for concurrency, n in ((64, n64), (256, n256)):
        for client in CLIENTS if with_distilabel else CLIENTS[:2]:
            server.reset()
            cmd = [sys.executable, __file__, "--measure", client, "--base-url", server.base_url,
                   "--n", str(n), "--concurrency", str(concurrency),
                   "--tag", f"{client}-{concurrency}-{time.time_ns()}"]
            # stderr is captured: distilabel's unclosed clients spam "Event loop is closed".
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.stderr.write(done.stderr)
                raise RuntimeError(f"{client} measurement failed")
            m = json.loads(done.stdout.strip().splitlines()[-1])
            st = server.stats()
            ideal = n * latency / concurrency
            rows.append({
                "client": LABELS[client], "concurrency": concurrency, "requests": n,
                "wall_s": m["wall"], "ideal_s": ideal, "efficiency": ideal / m["wall"],
                "cpu_ms_per_req": 1000 * m["cpu"] / n, "server_max_in_flight": st["max_in_flight"],
                "server_requests": st["total"],
            })
            print(f"  {LABELS[client]:<42} c={concurrency:<4} n={n:<5} wall={m['wall']:6.2f}s "
                  f"eff={ideal / m['wall']:.3f}", flush=True)
    return rows


def faults(server: ServerProcess, n: int) -> dict:
    server.reset()
    server.configure(latency=0.05, rate_429=0.10, times_429=1, retry_after=0.2,
                     rate_500=0.05, times_500=2, rate_malformed=0.02, times_malformed=3)
    with tempfile.TemporaryDirectory() as home:
        backend = OpenAIBackend(
            MODEL, base_url=server.base_url, concurrency=64, max_retries=4, parse_retries=2,
            backoff_base=0.1, cache=Path(home) / "llm_cache.duckdb", progress=False,
        )
        reqs = [Request([{"role": "user", "content": t}], SamplingParams(max_tokens=32),
                        json_schema=SCHEMA) for t in prompts(f"faults-{time.time_ns()}", n)]
        t0 = time.perf_counter()
        out = backend.run_batch(reqs)
        wall = time.perf_counter() - t0
    st = server.stats()
    server.configure(rate_429=0, rate_500=0, rate_malformed=0)
    statuses = Counter(r.status for r in out)
    return {
        "requests": n, "wall_s": wall, "client_statuses": dict(statuses),
        "results_returned": sum(statuses.values()), "none_missing": all(r is not None for r in out),
        "ok_parsed": sum(1 for r in out if r.ok and isinstance(r.parsed, dict)),
        "parse_error_kept_raw": sum(1 for r in out if r.status == "parse_error" and r.text),
        "attempts": sum(r.attempts for r in out), "server_requests": st["total"],
        "server_status_counts": st["status_counts"],
    }


def kill_resume(server: ServerProcess, n: int, concurrency: int, latency: float, how: str) -> dict:
    """Stop a child run at 50% (``how`` = "sigint" or "sigkill"), rerun it, count duplicates."""
    from factory.llm import RequestCache

    server.configure(latency=latency, rate_429=0, rate_500=0, rate_malformed=0)
    server.reset()
    tag = f"resume-{how}-{time.time_ns()}"
    with tempfile.TemporaryDirectory() as home:
        cmd = [sys.executable, __file__, "--child", "--base-url", server.base_url, "--home", home,
               "--n", str(n), "--concurrency", str(concurrency), "--tag", tag]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while server.stats()["completed"] < n // 2:
            if child.poll() is not None:
                raise RuntimeError("child finished before it could be stopped")
            time.sleep(0.002)
        t0 = time.perf_counter()
        os.kill(child.pid, signal.SIGINT if how == "sigint" else signal.SIGKILL)
        in_flight_at_signal = server.stats()["in_flight"]
        _, err = child.communicate()
        stop_wall = time.perf_counter() - t0
        if how == "sigint" and child.returncode != 130:
            sys.stderr.write(err)
            raise RuntimeError(f"stopped child exited with {child.returncode}, expected 130")
        at_stop = server.stats()
        announced = re.search(r"prefab: stopping: waiting for (\d+) in-flight", err)
        journals = len(list(Path(home).glob("*.journal")))
        # Opening the cache folds a dead process's journal: this is what the rerun will see.
        saved = RequestCache(Path(home) / "llm_cache.duckdb").stats().get("rows", 0)
        t0 = time.perf_counter()
        rerun = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        wall = time.perf_counter() - t0
        child_report = json.loads(rerun.stdout.strip().splitlines()[-1])
    st = server.stats()
    rerun_sent = st["total"] - at_stop["total"]
    return {
        "requests": n,
        "server: in flight at the signal (not yet answered)": in_flight_at_signal,
        "client: in flight it waited for (sent, reply not yet read)": (
            int(announced.group(1)) if announced else "-"),
        "signal to exit, s": stop_wall,
        "child exit code": child.returncode,
        "server: received before the stop": at_stop["total"],
        "server: answered before the stop": at_stop["completed"],
        "client: results saved by the stopped run": saved,
        "  answered but never read by the client": at_stop["completed"] - saved,
        "  in flight, connection dropped": st["aborted"],
        "journal files left behind": journals,
        "rerun: cache hits": child_report["cached"],
        "rerun: requests sent": rerun_sent,
        "rerun: sent == requests - saved": rerun_sent == n - saved,
        "rerun: wall s": wall,
        "server: distinct request bodies": st["distinct"],
        "DUPLICATE REQUESTS RECEIVED BY THE SERVER": st["duplicates"],
        "  of which were in flight (unsaved) at the stop": at_stop["total"] - saved,
        "DUPLICATES OF SAVED REQUESTS": st["duplicates"] - (at_stop["total"] - saved),
        "final ok": child_report["statuses"].get("ok", 0),
    }


def child_main(args: argparse.Namespace) -> None:
    # A child of a backgrounded benchmark inherits SIGINT ignored; a user's shell would not.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = run_prefab(args.base_url, prompts(args.tag, args.n), args.concurrency, args.home)
    except KeyboardInterrupt:  # what the prefab CLI does
        sys.exit(130)
    print(json.dumps({"statuses": dict(Counter(r.status for r in out)),
                      "cached": sum(r.cached for r in out)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller run (~1 min)")
    ap.add_argument("--no-distilabel", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    ap.add_argument("--measure", choices=CLIENTS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure_main(args)
        return
    if args.child:
        child_main(args)
        return

    n64, n256, nfault, nkill = (300, 600, 300, 400) if args.quick else (1000, 2000, 1000, 1000)
    with_distilabel = not args.no_distilabel
    if with_distilabel:
        try:
            import distilabel  # noqa: F401
        except ImportError:
            print("distilabel not installed (pip install prefab[bench]); skipping it")
            with_distilabel = False

    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]}", flush=True)
    with ServerProcess(latency=0.5) as server:
        print("1. throughput (server latency 500 ms)", flush=True)
        rows = throughput(server, n64, n256, 0.5, with_distilabel)
        print("2. faults", flush=True)
        fault = faults(server, nfault)
        print("3. stop at 50% and resume: graceful (SIGINT), then hard (SIGKILL)", flush=True)
        resume = {how: kill_resume(server, nkill, 64, 0.5, how) for how in ("sigint", "sigkill")}

    print()
    print("| client | concurrency | requests | wall s | ideal s | efficiency | client CPU ms/req | server max in flight |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['client']} | {r['concurrency']} | {r['requests']} | {r['wall_s']:.2f} | "
              f"{r['ideal_s']:.2f} | {r['efficiency']:.3f} | {r['cpu_ms_per_req']:.2f} | "
              f"{r['server_max_in_flight']} |")
    print()
    print(f"faults ({fault['requests']} structured requests, 10% 429 x1 / 5% 500 x2 / 2% malformed x3 "
          "(> parse_retries=2), "
          f"50 ms latency, {fault['wall_s']:.2f}s):")
    print(f"  client statuses: {fault['client_statuses']} -> {fault['results_returned']} results "
          f"for {fault['requests']} requests (none missing: {fault['none_missing']})")
    print(f"  ok with parsed object: {fault['ok_parsed']}; parse_error kept with raw text: "
          f"{fault['parse_error_kept_raw']}; attempts: {fault['attempts']}; "
          f"server saw {fault['server_requests']} requests: {fault['server_status_counts']}")
    print()
    print(f"stop at 50% + rerun ({nkill} requests, concurrency 64, 500 ms latency):")
    print()
    print("| | graceful stop: SIGINT (Ctrl+C) at 50% | hard kill: SIGKILL at 50% |")
    print("|---|---:|---:|")
    for k in resume["sigint"]:
        cells = [resume[how][k] for how in ("sigint", "sigkill")]
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells]
        label = f"- {k.strip()}" if k.startswith("  ") else k  # sub-row of the row above
        print(f"| {label} | {cells[0]} | {cells[1]} |")
    print()
    print("Graceful stop: nothing new is dispatched; the requests in flight finish and are saved,")
    print("so the rerun sends only requests the server never saw (target: 0 duplicates).")
    print("Hard kill: a request in flight at SIGKILL has no saved result, so the rerun must send")
    print("it again; those duplicates (= requests in flight at the kill) are unavoidable there.")
    print("In both, a request whose result was saved is never sent again (target: 0).")
    if args.json:
        print(json.dumps({"throughput": rows, "faults": fault, "resume": resume}, indent=2))


if __name__ == "__main__":
    main()
