"""`prefab catalog diff | tag | verify | gc` through the CLI, with --json."""

from __future__ import annotations

import json

from tests.conftest import DEMO_SEEDS


def test_tag_diff_verify_gc(cli, tmp_path):
    cli("ingest", DEMO_SEEDS, "--name", "demo")
    rows = [json.loads(line) for line in DEMO_SEEDS.read_text().splitlines()]
    flipped = {**rows[0], "chosen": rows[0]["rejected"], "rejected": rows[0]["chosen"]}
    edited = tmp_path / "v2.jsonl"
    edited.write_text("\n".join(json.dumps(r) for r in [flipped, *rows[2:]]) + "\n")
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
