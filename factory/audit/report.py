"""The audit's HTML report: one self-contained file (inline CSS, JS and SVG, no network).

The suspects table doubles as a review form: a reviewer marks each suspect keep, flip or
drop and "Save decisions" downloads a JSON file (``prefab-review/1``) that
``prefab review apply`` validates and commits. The page also reads decisions from its URL
hash (``#decide=ROW:ACTION,...``) so a headless browser can drive it in tests.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from factory.audit.review import ACTIONS, FORMAT

PLOTS = ("suspicion", "margin", "noise_by_group", "length_bias", "formatting")
_W, _PAD_L, _PAD_R = 640, 170, 60
_BLUE, _RED, _GREY = "#4c78a8", "#e45756", "#999999"


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _empty_svg(title: str, why: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="60" role="img" '
            f'aria-label="{_e(title)}"><text x="10" y="35" fill="#666" font-size="13">{_e(why)}</text></svg>')


def svg_histogram(series: Sequence[tuple[str, np.ndarray, str]], title: str, xlabel: str, *,
                  bins: int = 20, lo: float | None = None, hi: float | None = None) -> str:
    """Stacked histogram of one or more value sets sharing bins."""
    finite = [v[np.isfinite(v)] for _, v, _ in series]
    allv = np.concatenate(finite) if finite else np.array([])
    if allv.size == 0:
        return _empty_svg(title, f"{title}: no data")
    lo = float(allv.min()) if lo is None else lo
    hi = float(allv.max()) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(v, edges)[0] for v in finite]
    top = max(int(np.sum(counts, axis=0).max()), 1)
    height, plot_h, left = 240, 170, 50
    width = _W - left - 20
    bw = width / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" role="img" '
             f'aria-label="{_e(title)}" font-size="11">']
    base = np.zeros(bins)
    for (name, _, colour), count in zip(series, counts, strict=True):
        for i, c in enumerate(count):
            if c:
                h = plot_h * c / top
                y = 20 + plot_h - (base[i] * plot_h / top) - h
                parts.append(f'<rect x="{left + i * bw:.1f}" y="{y:.1f}" width="{max(bw - 1, 1):.1f}" '
                             f'height="{h:.1f}" fill="{colour}"><title>{_e(name)}: {int(c)} in '
                             f'[{edges[i]:.3g}, {edges[i + 1]:.3g})</title></rect>')
        base += count
    axis_y = 20 + plot_h
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + width}" y2="{axis_y}" stroke="#333"/>')
    for frac in (0, 0.5, 1):
        x = left + frac * width
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">{lo + frac * (hi - lo):.3g}</text>')
    parts.append(f'<text x="{left - 6}" y="26" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{left + width / 2:.1f}" y="{height - 8}" text-anchor="middle">{_e(xlabel)}</text>')
    for k, (name, _, colour) in enumerate(series):
        parts.append(f'<rect x="{left + 10 + k * 150}" y="4" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{left + 24 + k * 150}" y="13">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_hbars(rows: Sequence[tuple[str, float | None, str] | str], title: str, *, xmax: float = 1.0,
              ref: float | None = None, percent: bool = True) -> str:
    """Horizontal bars, one per (label, value, note); a bare string is a section heading."""
    if not any(isinstance(r, tuple) and r[1] is not None for r in rows):
        return _empty_svg(title, f"{title}: no data")
    step = 20
    height = 20 + step * len(rows) + 10
    width = _W - _PAD_L - _PAD_R
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{height}" role="img" '
             f'aria-label="{_e(title)}" font-size="11">']
    y = 20
    for row in rows:
        if isinstance(row, str):
            parts.append(f'<text x="4" y="{y + 13}" font-weight="bold">{_e(row)}</text>')
        else:
            label, value, note = row
            parts.append(f'<text x="{_PAD_L - 6}" y="{y + 13}" text-anchor="end">{_e(label[:28])}</text>')
            if value is not None:
                w = width * min(max(value / xmax, 0.0), 1.0)
                shown = f"{100 * value:.1f}%" if percent else f"{value:.3g}"
                parts.append(f'<rect x="{_PAD_L}" y="{y + 3}" width="{w:.1f}" height="{step - 6}" '
                             f'fill="{_BLUE}"><title>{_e(label)}: {shown} {_e(note)}</title></rect>')
                parts.append(f'<text x="{_PAD_L + w + 4:.1f}" y="{y + 13}">{shown} {_e(note)}</text>')
        y += step
    if ref is not None:
        x = _PAD_L + width * ref / xmax
        parts.append(f'<line x1="{x:.1f}" y1="16" x2="{x:.1f}" y2="{y}" stroke="{_RED}" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "".join(parts)


def plots(summary: dict[str, Any], frame: pl.DataFrame, margins: np.ndarray | None) -> dict[str, tuple[str, str]]:
    """Plot name -> (caption, inline SVG); every name in :data:`PLOTS`, a placeholder when no data."""
    out: dict[str, tuple[str, str]] = {}
    has_noise = "suspicion" in frame.columns
    if has_noise:
        s = frame["suspicion"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        f = frame["flagged"].to_numpy()
        out["suspicion"] = ("Suspicion (probability the label is wrong) of scored pairs", svg_histogram(
            [("not flagged", s[~f], _BLUE), ("flagged", s[f], _RED)], "suspicion", "suspicion", lo=0.0, hi=1.0))
    else:
        out["suspicion"] = ("Suspicion", _empty_svg("suspicion", "no noise scores: " + str(summary["noise"]["reason"])))
    if margins is not None:
        margin, what = np.asarray(margins, dtype=np.float64), f"reward margin of {summary['model']['model']}"
    elif "oof_margin" in frame.columns:
        margin = frame["oof_margin"].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        what = "out-of-fold RM ensemble margin (noise filter)"
    else:
        margin, what = None, ""
    if margin is None:
        out["margin"] = ("Margin distribution", _empty_svg("margin", "no margins: pass --model or store noise scores"))
    elif has_noise:
        f = frame["flagged"].to_numpy()
        out["margin"] = (f"Margin r(chosen) − r(rejected): {what}", svg_histogram(
            [("not flagged", margin[~f], _BLUE), ("flagged", margin[f], _RED)], "margin", "margin"))
    else:
        out["margin"] = (f"Margin r(chosen) − r(rejected): {what}",
                         svg_histogram([("pairs", margin, _BLUE)], "margin", "margin"))
    rows: list[tuple[str, float | None, str] | str] = []
    if has_noise:
        for key, groups in summary["by_group"].items():
            rows.append(f"by {key}")
            rows += [(g["group"], g["flagged_share"], f"({g['flagged']}/{g['scored']})") for g in groups[:12]]
    out["noise_by_group"] = ("Share of scored pairs flagged as noisy, by group",
                             svg_hbars(rows, "noise by group", ref=summary["noise"]["flag_share"]))
    lb = summary["length_bias"]
    rows = [("all pairs", lb["share"], f"({lb['chosen_longer']}/{lb['comparable']})"), "by source"]
    rows += [(g["group"], g["share"], f"({g['chosen_longer']}/{g['comparable']})") for g in lb["by_source"][:15]]
    out["length_bias"] = ("How often the longer answer is chosen (dashed: no bias)",
                          svg_hbars(rows, "length bias", ref=0.5))
    rows = [(k, v["share"], f"({v['chosen_has']}/{v['pairs_differing']})") for k, v in summary["formatting"].items()]
    out["formatting"] = ("When only one answer has the formatting, how often it is the chosen one",
                         svg_hbars(rows, "formatting bias", ref=0.5))
    assert tuple(out) == PLOTS
    return out


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:18px}figure{margin:12px 0}figcaption{font-size:13px;color:#555}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:4px;vertical-align:top}
.text{white-space:pre-wrap;max-width:340px;max-height:220px;overflow:auto}
tr.flip{background:#fff4d6}tr.drop{background:#fde2e2}tr.keep{background:#e6f4ea}
#save{font-size:14px;padding:6px 14px}
"""

