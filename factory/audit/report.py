"""The audit's HTML report: one self-contained file (inline CSS, JS and SVG, no network).

The suspects table doubles as a review form: a reviewer marks each suspect keep, flip or
drop and "Save decisions" downloads a JSON file (``prefab-review/1``) that
``prefab review apply`` validates and commits. The page also reads decisions from its URL
hash (``#decide=ROW:ACTION,...``) so a headless browser can drive it in tests.

Every piece of text from the data (pairs, names, reasons) goes through :func:`_e` or, inside
the one script, :func:`_script_json`; a part of the summary that is missing omits its section.
The plots are SVGs with a viewBox and width 100%, and below 760 px the suspects table stacks
each suspect's cells, so the page reads on a phone.
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
from schemas.pairs import generated_mask

PLOTS = ("suspicion", "margin", "noise_by_group", "length_bias", "formatting")
# Coordinates inside each SVG's viewBox; the SVG itself scales to the page's width.
_W, _PAD_L, _PAD_R = 640, 170, 60
_BLUE, _RED, _GREY, _ORANGE = "#4c78a8", "#e45756", "#999999", "#f58518"
# Summary parts drawn by a section of their own; any other part gets a generic one.
_DRAWN = {"ref", "rows", "noise", "suspects", "by_group", "annotators", "ties", "length_bias", "formatting",
          "duplicates", "model", "html", "position"}
_TITLES = {"removed": "Removed by the filter"}


def _e(text: Any) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _script_json(value: Any) -> str:
    """JSON for inside a <script>: no ``</script>``, ``<!--`` or line separator can end or bend it."""
    text = json.dumps(value)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escaped)
    return text


def _svg_open(title: str, height: int) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_W} {height}" width="100%" '
            f'preserveAspectRatio="xMinYMin meet" role="img" aria-label="{_e(title)}" font-size="11">')


def _empty_svg(title: str, why: str) -> str:
    return f'{_svg_open(title, 60)}<text x="10" y="35" fill="#666" font-size="13">{_e(why)}</text></svg>'


def _log_ticks(top: float) -> list[int]:
    ticks, t = [], 1
    while t <= top:
        ticks.append(t)
        t *= 10
    return ticks


def svg_histogram(series: Sequence[tuple[str, np.ndarray, str]], title: str, xlabel: str, *,
                  bins: int = 20, lo: float | None = None, hi: float | None = None, log: bool = False,
                  shares: bool = False, zero_line: bool = False) -> str:
    """Histogram of one or more value sets over shared bins, their bars side by side.

    ``log``: bar height ∝ log10(1 + count), so single pairs stay visible beside thousands.
    ``shares``: each set's counts as a share of that set, so sets of different sizes compare.
    ``zero_line``: the range includes 0 and a dashed line marks it.
    """
    finite = [np.asarray(v, dtype=np.float64) for _, v, _ in series]
    finite = [v[np.isfinite(v)] for v in finite]
    allv = np.concatenate(finite) if finite else np.array([])
    if allv.size == 0:
        return _empty_svg(title, f"{title}: no data")
    lo = float(allv.min()) if lo is None else lo
    hi = float(allv.max()) if hi is None else hi
    if zero_line:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    counts = [np.histogram(v, edges)[0] for v in finite]
    values = [c / max(len(v), 1) for c, v in zip(counts, finite, strict=True)] if shares else counts
    top = max(float(max(v.max() for v in values)), 1e-12 if shares else 1.0)
    height, plot_t, plot_h, left = 250, 26, 170, 58
    width = _W - left - 20

    def scaled(v: float) -> float:
        return plot_h * (np.log10(1 + v) / np.log10(1 + top) if log else v / top)

    bw = width / bins
    sub = max(bw - 1, 1) / len(series)
    axis_y = plot_t + plot_h
    parts = [_svg_open(title, height)]
    for k, ((name, _, colour), count, value) in enumerate(zip(series, counts, values, strict=True)):
        for i, (c, v) in enumerate(zip(count, value, strict=True)):
            if not c:
                continue
            h = scaled(float(v))
            shown = f"{int(c)} ({100 * v:.1f}% of {_e(name)})" if shares else f"{int(c)}"
            parts.append(f'<rect x="{left + i * bw + k * sub:.1f}" y="{axis_y - h:.1f}" width="{sub:.1f}" '
                         f'height="{h:.1f}" fill="{colour}" data-series="{_e(name)}" data-count="{int(c)}" '
                         f'data-lo="{edges[i]:.6g}" data-hi="{edges[i + 1]:.6g}"><title>{_e(name)}: {shown} in '
                         f"[{edges[i]:.3g}, {edges[i + 1]:.3g})</title></rect>")
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + width}" y2="{axis_y}" stroke="#333"/>'
                 f'<line x1="{left}" y1="{plot_t}" x2="{left}" y2="{axis_y}" stroke="#333"/>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        x = left + frac * width
        parts.append(f'<text x="{x:.1f}" y="{axis_y + 14}" text-anchor="middle">{lo + frac * (hi - lo):.3g}</text>')
    if zero_line and lo < 0 < hi:
        x = left + (0 - lo) / (hi - lo) * width
        parts.append(f'<line class="zero" x1="{x:.1f}" y1="{plot_t - 4}" x2="{x:.1f}" y2="{axis_y}" stroke="#333" '
                     f'stroke-dasharray="4 3"><title>0: no preference</title></line>'
                     f'<text x="{x:.1f}" y="{plot_t - 8}" text-anchor="middle">0</text>')
    if log:
        ticks: list[tuple[float, str]] = [(float(t), str(t)) for t in _log_ticks(top)]
        if ticks and scaled(top) - scaled(ticks[-1][0]) > 12:
            ticks.append((top, str(int(top))))
    else:
        ticks = [(0.0, "0"), (top, f"{100 * top:.1f}%" if shares else str(int(top)))]
    for value_, label in ticks:
        y = axis_y - scaled(value_)
        parts.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#333"/>'
                     f'<text class="ytick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    ylabel = "share of each set's pairs" if shares else "pairs (log scale)" if log else "pairs"
    parts.append(f'<text class="ylabel" transform="rotate(-90)" x="{-(plot_t + plot_h / 2):.1f}" y="12" '
                 f'text-anchor="middle">{ylabel}</text>')
    parts.append(f'<text x="{left + width / 2:.1f}" y="{height - 8}" text-anchor="middle">{_e(xlabel)}</text>')
    for k, ((name, _, colour), v) in enumerate(zip(series, finite, strict=True)):
        parts.append(f'<g class="legend"><rect x="{left + 10 + k * 170}" y="6" width="10" height="10" '
                     f'fill="{colour}"/><text x="{left + 24 + k * 170}" y="15">{_e(name)} ({len(v)})</text></g>')
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
    parts = [_svg_open(title, height)]
    y = 20
    for row in rows:
        if isinstance(row, str):
            parts.append(f'<text x="4" y="{y + 13}" font-weight="bold">{_e(row)}</text>')
        else:
            label, value, note = row
            parts.append(f'<text x="{_PAD_L - 6}" y="{y + 13}" text-anchor="end">{_e(str(label)[:28])}</text>')
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


def _float_column(frame: pl.DataFrame, name: str) -> np.ndarray:
    return frame[name].cast(pl.Float64).fill_null(float("nan")).to_numpy()


def _suspicion_plot(summary: dict[str, Any], frame: pl.DataFrame) -> tuple[str, str]:
    if "suspicion" not in frame.columns or "flagged" not in frame.columns:
        why = (summary.get("noise") or {}).get("reason") or "this version has none"
        return "Suspicion", _empty_svg("suspicion", f"no noise scores: {why}")
    s = _float_column(frame, "suspicion")
    f = frame["flagged"].fill_null(False).to_numpy().astype(bool)
    return ("Suspicion (probability the label is wrong) of scored pairs; counts on a log scale",
            svg_histogram([("not flagged", s[~f], _BLUE), ("flagged", s[f], _RED)], "suspicion", "suspicion",
                          lo=0.0, hi=1.0, log=True))


def _margin_plot(summary: dict[str, Any], frame: pl.DataFrame, margins: np.ndarray | None) -> tuple[str, str]:
    model = summary.get("model") or {}
    if margins is not None:
        margin, what = np.asarray(margins, dtype=np.float64), f"reward margin of {model.get('model', 'the model')}"
    elif "oof_margin" in frame.columns:
        margin, what = _float_column(frame, "oof_margin"), "out-of-fold RM ensemble margin (noise filter)"
    else:
        return "Margin distribution", _empty_svg("margin", "no margins: pass --model or store noise scores")
    caption = f"Margin r(chosen) − r(rejected): {what}; dashed: 0, left of it the rejected answer scores higher"
    generated = np.zeros(len(margin), dtype=bool)
    if len(margin) == frame.height and "generated" in frame.columns:  # the audit's frame (no provenance)
        generated = frame["generated"].fill_null(False).to_numpy().astype(bool)
    elif len(margin) == frame.height and "provenance" in frame.columns:
        generated = generated_mask(frame.select("provenance").to_arrow())
    if not generated.any():
        return caption, svg_histogram([("real", margin, _BLUE)], "margin", "margin", zero_line=True)
    caption += "; real and generated pairs each as a share of their own count"
    return caption, svg_histogram([("real", margin[~generated], _BLUE), ("generated", margin[generated], _ORANGE)],
                                  "margin", "margin", zero_line=True, shares=True)


def plots(summary: dict[str, Any], frame: pl.DataFrame, margins: np.ndarray | None) -> dict[str, tuple[str, str]]:
    """Plot name -> (caption, inline SVG); every name in :data:`PLOTS`, a placeholder when no data."""
    out: dict[str, tuple[str, str]] = {
        "suspicion": _suspicion_plot(summary, frame),
        "margin": _margin_plot(summary, frame, margins),
    }
    rows: list[tuple[str, float | None, str] | str] = []
    if "suspicion" in frame.columns:
        for key, groups in (summary.get("by_group") or {}).items():
            rows.append(f"by {key}")
            rows += [(g.get("group"), g.get("flagged_share"), f"({g.get('flagged')}/{g.get('scored')})")
                     for g in groups[:12]]
    out["noise_by_group"] = ("Share of scored pairs flagged as noisy, by group",
                             svg_hbars(rows, "noise by group", ref=(summary.get("noise") or {}).get("flag_share")))
    lb = summary.get("length_bias") or {}
    rows = [("all pairs", lb.get("share"), f"({lb.get('chosen_longer')}/{lb.get('comparable')})"), "by source"]
    rows += [(g.get("group"), g.get("share"), f"({g.get('chosen_longer')}/{g.get('comparable')})")
             for g in (lb.get("by_source") or [])[:15]]
    out["length_bias"] = ("How often the longer answer is chosen (dashed: no bias)",
                          svg_hbars(rows, "length bias", ref=0.5))
    rows = [(k, v.get("share"), f"({v.get('chosen_has')}/{v.get('pairs_differing')})")
            for k, v in (summary.get("formatting") or {}).items()]
    out["formatting"] = ("When only one answer has the formatting, how often it is the chosen one",
                         svg_hbars(rows, "formatting bias", ref=0.5))
    assert tuple(out) == PLOTS
    return out


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;margin:24px auto;padding:0 16px;max-width:1200px;color:#222;
overflow-wrap:break-word}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px}
.card b{display:block;font-size:18px}figure{margin:12px 0;max-width:640px}
figure svg{display:block;width:100%;height:auto}figcaption{font-size:13px;color:#555}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:4px;vertical-align:top;text-align:left}
.text{white-space:pre-wrap;max-width:340px;max-height:220px;overflow:auto;overflow-wrap:anywhere}
td.decision{white-space:nowrap}
tr.flip{background:#fff4d6}tr.drop{background:#fde2e2}tr.keep{background:#e6f4ea}
#save{font-size:14px;padding:6px 14px}pre{white-space:pre-wrap}.warn{color:#8a4b00}
@media (max-width:760px){
body{margin:12px auto;padding:0 8px}
#suspects,#suspects tbody,#suspects tr,#suspects td{display:block;width:100%}
#suspects thead{display:none}
#suspects tr.suspect{border:1px solid #bbb;border-radius:6px;margin:0 0 12px;padding:4px}
#suspects td{border:0;border-bottom:1px solid #eee}
#suspects td::before{content:attr(data-label);display:block;font-weight:600;color:#555}
#suspects td.index,#suspects td.suspicion{display:inline-block;width:auto;border:0;margin-right:24px}
#suspects td.index::before,#suspects td.suspicion::before{display:inline;margin-right:6px}
#suspects td.index br,#suspects td.suspicion br,#suspects td.decision br{display:none}
#suspects td small,#suspects td.suspicion b{margin-left:6px}
#suspects .text{max-width:none}
#suspects td.decision label{margin-right:18px}
}
"""

