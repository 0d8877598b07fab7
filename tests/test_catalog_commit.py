"""Commit guarantees from review issue 8: content ids, protected lineage, empty and unchanged
commits, extra columns, failed rows and merges."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from factory.catalog import Catalog, diff, export
from factory.catalog.catalog import code_version
from schemas import Message, Pair, PrefabError, pair_id_of, pairs_to_table, prompt_id_of
from tests.test_catalog import make_pairs


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "home")


def _replace(table: pa.Table, name: str, values: list) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), pa.array(values, table.schema.field(name).type))


# ---- 2. ids are recomputed from content --------------------------------------------------------


def test_content_ids_match_the_row_functions_on_awkward_text():
    from schemas import content_ids

    awkward = ['quote " and \\ backslash', "new\nline\ttab\r", "\x00\x01\x1f\x7f", "é 日本 😀 \u2028", "", "/"]
    pairs = [Pair(prompt=[Message("system", awkward[i % 6]), Message("user", awkward[(i + 1) % 6])],
                  chosen=awkward[(i + 2) % 6], rejected=awkward[(i + 3) % 6] + str(i)) for i in range(24)]
    table = pairs_to_table(pairs)
    pair_ids, prompt_ids = content_ids(table)
    assert pair_ids.to_pylist() == [pair_id_of(r["prompt"], r["chosen"], r["rejected"]) for r in table.to_pylist()]
    assert prompt_ids.to_pylist() == [prompt_id_of(r["prompt"]) for r in table.to_pylist()]


def test_commit_refuses_a_pair_id_that_does_not_match_the_content(catalog):
    table = make_pairs(5)
    ids = table.column("pair_id").to_pylist()
    ids[3] = "0" * 32
    with pytest.raises(PrefabError, match=r"row 4 has pair_id '0{32}', but its content hashes to"):
        catalog.commit("d", _replace(table, "pair_id", ids))
    prompts = table.column("prompt_id").to_pylist()
    prompts[0] = "nope"
    with pytest.raises(PrefabError, match="row 1 has prompt_id 'nope'"):
        catalog.commit("d", _replace(table, "prompt_id", prompts))
    edited = _replace(table, "chosen", ["edited"] + table.column("chosen").to_pylist()[1:])
    with pytest.raises(PrefabError, match="row 1 has pair_id"):
        catalog.commit("d", edited)
    assert catalog.datasets() == []


def test_commit_fills_missing_ids_and_names_the_row_across_streamed_batches(catalog):
    table = make_pairs(6)
    bare = table.drop_columns(["pair_id", "prompt_id"])
    info = catalog.commit("d", bare)
    assert catalog.read_table(info).column("pair_id") == table.column("pair_id")
    ids = table.column("pair_id").to_pylist()
    ids[4] = "f" * 32
    bad = _replace(table, "pair_id", ids)
    with pytest.raises(PrefabError, match="row 5 has pair_id"):
        catalog.commit("e", iter(bad.to_batches(max_chunksize=2)))


def test_lineage_cannot_override_parents_rows_or_code_version(catalog):
    catalog.commit("d", make_pairs(3))
    for key, value in (("parents", []), ("rows_out", 99), ("code_version", "prefab 9.9")):
        with pytest.raises(PrefabError, match=f"lineage\\['{key}'\\]"):
            catalog.commit("e", make_pairs(4), parents=["d@1"], lineage={key: value})
    info = catalog.commit("e", make_pairs(4), parents=["d@1"], lineage={"rows_out": 4, "command": "x"})
    assert info.lineage["parents"] == ["d@1"] and info.lineage["rows_out"] == 4
    assert info.lineage["code_version"] == code_version()


def test_code_version_names_the_git_commit_and_never_fails_without_git(monkeypatch):
    from factory.catalog import catalog as module

    root = Path(module.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not running from a git checkout")
    assert "(git " in code_version()
    monkeypatch.setenv("PATH", "/nonexistent")
    assert module._git_state(root) is None
    assert module._git_state(Path("/")) is None


def test_diff_sees_a_changed_weight_or_attribute_as_reannotated_not_relabelled(catalog):
    table = make_pairs(4)
    catalog.commit("d", table)
    catalog.commit("d", _replace(table, "weight", [None, 0.5, None, None]))
    catalog.commit("d", _replace(table, "attribute", [None, None, "factuality", None]))
    for a, b, changed in (("d@1", "d@2", 1), ("d@1", "d@3", 1), ("d@2", "d@3", 2)):
        result = diff(catalog, a, b)
        assert (result["relabelled"], result["reannotated"], result["changed"]) == (0, changed, changed)


# ---- 6. empty and unchanged commits ------------------------------------------------------------


def test_an_empty_commit_is_refused_unless_asked_for(catalog):
    with pytest.raises(PrefabError, match="refusing to commit an empty version of 'd'"):
        catalog.commit("d", make_pairs(0))
    assert catalog.datasets() == []
    assert catalog.commit("d", make_pairs(0), allow_empty=True).rows == 0


def test_identical_content_makes_no_new_version(catalog):
    first = catalog.commit("d", make_pairs(5), message="one")
    again = catalog.commit("d", iter(make_pairs(5).to_batches(max_chunksize=2)), message="two")
    assert again.unchanged and again.ref == first.ref == "d@1"
    assert [v.version for v in catalog.log("d")] == [1]
    assert catalog.commit("d", make_pairs(6)).version == 2
    # Equal to an older version but not to the latest is a new version (a revert).
    assert catalog.commit("d", make_pairs(5)).version == 3


# ---- 10. extra columns ---------------------------------------------------------------------------


def _scored(n: int) -> pa.Table:
    table = make_pairs(n)
    table = table.append_column("score_dedup_minhash", pa.array([i / 10 for i in range(n)], pa.float64()))
    judge = pa.array([{"label": "a", "votes": [1, 2]}] * n,
                     pa.struct([("label", pa.string()), ("votes", pa.list_(pa.int64()))]))
    return table.append_column("judge", judge)


def test_extra_columns_are_kept_after_the_canonical_ones(catalog, tmp_path):
    from schemas import PAIR_COLUMNS

    scored = _scored(4).select(["score_dedup_minhash", *reversed(_scored(4).column_names[:-2]), "judge"])
    info = catalog.commit("d", scored)
    table = catalog.read_table(info)
    assert table.column_names == [*PAIR_COLUMNS, "score_dedup_minhash", "judge"]
    assert table.schema.field("score_dedup_minhash").type == pa.float64()
    assert table.column("judge").to_pylist()[0] == {"label": "a", "votes": [1, 2]}
    plain = catalog.commit("plain", make_pairs(4))
    assert catalog.read_table(plain).column_names == list(PAIR_COLUMNS)
    assert diff(catalog, "plain@1", "d@1")["unchanged"] == 4

    for fmt in ("jsonl", "parquet", "trl", "hf"):
        export(catalog, "d", fmt, tmp_path / f"out.{fmt}")
    first = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert first["score_dedup_minhash"] == 0.0 and first["judge"]["votes"] == [1, 2]
    assert "score_dedup_minhash" in pa.parquet.read_schema(tmp_path / "out.parquet").names
    assert set(json.loads((tmp_path / "out.trl").read_text().splitlines()[0])) == {"prompt", "chosen", "rejected"}
    import datasets

    assert "judge" in datasets.load_from_disk(str(tmp_path / "out.hf")).column_names


# ---- 11. failed rows -----------------------------------------------------------------------------


def test_failures_are_stored_with_the_version_and_counted(catalog):
    from factory.catalog.catalog import FAILURE_SCHEMA

    failures = pa.table({"step": ["judge", "judge"], "pair_id": ["abc", None],
                         "reason": ["timeout", "unparseable verdict"], "raw": ['{"x": 1}', '{"y": 2}']})
    info = catalog.commit("d", make_pairs(3), failures=failures)
    assert info.lineage["rows_failed"] == 2
    stored = catalog.failures("d@1")
    assert stored.schema == FAILURE_SCHEMA
    assert stored.to_pylist() == failures.to_pylist()
    assert catalog.commit("d", make_pairs(4)).lineage["rows_failed"] == 0
    assert catalog.failures("d@2").num_rows == 0
    with pytest.raises(PrefabError, match="needs a 'reason'"):
        catalog.commit("d", make_pairs(5), failures=pa.table({"step": ["x"]}))


# ---- 8. merge ------------------------------------------------------------------------------------


def test_merge_keeps_the_first_copy_of_a_pair_and_counts_reconcile(catalog):
    catalog.commit("a", make_pairs(6))  # pairs 0-5
    catalog.commit("b", make_pairs(5, start=4, flip={5}))  # 4-8; 4 agrees, 5 is relabelled
    repeated = make_pairs(2, start=20)
    catalog.commit("c", pa.concat_tables([repeated, repeated]))  # a repeat within one input stays
    merged = catalog.merge(["a", "b@1", "c"], "m", message="all")
    lineage = merged.lineage
    assert lineage["parents"] == ["a@1", "b@1", "c@1"]
    assert (lineage["rows_in"], lineage["rows_out"], lineage["duplicates_dropped"]) == (15, 13, 2)
    assert lineage["rows_in"] == lineage["rows_out"] + lineage["duplicates_dropped"]
    assert lineage["label_conflicts"] == 1
    assert [i["kept"] for i in lineage["inputs"]] == [6, 3, 4]
    table = catalog.read_table("m")
    assert table.num_rows == merged.rows == 13
    kept_5 = table.filter(pc.equal(table["pair_id"], make_pairs(6).column("pair_id")[5]))
    assert kept_5.column("chosen").to_pylist() == ["answer 5 is right"]  # the first input's label
    with catalog._connect(read_only=True) as connection:
        parents = connection.execute(
            "SELECT parent_dataset, parent_version FROM version_parents WHERE dataset = 'm' ORDER BY 1"
        ).fetchall()
    assert parents == [("a", 1), ("b", 1), ("c", 1)]
    with pytest.raises(PrefabError, match="at least two"):
        catalog.merge(["a"], "m")
