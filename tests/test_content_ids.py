"""`content_ids` (column-wise) gives byte for byte the ids of the row-by-row definition.

The reference below is a frozen copy of the original row-by-row implementation: existing
catalogs store these ids, so any faster path must reproduce them exactly.
"""

from __future__ import annotations

import hashlib
import json
import random

import pyarrow as pa
import pytest

from schemas import PAIR_SCHEMA, content_ids


def _reference_digest(payload: object) -> str:
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def reference_prompt_id(prompt: list[dict[str, str]]) -> str:
    return _reference_digest([[m["role"], m["content"]] for m in prompt])


def reference_pair_id(prompt: list[dict[str, str]], response_a: str, response_b: str) -> str:
    return _reference_digest([[[m["role"], m["content"]] for m in prompt], sorted((response_a, response_b))])


# Every character json.dumps treats specially, and the code-point order traps of UTF-8.
TRICKY = ['"', "\\", "\n", "\r", "\t", "\x00", "\x01", "\x1f", "\x7f", "\u2028", "\u2029", "/", "\b",
          "\f", "é", "ß", "日本語", "\u0301", "\uffff", "\U0001f600", "\ufeff", "{}", "[]", ",", ":"]


def _text(rng: random.Random) -> str:
    size = rng.choice([0, 0, 1, 3, 12, 80, 3000])
    alphabet = TRICKY + list("abcdefghij XYZ0123456789")
    if size > 100:  # long text (a payload past hashlib's 2 KiB threshold), built cheaply
        return "".join(rng.choice(alphabet) for _ in range(30)) * (size // 30)
    return "".join(rng.choice(alphabet) for _ in range(size))


def _prompt(rng: random.Random) -> list[dict[str, str]]:
    turns = rng.choice([0, 1, 1, 2, 3, 5])
    roles = ["system", "user", "assistant", "tool", "", "user\n\"x\""]
    return [{"role": rng.choice(roles), "content": _text(rng)} for _ in range(turns)]


def _rows(count: int, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        chosen, rejected = _text(rng), _text(rng)
        if rng.random() < 0.1:
            rejected = chosen  # a tie on identical text
        elif rng.random() < 0.1:
            rejected = chosen + rng.choice(["", "a", "\x00", "\U0001f600"])  # one a prefix of the other
        rows.append({"prompt": _prompt(rng), "chosen": chosen, "rejected": rejected, "tie": rng.random() < 0.2})
    fixed = [
        ([], "", ""),
        ([{"role": "user", "content": ""}], "", "x"),
        ([{"role": "user", "content": "q"}], "\uffff", "\U0001f600"),  # BMP max vs astral
        ([{"role": "user", "content": "q"}], "\U0001f600", "\uffff"),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}], "4", "5"),
        ([{"role": "user", "content": "2+2?"}], "5", "4"),
        ([{"role": "user", "content": "x" * 5000}], "y" * 4000, "z" * 4001),
    ]
    rows += [{"prompt": p, "chosen": c, "rejected": r, "tie": False} for p, c, r in fixed]
    return rows


def _table(rows: list[dict[str, object]]) -> pa.Table:
    schema = pa.schema([PAIR_SCHEMA.field(n) for n in ("prompt", "chosen", "rejected", "tie")])
    return pa.Table.from_pylist(rows, schema=schema)


def _expected(rows: list[dict[str, object]]) -> tuple[list[str], list[str]]:
    pair_ids = [reference_pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in rows]  # type: ignore[arg-type]
    prompt_ids = [reference_prompt_id(r["prompt"]) for r in rows]  # type: ignore[arg-type]
    return pair_ids, prompt_ids


def test_content_ids_equal_the_row_by_row_reference_on_varied_rows():
    rows = _rows(600)
    pair_ids, prompt_ids = content_ids(_table(rows))
    expected_pairs, expected_prompts = _expected(rows)
    assert pair_ids.to_pylist() == expected_pairs
    assert prompt_ids.to_pylist() == expected_prompts
    assert pair_ids.type == pa.string() and prompt_ids.type == pa.string()


def test_swapping_chosen_and_rejected_keeps_the_pair_id():
    rows = _rows(200, seed=1)
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    assert content_ids(_table(rows))[0].to_pylist() == content_ids(_table(swapped))[0].to_pylist()


def test_content_ids_of_record_batches_slices_and_chunked_columns():
    rows = _rows(300, seed=2)
    table = _table(rows)
    expected_pairs, expected_prompts = _expected(rows)
    # several chunks, and a slice that starts inside a chunk (non-zero array offsets)
    chunked = pa.concat_tables([table.slice(0, 70), table.slice(70, 1), table.slice(71)])
    assert content_ids(chunked)[0].to_pylist() == expected_pairs
    batch = table.slice(37, 100).combine_chunks().to_batches()[0]
    pair_ids, prompt_ids = content_ids(batch)
    assert pair_ids.to_pylist() == expected_pairs[37:137]
    assert prompt_ids.to_pylist() == expected_prompts[37:137]
    large = table.cast(pa.schema([pa.field("prompt", table.schema.field("prompt").type),
                                  pa.field("chosen", pa.large_string()),
                                  pa.field("rejected", pa.large_string()), pa.field("tie", pa.bool_())]))
    assert content_ids(large)[1].to_pylist() == expected_prompts


def test_content_ids_of_an_empty_table():
    pair_ids, prompt_ids = content_ids(_table([]))
    assert len(pair_ids) == 0 and len(prompt_ids) == 0


def test_content_ids_refuse_null_text():
    table = _table([{"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b", "tie": False}])
    table = table.set_column(1, "chosen", pa.array([None], pa.string()))
    with pytest.raises(ValueError, match="null"):
        content_ids(table)