_JS = """
const REF = document.body.dataset.ref || '';
function decisions(){
  const out = [];
  document.querySelectorAll('tr.suspect').forEach(tr => {
    const picked = tr.querySelector('input[type=radio]:checked');
    tr.className = 'suspect' + (picked ? ' ' + picked.value : '');
    if (!picked) return;
    const d = {pair_id: tr.dataset.pairId, action: picked.value};
    if (tr.dataset.row) d.row = Number(tr.dataset.row);
    out.push(d);
  });
  return {format: FORMAT, ref: REF, decisions: out};
}
function refresh(){
  const d = decisions(), json = document.getElementById('decisions-json'), n = document.getElementById('decided');
  if (json) json.textContent = JSON.stringify(d);
  if (n) n.textContent = d.decisions.length;
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
    const tr = [...document.querySelectorAll('tr.suspect')].find(t => t.dataset.row === row);
    const input = tr && [...tr.querySelectorAll('input[type=radio]')].find(i => i.value === action);
    if (input) input.checked = true;
  });
}
document.addEventListener('change', refresh);
const saveButton = document.getElementById('save');
if (saveButton) saveButton.addEventListener('click', save);
fromHash(); refresh();
"""


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, int | float) else "n/a"


def _cards(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) of each headline number the summary has."""
    cards: list[tuple[str, Any]] = []
    if "rows" in summary:
        cards.append(("pairs", summary["rows"]))
    n = summary.get("noise") or {}
    if n:
        interval = n.get("interval") or []
        rate = _pct(n.get("rate")) + (f" [{_pct(interval[0])}, {_pct(interval[1])}]" if len(interval) >= 2 else "")
        cards += [("estimated noise rate", rate), ("flagged", f"{n.get('flagged')} of {n.get('pairs_scored')}"),
                  ("noise scores from", n.get("scores_from"))]
    t = summary.get("ties") or {}
    if t:
        cards.append(("ties", f"{t.get('pairs')} ({_pct(t.get('share'))})"))
    if summary.get("length_bias"):
        cards.append(("longer chosen", _pct(summary["length_bias"].get("share"))))
    d = summary.get("duplicates") or {}
    if d:
        cards.append(("exact duplicates", f"{d.get('exact_duplicates')} ({_pct(d.get('exact_rate'))})"))
        if d.get("near_duplicates") is not None:
            cards.append(("near duplicates", f"{d['near_duplicates']} ({_pct(d.get('near_rate'))})"))
        if d.get("contaminated") is not None:
            cards.append(("contaminated", f"{d['contaminated']} ({_pct(d.get('contamination_rate'))})"))
    a = summary.get("annotators") or {}
    if a:
        cards.append(("annotator pairwise agreement", _pct(a.get("pairwise_agreement"))))
    m = summary.get("model") or {}
    if m:
        cards += [(f"{m.get('model')} master-key FPR", _pct(m.get("master_key_fpr"))),
                  (f"{m.get('model')} contrast consistency", _pct(m.get("contrast_consistency")))]
    return cards


def _notes(noise: dict[str, Any]) -> list[str]:
    """Why noise was not scored, and any warnings the noise step left."""
    out = []
    if noise and not noise.get("available", True):
        out.append(f"<p>Noise was not scored: {_e(noise.get('reason'))}</p>")
    warnings = noise.get("warnings") or noise.get("warning") or []
    for w in [warnings] if isinstance(warnings, str) else warnings:
        out.append(f'<p class="warn">{_e(w)}</p>')
    return out


def _scalar(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return _e(f"{value:.4g}")
    if isinstance(value, str) and len(value) > 120:
        return f'<div class="text">{_e(value)}</div>'
    if isinstance(value, list | dict):
        return f"<code>{_e(json.dumps(value, default=str))}</code>"
    return _e(value)


def _value_html(value: Any, depth: int = 0) -> str:
    """Any JSON-like summary part as escaped tables: a dict as key/value rows, a list of dicts
    as one row each (the first 100), anything deeper as JSON text."""
    if depth >= 3:
        return _scalar(value)
    if isinstance(value, dict):
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_value_html(v, depth + 1)}</td></tr>" for k, v in value.items())
        return f'<div class="scroll"><table class="kv">{rows}</table></div>'
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = list(dict.fromkeys(k for v in value for k in v))
        head = "".join(f"<th>{_e(c)}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{_value_html(v.get(c), depth + 1)}</td>" for c in columns) + "</tr>"
                       for v in value[:100])
        more = f"<p>… and {len(value) - 100} more</p>" if len(value) > 100 else ""
        return f'<div class="scroll"><table><tr>{head}</tr>{body}</table></div>{more}'
    if isinstance(value, list):
        return ", ".join(_value_html(v, depth + 1) for v in value) or "none"
    return _scalar(value)


def _other_sections(summary: dict[str, Any]) -> list[str]:
    """A section for each summary part this report does not draw on its own (e.g. what the
    filter that made the version removed)."""
    out = []
    for key, value in summary.items():
        if key in _DRAWN or value is None:
            continue
        title = _TITLES.get(key, str(key).replace("_", " "))
        out.append(f'<section class="part" data-part="{_e(key)}"><h2>{_e(title)}</h2>{_value_html(value)}</section>')
    return out


def _group_tables(summary: dict[str, Any]) -> list[str]:
    n = summary.get("noise") or {}
    by_group = summary.get("by_group")
    if not n.get("available") or not by_group:
        return []
    body = ["<h2>Noise by group</h2>"]
    for key, groups in by_group.items():
        body.append(f'<h3>{_e(key)}</h3><div class="scroll"><table><tr><th>group</th><th>pairs</th><th>scored</th>'
                    "<th>flagged</th><th>flagged share</th><th>expected noisy</th><th>mean suspicion</th></tr>")
        body += [f"<tr><td>{_e(g.get('group'))}</td><td>{_e(g.get('pairs'))}</td><td>{_e(g.get('scored'))}</td>"
                 f"<td>{_e(g.get('flagged'))}</td><td>{_pct(g.get('flagged_share'))}</td>"
                 f"<td>{_e(g.get('expected_noisy'))}</td><td>{_e(g.get('mean_suspicion'))}</td></tr>"
                 for g in groups]
        body.append("</table></div>")
    return body


def _signals_cell(s: dict[str, Any]) -> str:
    # Only a flagged pair was flagged *by* its signals; for the others they are what scored highest.
    signals = ", ".join(str(x) for x in s.get("signals") or [])
    if s.get("flagged"):
        text = f"flagged by {signals or 'the combined score only'}"
    else:
        text = f"strongest signals: {signals or 'none recorded (combined score only)'}"
    scores = ", ".join(f"{k} {v}" for k, v in (s.get("scores") or {}).items() if v is not None)
    return f"{_e(text)}<br><small>{_e(scores)}</small>"


def _suspect_row(i: int, s: dict[str, Any]) -> str:
    row = s.get("row")
    radios = "".join(f'<label><input type="radio" name="d{i}" value="{act}"> {act}</label><br>' for act in ACTIONS)
    suspicion = s.get("suspicion")
    shown = f"{suspicion:.3f}" if isinstance(suspicion, int | float) else _e(suspicion)
    row_attr = f' data-row="{_e(row)}"' if row is not None else ""
    cells = [
        ("index", f"{i + 1}" + (f"<br><small>row {_e(row)}</small>" if row is not None else "")),
        ("suspicion", shown + ("<br><b>flagged</b>" if s.get("flagged") else "")),
        ("signals", _signals_cell(s)),
        ("group", "<br>".join(_e(s.get(k)) for k in ("source", "step", "attribute", "task"))),
        ("prompt", f'<div class="text">{_e(s.get("prompt"))}</div>'),
        ("chosen", f'<div class="text">{_e(s.get("chosen"))}</div>'),
        ("rejected", f'<div class="text">{_e(s.get("rejected"))}</div>'),
        ("decision", radios),
    ]
    tds = "".join(f'<td class="{name}" data-label="{"#" if name == "index" else name}">{content}</td>'
                  for name, content in cells)
    return f'<tr class="suspect"{row_attr} data-pair-id="{_e(s.get("pair_id"))}">{tds}</tr>'


def _suspects_section(summary: dict[str, Any]) -> list[str]:
    if "suspects" not in summary:
        return []
    suspects = summary["suspects"] or []
    body = [f"<h2>Suspects ({len(suspects)}, most suspicious first)</h2>"]
    if not suspects:
        return [*body, "<p>No scored pairs to review.</p>"]
    body.append("<p>Mark each suspect keep, flip (swap chosen and rejected) or drop, then save the decisions "
                "and run <code>prefab review apply REF DECISIONS.json --name NAME</code>. Unmarked rows are kept. "
                'Decided: <span id="decided">0</span>. <button id="save" type="button">Save decisions</button></p>')
    head = "".join(f"<th>{c}</th>" for c in ("#", "suspicion", "signals", "group", "prompt", "chosen", "rejected",
                                              "decision"))
    body.append(f'<div class="scroll"><table id="suspects"><thead><tr>{head}</tr></thead><tbody>')
    body += [_suspect_row(i, s) for i, s in enumerate(suspects)]
    body.append("</tbody></table></div>")
    body.append('<h2>Decisions</h2><pre id="decisions-json"></pre>')
    return body


def render_html(summary: dict[str, Any], frame: pl.DataFrame, margins: np.ndarray | None = None) -> str:
    """The whole report as one string."""
    ref = summary.get("ref")
    body = [f"<h1>Audit of {_e(ref)}</h1>" if ref is not None else "<h1>Audit</h1>"]
    body += _notes(summary.get("noise") or {})
    body.append('<div class="cards">' + "".join(f'<div class="card">{_e(k)}<b>{_e(v)}</b></div>'
                                               for k, v in _cards(summary)) + "</div>")
    body += _other_sections(summary)
    body.append("<h2>Plots</h2>")
    for name, (caption, svg) in plots(summary, frame, margins).items():
        body.append(f'<figure class="plot" data-plot="{name}">{svg}<figcaption>{_e(caption)}</figcaption></figure>')
    body += _group_tables(summary)
    body += _suspects_section(summary)
    body.append('<h2>Summary (JSON)</h2><details><summary>show</summary><pre>'
                + _e(json.dumps({k: v for k, v in summary.items() if k != "suspects"}, indent=2, default=str))
                + "</pre></details>")
    script = f"const FORMAT = {_script_json(FORMAT)};\n{_JS}"
    assert "</" not in script and "<!--" not in script  # nothing in the script can close it
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>prefab audit{': ' + _e(ref) if ref is not None else ''}</title><style>{_CSS}</style></head>"
            f'<body data-ref="{_e(ref)}">' + "\n".join(body) + f"<script>{script}</script></body></html>\n")


def write_html(summary: dict[str, Any], frame: pl.DataFrame, path: Path, *,
               margins: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(summary, frame, margins), encoding="utf-8")
    tmp.replace(path)
    return path
