"""Readers on the real human-labelled files in ../shared/data."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas.readers import detect_format, read_path

pytestmark = pytest.mark.realdata


def test_hh_rlhf_splits_transcripts_into_prompt_and_final_turns(shared_data):
    path = shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"
    result = read_path(path)
    assert result.format == "hh-rlhf"
    assert result.rows_in == result.rows_out == 2312
    rows = result.table.to_pylist()
    assert all(row["prompt"][-1]["role"] == "user" for row in rows)
    assert all(row["prompt"][0]["role"] == "user" for row in rows)
    first = rows[0]
    assert first["prompt"][0]["content"] == "what are some pranks with a pen i can do?"
    assert first["chosen"].startswith("No, sorry!  All of these involve a pen")
    assert first["rejected"].startswith("There are lots of funny things you can do with pens")
    # Final assistant turns carry no transcript markers, except the few real rows whose
    # transcripts diverge early; those are counted, not hidden.
    spans = sum("\n\nHuman:" in r["chosen"] or "\n\nHuman:" in r["rejected"] for r in rows)
    assert spans <= result.warnings["response_spans_turns"] == 5
    assert result.warnings["empty_response"] == 4


def test_pandalm_majority_labels_ties_and_votes(shared_data):
    result = read_path(shared_data / "pandalm-testset-v1.json")
    assert result.format == "pandalm"
    assert result.rows_out == 999
    rows = result.table.to_pylist()
    assert sum(row["tie"] for row in rows) == 105
    assert all(len(row["votes"]) == 3 for row in rows)
    # Non-tie pairs: the majority of votes favours the chosen side.
    for row in rows:
        counts = Counter(row["votes"])
        if not row["tie"]:
            assert counts[1] >= 2
        else:
            assert counts[0] >= 2
    # Boolean responses in the file are coerced to text and reported, not dropped.
    assert sum(result.coerced.values()) == 6


@pytest.mark.parametrize(
    ("name", "pairs"),
    [("natural.json", 100), ("processed-mt-bench.json", 200), ("processed-faireval.json", 66),
     ("processed-llmeval22.json", 200)],
)
def test_llmbar_sets(shared_data, name, pairs):
    path = shared_data / "llmbar" / name
    assert detect_format(path)[0] == "llmbar"
    result = read_path(path)
    assert result.rows_out == pairs
    assert not any(result.table.column("tie").to_pylist())


def test_ingest_cli_reports_real_counts(shared_data, cli):
    hh = cli("ingest", shared_data / "hh-rlhf-harmless-base-test.jsonl.gz", "--name", "hh", "--json")
    assert hh.code == 0, hh.stderr
    assert hh.json()["committed"] == 2312
    pandalm = cli("ingest", shared_data / "pandalm-testset-v1.json", "--name", "pandalm", "--json").json()
    assert (pandalm["committed"], pandalm["ties"], pandalm["format"]) == (999, 105, "pandalm")
    natural = cli("ingest", shared_data / "llmbar" / "natural.json", "--name", "natural", "--json").json()
    assert natural["committed"] == 100
