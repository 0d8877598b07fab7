"""`prefab catalog diff | tag | verify | gc` through the CLI, with --json."""

from __future__ import annotations

import json

from tests.conftest import DEMO_SEEDS


def test_tag_diff_verify_gc(cli, tmp_path):
    cli("ingest", DEMO_SEEDS, "--name", "demo")
    rows = [json.loads(line) for line in DEMO_SEEDS.read_text().splitlines()]
    # Swap the sides of a decided pair (a relabelling; for a tie it would be no change).
    k = next(i for i, r in enumerate(rows) if not r.get("tie"))
    flipped = {**rows[k], "chosen": rows[k]["rejected"], "rejected": rows[k]["chosen"]}
    kept = [r for i, r in enumerate(rows) if i != k]
    edited = tmp_path / "v2.jsonl"
    edited.write_text("\n".join(json.dumps(r) for r in [flipped, *kept[1:]]) + "\n")
    cli("ingest", edited, "--name", "demo")

    assert cli("catalog", "tag", "demo@1", "seed").code == 0
    moved = cli("catalog", "tag", "demo@2", "seed")
    assert moved.code == 1 and "immutable" in moved.stderr
    assert cli("catalog", "tag", "demo@2", "seed", "--force", "--json").json()["moved_from"] == 1

    result = cli("catalog", "diff", "demo@1", "demo@2", "--json").json()
    assert (result["added"], result["removed"], result["relabelled"], result["unchanged"]) == (0, 1, 1, 318)
    text = cli("catalog", "diff", "demo@1", "demo").stdout
    assert "removed 1, changed 1 (1 relabelled" in text

    assert cli("catalog", "verify", "--json").json()["ok"]
    assert cli("catalog", "gc", "--json").json()["files"] == []
    from factory.catalog import Catalog

    catalog = Catalog()
    path = catalog.paths("demo@1")[0]
    path.write_bytes(path.read_bytes()[:-10])
    broken = cli("catalog", "verify")
    assert broken.code == 1
    assert "breaks demo@1" in broken.stderr and broken.stderr.count("\n") == 1


def test_gc_cli_dry_run_then_yes(cli):
    from factory.catalog import Catalog
    from tests.test_catalog import make_pairs

    cli("ingest", DEMO_SEEDS, "--name", "demo")
    orphan = Catalog().store.write_table(make_pairs(3))
    kept = cli("catalog", "gc", "--json").json()
    assert kept["files"] == [] and kept["skipped_younger_than_grace"] == 1
    dry = cli("catalog", "gc", "--grace", "0")
    assert "would delete 1 files" in dry.stdout and orphan.path.exists()
    done = cli("catalog", "gc", "--grace", "0", "--yes", "--json").json()
    assert not done["dry_run"] and len(done["files"]) == 1 and not orphan.path.exists()
    assert cli("catalog", "verify").code == 0
