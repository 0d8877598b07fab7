"""Issue 18: an unchanged commit is a run of the existing version, not thrown away."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from factory.catalog import Catalog, gc, verify
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
    assert catalog.find_scores("s2").column("x").to_pylist() == [3, 4]
    assert catalog.find_scores("s1").column("x").to_pylist() == [1, 2]
    assert catalog.resolve("d@1").lineage["recipe_step_key"] == "k1"  # the version as it was made
    assert [r.lineage["recipe_step_key"] for r in catalog.runs("d@1")] == ["k1", "k2"]

    # A run's attachment is a file the catalog needs: verify checks it and gc keeps it.
    assert verify(catalog)["ok"]
    assert gc(catalog, dry_run=False, grace_seconds=0)["files"] == []
    assert catalog.find_scores("s2").column("x").to_pylist() == [3, 4]
