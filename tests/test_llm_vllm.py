"""vLLM backend without vLLM: a fake engine at the ``LLM.chat`` boundary."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from factory.llm import (
    ERROR,
    OK,
    PARSE_ERROR,
    TRUNCATED,
    MissingDependencyError,
    Request,
    SamplingParams,
    backend_from_spec,
)
from factory.llm.vllm_backend import DEFAULT_MAX_TOKENS, VLLMBackend, make_vllm_sampling_params

SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}


# vllm.SamplingParams().max_tokens: what the engine applies when none is sent.
VLLM_DEFAULT_MAX_TOKENS = 16


class FakeLLM:
    """Shaped like vllm.LLM.chat: returns RequestOutput-like objects in input order.

    One token per word; a reply longer than ``max_tokens`` (vLLM's default of 16 when
    none is sent) is cut there with ``finish_reason="length"``, as the engine does."""

    def __init__(self, reply=None, fail_on=None):
        self.calls = []
        self.reply = reply or (lambda conv, i: f"answer {i} to {conv[-1]['content']}")
        self.fail_on = fail_on

    def chat(self, messages, sampling_params=None, use_tqdm=True, chat_template=None):
        self.calls.append({"messages": messages, "sampling_params": sampling_params,
                           "use_tqdm": use_tqdm, "chat_template": chat_template})
        if self.fail_on and any(conv[-1]["content"] == self.fail_on for conv in messages):
            raise ValueError("prompt too long")
        outs = []
        for conv, sp in zip(messages, sampling_params, strict=True):
            limit = sp.get("max_tokens", VLLM_DEFAULT_MAX_TOKENS)
            completions = []
            for i in range(sp["n"]):
                words = self.reply(conv, i).split(" ")
                finish = "length" if len(words) > limit else "stop"
                words = words[:limit]
                completions.append(SimpleNamespace(index=i, text=" ".join(words),
                                                   token_ids=list(range(len(words))),
                                                   finish_reason=finish))
            outs.append(SimpleNamespace(prompt_token_ids=[1] * 7, outputs=completions))
        return outs


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFAB_HOME", str(tmp_path))


def make(engine, **kw) -> VLLMBackend:
    kw.setdefault("progress", False)
    return VLLMBackend("Qwen/Qwen2.5-0.5B-Instruct", engine=engine,
                       sampling_factory=lambda **sp: sp, **kw)


def test_request_building_and_output_parsing():
    eng = FakeLLM()
    reqs = [
        Request([{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}],
                SamplingParams(temperature=0.5, top_p=0.9, max_tokens=32, stop=("\n\n",),
                               extra={"top_k": 20}),
                n=2, seed=100, sample_index=1),
        Request([{"role": "user", "content": "q2"}]),
    ]
    out = make(eng, chat_template="{{ messages }}").run_batch(reqs)
    [call] = eng.calls
    assert call["messages"] == [reqs[0].messages, reqs[1].messages]
    assert call["use_tqdm"] is False and call["chat_template"] == "{{ messages }}"
    assert call["sampling_params"][0] == {"n": 2, "temperature": 0.5, "top_p": 0.9,
                                          "max_tokens": 32, "stop": ["\n\n"], "seed": 101,
                                          "top_k": 20}
    assert call["sampling_params"][1] == {"n": 1, "max_tokens": DEFAULT_MAX_TOKENS}
    first = out[0]
    assert first.status == OK and first.texts == ["answer 0 to q1", "answer 1 to q1"]
    assert first.prompt_tokens == 7 and first.completion_tokens == 4 + 4
    assert first.finish_reason == "stop" and first.cost == 0.0
    assert out[1].text == "answer 0 to q2"


def test_structured_outputs_request_and_parse():
    replies = {"good": '{"score": 4}', "cut": '{"sco'}
    eng = FakeLLM(reply=lambda conv, i: replies[conv[-1]["content"]])
    reqs = [Request([{"role": "user", "content": k}], json_schema=SCHEMA) for k in replies]
    good, cut = make(eng).run_batch(reqs)
    assert eng.calls[0]["sampling_params"][0]["structured_outputs"] == {"json": SCHEMA}
    assert good.status == OK and good.parsed == {"score": 4}
    assert cut.status == PARSE_ERROR and cut.text == '{"sco' and cut.parsed is None


LONG = " ".join(f"w{i}" for i in range(100))  # a 100-token reply


def test_every_request_gets_an_explicit_token_limit():
    # Without one, vLLM stops every reply at 16 tokens: a silently cut "ok" answer.
    eng = FakeLLM(reply=lambda conv, i: LONG)
    req = Request([{"role": "user", "content": "write at length"}])
    [r] = make(eng, cache=False).run_batch([req])
    assert eng.calls[0]["sampling_params"][0]["max_tokens"] == DEFAULT_MAX_TOKENS >= 1024
    assert r.status == OK and r.text == LONG and r.completion_tokens == 100
    # a backend-level default (spec key max_tokens) applies to requests that set none...
    eng = FakeLLM(reply=lambda conv, i: LONG)
    [r] = make(eng, cache=False, max_tokens=300).run_batch([req])
    assert eng.calls[0]["sampling_params"][0]["max_tokens"] == 300 and r.status == OK
    # ...and the request's own limit wins over it
    eng = FakeLLM(reply=lambda conv, i: LONG)
    make(eng, cache=False, max_tokens=300).run_batch(
        [Request(req.messages, SamplingParams(max_tokens=120))])
    assert eng.calls[0]["sampling_params"][0]["max_tokens"] == 120


def test_reply_cut_at_the_limit_is_truncated_counted_and_cached(capsys):
    eng = FakeLLM(reply=lambda conv, i: LONG if conv[-1]["content"] == "long" else "short one")
    reqs = [Request([{"role": "user", "content": c}], SamplingParams(max_tokens=8))
            for c in ("long", "short")]
    b = make(eng, progress=True)
    cut, whole = b.run_batch(reqs)
    assert cut.status == TRUNCATED and not cut.ok and cut.finish_reason == "length"
    assert cut.text == " ".join(LONG.split()[:8]) and "finish_reason=length" in cut.error
    assert whole.status == OK
    assert b.usage["truncated"] == 1 and "truncated=1" in capsys.readouterr().err
    # cached as the answer for max_tokens=8, and it comes back still marked truncated
    again = make(eng).run_batch(reqs)
    assert len(eng.calls) == 1 and all(r.cached for r in again)
    assert [r.status for r in again] == [TRUNCATED, OK]


def test_structured_reply_cut_at_the_limit_is_truncated_not_parse_error():
    eng = FakeLLM(reply=lambda conv, i: '{"score": ' + " ".join(["1"] * 50) + "}")
    [r] = make(eng, cache=False).run_batch(
        [Request([{"role": "user", "content": "rate"}], SamplingParams(max_tokens=4),
                 json_schema=SCHEMA)])
    assert r.status == TRUNCATED and r.parsed is None and "invalid JSON" in r.error


def test_cache_key_holds_the_engine_settings_that_change_answers():
    req = Request([{"role": "user", "content": "q"}])
    base = make(FakeLLM(), dtype="bfloat16")
    # same settings -> same key (another object, speed-only settings changed)
    same = make(FakeLLM(), dtype="bfloat16", gpu_memory_utilization=0.5, enforce_eager=True,
                chunk_size=7, tensor_parallel_size=2)
    assert same.request_key(req) == base.request_key(req)
    variants = [
        make(FakeLLM(), dtype="float16"),
        make(FakeLLM(), dtype="bfloat16", quantization="awq"),
        make(FakeLLM(), dtype="bfloat16", revision="abc123"),
        make(FakeLLM(), dtype="bfloat16", generation_config="vllm"),
        make(FakeLLM(), dtype="bfloat16", chat_template="{{ messages }}"),
        make(FakeLLM(), dtype="bfloat16", max_tokens=512),
    ]
    keys = {base.request_key(req)} | {v.request_key(req) for v in variants}
    assert len(keys) == 1 + len(variants)
    # end to end: a cached answer from a bfloat16 engine is not served to a float16 one
    base.run_batch([req])
    eng = FakeLLM()
    [r] = make(eng, dtype="float16").run_batch([req])
    assert not r.cached and len(eng.calls) == 1
    assert make(FakeLLM(), dtype="bfloat16").run_batch([req])[0].cached


def test_chunks_stream_and_cache(tmp_path):
    eng = FakeLLM()
    reqs = [Request([{"role": "user", "content": f"q{i}"}]) for i in range(5)]
    b = make(eng, chunk_size=2)
    assert [i for i, _ in b.stream(reqs)] == [0, 1, 2, 3, 4]
    assert [len(c["messages"]) for c in eng.calls] == [2, 2, 1]
    again = make(eng, chunk_size=2).run_batch(reqs)
    assert all(r.cached for r in again) and len(eng.calls) == 3


def test_a_failing_request_is_isolated_not_the_chunk():
    eng = FakeLLM(fail_on="boom")
    reqs = [Request([{"role": "user", "content": c}]) for c in ("a", "boom", "b")]
    out = make(eng, cache=False).run_batch(reqs)
    assert [r.status for r in out] == [OK, ERROR, OK]
    assert "prompt too long" in out[1].error


def test_missing_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'prefab\[vllm\]'"):
        VLLMBackend("some/model")
    with pytest.raises(MissingDependencyError, match="prefab"):
        backend_from_spec("vllm:some/model?tp=2")
    # an injected engine still needs vllm for SamplingParams unless a factory is given
    b = VLLMBackend("m", engine=FakeLLM(), cache=False, progress=False)
    with pytest.raises(MissingDependencyError):
        b.run_batch([Request([{"role": "user", "content": "x"}])])


def _fake_vllm(monkeypatch, *, new_api: bool):
    class SamplingParams_:
        def __init__(self, **kw):
            self.kw = kw

    class Structured:
        def __init__(self, **kw):
            self.kw = kw

    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = SamplingParams_
    sp_mod = types.ModuleType("vllm.sampling_params")
    if new_api:
        sp_mod.StructuredOutputsParams = Structured
    else:
        sp_mod.GuidedDecodingParams = Structured
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)


@pytest.mark.parametrize("new_api", [True, False])
def test_sampling_params_use_the_installed_structured_outputs_api(monkeypatch, new_api):
    _fake_vllm(monkeypatch, new_api=new_api)
    sp = make_vllm_sampling_params(n=1, max_tokens=8, structured_outputs={"json": SCHEMA})
    field = "structured_outputs" if new_api else "guided_decoding"
    assert set(sp.kw) == {"n", "max_tokens", field}
    assert sp.kw[field].kw == {"json": SCHEMA}


def test_spec_builds_vllm_backend_with_tensor_parallelism(monkeypatch):
    _fake_vllm(monkeypatch, new_api=True)
    b = backend_from_spec("vllm:meta-llama/Llama-3.1-8B-Instruct?tp=2&max_model_len=8192&enforce_eager=true&cache=0")
    assert isinstance(b, VLLMBackend) and b.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert b.tensor_parallel_size == 2 and b.cache is None
    assert b.engine_kwargs == {"max_model_len": 8192, "enforce_eager": True}
    b = backend_from_spec("vllm:m?max_tokens=4096&cache=0")
    assert b.max_tokens == 4096 and b.engine_kwargs == {}


class SignallingLLM(FakeLLM):
    """Sends itself SIGINT during chosen engine calls, as a user pressing Ctrl+C would."""

    def __init__(self, signals_per_call):
        super().__init__()
        self.signals_per_call = signals_per_call

    def chat(self, messages, **kw):
        import os
        import signal

        for _ in range(self.signals_per_call.get(len(self.calls), 0)):
            os.kill(os.getpid(), signal.SIGINT)
        return super().chat(messages, **kw)


def test_first_ctrl_c_stops_after_the_current_chunk_and_caches_it(capsys):
    eng = SignallingLLM({0: 1})
    reqs = [Request([{"role": "user", "content": f"q{i}"}]) for i in range(5)]
    with pytest.raises(KeyboardInterrupt, match="3 requests were left without a final answer"):
        make(eng, chunk_size=2).run_batch(reqs)
    assert len(eng.calls) == 1  # the chunk in the engine finished; no other chunk started
    err = capsys.readouterr().err
    assert "prefab: stopping: waiting for the current chunk of 2 requests to finish" in err
    eng2 = FakeLLM()
    again = make(eng2, chunk_size=2).run_batch(reqs)
    assert [r.cached for r in again] == [True, True, False, False, False]
    assert [len(c["messages"]) for c in eng2.calls] == [2, 1]


def test_second_ctrl_c_interrupts_the_engine_call():
    eng = SignallingLLM({0: 2})
    reqs = [Request([{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    with pytest.raises(KeyboardInterrupt, match="aborted"):
        make(eng, chunk_size=2).run_batch(reqs)
    assert eng.calls == []  # interrupted inside chat(), before it returned anything
    assert not any(r.cached for r in make(FakeLLM()).run_batch(reqs))
