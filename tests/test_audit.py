"""prefab audit and the review loop, on small fixtures with planted flips (no training:
noise scores are written into the committed versions as the noise filter would store them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from schemas.pairs import Message, Pair, Provenance, pairs_to_table
from tests.toy import toy_pairs

PLANTED = [3, 11, 27]  # rows whose labels are flipped on purpose


def _flip_rows(table: pa.Table, rows: list[int]) -> pa.Table:
    chosen, rejected = table.column("chosen").to_pylist(), table.column("rejected").to_pylist()
    for r in rows:
        chosen[r], rejected[r] = rejected[r], chosen[r]
    table = table.set_column(table.schema.get_field_index("chosen"), "chosen", pa.array(chosen, pa.string()))
    return table.set_column(table.schema.get_field_index("rejected"), "rejected", pa.array(rejected, pa.string()))


def _fake_noise(table: pa.Table, planted: list[int], rate: float = 0.075) -> dict[str, pa.Array]:
    """Columns as ``prefab filter noise`` stores them: planted rows get a high suspicion."""
    n = table.num_rows
    tie = np.asarray(table.column("tie").to_pylist(), dtype=bool)
    rng = np.random.default_rng(0)
    suspicion = rng.uniform(0.01, 0.2, n)
    suspicion[planted] = [0.95, 0.9, 0.85]
    signals = np.where(np.isin(np.arange(n), planted), "rm, neighbours", "").astype(object)
    margin = np.where(np.isin(np.arange(n), planted), -2.0, 1.5) + rng.normal(0, 0.1, n)
    return {
        "noise_suspicion": pa.array(suspicion, pa.float64(), mask=tie),
        "noise_oof_margin": pa.array(margin, pa.float64(), mask=tie),
        "noise_signals": pa.array([None if t else s for s, t in zip(signals, tie, strict=True)], pa.string()),
        "noise_rate_estimate": pa.array(np.full(n, rate)),
        "noise_rate_low": pa.array(np.full(n, 0.04)),
        "noise_rate_high": pa.array(np.full(n, 0.12)),
    }


@pytest.fixture
def noisy(home: Path) -> tuple[str, pa.Table]:
    from factory.catalog import Catalog

    table = _flip_rows(toy_pairs(40, ties=4), PLANTED)
    for name, column in _fake_noise(table, PLANTED).items():
        table = table.append_column(name, column)
    info = Catalog(home).commit("noisy", table, message="toy with planted flips")
    return info.ref, table


def test_planted_flips_are_top_suspects(noisy, cli) -> None:
    ref, _ = noisy
    result = cli("audit", ref, "--json", "--no-compute", "--top", "5")
    assert result.code == 0, result.stderr
    summary = result.json()
    from factory.audit import SUMMARY_KEYS

    assert tuple(summary) == SUMMARY_KEYS
    noise = summary["noise"]
    assert noise["available"] and noise["scores_from"] == "columns"
    assert noise["rate"] == 0.075 and noise["interval"] == [0.04, 0.12]
    assert noise["pairs_scored"] == 40  # ties are not scored
    assert noise["flagged"] == 3  # round(0.075 * 40)
    top = summary["suspects"]
    assert [s["row"] for s in top[:3]] == PLANTED
    assert all(s["flagged"] for s in top[:3]) and not any(s["flagged"] for s in top[3:])
    assert top[0]["signals"] == ["rm", "neighbours"] and top[0]["scores"]["oof_margin"] < 0
    assert top[0]["chosen"].startswith(("Shut", "Go", "You", "What"))  # the insult is "chosen" now
    assert summary["ties"] == {"pairs": 4, "share": 0.0909}


def test_group_breakdowns_sum(noisy) -> None:
    import factory.audit

    ref, table = noisy
    summary = factory.audit(ref, compute=False)
    noise = summary["noise"]
    for key, groups in summary["by_group"].items():
        assert sum(g["pairs"] for g in groups) == table.num_rows, key
        assert sum(g["scored"] for g in groups) == noise["pairs_scored"], key
        assert sum(g["flagged"] for g in groups) == noise["flagged"], key
        assert sum(g["ties"] for g in groups) == summary["ties"]["pairs"], key
        assert sum(g["expected_noisy"] for g in groups) == pytest.approx(noise["expected_noisy"], abs=1e-2)
    sources = {g["group"] for g in summary["by_group"]["source"]}
    assert sources == {"toy", "toy-b"}
    lb = summary["length_bias"]
    assert sum(g["comparable"] for g in lb["by_source"]) == lb["comparable"]
    assert sum(g["chosen_longer"] for g in lb["by_source"]) == lb["chosen_longer"]


def _tiny(home: Path) -> str:
    from factory.catalog import Catalog

    p = [Message("user", "q")]
    pairs = [
        Pair(p, "a much longer answer", "short", provenance=Provenance(source="s1")),  # longer chosen
        Pair(p, "tiny", "a longer rejected one", provenance=Provenance(source="s1")),  # shorter chosen
        Pair(p, "longer chosen text", "brief", provenance=Provenance(source="s2"), votes=[1, 1, -1]),
        Pair(p, "same", "four", provenance=Provenance(source="s2"), votes=[1, 1]),  # equal length: not counted
        Pair(p, "- item one\n- item two", "prose answer here", provenance=Provenance(source="s2")),
        Pair(p, "x", "yy", tie=True, provenance=Provenance(source="s1")),  # tie: not counted
    ]
    return Catalog(home).commit("tiny", pairs_to_table(pairs)).ref


def test_length_bias_exact(home: Path) -> None:
    import factory.audit

    summary = factory.audit(_tiny(home), compute=False)
    lb = summary["length_bias"]
    # non-tie pairs of unequal length: rows 0, 1, 2, 4; the longer one is chosen in 0, 2, 4
    assert (lb["pairs"], lb["comparable"], lb["chosen_longer"], lb["share"]) == (5, 4, 3, 0.75)
    by = {g["group"]: g for g in lb["by_source"]}
    assert (by["s1"]["comparable"], by["s1"]["chosen_longer"], by["s1"]["share"]) == (2, 1, 0.5)
    assert (by["s2"]["comparable"], by["s2"]["chosen_longer"], by["s2"]["share"]) == (2, 2, 1.0)
    assert summary["formatting"]["list"] == {"pairs_differing": 1, "chosen_has": 1, "share": 1.0}
    a = summary["annotators"]
    # votes [1,1,-1]: 1 agreeing pair of 3; [1,1]: 1 of 1 -> mean 2/3
    assert a["rows_with_votes"] == 2 and a["pairwise_agreement"] == pytest.approx(0.6667, abs=1e-4)
    assert a["votes_agreeing_with_label"] == 0.8 and a["unanimous_share"] == 0.5
    assert summary["noise"]["available"] is False and "no noise scores" in summary["noise"]["reason"]
    assert summary["duplicates"]["exact_duplicates"] == 0


@pytest.fixture
def fast_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise filter with a bag-of-words stand-in for the encoder (milliseconds)."""
    import filters.noise as noise_module
    from tests.test_filter_noise import _hash_features

    monkeypatch.setattr(noise_module, "_features",
                        lambda data, ctx: (_hash_features(data.chosen), _hash_features(data.rejected)))


