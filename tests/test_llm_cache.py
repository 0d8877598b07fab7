"""Request cache: durability, crash recovery, locking, resume after a killed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from factory.llm import (
    ERROR,
    OK,
    PARSE_ERROR,
    CacheLockedError,
    Choice,
    Request,
    RequestCache,
    Response,
    SamplingParams,
    default_cache_path,
)
from factory.llm.testing import LoopbackServer

ROOT = Path(__file__).resolve().parents[1]


def resp(text: str, status: str = OK) -> Response:
    return Response(status=status, choices=[Choice(text=text, finish_reason="stop")],
                    prompt_tokens=3, completion_tokens=2, cost=0.5, attempts=1)


def test_default_path_follows_prefab_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFAB_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "llm_cache.duckdb"
    monkeypatch.delenv("PREFAB_HOME")
    assert default_cache_path() == Path(".prefab") / "llm_cache.duckdb"


def test_key_depends_on_everything_that_changes_the_answer():
    base = Request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5))
    variants = [
        Request([{"role": "user", "content": "hi!"}], SamplingParams(max_tokens=5)),
        Request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=6)),
        Request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5), sample_index=1),
        Request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5), seed=1),
        Request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5), n=2),
        Request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5),
                json_schema={"type": "object"}),
    ]
    keys = {base.key("m"), base.key("m2")} | {v.key("m") for v in variants}
    assert len(keys) == 8
    same = Request([{"content": "hi", "role": "user"}], SamplingParams(max_tokens=5))
    assert same.key("m") == base.key("m")


def test_put_get_roundtrip_and_only_final_statuses(tmp_path):
    c = RequestCache(tmp_path / "c.duckdb")
    assert c.put("a", "m", resp("A"))
    assert c.put("p", "m", resp("raw{", PARSE_ERROR))
    assert not c.put("e", "m", Response(status=ERROR, error="HTTP 500"))
    hits = c.get_many(["a", "p", "e", "zz"])  # served from the journal before folding
    assert set(hits) == {"a", "p"} and hits["a"].cached and hits["a"].text == "A"
    assert c.flush() == 2
    fresh = RequestCache(tmp_path / "c.duckdb")
    hits = fresh.get_many(["a", "p", "e"])
    assert hits["a"].text == "A" and hits["a"].cost == 0.5
    assert hits["p"].status == PARSE_ERROR and hits["p"].text == "raw{"
    assert fresh.stats() == {"ok": 1, "parse_error": 1, "rows": 2}


def test_journal_of_a_dead_process_is_recovered_and_torn_line_skipped(tmp_path):
    path = tmp_path / "c.duckdb"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead_pid = proc.pid
    good = {"key": "k1", "model": "m", "status": OK, "response": resp("one").to_json(),
            "pt": 3, "ct": 2, "cost": 0.5, "ts": "2025-01-01T00:00:00"}
    journal = Path(f"{path}.{dead_pid}.1.journal")
    journal.write_text(json.dumps(good) + "\n" + '{"key": "k2", "model": "m", "sta')
    c = RequestCache(path)
    hits = c.get_many(["k1", "k2"])
    assert list(hits) == ["k1"] and hits["k1"].text == "one"
    assert not journal.exists()


def test_unflushed_journal_of_a_dropped_object_is_recovered_in_process(tmp_path):
    path = tmp_path / "c.duckdb"
    a = RequestCache(path)
    a.put("k", "m", resp("kept"))
    other = RequestCache(path)
    assert other.get_many(["k"]) == {}  # a is alive and still owns its journal
    del a
    assert other.get_many(["k"])["k"].text == "kept"
    assert not list(tmp_path.glob("*.journal"))


def test_lock_held_by_another_process_gives_a_clear_error(tmp_path):
    path = tmp_path / "c.duckdb"
    c = RequestCache(path)
    c.put("a", "m", resp("A"))
    c.flush()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb,time,sys; c=duckdb.connect({str(path)!r}); print('ready', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        c = RequestCache(path, lock_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(CacheLockedError, match="locked by another process"):
            c.get_many(["a"])
        assert 0.4 < time.monotonic() - t0 < 5
    finally:
        holder.kill()
        holder.wait()
    assert RequestCache(path).get_many(["a"])["a"].text == "A"  # fine once the holder is gone


CHILD = textwrap.dedent(
    """
    import sys
    from factory.llm import OpenAIBackend, Request, SamplingParams
    base_url, n = sys.argv[1], int(sys.argv[2])
    b = OpenAIBackend("m", base_url=base_url, concurrency=4, progress=False)
    reqs = [Request([{"role": "user", "content": f"q{i}"}], SamplingParams(max_tokens=4)) for i in range(n)]
    b.run_batch(reqs)
    """
)


def test_resume_after_sigkill_sends_only_missing_requests(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PREFAB_HOME", str(home))
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    n = 40
    with LoopbackServer(latency=0.05) as srv:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen([sys.executable, "-c", CHILD, srv.base_url, str(n)], env=env)
        deadline = time.monotonic() + 30
        while srv.stats()["completed"] < n // 2:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        time.sleep(0.1)
        at_kill = srv.stats()
        saved = RequestCache(home / "llm_cache.duckdb").stats()["rows"]
        assert saved >= n // 2 - 4  # at most the 4 in-flight answers can be unread
        from factory.llm import OpenAIBackend

        b = OpenAIBackend("m", base_url=srv.base_url, concurrency=4, progress=False)
        out = b.run_batch([Request([{"role": "user", "content": f"q{i}"}], SamplingParams(max_tokens=4))
                           for i in range(n)])
        st = srv.stats()
    assert all(r.status == OK for r in out)
    assert sum(r.cached for r in out) == saved
    assert st["total"] - at_kill["total"] == n - saved  # the rerun sent only what was missing
    assert st["distinct"] == n
    # only requests in flight at the kill (at most the 4 workers) were ever sent twice
    assert st["duplicates"] == at_kill["total"] - saved <= 4


def test_key_holds_backend_kind_and_endpoint_and_is_stable(tmp_path, monkeypatch):
    from factory.llm import OpenAIBackend

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    req = Request([{"role": "user", "content": "hi"}], SamplingParams(max_tokens=5))

    def key(**kw) -> str:
        return OpenAIBackend("M", cache=False, **kw).request_key(req)

    base = key(base_url="http://127.0.0.1:8000/v1")
    # the same endpoint in another form, other speed settings, another object: same key
    assert key(base_url="http://127.0.0.1:8000/v1/", concurrency=64, rpm=100, timeout=5) == base
    assert key() == key(base_url="https://api.openai.com/v1")
    assert len({base, key(), key(base_url="http://127.0.0.1:8001/v1")}) == 3
    # one process computes what another will: the key is a pure function of the settings
    code = ("import os; os.environ['OPENAI_API_KEY'] = 'x'; from factory.llm import OpenAIBackend, "
            "Request, SamplingParams; print(OpenAIBackend('M', cache=False, base_url="
            "'http://127.0.0.1:8000/v1').request_key(Request([{'role': 'user', 'content': 'hi'}], "
            "SamplingParams(max_tokens=5))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == base


def test_vllm_and_openai_never_share_entries(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from factory.llm import OpenAIBackend
    from factory.llm.vllm_backend import VLLMBackend

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    cache = tmp_path / "c.duckdb"

    class Engine:
        def chat(self, messages, sampling_params, **kw):
            return [SimpleNamespace(prompt_token_ids=[1], outputs=[SimpleNamespace(
                text="from vllm", token_ids=[1, 2], finish_reason="stop")]) for _ in messages]

    req = Request([{"role": "user", "content": "same"}], SamplingParams(max_tokens=5))
    vllm = VLLMBackend("M", engine=Engine(), sampling_factory=dict, cache=cache, progress=False)
    assert vllm.run_batch([req])[0].text == "from vllm"
    with LoopbackServer() as srv:
        [r] = OpenAIBackend("M", base_url=srv.base_url, cache=cache, progress=False).run_batch([req])
        assert not r.cached and r.text == "echo[0]: same" and srv.stats()["total"] == 1
    assert vllm.run_batch([req])[0].text == "from vllm"
