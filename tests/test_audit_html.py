"""The audit's HTML report as HTML: hostile text stays text, missing summary parts omit their
section, and the plots say what they show (log-scale suspicion, margin zero line, real versus
generated margins). Pure Python, no browser: tests/test_audit_browser.py renders it."""

from __future__ import annotations

import copy
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from schemas.pairs import PROVENANCE_TYPE, content_ids
from tests.test_audit import PLANTED, _fake_noise, _flip_rows
from tests.toy import toy_pairs

# Each breaks out of a different context: element content, a quoted attribute (both quote
# kinds), a raw-text element (script, style, textarea), SVG CDATA and an HTML comment.
HOSTILE = ("<script>alert(1)</script> \" onerror=\"x ' onerror='x </textarea> <img src=x onerror=alert(1)> "
           "]]> </style> <!-- </script <svg onload=alert(1)>")


class _Page(HTMLParser):
    """Every element, attribute, script body and text node of a page, as a browser splits them."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str | None]] = []
        self.scripts: list[str] = []
        self.text: list[str] = []
        self._raw: str | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag in ("script", "style"):
            self._raw = tag

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag: str) -> None:
        if tag == self._raw:
            self._raw = None

    def handle_data(self, data: str) -> None:
        if self._raw == "script":
            self.scripts.append(data)
        elif self._raw is None:
            self.text.append(data)


def _assert_inert(page: str) -> _Page:
    """Nothing of HOSTILE became markup: one script (the report's own), one style, no handlers."""
    parsed = _Page(page)
    assert parsed.tags.count("script") == 1 and parsed.tags.count("style") == 1, parsed.tags
    assert not {"img", "textarea"} & set(parsed.tags)
    assert parsed.tags.count("svg") == 5  # the five plots, no injected <svg onload>
    handlers = [(t, k) for t, k, _ in parsed.attrs if k.startswith("on")]
    assert not handlers, handlers
    (script,) = parsed.scripts
    assert script.lstrip().startswith("const FORMAT") and "alert(" not in script
    assert "</" not in script and "<!--" not in script
    return parsed


def _with_generated(table: pa.Table, rows: list[int]) -> pa.Table:
    """Mark ``rows`` as made by a generator: the runner stamps the step's version and parents."""
    provenance = table.column("provenance").to_pylist()
    for r in rows:
        provenance[r] = {**provenance[r], "step": "master_keys", "step_version": "1",
                         "parent_ids": [table.column("pair_id")[0].as_py()]}
    i = table.schema.get_field_index("provenance")
    return table.set_column(i, "provenance", pa.array(provenance, PROVENANCE_TYPE))


def _hostile_table() -> pa.Table:
    """Toy pairs with HOSTILE, tagged by field, in every text field a pair has."""
    table = _flip_rows(toy_pairs(12, ties=2), [0])
    n = table.num_rows
    prompt = [[{"role": "user", "content": f"prompt-{i} {HOSTILE}"}] for i in range(n)]
    provenance = [{**p, "source": f"source {HOSTILE}", "step": f"step {HOSTILE}"}
                  for p in table.column("provenance").to_pylist()]
    replace = {
        "prompt": pa.array(prompt, table.schema.field("prompt").type),
        "chosen": pa.array([f"chosen-{i} {HOSTILE}" for i in range(n)], pa.string()),
        "rejected": pa.array([f"rejected-{i} {HOSTILE}" for i in range(n)], pa.string()),
        "attribute": pa.array([f"attribute {HOSTILE}"] * n, pa.string()),
        "task": pa.array([f"task {HOSTILE}"] * n, pa.string()),
        "provenance": pa.array(provenance, PROVENANCE_TYPE),
    }
    for name, column in replace.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    pair_ids, prompt_ids = content_ids(table)  # the content changed: so did its hashes
    for name, column in (("pair_id", pair_ids), ("prompt_id", prompt_ids)):
        table = table.set_column(table.schema.get_field_index(name), name, column.cast(pa.string()))
    noise = _fake_noise(table, [0, 1, 2])
    tie = np.asarray(table.column("tie").to_pylist(), dtype=bool)
    noise["noise_signals"] = pa.array([None if t else f"signal {HOSTILE}, rm" for t in tie], pa.string())
    for name, column in noise.items():
        table = table.append_column(name, column)
    return table


def test_hostile_pair_text_stays_text(home: Path, tmp_path: Path) -> None:
    import factory.audit
    from factory.catalog import Catalog

    ref = Catalog(home).commit("hostile", _hostile_table(), message=HOSTILE).ref
    out = tmp_path / "audit.html"
    summary = factory.audit(ref, compute=False, html=out, top=20)
    page = out.read_text()
    parsed = _assert_inert(page)
    shown = "".join(parsed.text)
    # every field is shown, as text, in the suspects table and the group tables
    for field in ("prompt-0", "chosen-0", "rejected-0", "source", "step", "attribute", "task", "signal"):
        assert f"{field} {HOSTILE}" in shown, field
    assert len(summary["suspects"]) == 14 - 2  # ties are not scored


def _poison(value: Any, key: str | None = None) -> Any:
    """Every string of a summary replaced by HOSTILE; keys too where they are data (group
    names, formatting features, signal scores)."""
    if isinstance(value, str):
        return f"{key} {HOSTILE}"
    if isinstance(value, list):
        return [_poison(v, key) for v in value]
    if isinstance(value, dict):
        data_keys = key in ("by_group", "formatting", "scores", "removed")
        return {(f"{k} {HOSTILE}" if data_keys else k): _poison(v, k) for k, v in value.items()}
    return value


def _frame_and_summary(home: Path) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A real audit summary of the noisy toy version and the frame the report plots from."""
    import factory.audit
    from factory.audit.compute import audit_frame, flag_suspects
    from factory.catalog import Catalog

    table = _with_generated(_flip_rows(toy_pairs(40, ties=4), PLANTED), list(range(30, 40)))
    for name, column in _fake_noise(table, PLANTED).items():
        table = table.append_column(name, column)
    ref = Catalog(home).commit("noisy", table).ref
    summary = factory.audit(ref, compute=False, top=10)
    frame = audit_frame(table)
    suspicion = frame["noise_suspicion"]
    flagged, _ = flag_suspects(suspicion.fill_null(float("nan")), 0.075, None)
    frame = frame.with_columns(suspicion.alias("suspicion"), pl.Series("flagged", flagged),
                               frame["noise_oof_margin"].alias("oof_margin"))
    return frame, summary


def test_hostile_summary_text_stays_text(home: Path) -> None:
    """Names the catalog would refuse (refs, models) and text a filter writes (reasons,
    messages, a removed-pairs section) still cannot become markup in the report."""
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    summary["model"] = {"model": "rm", "accuracy": 0.9, "master_key_fpr": 0.1, "contrast_consistency": 0.8}
    summary["removed"] = {"by": "noise@1", "rows_removed": 2, "message": "m",
                          "pairs": [{"pair_id": "p", "reason": "r", "chosen": "c", "rejected": "x"}]}
    summary["noise"]["warnings"] = ["w"]
    poisoned = _poison(summary)
    page = render_html(poisoned, frame, margins=np.linspace(-1, 1, frame.height))
    parsed = _assert_inert(page)
    shown = "".join(parsed.text)
    for what in ("ref", "model", "reason", "signals", "group", "pair_id", "message", "warnings", "scores_from",
                 "source", "attribute", "task", "prompt", "chosen", "rejected"):
        assert f"{what} {HOSTILE}" in shown, what
    # the ref rides in an attribute for the page's script: quoted there, whole
    assert ("body", "data-ref", f"ref {HOSTILE}") in parsed.attrs


# ---- missing parts of the summary -------------------------------------------------------

_SECTIONS = {"by_group": "<h2>Noise by group</h2>", "suspects": 'id="suspects"',
             "model": "master-key FPR", "annotators": "annotator pairwise agreement",
             "duplicates": "exact duplicates"}


@pytest.mark.parametrize("key", ["ref", "rows", "noise", "suspects", "by_group", "annotators", "ties",
                                 "length_bias", "formatting", "duplicates", "model"])
def test_a_missing_summary_part_omits_its_section(home: Path, key: str) -> None:
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    summary["model"] = {"model": "rm", "accuracy": 0.9, "master_key_fpr": 0.1, "contrast_consistency": 0.8}
    summary["annotators"] = {"rows_with_votes": 4, "pairwise_agreement": 0.75}
    full = render_html(summary, frame)
    for marker in _SECTIONS.values():
        assert marker in full, marker
    del summary[key]
    page = render_html(summary, frame)
    _assert_inert(page)
    if key in _SECTIONS:
        assert _SECTIONS[key] not in page


def test_missing_fields_inside_parts_do_not_crash(home: Path) -> None:
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    for part in ("noise", "length_bias", "duplicates", "ties"):
        for field in list(summary[part]):
            trimmed = copy.deepcopy(summary)
            del trimmed[part][field]
            _assert_inert(render_html(trimmed, frame))
    for field in list(summary["suspects"][0]):
        trimmed = copy.deepcopy(summary)
        for s in trimmed["suspects"]:
            del s[field]
        _assert_inert(render_html(trimmed, frame))


def test_unflagged_suspects_show_strongest_signals_not_flagged_by(home: Path) -> None:
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    page = render_html(summary, frame)
    rows = re.findall(r'<tr class="suspect".*?</tr>', page, re.S)
    flags = [s["flagged"] for s in summary["suspects"]]
    assert len(rows) == len(flags) and any(flags) and not all(flags)
    for row, flagged in zip(rows, flags, strict=True):
        assert ("flagged by" in row) == flagged, row
        assert ("strongest signals" in row) == (not flagged), row


# ---- plots ------------------------------------------------------------------------------


def _figure(page: str, name: str) -> str:
    return page.split(f'data-plot="{name}">', 1)[1].split("</figure>", 1)[0]


def _bars(svg: str) -> list[dict[str, str]]:
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', tag)) for tag in re.findall(r"<rect [^>]*data-count[^>]*>", svg)]


def test_plots_scale_with_the_page(home: Path) -> None:
    from factory.audit.report import PLOTS, render_html

    frame, summary = _frame_and_summary(home)
    page = render_html(summary, frame)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    for name in PLOTS:
        (svg,) = re.findall(r"<svg [^>]*>", _figure(page, name))
        assert re.search(r'viewBox="0 0 \d+ \d+"', svg) and 'width="100%"' in svg, svg
        assert not re.search(r'height="\d', svg), svg  # height follows the width through the viewBox


def test_suspicion_histogram_is_log_scaled_and_labelled(home: Path) -> None:
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    svg = _figure(render_html(summary, frame), "suspicion")
    assert "pairs (log scale)" in svg
    bars = _bars(svg)
    counts = [int(b["data-count"]) for b in bars]
    assert 1 in counts and max(counts) > 3  # planted: single pairs at the top, a crowd at the bottom
    top_height = max(float(b["height"]) for b in bars)
    for bar, count in zip(bars, counts, strict=True):
        expected = top_height * math.log10(1 + count) / math.log10(1 + max(counts))
        assert float(bar["height"]) == pytest.approx(expected, abs=0.11), bar
    by_series = {s: sum(int(b["data-count"]) for b in bars if b["data-series"] == s) for s in ("flagged", "not flagged")}
    assert by_series == {"flagged": 3, "not flagged": 37}
    ticks = re.findall(r'<text class="ytick"[^>]*>(\d+)</text>', svg)
    assert ticks[0] == "1" and str(max(counts)) in ticks


def test_margin_plot_splits_real_and_generated_with_a_zero_line(home: Path) -> None:
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    svg = _figure(render_html(summary, frame), "margin")
    # rows 30-39 are generated; ties (rows 40-43) have no margin
    assert "real (30)" in svg and "generated (10)" in svg
    bars = _bars(svg)
    counts = {s: sum(int(b["data-count"]) for b in bars if b["data-series"] == s) for s in ("real", "generated")}
    assert counts == {"real": 30, "generated": 10}
    (zero,) = re.findall(r'<line class="zero"[^>]*>', svg)
    x_zero = float(re.search(r'x1="([\d.]+)"', zero).group(1))
    # margins lie around -2 (planted flips) and +1.5: zero sits between the bars of each sign
    negative = [float(b["x"]) for b in bars if float(b["data-hi"]) <= 0]
    positive = [float(b["x"]) for b in bars if float(b["data-lo"]) >= 0]
    assert negative and positive and max(negative) < x_zero < min(positive)


def test_margin_plot_without_generated_pairs_has_one_series(home: Path) -> None:
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    frame = frame.drop("provenance")
    svg = _figure(render_html(summary, frame), "margin")
    assert "real (40)" in svg and "generated" not in svg


def test_a_part_the_report_does_not_know_gets_its_own_section(home: Path) -> None:
    """What a filtered version's filter removed (a part added to the summary after this
    report was written) shows as a table rather than only in the JSON dump."""
    from factory.audit.report import render_html

    frame, summary = _frame_and_summary(home)
    summary["removed"] = {"by": "noise@2", "rows_removed": 2,
                          "pairs": [{"pair_id": "a1", "reason": "suspicion 0.91"},
                                    {"pair_id": "b2", "reason": "suspicion 0.88", "action": "drop"}]}
    summary["empty_part"] = None
    page = render_html(summary, frame)
    section = page.split('<section class="part" data-part="removed">', 1)[1].split("</section>", 1)[0]
    assert section.startswith("<h2>Removed by the filter</h2>")
    assert "<th>rows_removed</th><td>2</td>" in section
    assert "<tr><th>pair_id</th><th>reason</th><th>action</th></tr>" in section
    assert "<td>b2</td><td>suspicion 0.88</td><td>drop</td>" in section
    assert "<td>a1</td><td>suspicion 0.91</td><td>n/a</td>" in section
    assert 'data-part="empty_part"' not in page