def test_stored_scores_of_an_earlier_noise_run_are_reused(home: Path, fast_noise) -> None:
    """`prefab filter noise --from REF` stored its scores: the audit of REF finds them through
    the filter's public lookup (a run with other thresholds shares them)."""
    import factory
    import factory.audit
    from factory.catalog import Catalog
    from factory.steps.api import find_stored_scores

    catalog = Catalog(home)
    table = _flip_rows(toy_pairs(40), PLANTED)
    ref = catalog.commit("base", table).ref
    factory.filter("noise", ref, "base-clean", settings={"share": "0.1"}, home=home, progress=False)
    stored = find_stored_scores("noise", ref, settings={"share": "0.2"}, home=home)  # a threshold only
    assert stored is not None and stored.version == "base-clean@1"
    assert stored.table["row"].to_pylist() == list(range(40))
    assert find_stored_scores("noise", ref, seed=1, home=home) is None  # another seed: other scores
    summary = factory.audit(ref, compute=False)
    assert summary["noise"]["scores_from"] == "stored_scores"
    assert summary["noise"]["stored_with"] == "base-clean@1"
    stored = catalog.read_attachment("base-clean", "scores")
    expected = stored.column("noise_suspicion").to_numpy(zero_copy_only=False)
    for s in summary["suspects"]:
        assert s["suspicion"] == pytest.approx(expected[s["row"]], abs=1e-4)
    assert summary["noise"]["rate"] == round(catalog.resolve("base-clean").lineage["stats"]["noise_rate"], 4)
    assert summary["filtered"] is None  # base was not made by a filter


def _noise_output(home: Path) -> tuple[str, str]:
    """A real noise-filter run (stand-in encoder) on 120 pairs with 10 flips, 12 dropped."""
    import factory
    from factory.catalog import Catalog
    from tests.test_filter_noise import flipped_table

    Catalog(home).commit("toy", flipped_table(), message="toy")
    report = factory.filter("noise", "toy", "clean", settings={"share": "0.1", "synthetic_copies": "3"},
                            home=home, progress=False)
    assert report["rows_dropped"] == 12
    return "toy@1", report["ref"]


