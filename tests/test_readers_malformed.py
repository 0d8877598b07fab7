"""Every reader on broken input: one clear error naming file, line and field, or quarantine."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from schemas.errors import InputError
from schemas.readers import read_path

GOOD_TRL = {"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def hh_row(last_chosen: str = "Sure.", last_rejected: str = "No.") -> dict:
    prefix = "\n\nHuman: Hello?\n\nAssistant: Hi.\n\nHuman: Help me?\n\nAssistant: "
    return {"chosen": prefix + last_chosen, "rejected": prefix + last_rejected}


def pandalm_row(**overrides) -> dict:
    row = {"idx": 1, "instruction": "Rewrite it.", "input": "text", "response1": "a", "response2": "b",
           "annotator1": 1, "annotator2": 1, "annotator3": 2}
    row.update(overrides)
    return row


def llmbar_row(**overrides) -> dict:
    row = {"input": "Q?", "output_1": "good", "output_2": "bad", "label": 1}
    row.update(overrides)
    return row


def test_broken_json_on_line_3_names_line_3(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD_TRL, GOOD_TRL, '{"prompt": "x", "chosen": ', GOOD_TRL])
    with pytest.raises(InputError) as caught:
        read_path(path)
    assert caught.value.line == 3
    assert "pairs.jsonl, line 3: invalid JSON" in str(caught.value)


def test_quarantine_keeps_good_rows_and_counts_add_up(tmp_path):
    rows = [GOOD_TRL, "{broken", {"prompt": "x", "chosen": "", "rejected": " "},
            {"prompt": "x", "chosen": ["not", "messages"], "rejected": "y"}, {**GOOD_TRL, "chosen": "Hey"}]
    result = read_path(write_jsonl(tmp_path / "mixed.jsonl", rows), "trl", on_error="quarantine")
    assert (result.rows_in, result.rows_out, result.quarantined) == (5, 2, 3)
    reasons = result.quarantine.to_pylist()
    assert [r["line"] for r in reasons] == [2, 3, 4]
    assert reasons[1]["reason"] == "both responses are empty"
    assert reasons[2]["field"] == "chosen[0]"
    assert reasons[0]["raw"] == "{broken"


def test_undecodable_bytes_are_located(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD_TRL).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match="line 2: undecodable text"):
        read_path(path, "trl")


def test_lone_surrogate_is_undecodable(tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", ['{"prompt": "q", "chosen": "\\ud800", "rejected": "b"}'])
    with pytest.raises(InputError, match="field 'chosen': undecodable text"):
        read_path(path, "trl")


@pytest.mark.parametrize(
    ("row", "field", "message"),
    [
        ({"chosen": "a", "rejected": "b"}, "prompt", "missing field"),
        ({"prompt": "q", "rejected": "b"}, "chosen", "missing field"),
        ({"prompt": "q", "chosen": {"x": 1}, "rejected": "b"}, "chosen", "expected text, got object"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", "expected a number"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "tie": "maybe"}, "tie", "expected true/false"),
        ({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a", "rejected": "b"}, "prompt[0].role", "unknown role"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty prompt"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "weight": -1}, "weight", "non-negative"),
    ],
)
def test_trl_row_errors_name_the_field(tmp_path, row, field, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [GOOD_TRL, row])
    with pytest.raises(InputError) as caught:
        read_path(path, "trl")
    assert (caught.value.line, caught.value.field) == (2, field)
    assert message in caught.value.reason


def test_trl_conversational_explicit_and_implicit_prompts(tmp_path):
    explicit = {"prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}], "margin": 2}
    implicit = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]}
    result = read_path(write_jsonl(tmp_path / "c.jsonl", [explicit, implicit]))
    rows = result.table.to_pylist()
    assert result.format == "trl"
    assert rows[0]["pair_id"] == rows[1]["pair_id"]
    assert rows[0]["margin"] == 2.0 and rows[1]["margin"] is None
    bad = {"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}] * 2, "rejected": "b"}
    with pytest.raises(InputError, match="expected one assistant message"):
        read_path(write_jsonl(tmp_path / "d.jsonl", [bad]), "trl")


def test_string_rows_without_prompt_point_to_hh_format(tmp_path):
    with pytest.raises(InputError, match="--format hh-rlhf"):
        read_path(write_jsonl(tmp_path / "x.jsonl", [{"chosen": "a", "rejected": "b"}]), "trl")


def test_hh_reader_errors(tmp_path):
    not_hh = {"chosen": "Human: hi Assistant: yo", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
    with pytest.raises(InputError, match="line 2, field 'chosen': not an HH transcript"):
        read_path(write_jsonl(tmp_path / "h.jsonl", [hh_row(), not_hh]), "hh-rlhf")
    no_assistant = {"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: b"}
    with pytest.raises(InputError, match="share no assistant turn"):
        read_path(write_jsonl(tmp_path / "i.jsonl", [no_assistant]), "hh-rlhf")
    with pytest.raises(InputError, match="field 'rejected': missing field"):
        read_path(write_jsonl(tmp_path / "j.jsonl", [{"chosen": hh_row()["chosen"]}]), "hh-rlhf")


def test_hh_reader_on_gzip_and_empty_response_policy(tmp_path):
    path = tmp_path / "h.jsonl.gz"
    rows = [hh_row(), hh_row(last_chosen="")]
    path.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    result = read_path(path)
    assert result.format == "hh-rlhf" and result.rows_out == 2
    assert result.table.column("prompt").to_pylist()[0][-1] == {"role": "user", "content": "Help me?"}
    assert result.warnings["empty_response"] == 1
    with pytest.raises(InputError, match="line 2, field 'chosen': empty response .*--strict"):
        read_path(path, strict=True)


def test_pandalm_reader_errors(tmp_path):
    def read(rows):
        path = tmp_path / "p.json"
        path.write_text(json.dumps(rows, indent=1))
        return read_path(path, "pandalm")

    assert read([pandalm_row()]).table.column("votes").to_pylist() == [[1, 1, -1]]
    assert read([pandalm_row(annotator1="2", annotator2="2")]).coerced["annotator1: str -> int"] == 1
    with pytest.raises(InputError, match="line 12, field 'annotator3': vote must be 0"):
        read([pandalm_row(), pandalm_row(annotator3=7)])
    with pytest.raises(InputError, match="no majority"):
        read([pandalm_row(annotator1=0, annotator2=1, annotator3=2)])
    with pytest.raises(InputError, match="field 'response2': missing field"):
        read([{k: v for k, v in pandalm_row().items() if k != "response2"}])
    tie = read([pandalm_row(annotator1=0, annotator2=0)]).table.to_pylist()[0]
    assert tie["tie"] and tie["votes"] == [0, 0, -1]


def test_json_array_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "l.json"
    path.write_text('[\n  {"input": "q", "output_1": "a", "output_2": "b", "label": 1},\n  {"input": "q" "x"}\n]')
    with pytest.raises(InputError, match="line 3: invalid JSON"):
        read_path(path, "llmbar")


def test_llmbar_reader_errors(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([llmbar_row(), llmbar_row(label=3)], indent=2))
    with pytest.raises(InputError, match="field 'label': label must be 1 or 2, got 3"):
        read_path(path)
    path.write_text(json.dumps([llmbar_row(label=2.0), llmbar_row(output_1=None)]))
    with pytest.raises(InputError, match="field 'output_1': field is null"):
        read_path(path)
    result = read_path(path, on_error="quarantine")
    assert (result.rows_out, result.quarantined) == (1, 1)
    assert result.table.column("chosen").to_pylist() == ["bad"]


def test_column_map_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "good": ["a", "c"], "bad": ["b", None]}), path)
    result = read_path(path, column_map={"prompt": "question", "chosen": "good", "rejected": "bad"},
                       on_error="quarantine")
    assert result.format == "parquet" and (result.rows_out, result.quarantined) == (1, 1)
    assert result.quarantine.to_pylist()[0]["line"] == 2
    with pytest.raises(InputError, match="missing mapped column 'nope'"):
        read_path(path, column_map={"prompt": "nope", "chosen": "good", "rejected": "bad"})
    with pytest.raises(InputError, match="--map applies to column formats"):
        read_path(path, "llmbar", column_map={"input": "question"})


def test_hf_datasets_folder_and_object(tmp_path):
    import datasets

    from schemas.readers import read_dataset

    dataset = datasets.Dataset.from_list([GOOD_TRL, {**GOOD_TRL, "chosen": "Hello"}])
    dataset.save_to_disk(str(tmp_path / "saved"))
    from_folder = read_path(tmp_path / "saved")
    assert from_folder.format == "hf" and from_folder.rows_out == 2
    assert read_dataset(datasets.DatasetDict({"train": dataset})).rows_out == 2
    with pytest.raises(InputError, match="splits"):
        read_dataset(datasets.DatasetDict({"train": dataset, "test": dataset}))


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown format 'csv'"):
        read_path(write_jsonl(tmp_path / "a.jsonl", [GOOD_TRL]), "csv")
    with pytest.raises(InputError, match="no such file"):
        read_path(tmp_path / "missing.jsonl")


def test_attribute_scores_survive_and_are_validated(tmp_path):
    scores = [{"attribute": "factuality", "chosen": 4, "rejected": 1.5}]
    result = read_path(write_jsonl(tmp_path / "s.jsonl", [{**GOOD_TRL, "attribute_scores": scores}]), "trl")
    assert result.table.column("attribute_scores").to_pylist() == [
        [{"attribute": "factuality", "chosen": 4.0, "rejected": 1.5}]]
    with pytest.raises(InputError, match="field 'attribute_scores\\[0\\]'"):
        read_path(write_jsonl(tmp_path / "t.jsonl", [{**GOOD_TRL, "attribute_scores": [{"x": 1}]}]), "trl")