def test_sha256_prefixes_read_inline_and_buffered_string_views_of_a_slice():
    from schemas.pairs import _sha256_prefixes

    texts = ["", "short", "exactly12byt", "thirteen byte", "é" * 7, "\U0001f600" * 3, "x" * 100] * 3
    expected = [hashlib.sha256(t.encode()).hexdigest()[:32] for t in texts]
    views = pa.array(texts, pa.string_view())
    assert _sha256_prefixes(views).to_pylist() == expected
    assert _sha256_prefixes(views.slice(5, 9)).to_pylist() == expected[5:14]
    assert _sha256_prefixes(pa.array(texts, pa.large_string()).slice(3)).to_pylist() == expected[3:]


def test_commit_checks_ids_in_short_batches_with_row_numbers_and_bytes_unchanged(tmp_path, monkeypatch):
    import factory.catalog.catalog as catalog_module
    from factory.catalog import Catalog
    from schemas import PrefabError, conform

    rows = _rows(120, seed=3)
    table = _table(rows)
    pair_ids, prompt_ids = content_ids(table)
    table = conform(table.append_column("pair_id", pair_ids).append_column("prompt_id", prompt_ids))
    whole = Catalog(tmp_path / "whole").stage(table)
    # Ids checked 7 rows at a time, from one big record batch and from uneven batches.
    monkeypatch.setattr(catalog_module, "ID_CHECK_ROWS", 7)
    catalog = Catalog(tmp_path / "home")
    assert catalog.stage(table.combine_chunks().to_batches()[0]).data.sha256 == whole.data.sha256
    uneven = [table.slice(0, 50), table.slice(50, 1), table.slice(51)]
    staged = catalog.stage(iter(uneven))
    assert (staged.data.sha256, staged.index.sha256) == (whole.data.sha256, whole.index.sha256)
    wrong = pair_ids.to_pylist()
    wrong[100] = "0" * 32
    bad = table.set_column(0, table.schema.field("pair_id"), pa.array(wrong, pa.string()))
    with pytest.raises(PrefabError, match="row 101 has pair_id"):
        catalog.commit("d", bad.combine_chunks().to_batches()[0])


def _one_turn(texts: list[str], responses: list[tuple[str, str]]) -> list[dict[str, object]]:
    return [{"prompt": [{"role": "user", "content": text}], "chosen": a, "rejected": b, "tie": False}
            for text, (a, b) in zip(texts, responses, strict=True)]


def test_every_character_json_escapes_alone_and_beside_multibyte_text():
    # Each escaped character (and the 0x7f/U+2028 json.dumps leaves alone) on its own row,
    # among rows with nothing to escape: only the rows that need it are rewritten.
    specials = [chr(i) for i in range(32)] + ['"', "\\", "\x7f", "\u2028", "\\n", '\\"', "\\\\\\"]
    texts = [f"é{c}日{c}" for c in specials] + ["plain"] * 5 + ["", "\U0001f600"]
    responses = [(t, "x" + t) for t in texts]
    rows = _one_turn(texts, responses)
    pair_ids, prompt_ids = content_ids(_table(rows))
    assert (pair_ids.to_pylist(), prompt_ids.to_pylist()) == _expected(rows)


def test_escaping_when_every_row_or_no_row_needs_it():
    every = _one_turn([f'line one\nsaid "{i}"\\' for i in range(50)],
                      [(f"a\tb{i}", f"c\r\n{i}") for i in range(50)])
    none = _one_turn([f"question {i}" for i in range(50)], [(f"yes {i}", f"no {i}") for i in range(50)])
    for rows in (every, none, every + none):
        pair_ids, prompt_ids = content_ids(_table(rows))
        assert (pair_ids.to_pylist(), prompt_ids.to_pylist()) == _expected(rows)


def test_content_ids_of_a_table_longer_than_one_id_batch(monkeypatch):
    import schemas.pairs as pairs

    monkeypatch.setattr(pairs, "ID_BATCH_ROWS", 64)  # 3 full batches and a short one
    rows = _rows(200, seed=4)
    pair_ids, prompt_ids = content_ids(_table(rows))
    assert (pair_ids.to_pylist(), prompt_ids.to_pylist()) == _expected(rows)


def test_content_ids_of_large_list_prompts_and_long_texts():
    rows = _one_turn(["q" * 70_000, "\n" * 3000], [("\u00e9" * 40_000, '"' * 5000), ("", "\\" * 2049)])
    table = _table(rows)
    large = table.cast(pa.schema([pa.field("prompt", pa.large_list(table.schema.field("prompt").type.value_type)),
                                  *[table.schema.field(n) for n in ("chosen", "rejected", "tie")]]))
    pair_ids, prompt_ids = content_ids(large)
    assert (pair_ids.to_pylist(), prompt_ids.to_pylist()) == _expected(rows)


def test_a_data_write_failing_with_batches_queued_leaves_no_files(tmp_path, monkeypatch):
    import factory.catalog.catalog as catalog_module
    from factory.catalog import Catalog
    from factory.catalog.store import ObjectWriter

    rows = _rows(120, seed=5)
    table = _table(rows)
    monkeypatch.setattr(catalog_module, "ID_CHECK_ROWS", 7)  # many batches queued for the writer
    written = []
    original = ObjectWriter.write

    def failing(self, batch):
        written.append(batch.num_rows)
        if len(written) == 5:
            raise OSError("disk full")
        original(self, batch)

    monkeypatch.setattr(ObjectWriter, "write", failing)
    catalog = Catalog(tmp_path / "home")
    with pytest.raises(OSError, match="disk full"):
        catalog.commit("d", table)
    assert catalog.store.temporary_files() == [] and catalog.store.all_objects() == []