_JS = """
const REF = document.body.dataset.ref;
function decisions(){
  const out = [];
  document.querySelectorAll('tr.suspect').forEach(tr => {
    const picked = tr.querySelector('input[type=radio]:checked');
    tr.className = 'suspect' + (picked ? ' ' + picked.value : '');
    if (picked) out.push({pair_id: tr.dataset.pairId, row: Number(tr.dataset.row), action: picked.value});
  });
  return {format: FORMAT, ref: REF, decisions: out};
}
function refresh(){
  const d = decisions();
  document.getElementById('decisions-json').textContent = JSON.stringify(d);
  document.getElementById('decided').textContent = d.decisions.length;
}
function save(){
  const blob = new Blob([JSON.stringify(decisions(), null, 2)], {type: 'application/json'});
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = 'decisions-' + REF.replace(/[^A-Za-z0-9_.-]/g, '_') + '.json';
  document.body.appendChild(a); a.click(); a.remove();
}
function fromHash(){
  const m = /decide=([^&]*)/.exec(location.hash);
  if (!m) return;
  decodeURIComponent(m[1]).split(',').forEach(item => {
    const [row, action] = item.split(':');
    const input = document.querySelector('tr.suspect[data-row="' + row + '"] input[value="' + action + '"]');
    if (input) input.checked = true;
  });
}
document.addEventListener('change', refresh);
document.getElementById('save').addEventListener('click', save);
fromHash(); refresh();
"""


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def render_html(summary: dict[str, Any], frame: pl.DataFrame, margins: np.ndarray | None = None) -> str:
    """The whole report as one string."""
    n = summary["noise"]
    low, high = (n["interval"] or [None, None])[:2]
    cards = [
        ("pairs", summary["rows"]),
        ("estimated noise rate", f"{_pct(n['rate'])}" + (f" [{_pct(low)}, {_pct(high)}]" if n["interval"] else "")),
        ("flagged", f"{n['flagged']} of {n['pairs_scored']}"),
        ("noise scores from", n["scores_from"]),
        ("ties", f"{summary['ties']['pairs']} ({_pct(summary['ties']['share'])})"),
        ("longer chosen", _pct(summary["length_bias"]["share"])),
        ("exact duplicates", f"{summary['duplicates']['exact_duplicates']} ({_pct(summary['duplicates']['exact_rate'])})"),
    ]
    d = summary["duplicates"]
    if d["near_duplicates"] is not None:
        cards.append(("near duplicates", f"{d['near_duplicates']} ({_pct(d['near_rate'])})"))
    if d["contaminated"] is not None:
        cards.append(("contaminated", f"{d['contaminated']} ({_pct(d['contamination_rate'])})"))
    a = summary["annotators"]
    if a:
        cards.append(("annotator pairwise agreement", _pct(a["pairwise_agreement"])))
    m = summary["model"]
    if m:
        cards += [(f"{m['model']} master-key FPR", _pct(m["master_key_fpr"])),
                  (f"{m['model']} contrast consistency", _pct(m["contrast_consistency"]))]
    body = [f"<h1>Audit of {_e(summary['ref'])}</h1>"]
    if not n["available"]:
        body.append(f"<p>Noise was not scored: {_e(n['reason'])}</p>")
    body.append('<div class="cards">' + "".join(f'<div class="card">{_e(k)}<b>{_e(v)}</b></div>'
                                               for k, v in cards) + "</div>")
    body.append("<h2>Plots</h2>")
    for name, (caption, svg) in plots(summary, frame, margins).items():
        body.append(f'<figure class="plot" data-plot="{name}">{svg}<figcaption>{_e(caption)}</figcaption></figure>')
    if n["available"]:
        body.append("<h2>Noise by group</h2>")
        for key, groups in summary["by_group"].items():
            body.append(f"<h3>{_e(key)}</h3><table><tr><th>group</th><th>pairs</th><th>scored</th><th>flagged</th>"
                        "<th>flagged share</th><th>expected noisy</th><th>mean suspicion</th></tr>")
            body += [f"<tr><td>{_e(g['group'])}</td><td>{g['pairs']}</td><td>{g['scored']}</td><td>{g['flagged']}</td>"
                     f"<td>{_pct(g['flagged_share'])}</td><td>{g['expected_noisy']}</td>"
                     f"<td>{_e(g['mean_suspicion'])}</td></tr>" for g in groups]
            body.append("</table>")
    body.append(f"<h2>Suspects ({len(summary['suspects'])}, most suspicious first)</h2>")
    body.append("<p>Mark each suspect keep, flip (swap chosen and rejected) or drop, then save the decisions "
                "and run <code>prefab review apply REF DECISIONS.json --name NAME</code>. Unmarked rows are kept. "
                'Decided: <span id="decided">0</span>. <button id="save" type="button">Save decisions</button></p>')
    body.append('<table id="suspects"><tr><th>#</th><th>suspicion</th><th>signals</th><th>group</th><th>prompt</th>'
                "<th>chosen</th><th>rejected</th><th>decision</th></tr>")
    for i, s in enumerate(summary["suspects"]):
        radios = "".join(
            f'<label><input type="radio" name="d{s["row"]}" value="{act}"> {act}</label><br>' for act in ACTIONS)
        scores = ", ".join(f"{k} {v}" for k, v in s["scores"].items() if v is not None)
        body.append(
            f'<tr class="suspect" data-row="{s["row"]}" data-pair-id="{_e(s["pair_id"])}">'
            f"<td>{i + 1}<br><small>row {s['row']}</small></td><td>{s['suspicion']:.3f}"
            f"{'<br><b>flagged</b>' if s['flagged'] else ''}</td>"
            f"<td>{_e(', '.join(s['signals']) or 'combined score only')}<br><small>{_e(scores)}</small></td>"
            f"<td>{_e(s['source'])}<br>{_e(s['step'])}<br>{_e(s['attribute'])}<br>{_e(s['task'])}</td>"
            f'<td><div class="text">{_e(s["prompt"])}</div></td><td><div class="text">{_e(s["chosen"])}</div></td>'
            f'<td><div class="text">{_e(s["rejected"])}</div></td><td>{radios}</td></tr>')
    body.append("</table>")
    body.append('<h2>Decisions</h2><pre id="decisions-json"></pre>')
    body.append('<h2>Summary (JSON)</h2><details><summary>show</summary><pre>'
                + _e(json.dumps({k: v for k, v in summary.items() if k != "suspects"}, indent=2, default=str))
                + "</pre></details>")
    script = f"const FORMAT = {json.dumps(FORMAT)};\n{_JS}".replace("</", "<\\/")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>prefab audit: {_e(summary['ref'])}</title><style>{_CSS}</style></head>"
            f'<body data-ref="{_e(summary["ref"])}">' + "\n".join(body) + f"<script>{script}</script></body></html>\n")


def write_html(summary: dict[str, Any], frame: pl.DataFrame, path: Path, *,
               margins: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(summary, frame, margins), encoding="utf-8")
    tmp.replace(path)
    return path