def test_audit_of_a_noise_filter_output_is_about_that_version(home: Path, fast_noise) -> None:
    """Issue 18: the audit of the noise filter's output showed the *input's* rate and re-flagged
    that share among the survivors. Now: the survivors' own rate (lower), and what the filter
    removed and why."""
    import factory.audit
    from factory.catalog import Catalog

    toy, clean = _noise_output(home)
    catalog = Catalog(home)
    lineage = catalog.resolve(clean).lineage
    summary = factory.audit(clean, compute=False, top=5, settings={"synthetic_copies": "3"})
    noise = summary["noise"]
    assert noise["scores_from"] == "columns" and noise["pairs_scored"] == 108
    assert noise["input_rate"] == round(lineage["stats"]["noise_rate"], 4)
    stored = catalog.read_attachment(clean, "scores")
    every = stored.column("noise_suspicion").to_numpy()
    kept = catalog.read_table(clean).column("noise_suspicion").to_numpy()
    assert noise["rate"] == pytest.approx(noise["input_rate"] * kept.mean() / every.mean(), abs=1e-4)
    assert noise["rate"] <= noise["input_rate"]
    assert noise["flagged"] == round(noise["rate"] * 108)  # the filter's rule at the version's own rate
    if noise["flagged"]:
        flagged = kept[np.argsort(-kept, kind="stable")[: noise["flagged"]]]
        assert noise["flagged_expected_wrong"] == pytest.approx(flagged.mean(), abs=1e-4)
    f = summary["filtered"]
    assert f["step"] == "noise" and f["inputs"] == [toy] and f["rows_dropped"] == 12
    assert f["by_action"] == {"keep": 108, "drop": 12}
    assert sum(r["rows"] for r in f["by_reason"]) == 12
    assert all(r["reason"].startswith("flagged by ") and r["action"] == "drop" for r in f["by_reason"])
    dropped = {pid for pid, a in zip(stored.column("pair_id").to_pylist(), stored.column("noise_action").to_pylist(),
                                     strict=True) if a == "drop"}
    assert len(f["removed"]) == 5 and {r["pair_id"] for r in f["removed"]} <= dropped
    first = f["removed"][0]
    assert first["reason"].startswith("label noise suspect") and first["chosen"] and first["prompt"]
    assert first["suspicion"] == pytest.approx(float(np.nanmax(every)), abs=1e-4)
    # tables and plots stay about the audited version
    assert sum(g["pairs"] for g in summary["by_group"]["source"]) == 108 == summary["rows"]
    from factory.audit import summary_text

    text = summary_text(summary)
    assert "left after the filter" in text and "made by filter noise from toy@1" in text


def test_audit_uses_the_noise_filters_own_rule(home: Path) -> None:
    """The audit flags with filters.noise.flag: scores that cannot separate flag nothing."""
    import factory.audit
    from factory.catalog import Catalog
    from factory.steps.params import build_params
    from filters.noise import NoiseParams, flag

    table = _flip_rows(toy_pairs(40, ties=4), PLANTED)
    for name, column in _fake_noise(table, PLANTED).items():
        table = table.append_column(name, column)
    weak = table.append_column("noise_separation", pa.array(np.full(table.num_rows, 0.55)))
    ref = Catalog(home).commit("weak", weak).ref
    noise = factory.audit(ref, compute=False)["noise"]
    assert noise["flagged"] == 0 and "cannot separate" in noise["flag_rule"] and noise["separation"] == 0.55
    scores = pa.table({"suspicion": table.column("noise_suspicion"), "rate_estimate": table.column("noise_rate_estimate")})
    expected, _ = flag(scores, build_params(NoiseParams, {}, step="noise"))
    strong = Catalog(home).commit("strong", table).ref
    summary = factory.audit(strong, compute=False, top=44)
    got = {s["row"] for s in summary["suspects"] if s["flagged"]}
    assert got == set(np.flatnonzero(expected).tolist())


