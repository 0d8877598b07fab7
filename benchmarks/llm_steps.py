"""LLM-step benchmark: judge preference pairs with an LLM, prefab vs a distilabel pipeline.

    python benchmarks/llm_steps.py                 # 2,000 pairs x 2 draws, 500 ms latency (~3 min)
    python benchmarks/llm_steps.py --pairs 400     # quicker
    python benchmarks/llm_steps.py --no-distilabel

The job: 2,000 pairs, k=2 draws each with the A/B order swapped in one of them (by pair id
and draw), against the loopback OpenAI-compatible server (its own process, 500 ms per
reply) scripted as a position-biased judge: it prefers a clearly longer answer and, between
two about as long, whichever is shown first.

1. prefab: ``factory.filter("consistency", ...)`` on a catalog version (render, send through
   the real openai client, parse the JSON-schema verdicts, vote, store scores, commit);
   wall time against the ideal requests x latency / concurrency.
2. distilabel 1.5.3: the same judging job as a Pipeline (LoadDataFromDicts >> UltraFeedback,
   overall-rating, 2 generations per row, one row per draw with the order swapped the
   same way) through its OpenAILLM with base_url, ``input_batch_size`` = concurrency.
3. stop at 50% and rerun: the run gets SIGINT (Ctrl+C) when the server has answered half
   of the requests, then the same command runs again; the server counts request bodies it
   received twice. prefab: ``prefab filter consistency`` exactly as a user types it.
   distilabel: the same pipeline with ``use_cache=True``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench-judge"
JUDGE_MAX_TOKENS = 256


# ---- the scripted judge (runs inside the server process) -------------------------------------


def _verdict(a: str, b: str) -> str:
    if max(len(a), len(b)) <= 1.3 * min(len(a), len(b)):
        return "A"  # position bias: about as long -> the first one shown
    return "A" if len(a) > len(b) else "B"


def judge_handler(body: dict[str, Any], attempt: int) -> Any:
    messages = body.get("messages") or []
    user = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    if "Your role is to evaluate text quality" in system:  # distilabel's UltraFeedback
        texts = re.findall(r"^<text (\d+)> (.*)$", user.split("## Annotation", 1)[-1], re.M)
        a, b = texts[0][1], texts[1][1]
        first = _verdict(a, b) == "A"
        return (f"#### Output for Text 1\nRating: {4 if first else 2}\nRationale: compared.\n\n"
                f"#### Output for Text 2\nRating: {2 if first else 4}\nRationale: compared.")
    parts = dict(re.findall(r"(Response [AB]):\n<<<\n(.*?)\n>>>", user, re.S))
    if len(parts) == 2:  # prefab's consistency judge
        return json.dumps({"reason": "compared.", "verdict": _verdict(parts["Response A"], parts["Response B"])})
    return None


def serve_main(latency: float) -> None:
    from factory.llm.testing import LoopbackServer

    server = LoopbackServer(handler=judge_handler, latency=latency).start()
    print(json.dumps({"port": server.port, "base_url": server.base_url}), flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


class Server:
    """The scripted judge server in its own process (own GIL), driven over HTTP."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", "--latency", str(latency)],
                                     stdout=subprocess.PIPE, text=True)
        info = json.loads(self.proc.stdout.readline())
        self.port, self.base_url = info["port"], info["base_url"]

    def _call(self, path: str, payload: dict | None = None) -> dict[str, Any]:
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method="GET" if data is None else "POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stats(self) -> dict[str, Any]:
        return self._call("/_stats")

    def reset(self) -> None:
        self._call("/_reset", {})

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# ---- the job -----------------------------------------------------------------------------------


def make_pairs(n: int) -> list[dict[str, str]]:
    """A third with the chosen answer clearly longer, a third about as long, a third
    with the rejected one clearly longer (the labels a judge should doubt)."""
    rows = []
    for i in range(n):
        short = f"Answer {i}: no."
        same = f"Answer {i}: yes."
        long = f"Answer {i}: yes, because the premise holds and the steps check out in detail."
        kind = i % 3
        chosen, rejected = ((long, short), (same, short), (short, long))[kind]
        rows.append({"prompt": f"Question {i}: is the claim in item {i} correct?", "chosen": chosen,
                     "rejected": rejected})
    return rows


def setup_home(home: str, n: int) -> None:
    from factory.catalog import Catalog
    from schemas.pairs import Message, Pair, pairs_to_table

    pairs = [Pair([Message("user", r["prompt"])], r["chosen"], r["rejected"]) for r in make_pairs(n)]
    Catalog(home).commit("bench", pairs_to_table(pairs), message="benchmark pairs")


