"""OpenAI backend against the loopback server, through the real openai client."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from factory.llm import (
    BUDGET_EXCEEDED,
    ERROR,
    OK,
    PARSE_ERROR,
    TIMEOUT,
    TRUNCATED,
    BudgetExceededError,
    LLMError,
    OpenAIBackend,
    Request,
    SamplingParams,
)
from factory.llm.testing import LoopbackServer

SECRET = "sk-prefab-test-SECRET-0123456789abcdef"
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def user(text: str, **kw) -> Request:
    return Request([{"role": "user", "content": text}], SamplingParams(max_tokens=8), **kw)


def last_user(body: dict) -> str:
    return body["messages"][-1]["content"]


def backend(server: LoopbackServer, **kw) -> OpenAIBackend:
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("progress", False)
    return OpenAIBackend("test-model", base_url=server.base_url, **kw)


def test_results_stream_in_completion_order_and_batch_in_input_order(server):
    delays = {"slow": 0.4, "fast": 0.0, "mid": 0.2}
    server.handler = lambda body, attempt: {"delay": delays[last_user(body)]}
    reqs = [user("slow"), user("fast"), user("mid")]
    b = backend(server, concurrency=3)
    order = [i for i, _ in b.stream(reqs)]
    assert order == [1, 2, 0]
    out = backend(server, concurrency=3, cache=False).run_batch(reqs)
    assert [r.text for r in out] == ["echo[0]: slow", "echo[0]: fast", "echo[0]: mid"]
    assert all(r.status == OK and r.attempts == 1 for r in out)


def test_concurrency_bound_is_respected(server):
    server.configure(latency=0.05)
    out = backend(server, concurrency=5).run_batch([user(f"q{i}") for i in range(40)])
    assert all(r.ok for r in out)
    assert server.stats()["max_in_flight"] == 5


def test_rpm_limiter_paces_requests(server):
    # 1200 RPM = 20/s with a one-second burst: 40 requests need at least ~1 s.
    t0 = time.monotonic()
    out = backend(server, concurrency=40, rpm=1200).run_batch([user(f"r{i}") for i in range(40)])
    elapsed = time.monotonic() - t0
    assert all(r.ok for r in out)
    arrivals = sorted(server.stats(with_arrivals=True)["arrivals"])
    assert elapsed >= 0.9
    assert arrivals[-1] - arrivals[0] >= 0.9
    # never more than burst (20) + rate x window in any half second
    for i, t in enumerate(arrivals):
        assert sum(1 for u in arrivals[i:] if u - t < 0.5) <= 20 + 10 + 1


def test_429_retry_after_is_honoured(server):
    server.handler = lambda body, attempt: {"status": 429, "retry_after": 0.5} if attempt == 1 else None
    t0 = time.monotonic()
    [r] = backend(server).run_batch([user("limited")])
    assert r.status == OK and r.attempts == 2
    arrivals = server.stats(with_arrivals=True)["arrivals"]
    assert arrivals[1] - arrivals[0] >= 0.5  # backoff_base is 0.01: the wait came from retry-after
    assert time.monotonic() - t0 < 3


def test_500_is_retried_then_reported_as_explicit_error(server):
    server.handler = lambda body, attempt: "500" if last_user(body) == "broken" else None
    out = backend(server, max_retries=2).run_batch([user("fine"), user("broken"), user("fine2")])
    assert [r.status for r in out] == [OK, ERROR, OK]
    bad = out[1]
    assert bad.http_status == 500 and bad.attempts == 3 and "500" in bad.error
    st = server.stats()
    assert st["status_counts"]["500"] == 3 and st["total"] == 5


def test_non_retryable_status_fails_at_once_and_key_is_redacted(server):
    server.handler = lambda body, attempt: {
        "status": 401, "message": f"Incorrect API key provided: {SECRET}"
    }
    [r] = backend(server, max_retries=5).run_batch([user("x")])
    assert r.status == ERROR and r.http_status == 401 and r.attempts == 1
    assert SECRET not in r.error and "***" in r.error


def test_timeout_is_retried_then_reported(server):
    server.configure(hang_s=10)
    server.handler = lambda body, attempt: "timeout"
    t0 = time.monotonic()
    [r] = backend(server, timeout=0.3, max_retries=1).run_batch([user("hang")])
    assert r.status == TIMEOUT and r.attempts == 2
    assert time.monotonic() - t0 < 2.5
    time.sleep(0.1)
    assert server.stats()["aborted"] == 2  # the server saw the client give up both times


def test_malformed_json_is_retried_then_kept_raw_as_parse_error(server):
    server.handler = lambda body, attempt: (
        "malformed" if last_user(body) == "always-bad" or attempt == 1 else None
    )
    reqs = [user("bad-once", json_schema=SCHEMA), user("always-bad", json_schema=SCHEMA)]
    good, bad = backend(server, parse_retries=2).run_batch(reqs)
    assert good.status == OK and good.attempts == 2 and good.parsed == {"answer": "bad-once"}
    assert bad.status == PARSE_ERROR and bad.attempts == 3
    assert bad.text == '{"answer": "trunc' and bad.parsed is None and "invalid JSON" in bad.error
    # parse_error is final: it is cached with its status, not re-sent
    total = server.stats()["total"]
    again = backend(server).run_batch(reqs)
    assert [r.status for r in again] == [OK, PARSE_ERROR] and all(r.cached for r in again)
    assert server.stats()["total"] == total


def test_schema_violation_is_a_parse_error(server):
    server.handler = lambda body, attempt: json.dumps({"answer": 3})
    [r] = backend(server, parse_retries=1).run_batch([user("q", json_schema=SCHEMA)])
    assert r.status == PARSE_ERROR and "schema violation" in r.error and r.attempts == 2


def test_structured_request_body(server):
    seen = []
    server.handler = lambda body, attempt: seen.append(body)
    req = Request([{"role": "user", "content": "q"}], SamplingParams(temperature=0.7, top_p=0.9,
                  max_tokens=20, stop=("END",)), n=2, seed=10, sample_index=3, json_schema=SCHEMA)
    [r] = backend(server).run_batch([req])
    body = seen[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    assert (body["n"], body["seed"], body["temperature"], body["top_p"], body["max_tokens"]) == (
        2, 13, 0.7, 0.9, 20)
    assert body["stop"] == ["END"]
    assert len(r.choices) == 2 and all(c.parsed == {"answer": "q"} for c in r.choices)


def test_reply_cut_at_max_tokens_is_truncated_not_ok(server, capsys):
    # The server cuts at max_tokens (4 characters a token) with finish_reason "length".
    long_q = "a rather long question " * 4
    reqs = [Request([{"role": "user", "content": long_q}], SamplingParams(max_tokens=3)),
            user("hi")]
    b = backend(server, progress=True)
    cut, whole = b.run_batch(reqs)
    assert cut.status == TRUNCATED and not cut.ok and cut.finish_reason == "length"
    assert cut.text == f"echo[0]: {long_q}"[:12] and "finish_reason=length" in cut.error
    assert cut.attempts == 1 and whole.status == OK
    assert b.usage["truncated"] == 1 and "truncated=1" in capsys.readouterr().err
    # a real answer for max_tokens=3: cached, and still marked truncated when served again
    again = backend(server).run_batch(reqs)
    assert [r.status for r in again] == [TRUNCATED, OK] and all(r.cached for r in again)
    assert server.stats()["total"] == 2


def test_structured_reply_cut_at_max_tokens_is_truncated_and_not_retried(server):
    server.handler = lambda body, attempt: {"content": '{"answer": "lo', "finish_reason": "length"}
    [r] = backend(server, parse_retries=2).run_batch([user("q", json_schema=SCHEMA)])
    assert r.status == TRUNCATED and r.parsed is None and "invalid JSON" in r.error
    assert r.attempts == 1  # the same limit would cut it again: no parse retries spent


OPTIONAL = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
            "required": ["a"], "additionalProperties": False}
OPEN = {"type": "object", "properties": {"a": {"type": "string"}, "tags": {
    "type": "array", "items": {"type": "object", "properties": {"t": {"type": "string"}},
                               "required": ["t"]}}}, "required": ["a", "tags"]}
CLOSED = {**OPEN, "additionalProperties": False, "properties": {**OPEN["properties"], "tags": {
    "type": "array", "items": {**OPEN["properties"]["tags"]["items"],
                               "additionalProperties": False}}}}
MIN_LENGTH = {"type": "object", "properties": {"a": {"type": "string", "minLength": 3}},
              "required": ["a"], "additionalProperties": False}


@pytest.mark.parametrize("schema, strict, sent", [
    (SCHEMA, True, SCHEMA),          # already strict-compatible
    (OPEN, True, CLOSED),            # closing every object is lossless: made strict
    (OPTIONAL, False, OPTIONAL),     # an optional field: strict would need it required
    (MIN_LENGTH, False, MIN_LENGTH), # a keyword strict mode refuses
])
def test_strict_only_for_schemas_strict_mode_accepts(server, schema, strict, sent):
    seen = []
    server.handler = lambda body, attempt: seen.append(body["response_format"]["json_schema"])
    [r] = backend(server, max_retries=0).run_batch([user("q", json_schema=schema)])
    # the loopback server answers a strict schema outside strict mode with HTTP 400
    assert r.status == OK, r.error
    assert seen == [{"name": "response", "schema": sent, "strict": strict}]


def test_loopback_refuses_what_openai_refuses(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="sk-x", max_retries=0)
    msgs = [{"role": "user", "content": "q"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="test-model", messages=msgs, response_format={
            "type": "json_schema", "json_schema": {"name": "r", "schema": OPTIONAL, "strict": True}})
    err = e.value.body
    assert err["type"] == "invalid_request_error" and err["param"] == "response_format"
    assert "Invalid schema for response_format 'r'" in err["message"] and "'b'" in err["message"]
    for model in ("o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini"):
        with pytest.raises(openai.BadRequestError, match="Use 'max_completion_tokens' instead"):
            client.chat.completions.create(model=model, messages=msgs, max_tokens=5)
    ok = client.chat.completions.create(model="o3-mini", messages=msgs, max_completion_tokens=2)
    assert ok.choices[0].finish_reason == "length"
    assert server.stats()["status_counts"] == {"400": 6, "200": 1}
    client.close()


@pytest.mark.parametrize("model, param", [
    ("o1", "max_completion_tokens"), ("o3-mini-2025-01-31", "max_completion_tokens"),
    ("o4-mini", "max_completion_tokens"), ("gpt-5", "max_completion_tokens"),
    ("gpt-5-nano", "max_completion_tokens"), ("gpt-5.1", "max_completion_tokens"),
    ("gpt-4o-mini", "max_tokens"), ("gpt-4.1", "max_tokens"),
    ("Qwen/Qwen2.5-7B-Instruct", "max_tokens"),
])
def test_token_limit_parameter_follows_the_model(server, model, param):
    seen = []
    server.handler = lambda body, attempt: seen.append(body)
    b = OpenAIBackend(model, base_url=server.base_url, max_retries=0, progress=False)
    [r] = b.run_batch([user("q")])
    assert r.status == OK, r.error
    other = ({"max_tokens", "max_completion_tokens"} - {param}).pop()
    assert seen[0][param] == 8 and other not in seen[0]


def test_cost_accounting_with_price_override(server):
    server.configure(completion_tokens=100)
    b = backend(server, prices={"test-model": (1.0, 2.0)})
    out = b.run_batch([user("a"), user("b")])
    for r in out:
        assert r.completion_tokens == 100 and r.prompt_tokens > 0
        assert r.cost == pytest.approx((r.prompt_tokens * 1.0 + 100 * 2.0) / 1e6)
    assert b.usage["cost"] == pytest.approx(sum(r.cost for r in out))
    assert b.usage["completion_tokens"] == 200


def test_budget_refuses_to_start(server):
    b = backend(server, prices={"test-model": (1.0, 1.0)}, max_cost=1e-6)
    with pytest.raises(BudgetExceededError, match="exceeds the budget"):
        b.run_batch([user(f"q{i}") for i in range(10)])
    assert server.stats()["total"] == 0
    with pytest.raises(LLMError, match="no price known"):
        backend(server, max_cost=1.0).run_batch([user("q")])
    assert server.stats()["total"] == 0


def test_budget_stops_cleanly_and_keeps_finished_work(server):
    # The server bills 1000 completion tokens although max_tokens is 8: the estimate passes,
    # the real spend ($1 per request at $1000/M) reaches the $5 cap mid-run.
    server.configure(completion_tokens=1000, latency=0.01)
    reqs = [user(f"q{i}") for i in range(20)]
    b = backend(server, concurrency=2, prices={"test-model": (0.0, 1000.0)}, max_cost=5.0)
    out = b.run_batch(reqs)
    statuses = [r.status for r in out]
    n_ok = statuses.count(OK)
    assert 5 <= n_ok <= 6 and statuses.count(BUDGET_EXCEEDED) == 20 - n_ok
    assert b.budget.spent == pytest.approx(n_ok * 1.0)
    assert server.stats()["total"] == n_ok
    # finished work is cached: a bigger budget sends only the rest
    b2 = backend(server, concurrency=2, prices={"test-model": (0.0, 1000.0)}, max_cost=100.0)
    out2 = b2.run_batch(reqs)
    assert all(r.ok for r in out2) and sum(r.cached for r in out2) == n_ok
    assert server.stats()["total"] == 20


def test_cache_hit_sends_nothing_across_backend_instances(server):
    reqs = [user(f"c{i}") for i in range(10)]
    first = backend(server).run_batch(reqs)
    assert server.stats()["total"] == 10 and not any(r.cached for r in first)
    second = backend(server, concurrency=3).run_batch(reqs)  # fresh object, same home
    assert server.stats()["total"] == 10
    assert all(r.cached for r in second) and [r.text for r in second] == [r.text for r in first]


def test_errors_are_not_cached(server):
    server.handler = lambda body, attempt: "500" if attempt == 1 else None
    [r] = backend(server, max_retries=0).run_batch([user("flaky")])
    assert r.status == ERROR
    [r2] = backend(server, max_retries=0).run_batch([user("flaky")])
    assert r2.status == OK and not r2.cached
    assert server.stats()["total"] == 2


def test_duplicates_in_a_batch_are_sent_once(server):
    out = backend(server).run_batch([user("same"), user("same"), user("other")])
    assert server.stats()["total"] == 2
    assert out[0].text == out[1].text == "echo[0]: same"


def test_sample_index_gives_distinct_requests(server):
    reqs = [user("s", seed=7, sample_index=i) for i in range(3)]
    backend(server).run_batch(reqs)
    assert server.stats()["distinct"] == 3


def test_api_key_from_env_only_and_never_stored(server, tmp_path):
    with pytest.raises(LLMError, match="api_key"):
        from factory.llm import backend_from_spec

        backend_from_spec(f"openai:m?api_key={SECRET}")
    b = backend(server)
    assert SECRET not in repr(b) and SECRET not in str(vars(b))
    b.run_batch([user(f"k{i}") for i in range(5)])
    files = [p for p in (tmp_path / "home").rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p


def test_missing_key_for_openai_is_a_clear_error_when_a_request_is_to_be_sent(monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY")
    backend = OpenAIBackend("gpt-4o-mini", cache=tmp_path / "cache.duckdb")  # a dry run needs no key
    with pytest.raises(LLMError, match="OPENAI_API_KEY"):
        backend.run_batch([user("hello")])
    monkeypatch.setenv("MY_KEY", "x")
    OpenAIBackend("gpt-4o-mini", api_key_env="MY_KEY").require_key()


def test_first_ctrl_c_drains_in_flight_requests_into_the_cache(server, capsys):
    server.configure(latency=0.4)
    arrived = []

    def on_arrival(body, attempt):
        arrived.append(last_user(body))
        if len(arrived) == 4:  # all four workers have a request on the wire
            os.kill(os.getpid(), signal.SIGINT)

    server.handler = on_arrival
    reqs = [user(f"d{i}") for i in range(12)]
    t0 = time.monotonic()
    stopped = "SIGINT: stopped once the in-flight requests had finished; 8 requests were left"
    with pytest.raises(KeyboardInterrupt, match=stopped):
        backend(server, concurrency=4).run_batch(reqs)
    assert 0.35 < time.monotonic() - t0 < 2  # waited for the 0.4 s replies, sent nothing more
    st = server.stats()
    assert st["total"] == st["completed"] == 4 and st["aborted"] == 0
    err = capsys.readouterr().err
    assert "prefab: stopping: waiting for 4 in-flight requests (Ctrl+C again to abort)" in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    server.handler = None
    out = backend(server, concurrency=4).run_batch(reqs)
    assert all(r.ok for r in out) and sum(r.cached for r in out) == 4
    st = server.stats()
    assert st["total"] == 12 and st["duplicates"] == 0


def test_second_ctrl_c_aborts_without_waiting_for_in_flight_requests(server, capsys):
    server.handler = lambda body, attempt: {"delay": 0.0 if last_user(body).startswith("f") else 5}
    reqs = [user(f"f{i}") for i in range(6)] + [user(f"s{i}") for i in range(4)]
    timers = [threading.Timer(t, os.kill, (os.getpid(), signal.SIGINT)) for t in (0.6, 0.8)]
    for t in timers:
        t.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="aborted"):
        backend(server, concurrency=10).run_batch(reqs)
    assert time.monotonic() - t0 < 2  # the 5 s requests were not awaited
    assert "waiting for 4 in-flight requests" in capsys.readouterr().err
    time.sleep(0.1)
    assert server.stats()["aborted"] == 4  # their connections were dropped
    server.handler = None
    out = backend(server, concurrency=10).run_batch(reqs)
    assert sum(r.cached for r in out) == 6 and all(r.ok for r in out)


def test_a_stop_cuts_retry_backoff_short_and_caches_nothing_unfinished(server):
    # "flaky" gets a 429 with a 30 s retry-after: it sleeps in backoff when the stop
    # comes, so it ends at once as cancelled (not cached); "fine" finishes and is cached.
    def handler(body, attempt):
        if last_user(body) == "flaky" and attempt == 1:
            threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
            return {"status": 429, "retry_after": 30}
        return {"delay": 0.3}

    server.handler = handler
    seen = {}
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        for i, r in backend(server, concurrency=2).stream([user("flaky"), user("fine")]):
            seen[i] = r
    assert time.monotonic() - t0 < 2
    assert seen[0].status == "cancelled" and seen[0].attempts == 1 and "HTTP 429" in seen[0].error
    assert seen[1].ok
    server.handler = None
    again = backend(server).run_batch([user("flaky"), user("fine")])
    assert [r.cached for r in again] == [False, True]


def test_sync_api_inside_a_running_loop_and_async_api(server):
    import asyncio

    b = backend(server, concurrency=4)

    async def main():
        inside = b.run_batch([user("loop1"), user("loop2")])  # e.g. from a notebook cell
        awaited = await b.arun_batch([user("loop3"), user("loop1")])
        return inside, awaited

    inside, awaited = asyncio.run(main())
    assert [r.text for r in inside] == ["echo[0]: loop1", "echo[0]: loop2"]
    assert awaited[0].text == "echo[0]: loop3" and awaited[1].cached
    assert server.stats()["total"] == 3


def test_progress_bar_reports_errors_and_spend(server, capsys):
    server.handler = lambda body, attempt: "500" if last_user(body) == "bad" else None
    b = backend(server, max_retries=0, prices={"test-model": (1.0, 1.0)}, progress=True)
    b.run_batch([user("ok"), user("bad")])
    err = capsys.readouterr().err
    assert "2/2" in err and "err=1" in err and "spent=$" in err
