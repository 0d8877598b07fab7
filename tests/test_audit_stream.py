"""The audit streams: its figures, computed from one batch of texts at a time plus small
per-row columns, equal the same figures computed on the whole table at once; texts are
read only for the rows the report shows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from schemas.pairs import PROVENANCE_TYPE
from tests.toy import toy_pairs


def big_table(n: int, seed: int = 0, start: int = 0, pad: int = 0) -> pa.Table:
    """``n`` pairs (more than one read batch when n > 16k): the toy pairs repeated with a
    counter suffix, one in 97 left without it (exact duplicates far apart, in other batches),
    formatting on some sides, votes, ties, three sources, generated rows and noise columns.
    Rows are numbered from ``start`` (so chunks of a larger version stay distinct); ``pad``
    characters of filler lengthen both answers (realistic text sizes for measurements)."""
    rng = np.random.default_rng(seed)
    base = toy_pairs(40, ties=4)
    table = base.take(pa.array((start + np.arange(n)) % base.num_rows))
    index = start + np.arange(n)
    filler = " " + ("lorem ipsum dolor sit amet " * (pad // 27 + 1))[:pad] if pad else ""
    suffix = pa.array(np.where(index % 97 == 0, filler, [f"{filler} #{i}" for i in index]))
    chosen = pc.binary_join_element_wise(table.column("chosen"), suffix, "")
    chosen = pc.if_else(pa.array(index % 5 == 0), pc.binary_join_element_wise(chosen, "\n- a list item", ""),
                        chosen)
    rejected = pc.if_else(pa.array(index % 7 == 0),
                          pc.binary_join_element_wise(table.column("rejected"), " **bold**", ""),
                          table.column("rejected"))
    rejected = pc.binary_join_element_wise(rejected, pa.array(np.where(index % 97 == 0, filler, [
        f"{filler} ~{i}" for i in index])), "")
    votes = [None if i % 3 else [int(v) for v in rng.choice([-1, 0, 1], size=1 + i % 4)] for i in index]
    provenance = table.column("provenance").to_pylist()
    for i, p in zip(index.tolist(), provenance, strict=True):
        p["source"] = ("alpha", "beta", "gamma")[i % 3] if i % 11 else None
        if i % 13 == 0:
            p["step"], p["parent_ids"] = "master_keys", ["seed"]
    tie = np.asarray(table.column("tie").to_pylist(), dtype=bool)
    suspicion = rng.uniform(0, 1, n)
    columns = {
        "pair_id": pa.nulls(n, pa.string()), "prompt_id": pa.nulls(n, pa.string()),
        "chosen": chosen, "rejected": rejected, "votes": pa.array(votes, pa.list_(pa.int8())),
        "provenance": pa.array(provenance, PROVENANCE_TYPE),
    }
    for name, column in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    noise = {
        "noise_suspicion": pa.array(suspicion, pa.float64(), mask=tie),
        "noise_oof_margin": pa.array(rng.normal(0, 1, n), pa.float64(), mask=tie),
        "noise_signals": pa.array(np.where(suspicion > 0.9, "rm", "")).cast(pa.string()),
        "noise_rate_estimate": pa.array(np.full(n, 0.1)),
        "noise_rate_low": pa.array(np.full(n, 0.05)),
        "noise_rate_high": pa.array(np.full(n, 0.15)),
        "dedup_near_similarity": pa.array(rng.uniform(0, 1, n)),
        "unused_text": pa.array(np.full(n, "x" * 50)),
    }
    for name, column in noise.items():
        table = table.append_column(name, column)
    return table


def _whole_table_figures(table: pa.Table) -> dict[str, object]:
    """The figures the audit used to compute on the whole table, texts and all (the reference)."""
    import polars as pl

    from factory.audit.compute import FORMATTING

    frame = pl.from_arrow(table)
    pref = frame.filter(~pl.col("tie"))
    formatting = {}
    for name, pattern in FORMATTING.items():
        has = pref.select(pl.col("chosen").str.contains(pattern).alias("c"),
                          pl.col("rejected").str.contains(pattern).alias("r")).filter(pl.col("c") != pl.col("r"))
        formatting[name] = (has.height, int(has["c"].sum()))
    exact = frame.height - frame.select(
        pl.col("prompt").list.eval(pl.element().struct.field("content")).list.join("\x1f"),
        "chosen", "rejected", "tie").n_unique()
    unequal = pref.filter(pl.col("chosen").str.len_chars() != pl.col("rejected").str.len_chars())
    longer = int((unequal["chosen"].str.len_chars() > unequal["rejected"].str.len_chars()).sum())
    return {"formatting": formatting, "exact": exact, "comparable": unequal.height, "longer": longer}


def test_streamed_figures_equal_the_whole_table_ones(home) -> None:
    """A version of several read batches (duplicates in different batches): the audit, built
    a batch at a time without texts, gives the figures of the whole-table computation."""
    import factory.audit
    from factory.catalog import Catalog

    table = big_table(40_000)  # 5 batches of the audit's 8k rows
    info = Catalog(home).commit("big", table)
    summary = factory.audit(info.ref, compute=False, top=5)
    ref = _whole_table_figures(Catalog(home).read_table(info))
    assert ref["exact"] > 0
    assert summary["duplicates"]["exact_duplicates"] == ref["exact"]
    assert {k: (v["pairs_differing"], v["chosen_has"]) for k, v in summary["formatting"].items()} \
        == ref["formatting"]
    assert (summary["length_bias"]["comparable"], summary["length_bias"]["chosen_longer"]) \
        == (ref["comparable"], ref["longer"])
    assert summary["rows"] == 40_000 == sum(g["pairs"] for g in summary["by_group"]["source"])


def test_stream_frame_equals_the_whole_table_frame_but_for_texts(home) -> None:
    import polars as pl

    from factory.audit.compute import TEXT_COLUMNS, audit_frame, stream_frame
    from factory.catalog import Catalog
    from schemas.pairs import generated_mask

    table = big_table(3_000)
    catalog = Catalog(home)
    info = catalog.commit("big", table)
    whole = catalog.read_table(info)
    streamed = stream_frame(catalog, info, batch_rows=700)
    expected = audit_frame(whole).with_columns(pl.Series("generated", generated_mask(whole)))
    expected = expected.select(streamed.columns)
    assert set(TEXT_COLUMNS).isdisjoint(streamed.columns) and "provenance" not in streamed.columns
    assert "unused_text" not in streamed.columns  # columns the audit does not use are not read
    assert streamed.equals(expected)
    assert int(streamed["generated"].sum()) == len(range(0, 3_000, 13))


def test_the_audit_never_reads_the_whole_table(home, monkeypatch) -> None:
    """Its texts come a batch at a time, and for the suspects by position: reading the whole
    version (which held every text at once) fails here."""
    import factory.audit
    from factory.catalog import Catalog

    info = Catalog(home).commit("big", big_table(2_000))

    def whole_table(*args, **kwargs):
        raise AssertionError("the audit read the whole table")

    monkeypatch.setattr(Catalog, "read_table", whole_table)
    summary = factory.audit(info.ref, compute=False, top=3)
    assert len(summary["suspects"]) == 3
    table = big_table(2_000)
    for s in summary["suspects"]:
        row = table.slice(s["row"], 1).to_pylist()[0]
        assert (s["chosen"], s["rejected"]) == (row["chosen"], row["rejected"])
        assert s["prompt"] == row["prompt"][0]["content"]


def test_rows_at_reads_rows_across_versions_and_files(home) -> None:
    from factory.audit.compute import rows_at
    from factory.catalog import Catalog

    catalog = Catalog(home)
    first = catalog.commit("a", big_table(1_000))
    second = catalog.commit("b", big_table(500, start=1_000))
    both = pa.concat_tables([catalog.read_table(first), catalog.read_table(second)], promote_options="permissive")
    wanted = [1_499, 0, 999, 1_000, 57, 57, 1_500, 10_000]
    got = rows_at(catalog, [first.ref, second.ref], wanted, ["chosen", "prompt", "not_a_column"], batch_rows=64)
    assert sorted(got) == [0, 57, 999, 1_000, 1_499]
    for row, values in got.items():
        assert values == both.select(["chosen", "prompt"]).slice(row, 1).to_pylist()[0]


def test_trl_export_counts_labels_without_reading_the_whole_table(home, monkeypatch, tmp_path) -> None:
    from factory.catalog import Catalog, export

    catalog = Catalog(home)
    table = big_table(300)
    margin = pa.array(np.where(np.arange(300) == 7, np.nan, 1.0), mask=np.arange(300) == 7)
    info = catalog.commit("t", table.set_column(table.schema.get_field_index("margin"), "margin", margin))

    def whole_table(*args, **kwargs):
        raise AssertionError("the export read the whole table")

    monkeypatch.setattr(Catalog, "read_table", whole_table)
    result = export(catalog, info.ref, "trl", tmp_path / "out.jsonl")
    ties = int(pc.sum(table.column("tie")).as_py())
    assert (result["rows"], result["ties_skipped"]) == (300 - ties, ties)
    assert not result["margin_written"] and result["margin_missing"] == 1


def test_review_apply_streams_and_equals_the_whole_table_decision(home, monkeypatch, tmp_path) -> None:
    """A review of a version of several read batches: committed a batch at a time (the whole
    table is never read), with the rows the runner's rule gives on the whole table."""
    import json

    from factory.audit.review import apply_review
    from factory.catalog import Catalog
    from factory.steps.context import Decision
    from factory.steps.runner import apply_decision

    catalog = Catalog(home)
    info = catalog.commit("rv", big_table(40_000))
    whole = catalog.read_table(info)
    ids = whole.column("pair_id").to_pylist()
    picks = {5: "flip", 20_000: "drop", 39_999: "flip", 17_000: "keep"}
    entries = [{"pair_id": ids[row], "row": row, "action": action} for row, action in picks.items()]
    path = tmp_path / "decisions.json"
    path.write_text(json.dumps({"format": "prefab-review/1", "ref": info.ref, "decisions": entries}))
    actions = np.full(whole.num_rows, "keep", dtype=object)
    for row, action in picks.items():
        actions[row] = action
    expected, _ = apply_decision(whole, Decision(pa.array(actions.tolist()), pa.nulls(len(actions), pa.string())),
                                 np.zeros(len(actions), dtype=bool))

    def whole_table(*args, **kwargs):
        raise AssertionError("the review read the whole table")

    monkeypatch.setattr(Catalog, "read_table", whole_table)
    result = apply_review(info.ref, path, "reviewed", home=home)
    assert (result["rows_kept"], result["rows_dropped"], result["rows_flipped"]) == (39_999, 1, 2)
    monkeypatch.undo()
    got = catalog.read_table(result["ref"])
    assert got.select(expected.column_names).equals(expected.cast(got.select(expected.column_names).schema))