def prefab_command(base_url: str, home: str, concurrency: int, samples: int) -> list[str]:
    backend = f"openai:{MODEL}?base_url={base_url}&concurrency={concurrency}"
    return [sys.executable, "-c", "import sys; from factory.cli import main; sys.exit(main(sys.argv[1:]))",
            "filter", "consistency", "--home", home, "--from", "bench", "--name", "judged", "--backend", backend,
            "--set", f"samples={samples}", "--set", f"max_tokens={JUDGE_MAX_TOKENS}", "--no-progress", "--json"]


def prefab_child(args: argparse.Namespace) -> None:
    """Time the filter call itself (imports excluded, as for distilabel's pipeline.run)."""
    import factory
    import factory.catalog
    import factory.llm.openai_backend
    import factory.steps.api  # noqa: F401
    from factory.steps import load_steps

    load_steps()

    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.perf_counter()
    report = factory.filter("consistency", "bench", "judged", home=args.home,
                            backend=f"openai:{MODEL}?base_url={args.base_url}&concurrency={args.concurrency}",
                            settings={"samples": args.samples, "max_tokens": JUDGE_MAX_TOKENS}, progress=False)
    wall = time.perf_counter() - t0
    from factory.catalog import Catalog

    _, scores = Catalog(args.home).find_scores(Catalog(args.home).resolve("judged").lineage["score_key"])
    print(json.dumps({"wall": wall, "report": report, "agreement": scores["consistency_agreement"].to_pylist(),
                      "pair_ids": scores["pair_id"].to_pylist()}, default=str), flush=True)