def test_unflagged_suspects_are_not_listed_as_flagged_by(noisy, cli) -> None:
    """Issue 18: a suspect with "flagged: false" was listed as "flagged by" its signals."""
    ref, _ = noisy
    summary = cli("audit", ref, "--json", "--no-compute", "--top", "6").json()
    flagged = [s for s in summary["suspects"] if s["flagged"]]
    others = [s for s in summary["suspects"] if not s["flagged"]]
    assert flagged and others
    for s in flagged:
        assert s["flagged_by"] == s["signals"] and "flagged by" in s["reason"] and not s["strongest_signals"]
    for s in others:
        assert s["flagged_by"] == [] and "flagged by" not in s["reason"] and "not flagged" in s["reason"]
        assert s["strongest_signals"] == s["signals"]
    text = cli("audit", ref, "--no-compute", "--top", "6").stdout
    suspect_lines = [line for line in text.splitlines() if line.startswith("  0.")]
    assert sum("not flagged; strongest signals" in line for line in suspect_lines) == len(others)


def test_near_duplicates_use_dedups_threshold(home: Path) -> None:
    import factory.audit
    from factory.catalog import Catalog
    from filters.dedup import DedupParams

    table = toy_pairs(10)
    near = np.full(10, 0.1)
    near[:3] = 0.87  # above dedup's default (0.85), below the audit's old 0.9
    ref = Catalog(home).commit("d", table.append_column("dedup_near_similarity", pa.array(near))).ref
    d = factory.audit(ref, compute=False)["duplicates"]
    assert d["near_threshold"] == DedupParams().near_threshold and d["near_duplicates"] == 3


def test_html_self_contained_with_one_svg_per_plot(noisy, tmp_path: Path) -> None:
    import factory.audit
    from factory.audit.report import PLOTS

    ref, _ = noisy
    out = tmp_path / "r" / "audit.html"
    summary = factory.audit(ref, compute=False, html=out, top=10)
    assert summary["html"] == str(out)
    page = out.read_text()
    assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "<link" not in page and "@import" not in page
    figures = re.findall(r'<figure class="plot" data-plot="(\w+)">(.*?)</figure>', page, re.S)
    assert [name for name, _ in figures] == list(PLOTS)
    for name, body in figures:
        assert body.count("<svg") == 1, name
    # real bars, not placeholders, where the fixture has the data
    for name, body in figures:
        if name != "formatting":
            assert "<rect" in body, name
    assert page.count('class="suspect"') == 10 and 'id="save"' in page and "new Blob(" in page
    assert "<script>" in page and "</script>" in page.split("<script>", 1)[1]


def _decisions(path: Path, ref: str, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"format": "prefab-review/1", "ref": ref, "decisions": entries}))
    return path


def test_review_apply_counts_and_flips(home: Path, tmp_path: Path, cli) -> None:
    from factory.catalog import Catalog

    catalog = Catalog(home)
    table = toy_pairs(10)
    votes = pa.array([[1, -1, 1]] * 10, pa.list_(pa.int8()))
    table = table.set_column(table.schema.get_field_index("votes"), "votes", votes)
    ref = catalog.commit("rv", table).ref
    ids = table.column("pair_id").to_pylist()
    path = _decisions(tmp_path / "d.json", ref, [
        {"pair_id": ids[0], "row": 0, "action": "flip"},
        {"pair_id": ids[1], "action": "drop"},
        {"pair_id": ids[2], "row": 2, "action": "keep"},
        {"pair_id": ids[3], "row": 3, "action": "flip"},
    ])
    result = cli("review", "apply", ref, path, "--name", "rv-reviewed", "--json")
    assert result.code == 0, result.stderr
    r = result.json()
    assert (r["rows_in"], r["rows_kept"], r["rows_dropped"], r["rows_flipped"]) == (10, 9, 1, 2)
    assert r["rows_in"] == r["rows_kept"] + r["rows_dropped"]
    out = catalog.read_table(r["ref"])
    got = {row["pair_id"]: row for row in out.to_pylist()}
    assert ids[1] not in got and len(got) == 9
    for i in (0, 3):
        assert got[ids[i]]["chosen"] == table.column("rejected")[i].as_py()
        assert got[ids[i]]["rejected"] == table.column("chosen")[i].as_py()
        assert got[ids[i]]["votes"] == [-1, 1, -1]
    assert got[ids[2]]["chosen"] == table.column("chosen")[2].as_py() and got[ids[2]]["votes"] == [1, -1, 1]
    lineage = catalog.resolve(r["ref"]).lineage
    import hashlib

    assert lineage["review"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert lineage["review"]["decided_flip"] == 2 and lineage["review"]["decided_drop"] == 1
    assert (lineage["rows_in"], lineage["rows_kept"], lineage["rows_dropped"], lineage["rows_flipped"]) == (10, 9, 1, 2)
    assert lineage["parents"] == [ref]


@pytest.mark.parametrize("entries, expected", [
    ([{"pair_id": "nope", "action": "drop"}], r"decisions\[0\]: pair_id 'nope' is not in rv@1"),
    ([{"pair_id": "ID0", "action": "burn"}], r"decisions\[0\]: action 'burn' is not one of keep, flip, drop"),
    ([{"pair_id": "ID0", "row": 5, "action": "drop"}], r"decisions\[0\]: row 5 of rv@1 is not pair"),
    ([{"pair_id": "ID0", "action": "drop"}, {"pair_id": "ID0", "action": "flip"}],
     r"decisions\[1\]: row 0 already has action 'drop' from decisions\[0\]"),
    ("not json{", r"line 1: not valid JSON"),
    ({"ref": "other@2", "decisions": []}, r"made on other@2, not rv@1"),
])
def test_bad_decisions_fail_in_one_line(home: Path, tmp_path: Path, cli, entries, expected) -> None:
    from factory.catalog import Catalog

    table = toy_pairs(6)
    ref = Catalog(home).commit("rv", table).ref
    path = tmp_path / "bad.json"
    if isinstance(entries, str):
        path.write_text(entries)
    elif isinstance(entries, dict):
        path.write_text(json.dumps(entries))
    else:
        pid = table.column("pair_id")[0].as_py()
        _decisions(path, ref, [{**e, "pair_id": pid if e["pair_id"] == "ID0" else e["pair_id"]} for e in entries])
    result = cli("review", "apply", ref, path, "--name", "rv2")
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], result.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert [d["name"] for d in Catalog(home).datasets()] == ["rv"]  # nothing committed


