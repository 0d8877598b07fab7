"""Issue 18: an unchanged commit is a run of the existing version, not thrown away."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from factory.catalog import Catalog, diff, gc, verify
from tests.test_catalog import make_pairs


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return Catalog(tmp_path / "home")


def _failures(reason: str) -> pa.Table:
    return pa.table({"step": ["judge"], "pair_id": ["p1"], "reason": [reason], "raw": ["{}"]})


def test_an_unchanged_commit_keeps_its_lineage_failures_and_attachments(catalog):
    first = catalog.commit("d", make_pairs(4), lineage={"recipe_step_key": "k1", "score_key": "s1"},
                           failures=_failures("timeout"), attachments={"scores": pa.table({"x": [1, 2]})})
    again = catalog.commit("d", make_pairs(4), message="rerun",
                           lineage={"recipe_step_key": "k2", "score_key": "s2"},
                           failures=_failures("unparseable"), attachments={"scores": pa.table({"x": [3, 4]})},
                           quarantine=pa.table({"file": ["f"], "line": [7], "field": ["chosen"],
                                                "reason": ["empty"], "raw": ["{}"]}))
    assert again.unchanged and again.ref == first.ref == "d@1" and again.run == 1
    assert [v.version for v in catalog.log("d")] == [1]

    found = catalog.find_by_lineage("recipe_step_key", "k2", "d")
    assert found is not None and found.ref == "d@1" and found.run == 1
    assert found.lineage["recipe_step_key"] == "k2"
    assert catalog.find_by_lineage("recipe_step_key", "k1", "d").run == 0  # the first run stays findable

    assert catalog.failures("d@1").column("reason").to_pylist() == ["timeout", "unparseable"]
    assert catalog.failures("d@1", run=1).column("reason").to_pylist() == ["unparseable"]
    assert catalog.quarantined("d@1", run=1).column("line").to_pylist() == [7]
    assert catalog.find_scores("s2")[1].column("x").to_pylist() == [3, 4]
    assert catalog.find_scores("s1")[1].column("x").to_pylist() == [1, 2]
    assert catalog.resolve("d@1").lineage["recipe_step_key"] == "k1"  # the version as it was made
    assert [(r.lineage["recipe_step_key"], r.message) for r in catalog.runs("d@1")] == [("k1", ""), ("k2", "rerun")]

    # A run's attachment is a file the catalog needs: verify checks it and gc keeps it.
    assert verify(catalog)["ok"]
    assert gc(catalog, dry_run=False, grace_seconds=0)["files"] == []
    assert catalog.find_scores("s2")[1].column("x").to_pylist() == [3, 4]


# ---- merge and diff count only real label changes as conflicts / relabellings ------------------


def _with(table: pa.Table, name: str, values: list) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(name), pa.array(values, table.schema.field(name).type))


def _swapped(table: pa.Table, rows: set[int]) -> pa.Table:
    chosen, rejected = table["chosen"].to_pylist(), table["rejected"].to_pylist()
    for i in rows:
        chosen[i], rejected[i] = rejected[i], chosen[i]
    return _with(_with(table, "chosen", chosen), "rejected", rejected)


def test_merge_counts_an_attribute_only_difference_apart_from_label_conflicts(catalog):
    base = make_pairs(4)
    catalog.commit("a", base)
    # pair 0: same label, another attribute; pair 1: the other side won; pair 2: became a tie
    other = _with(_swapped(base, {1}), "attribute", ["factuality", None, None, None])
    catalog.commit("b", _with(other, "tie", [False, False, True, False]))
    lineage = catalog.merge(["a", "b"], "m").lineage
    assert (lineage["duplicates_dropped"], lineage["label_conflicts"], lineage["annotation_conflicts"]) == (4, 2, 1)


def test_diff_after_dropping_repeated_judgments_reports_no_relabelling(catalog):
    base = make_pairs(5)
    catalog.commit("d", pa.concat_tables([base, base.slice(0, 3)]))  # pairs 0-2 judged twice, alike
    catalog.commit("d", base)  # a dedup dropped the copies
    result = diff(catalog, "d@1", "d@2")
    assert (result["relabelled"], result["reannotated"], result["changed"]) == (0, 0, 0)
    assert (result["repeats_changed"], result["unchanged"]) == (3, 2)
    catalog.commit("d", _swapped(base, {4}))
    swapped = diff(catalog, "d@2", "d@3")
    assert (swapped["relabelled"], swapped["changed"], swapped["unchanged"]) == (1, 1, 4)
    tie = _with(base, "tie", [True] + [False] * 4)
    catalog.commit("t", tie)
    catalog.commit("t", _swapped(tie, {0}))  # a tie's sides swapped: the same judgment
    assert diff(catalog, "t@1", "t@2")["unchanged"] == 5


def test_show_lists_the_runs_of_unchanged_ingests(cli):
    from tests.conftest import DEMO_SEEDS

    cli("ingest", DEMO_SEEDS, "--name", "demo")
    cli("ingest", DEMO_SEEDS, "--name", "demo", "-m", "again")
    shown = cli("catalog", "show", "demo", "--json").json()
    assert shown["ref"] == "demo@1" and [r["run"] for r in shown["reruns"]] == [1]
    assert "run 1 (same rows):" in cli("catalog", "show", "demo").stdout