def backend_child(args: argparse.Namespace) -> None:
    """The same requests through the backend alone: what the step layer adds on top."""
    import factory.steps.api  # noqa: F401  # imported before timing, like the other runners
    from factory.catalog import Catalog
    from factory.llm import backend_from_spec
    from factory.steps import StepContext, load_steps
    from factory.steps.llm import LLMMap
    from filters.consistency import ConsistencyParams, judge_calls

    load_steps()
    table = Catalog(args.home).read_table("bench")
    params = ConsistencyParams(samples=args.samples, max_tokens=JUDGE_MAX_TOKENS)
    backend = backend_from_spec(f"openai:{MODEL}?base_url={args.base_url}&concurrency={args.concurrency}",
                                cache=Path(args.home) / "llm_cache.duckdb", progress=False)
    ctx = StepContext("consistency", params, backend=backend, progress=False)
    mapper = LLMMap(ctx)
    requests = [mapper.request(params.template, c, temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
                for c in judge_calls(table, params)]
    t0 = time.perf_counter()
    out = backend.run_batch(requests)
    wall = time.perf_counter() - t0
    print(json.dumps({"wall": wall, "ok": sum(r.ok for r in out)}), flush=True)


def distilabel_rows(n: int, samples: int) -> list[dict[str, Any]]:
    from factory.steps.llm import ab_swapped
    from schemas.pairs import pair_id_of

    rows = []
    for r in make_pairs(n):
        pid = pair_id_of([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"])
        for k in range(samples):
            swapped = ab_swapped(pid, k)
            gens = [r["rejected"], r["chosen"]] if swapped else [r["chosen"], r["rejected"]]
            rows.append({"instruction": r["prompt"], "generations": gens, "pair_id": pid, "sample": k,
                         "swapped": swapped})
    return rows


def distilabel_child(args: argparse.Namespace) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("DISTILABEL_LOG_LEVEL", "ERROR")
    try:
        import requests  # noqa: F401  # distilabel imports it for image models only
    except ImportError:
        import types

        sys.modules["requests"] = types.ModuleType("requests")
    from distilabel.models.llms import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import UltraFeedback

    rows = distilabel_rows(args.pairs, args.samples)
    with Pipeline(name="bench-judge", cache_dir=args.home, enable_metadata=False) as pipeline:
        load = LoadDataFromDicts(data=rows, batch_size=args.concurrency)
        judge = UltraFeedback(
            llm=OpenAILLM(model=MODEL, base_url=args.base_url, api_key="bench", max_retries=0,
                          generation_kwargs={"max_new_tokens": JUDGE_MAX_TOKENS, "temperature": 0.0}),
            aspect="overall-rating", use_default_structured_output=False, input_batch_size=args.concurrency)
        load >> judge
    t0 = time.perf_counter()
    distiset = pipeline.run(use_cache=True)
    wall = time.perf_counter() - t0
    out = distiset["default"]["train"] if distiset else None
    votes: dict[str, list[int]] = {}
    unrated = 0
    for row in out or []:
        ratings = row.get("ratings") or [None, None]
        if None in ratings:
            unrated += 1
            continue
        first = ratings[0] > ratings[1]
        votes.setdefault(row["pair_id"], []).append(1 if first != row["swapped"] else -1)
    print(json.dumps({"wall": wall, "rows_out": len(out) if out is not None else 0, "unrated": unrated,
                      "agreement": {p: (sum(v) / len(v) + 1) / 2 for p, v in votes.items()}}), flush=True)


def run_child(mode: str, server: Server, home: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, mode, "--base-url", server.base_url, "--home", home, "--pairs", str(args.pairs),
           "--samples", str(args.samples), "--concurrency", str(args.concurrency)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise RuntimeError(f"{mode} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_group(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int | str, str, float]:
    """Run ``cmd`` in its own process group; kill the whole group if it outlives ``timeout``."""
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    try:
        out, _ = child.communicate(timeout=timeout)
        return child.returncode, out, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return f"hung: killed after {timeout:.0f}s", "", time.perf_counter() - t0


def stop_and_rerun(server: Server, cmd: list[str], total: int, home: str, rerun_timeout: float,
                   after_stop: Any = None) -> dict[str, Any]:
    """SIGINT when half of the requests are answered, then the same command again.
    ``after_stop()`` describes what the stopped run left behind (called before the rerun)."""
    server.reset()
    env = {**os.environ, "PREFAB_HOME": home}
    # start_new_session: the signal goes to the run and its workers, as Ctrl+C in a terminal would
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)
    while server.stats()["completed"] < total // 2:
        if child.poll() is not None:
            raise RuntimeError("the run finished before it could be stopped: " + child.stderr.read()[-2000:])
        time.sleep(0.005)
    t0 = time.perf_counter()
    os.killpg(child.pid, signal.SIGINT)
    try:
        stopped_out, _ = child.communicate(timeout=120)
        stopped_code: int | str = child.returncode
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        stopped_out, _ = child.communicate()
        stopped_code = "no exit in 120s: killed"
    stop_s = time.perf_counter() - t0
    at_stop = server.stats()
    left = after_stop() if after_stop is not None else "-"
    rerun_code, rerun_out, rerun_s = _run_group(cmd, env, rerun_timeout)
    end = server.stats()
    return {"stopped run: exit code": stopped_code, "_stopped_stdout": stopped_out, "result of the stopped run": left,
            "signal to exit, s": stop_s, "requests before the stop": at_stop["total"],
            "answered before the stop": at_stop["completed"],
            "rerun: exit code": rerun_code, "rerun: requests sent": end["total"] - at_stop["total"],
            "rerun: wall s": rerun_s, "distinct request bodies": end["distinct"],
            "DUPLICATE REQUESTS": end["duplicates"], "requests answered twice": end["completed_duplicates"],
            "_stdout": rerun_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--no-distilabel", action="store_true")
    ap.add_argument("--rerun-timeout", type=float, default=120.0, help="kill a rerun that takes longer (s)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-prefab", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-distilabel", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-backend", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base-url", help=argparse.SUPPRESS)
    ap.add_argument("--home", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_main(args.latency)
        return
    if args.child_prefab:
        prefab_child(args)
        return
    if args.child_distilabel:
        distilabel_child(args)
        return
    if args.child_backend:
        backend_child(args)
        return

    with_distilabel = not args.no_distilabel
    if with_distilabel:
        try:
            import distilabel  # noqa: F401
        except ImportError:
            print("distilabel is not installed: skipping it")
            with_distilabel = False
    n_requests = args.pairs * args.samples
    ideal = n_requests * args.latency / args.concurrency
    print(f"cpus={os.cpu_count()} python={sys.version.split()[0]} pairs={args.pairs} samples={args.samples} "
          f"requests={n_requests} latency={args.latency}s concurrency={args.concurrency}", flush=True)
    server = Server(args.latency)
    rows: list[dict[str, Any]] = []
    stops: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            home = f"{tmp}/prefab"
            setup_home(home, args.pairs)
            print("1. prefab consistency filter", flush=True)
            server.reset()
            prefab = run_child("--child-prefab", server, home, args)
            st = server.stats()
            report = prefab["report"]
            rows.append({"runner": "prefab filter consistency", "wall": prefab["wall"], "server": st,
                         "rows": f"{report['rows_kept']} kept + {report['rows_dropped']} dropped + "
                                 f"{report['rows_failed']} failed = {report['rows_in']}",
                         "agreement": dict(zip(prefab["pair_ids"], prefab["agreement"], strict=True))})
            print(f"   wall {prefab['wall']:.2f}s (ideal {ideal:.2f}s)", flush=True)
            print("   the same requests through the backend alone (no step)", flush=True)
            home_b = f"{tmp}/backend"
            setup_home(home_b, args.pairs)
            server.reset()
            alone = run_child("--child-backend", server, home_b, args)
            rows.append({"runner": "  (same requests, OpenAIBackend.run_batch alone)", "wall": alone["wall"],
                         "server": server.stats(), "rows": f"{alone['ok']} ok replies"})
            print(f"   wall {alone['wall']:.2f}s", flush=True)
            if with_distilabel:
                print("2. distilabel pipeline (LoadDataFromDicts >> UltraFeedback)", flush=True)
                server.reset()
                dist = run_child("--child-distilabel", server, f"{tmp}/distilabel", args)
                st = server.stats()
                rows.append({"runner": "distilabel Pipeline + UltraFeedback", "wall": dist["wall"], "server": st,
                             "rows": f"{dist['rows_out']} rows out, {dist['unrated']} without ratings",
                             "agreement": dist["agreement"]})
                print(f"   wall {dist['wall']:.2f}s", flush=True)

            print("3. stop at 50% (SIGINT) and rerun", flush=True)
            home2 = f"{tmp}/prefab-stop"
            setup_home(home2, args.pairs)
            from factory.catalog import Catalog

            def committed() -> str:
                names = {d["name"] for d in Catalog(home2).datasets()}
                return "a version was committed" if "judged" in names else "nothing committed"

            stop = stops["prefab"] = stop_and_rerun(
                server, prefab_command(server.base_url, home2, args.concurrency, args.samples), n_requests, home2,
                args.rerun_timeout, committed)
            report = json.loads(stop["_stdout"])
            usage = Catalog(home2).resolve("judged").lineage["usage"]
            stop["rerun: cache hits"] = usage["cache_hits"]
            stop["counts reconcile"] = (
                report["rows_in"] == report["rows_kept"] + report["rows_dropped"] + report["rows_failed"]
                == args.pairs and usage["cache_hits"] + usage["requests_sent"] == n_requests
                and stop["rerun: requests sent"] == usage["requests_sent"])
            if with_distilabel:
                cmd = [sys.executable, __file__, "--child-distilabel", "--base-url", server.base_url,
                       "--home", f"{tmp}/distilabel-stop", "--pairs", str(args.pairs), "--samples", str(args.samples),
                       "--concurrency", str(args.concurrency)]
                stop = stops["distilabel"] = stop_and_rerun(server, cmd, n_requests, f"{tmp}/distilabel-stop",
                                                            args.rerun_timeout)
                lines = stop["_stopped_stdout"].strip().splitlines()
                rows_out = json.loads(lines[-1])["rows_out"] if lines else 0
                stop["result of the stopped run"] = f"{rows_out} of {n_requests} rows returned as the result"
                stop["rerun: cache hits"] = "-"
                lines = stop["_stdout"].strip().splitlines()
                out = json.loads(lines[-1]) if lines else {"rows_out": 0, "unrated": 0}
                stop["counts reconcile"] = out["rows_out"] == n_requests and out["unrated"] == 0
    finally:
        server.close()

    print()
    print(f"Judging {args.pairs} pairs x {args.samples} order-swapped draws = {n_requests} requests, "
          f"{args.latency * 1000:.0f} ms latency, concurrency {args.concurrency}, ideal {ideal:.2f}s")
    print()
    print("| runner | wall s | ideal s | efficiency | server requests | duplicates | max in flight | rows |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        st = r["server"]
        print(f"| {r['runner']} | {r['wall']:.2f} | {ideal:.2f} | {ideal / r['wall']:.3f} | {st['total']} | "
              f"{st['duplicates']} | {st['max_in_flight']} | {r['rows']} |")
    judged = [r for r in rows if "agreement" in r]
    if len(judged) == 2:
        a, b = judged[0]["agreement"], judged[1]["agreement"]
        same = sum(1 for p in a if p in b and abs((a[p] or 0) - b[p]) < 1e-9)
        print(f"\nsame agreement per pair (same judge, same order swaps): {same} of {len(a)}")
    print()
    keys = ["stopped run: exit code", "result of the stopped run", "signal to exit, s", "requests before the stop",
            "answered before the stop", "rerun: exit code", "rerun: requests sent", "rerun: cache hits",
            "rerun: wall s", "distinct request bodies", "DUPLICATE REQUESTS", "requests answered twice",
            "counts reconcile"]
    names = list(stops)
    print("| stop at 50% (SIGINT) + rerun | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in keys:
        cells = [stops[name].get(k, "-") for name in names]
        print(f"| {k} | " + " | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in cells) + " |")
    if args.json:
        print(json.dumps({"rows": [{k: v for k, v in r.items() if k != "agreement"} for r in rows],
                          "stops": {n: {k: v for k, v in s.items() if not k.startswith("_")}
                                    for n, s in stops.items()}}, indent=2, default=str))


if __name__ == "__main__":
    main()