def test_audit_text_and_unknown_ref(noisy, cli) -> None:
    ref, _ = noisy
    result = cli("audit", ref, "--no-compute")
    assert result.code == 0 and "estimated noise rate 7.5%" in result.stdout
    bad = cli("audit", "nosuch", "--no-compute")
    assert bad.code == 1 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_noise_computed_in_process_when_missing(home: Path) -> None:
    """No noise scores stored: the audit runs the registered noise filter through the runner."""
    import factory.audit
    from factory.catalog import Catalog

    table = _flip_rows(toy_pairs(60), PLANTED)
    ref = Catalog(home).commit("raw", table).ref
    settings = {"folds": 3, "seeds": 1, "epochs": 4, "synthetic_copies": 2, "components": 32}
    summary = factory.audit(ref, settings=settings, progress=False, top=10)
    noise = summary["noise"]
    assert noise["available"] and noise["scores_from"] == "computed", noise
    assert noise["pairs_scored"] == 60 and noise["rate"] is not None and len(noise["interval"]) == 2
    top = {s["row"] for s in summary["suspects"][:6]}
    assert len(top & set(PLANTED)) >= 2, summary["suspects"][:6]  # insults as "chosen" stand out


@pytest.mark.slow
def test_model_probes_and_margin_plot(home: Path, tmp_path: Path, cli) -> None:
    import factory
    from factory.catalog import Catalog

    ref = Catalog(home).commit("clean", toy_pairs(40)).ref
    factory.train(ref, "toy-rm", home=home, epochs=3, progress=False)
    result = cli("audit", ref, "--model", "toy-rm", "--no-compute", "--html", tmp_path / "a.html", "--json")
    assert result.code == 0, result.stderr
    m = result.json()["model"]
    assert m["model"] == "toy-rm" and 0.0 <= m["master_key_fpr"] <= 1.0 and m["accuracy"] is not None
    assert set(m) >= {"master_key_fpr", "contrast_consistency", "contrast_pairs"}
    page = (tmp_path / "a.html").read_text()
    margin = page.split('data-plot="margin">', 1)[1].split("</figure>", 1)[0]
    assert "reward margin of toy-rm" in margin and "<rect" in margin


def test_pairs_the_noise_filter_flipped_are_not_suspects(home: Path) -> None:
    import factory.audit
    from factory.catalog import Catalog

    table = _flip_rows(toy_pairs(40), PLANTED)
    for name, column in _fake_noise(table, PLANTED).items():
        table = table.append_column(name, column)
    action = ["flip" if i == PLANTED[0] else "keep" for i in range(40)]
    table = _flip_rows(table, PLANTED[:1]).append_column("noise_action", pa.array(action, pa.string()))
    ref = Catalog(home).commit("fixed", table).ref
    suspects = factory.audit(ref, compute=False)["suspects"]
    assert [s["row"] for s in suspects[:2]] == PLANTED[1:]
    first = next(s for s in suspects if s["row"] == PLANTED[0])
    assert first["suspicion"] == pytest.approx(0.05) and first["signals"] == ["flipped by the noise filter"]
