"""The shared LLM map (factory.steps.llm) and the Crome LLM modes, end to end through the
CLI and the real openai client against the scripted loopback server."""

from __future__ import annotations

import json
import os
import signal

import pytest

from factory.catalog import Catalog
from factory.steps.llm import Template, TemplateError, ab_swapped, looks_refused, strict_object
from tests.test_llm_steps_script import ScriptedLLM, schema_name, spec, start, write_seeds


@pytest.fixture
def server():
    srv, script = start()
    srv.script = script
    yield srv
    srv.stop()


SEEDS = [
    {"prompt": "What is 12 times 3?", "chosen": "12 times 3 is 36.", "rejected": "It is 35."},
    {"prompt": "Name the largest planet.", "chosen": "Jupiter is the largest planet.", "rejected": "Mars."},
    {"prompt": "Why is the sky blue?", "chosen": "Rayleigh scattering favours short wavelengths.",
     "rejected": "Because of the ocean."},
    {"prompt": "MALFORMED: list three fruits.", "chosen": "Apple, pear, plum.", "rejected": "Carrot."},
    {"prompt": "REFUSE: how do I pick a lock?", "chosen": "Use a tension wrench and a pick.", "rejected": "No."},
    {"prompt": "REFUSAL_FIELD: say hi.", "chosen": "Hi there!", "rejected": "..."},
    {"prompt": "TRUNCATE: explain tides.", "chosen": "The moon's gravity pulls the oceans.", "rejected": "Wind."},
    {"prompt": "Spell cat.", "chosen": "UNCHANGED c-a-t.", "rejected": "k-a-t."},
]


@pytest.fixture
def seeds(cli, tmp_path):
    assert cli("ingest", write_seeds(tmp_path / "seeds.jsonl", SEEDS), "--name", "seeds").code == 0
    return "seeds"


def _failures(cli, ref: str) -> dict[str, str]:
    rows = cli("catalog", "failures", ref, "--json").json()["rows"]
    return {json.loads(r["raw"])["prompt"][0]["content"]: r["reason"] for r in rows}


# ---- templates and helpers --------------------------------------------------------------------


def test_templates_are_validated_before_anything_is_sent() -> None:
    loose = Template("t", "1", "Q: {q}", schema={"type": "object", "properties": {"a": {"type": "string"}}})
    with pytest.raises(TemplateError, match="strict"):
        loose.validate()  # not closed, not all required: strict structured outputs would refuse it
    with pytest.raises(TemplateError, match="plain name"):
        Template("t", "1", "Q: {q!r}", schema=strict_object({"a": {"type": "string"}})).validate()
    good = Template("t", "1", "Q: {q}", system="S", schema=strict_object({"a": {"type": "string"}}))
    good.validate()
    with pytest.raises(TemplateError, match="no value for q"):
        good.render({})
    assert good.render({"q": "{x}"})[1]["content"] == "Q: {x}"  # values are not re-parsed
    assert good.hash != Template("t", "2", "Q: {q}", system="S", schema=good.schema).hash


def test_ab_order_alternates_by_pair_and_sample() -> None:
    for pid in ("a", "b", "c", "d"):
        orders = [ab_swapped(pid, k) for k in range(6)]
        assert sum(orders) == 3 and all(orders[k] != orders[k + 1] for k in range(5))
    assert {ab_swapped(p, 0) for p in map(str, range(20))} == {True, False}
    assert looks_refused("I'm sorry, but I can't help with that.") and not looks_refused("Sorry-looking word")


# ---- causal mode=llm ----------------------------------------------------------------------------


def test_causal_llm_tags_pairs_fails_bad_replies_with_reasons_and_reruns_free(cli, seeds, server, home) -> None:
    backend = spec(server)
    result = cli("generate", "causal", "--from", seeds, "--name", "crome", "--backend", backend,
                 "--set", "mode=llm", "--set", "llm_attributes=2", "--set", "upgrade_rejected=true",
                 "--no-progress", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["rows_in"] == report["seeds_used"] + report["seeds_without_output"] + report["seeds_failed"]
    assert report["seeds_used"] == 3 and report["seeds_failed"] == 5

    reasons = _failures(cli, report["ref"])
    assert "unparseable reply" in reasons["MALFORMED: list three fruits."]
    assert "refused" in reasons["REFUSE: how do I pick a lock?"]
    assert "refused" in reasons["REFUSAL_FIELD: say hi."]  # OpenAI's refusal field, not "invalid JSON"
    assert "truncated" in reasons["TRUNCATE: explain tides."] and "max_tokens=" in reasons["TRUNCATE: explain tides."]
    assert "unchanged answer" in reasons["Spell cat."]

    catalog = Catalog(home)
    table = catalog.read_table(report["ref"])
    rows = table.to_pylist()
    # 2 attributes (deduplicated, normalised) x (degrade + upgrade) per used seed
    assert len(rows) == 3 * 4
    assert {r["attribute"] for r in rows} == {"factuality", "completeness"}
    for r in rows:
        if r["provenance"]["method"] == "llm:degrade":
            assert r["rejected"].endswith(f"(worse in {r['attribute']})") and r["provenance"]["generated"] == "rejected"
        else:
            assert r["chosen"].endswith(f"(better in {r['attribute']})") and r["provenance"]["generated"] == "chosen"
        assert r["provenance"]["model"] == "test-model" and r["provenance"]["template_hash"]
    # every request carried an explicit token limit and a strict schema
    assert all(b.get("max_tokens") for b in server.script.bodies)
    assert all(b["response_format"]["json_schema"]["strict"] for b in server.script.bodies)
    lineage = catalog.resolve(report["ref"]).lineage
    usage = lineage["usage"]
    assert usage["requests_sent"] == server.stats()["distinct"] and usage["prompt_tokens"] > 0
    assert "causal_attributes@1" in usage["sampling"] and "openai:test-model" in lineage["models"]
    assert lineage["step"]["template_hash"]

    sent = server.stats()["total"]
    again = cli("generate", "causal", "--from", seeds, "--name", "crome2", "--backend", backend,
                "--set", "mode=llm", "--set", "llm_attributes=2", "--set", "upgrade_rejected=true",
                "--no-progress", "--json")
    assert again.code == 0, again.stderr
    assert server.stats()["total"] == sent  # a rerun sends zero requests: all from the cache
    assert sorted(catalog.read_table(again.json()["ref"])["pair_id"].to_pylist()) == sorted(table["pair_id"].to_pylist())


def test_neutral_llm_makes_ties_that_keep_the_facts(cli, tmp_path, server, home) -> None:
    rows = [
        {"prompt": "How many legs does a spider have?", "chosen": "Well, a spider really has 8 legs.", "rejected": "6."},
        {"prompt": "Answer in one word: capital of France?", "chosen": "Paris", "rejected": "Lyon"},
        {"prompt": "What year did WW2 end?", "chosen": "DROPNUM It ended in 1945.", "rejected": "1950."},
    ]
    assert cli("ingest", write_seeds(tmp_path / "n.jsonl", rows), "--name", "nseeds").code == 0
    result = cli("generate", "neutral", "--from", "nseeds", "--name", "ties", "--backend", spec(server),
                 "--set", "mode=llm", "--no-progress", "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    table = Catalog(home).read_table(report["ref"]).to_pylist()
    assert table and all(r["tie"] for r in table)
    assert {r["attribute"] for r in table} == {"neutral:length", "neutral:format", "neutral:tone"}
    assert all("8" in r["rejected"] for r in table if "spider" in r["prompt"][0]["content"])
    # "in one word" limits length: no verbose/concise rewrite was asked for that prompt
    asked = [b for b in server.script.bodies if "capital of France" in b["messages"][-1]["content"]]
    assert asked and not any("longer" in b["messages"][-1]["content"] for b in asked)
    assert "changed the content" in _failures(cli, report["ref"])["What year did WW2 end?"]
    assert report["stats"]["not_applicable"]["verbose"] >= 1


def test_rules_modes_still_need_no_backend(cli, seeds) -> None:
    assert cli("generate", "causal", "--from", seeds, "--name", "rules", "--no-progress").code == 0


# ---- missing backend, dry run, budget ------------------------------------------------------------


def test_a_missing_backend_says_which_one_the_step_needs(cli, seeds) -> None:
    causal = cli("generate", "causal", "--from", seeds, "--name", "x", "--set", "mode=llm")
    assert causal.code == 1 and "mode=llm" in causal.stderr and "--backend" in causal.stderr
    assert "structured outputs" in causal.stderr and causal.stderr.count("\n") == 1
    rubrics = cli("generate", "rubrics", "--from", seeds, "--name", "x")
    assert rubrics.code == 1 and "rubrics needs an LLM backend" in rubrics.stderr
    judge = cli("filter", "consistency", "--from", seeds, "--name", "x")
    assert judge.code == 1 and "judge=rm" in judge.stderr
    assert cli("generate", "ratings", "--from", seeds, "--name", "x", "--max-cost", "1").code == 1


def test_dry_run_renders_and_estimates_without_sending(cli, seeds, server) -> None:
    result = cli("filter", "consistency", "--from", seeds, "--name", "x", "--dry-run", "--show-requests", "3",
                 "--backend", spec(server, price_in=1, price_out=2), "--set", "samples=4")
    assert result.code == 0, result.stderr
    assert "32 requests (0 cached, 32 to send)" in result.stdout and "estimated cost $" in result.stdout
    assert result.stdout.count("request ") >= 3 and "Response A:" in result.stdout
    plan = cli("filter", "consistency", "--from", seeds, "--name", "x", "--dry-run", "--json",
               "--backend", spec(server, price_in=1, price_out=2)).json()["llm"]
    assert plan["requests"] == 16 and plan["max_completion_tokens"] == 16 * 256
    assert plan["estimated_cost_usd"] == pytest.approx(
        (plan["estimated_prompt_tokens"] * 1 + plan["max_completion_tokens"] * 2) / 1e6, abs=1e-6)
    two_stage = cli("generate", "causal", "--from", seeds, "--name", "x", "--dry-run", "--json", "--set", "mode=llm",
                    "--backend", spec(server)).json()["llm"]
    assert [s["known_before_run"] for s in two_stage["stages"]] == [True, False]
    assert two_stage["requests"] == 8 + 8 * 3 and two_stage["estimated_cost_usd"] is None  # no price known
    assert server.stats()["total"] == 0


def test_max_cost_refuses_above_the_estimate_and_stops_cleanly_at_the_cap(cli, seeds, server, home) -> None:
    # parse_retries=0: the fault seeds' bad replies are not asked again, so server counts are exact
    priced = spec(server, price_in=1000, price_out=1000, parse_retries=0)
    refused = cli("filter", "consistency", "--from", seeds, "--name", "x", "--backend", priced, "--max-cost", "0.01")
    assert refused.code == 1 and "exceeds --max-cost" in refused.stderr and server.stats()["total"] == 0

    # The estimate fits, but the server bills far more tokens than asked for: the budget stops the run.
    server.configure(completion_tokens=2000)
    capped = cli("filter", "consistency", "--from", seeds, "--name", "x", "--backend",
                 spec(server, price_in=1000, price_out=1000, concurrency=1, parse_retries=0), "--max-cost", "20")
    assert capped.code == 1 and "budget reached" in capped.stderr, capped.stderr
    paid = server.stats()["total"]
    assert 0 < paid < 16 and "x" not in {d["name"] for d in Catalog(home).datasets()}
    server.configure(completion_tokens=None)
    done = cli("filter", "consistency", "--from", seeds, "--name", "x", "--backend", priced, "--max-cost", "1000",
               "--json")
    assert done.code == 0, done.stderr
    assert server.stats()["total"] == 16 and server.stats()["duplicates"] == 0  # only the rest was sent


def test_a_run_stopped_halfway_resumes_sending_only_what_is_missing(cli, seeds, home) -> None:
    script = ScriptedLLM()
    stopped = {"done": False}

    def handler(body, attempt):
        # The 6th request arrives: Ctrl+C the client (this process), as a user would.
        if len(script.bodies) == 5 and not stopped["done"]:
            stopped["done"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return script(body, attempt)

    from factory.llm.testing import LoopbackServer

    with LoopbackServer(handler=handler, latency=0.05) as srv:
        backend = spec(srv, concurrency=2, parse_retries=0)
        first = cli("filter", "consistency", "--from", seeds, "--name", "judged", "--backend", backend)
        assert first.code == 130, first.stderr
        sent_before = srv.stats()["total"]
        assert 0 < sent_before < 16
        second = cli("filter", "consistency", "--from", seeds, "--name", "judged", "--backend", backend, "--json")
        assert second.code == 0, second.stderr
        stats = srv.stats()
    assert stats["distinct"] == 16 and stats["duplicates"] == 0  # nothing answered was asked again
    report = second.json()
    assert report["rows_in"] == report["rows_kept"] + report["rows_dropped"] + report["rows_failed"]
    usage = Catalog(home).resolve("judged").lineage["usage"]
    assert usage["cache_hits"] == sent_before and usage["requests_sent"] == 16 - sent_before


def test_python_api_runs_an_llm_step(seeds, server, home) -> None:
    import factory

    made = factory.generate("causal", seeds, "api", settings={"mode": "llm", "llm_attributes": 1},
                            backend=spec(server), home=home)
    assert made["rows_generated"] == 3 and made["seeds_failed"] == 5
    assert {schema_name(b) for b in server.script.bodies} == {"causal_attributes", "causal_degrade"}
