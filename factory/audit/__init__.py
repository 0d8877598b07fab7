"""``prefab audit``: how noisy a dataset version is, which pairs are suspect and why.

Every figure is about the version audited: its estimated noise rate (for a noise filter's
output, what remains after it), its suspects flagged by the noise filter's own rule, its
tables and plots. A version a filter made also says what that filter removed and why
(``filtered``). Generated pairs are not scored for label noise (their labels are the
generator's, not a person's); the noise filter's warning about them is repeated.

``factory.audit(ref)`` returns the JSON summary (stable keys, see :data:`SUMMARY_KEYS`);
with ``html=PATH`` it also writes a self-contained HTML report whose suspects table is a
review form: its saved decisions file goes back in with ``prefab review apply``
(:func:`factory.audit.review.apply_review`).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from factory.audit.compute import (
    TEXT_COLUMNS,
    annotators,
    duplicates,
    filter_report,
    flag_suspects,
    formatting_bias,
    group_breakdown,
    length_bias,
    model_metrics,
    noise_scores,
    rows_at,
    stream_frame,
    suspects,
)

SUMMARY_KEYS = ("ref", "rows", "noise", "suspects", "by_group", "annotators", "ties", "length_bias",
                "formatting", "position", "duplicates", "model", "filtered", "html")


def audit(
    ref: str,
    *,
    home: str | Path | None = None,
    model: str | None = None,
    html: str | Path | None = None,
    compute: bool = True,
    top: int = 50,
    settings: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Audit catalog version ``ref``; noise scores are reused when stored, computed when missing
    (unless ``compute=False``); ``settings`` are the noise filter's parameters for that run.

    Memory is bounded by one batch of texts plus a text-free frame of ~140 bytes a pair
    (:func:`factory.audit.compute.stream_frame`); the texts of the ``top`` suspects and of
    the rows a filter removed are read at the end by position. Measured with stored scores:
    peak RSS 0.9 GiB for 1M pairs of ~2 kB text (5.4 GiB when the whole table was read),
    the same for shorter texts. Scoring noise in-process (no stored scores, ``compute=True``)
    and ``model`` run the noise filter and the model over the version, within their own bounds.
    """
    from factory.catalog import Catalog

    catalog = Catalog(home)
    info = catalog.resolve(ref)
    frame = stream_frame(catalog, info)
    noise = noise_scores(catalog, info, frame, compute=compute, settings=settings, seed=seed,
                         progress=progress)
    noise_summary: dict[str, Any] = {
        "available": noise.frame is not None, "scores_from": noise.scores_from, "reason": noise.reason,
        "rate": None if noise.rate is None else round(noise.rate, 4),
        "interval": noise.interval, "confident_learning_rate": noise.cl_rate,
        "pairs_scored": 0, "flagged": 0, "flag_share": None, "flag_rule": None, "expected_noisy": None,
        "mean_suspicion": None, **{k: v for k, v in noise.extra.items() if v is not None},
    }
    if noise.frame is not None:
        own = noise.frame.drop([c for c in noise.frame.columns if c in frame.columns])
        frame = pl.concat([frame, own], how="horizontal")
        suspicion = frame["suspicion"].cast(pl.Float64)
        suspicion = suspicion.fill_nan(None)
        flagged, rule = flag_suspects(suspicion, noise.rate, noise.extra.get("separation"), settings)
        frame = frame.with_columns(suspicion.alias("suspicion"), pl.Series("flagged", flagged))
        scored = int(suspicion.is_not_null().sum())
        noise_summary.update(
            pairs_scored=scored, flagged=int(flagged.sum()), flag_rule=rule,
            flag_share=None if scored == 0 else round(int(flagged.sum()) / scored, 4),
            expected_noisy=round(float(suspicion.sum() or 0.0), 3),
            mean_suspicion=None if scored == 0 else round(float(suspicion.mean()), 4),
            pairs_unscored=frame.height - scored,
            # calibrated suspicions: their mean over the flagged pairs is the share expected wrong
            flagged_expected_wrong=None if not flagged.any() else round(float(suspicion.filter(
                pl.Series(flagged)).mean()), 4))
    ties = int(frame["tie"].sum())
    margins: np.ndarray | None = None
    model_summary = None
    if model is not None:
        model_summary, margins = model_metrics(model, info.ref, catalog.home, progress)
    summary: dict[str, Any] = {
        "ref": info.ref,
        "rows": frame.height,
        "noise": noise_summary,
        "suspects": suspects(frame, top, lambda rows: rows_at(catalog, [info], rows, list(TEXT_COLUMNS))),
        "by_group": group_breakdown(frame),
        "annotators": annotators(frame),
        "ties": {"pairs": ties, "share": round(ties / frame.height, 4) if frame.height else None},
        "length_bias": length_bias(frame),
        "formatting": formatting_bias(frame),
        # Pairs store the verdict, not the A/B order a judge or annotator saw it in.
        "position": {"measurable": False,
                     "reason": "pairs do not record the A/B order the label was given in"},
        "duplicates": duplicates(frame, info.lineage or {}),
        "model": model_summary,
        "filtered": filter_report(catalog, info, top),
        "html": None,
    }
    assert tuple(summary) == SUMMARY_KEYS
    if html is not None:
        from factory.audit.report import write_html

        summary["html"] = str(write_html(summary, frame, Path(html), margins=margins))
    return summary


def summary_text(summary: dict[str, Any]) -> str:
    """The human-readable audit: one line per finding."""

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    n = summary["noise"]
    lines = [f"audit of {summary['ref']}: {summary['rows']} pairs"]
    if n["available"]:
        low, high = (n["interval"] or [None, None])[:2]
        line = f"estimated noise rate {pct(n['rate'])} (interval {pct(low)}–{pct(high)})"
        if n.get("input_rate") is not None:
            in_low, in_high = (n.get("input_interval") or [None, None])[:2]
            line += f" left after the filter (its input: {pct(n['input_rate'])}, {pct(in_low)}–{pct(in_high)})"
        lines.append(f"{line}, scores from {n['scores_from']}; {n['flagged']} of {n['pairs_scored']} scored "
                     f"pairs flagged ({n['flag_rule']}), expected noisy {n['expected_noisy']}"
                     + (f"; {pct(n['flagged_expected_wrong'])} of the flagged expected mislabelled"
                        if n.get("flagged_expected_wrong") is not None else ""))
        if n.get("separation") is not None:
            lines.append(f"scores separate synthetic flips with AUROC {n['separation']:.2f}")
        if n.get("pairs_unscored"):
            lines.append(f"{n['pairs_unscored']} pairs not scored (ties and generated pairs)")
        lines += [f"warning: {w}" for w in n.get("warnings") or []]
    else:
        lines.append(f"noise: not scored ({n['reason']})")
    for s in summary["suspects"][:10]:
        how = "flagged by" if s["flagged"] else "not flagged; strongest signals"
        lines.append(f"  {s['suspicion']:.3f}  {s['pair_id']}  [{s['source']}/{s['step']}]  "
                     f"{how}: {', '.join(s['signals']) or 'the combined score only'}")
    f = summary.get("filtered")
    if f:
        lines.append(f"made by filter {f['step']} from {', '.join(f['inputs'] or [])}: {f['rows_in']} rows in, "
                     f"{f['rows_kept']} kept, {f['rows_dropped']} dropped, {f['rows_flipped']} flipped")
        if f.get("input_summary"):
            lines.append(f"  on its input: {f['input_summary']}")
        for r in f["by_reason"][:6]:
            lines.append(f"  {r['action']} {r['rows']}: {r['reason']}")
        for r in f["removed"][:5]:
            lines.append(f"  {r['action']} {r['pair_id']}: {r['reason']}")
    for key, rows in summary["by_group"].items():
        if len(rows) > 1 and n["available"]:
            parts = ", ".join(f"{r['group']} {pct(r['flagged_share'])} of {r['scored']}" for r in rows[:6])
            lines.append(f"flagged by {key}: {parts}")
    lb = summary["length_bias"]
    lines.append(f"longer answer chosen in {pct(lb['share'])} of {lb['comparable']} pairs of unequal length")
    fmt = ", ".join(f"{k} {pct(v['share'])} of {v['pairs_differing']}" for k, v in summary["formatting"].items()
                    if v["pairs_differing"])
    if fmt:
        lines.append(f"side with the formatting chosen: {fmt}")
    lines.append(f"ties {summary['ties']['pairs']} ({pct(summary['ties']['share'])})")
    a = summary["annotators"]
    if a:
        lines.append(f"annotators: {a['rows_with_votes']} rows with votes, pairwise agreement "
                     f"{pct(a['pairwise_agreement'])}, votes agreeing with the label "
                     f"{pct(a['votes_agreeing_with_label'])}, majority against the label in "
                     f"{a['majority_against_label']} rows")
    d = summary["duplicates"]
    dup = f"exact duplicates {d['exact_duplicates']} ({pct(d['exact_rate'])})"
    if d["near_duplicates"] is not None:
        dup += f", near duplicates {d['near_duplicates']} ({pct(d['near_rate'])})"
    if d["contaminated"] is not None:
        dup += f", contaminated {d['contaminated']} ({pct(d['contamination_rate'])})"
    lines.append(dup)
    m = summary["model"]
    if m:
        lines.append(f"model {m['model']}: accuracy {pct(m['accuracy'])}, master-key FPR "
                     f"{pct(m['master_key_fpr'])}, contrast-instructions consistency {pct(m['contrast_consistency'])}")
    if summary["html"]:
        lines.append(f"report: {summary['html']}")
    return "\n".join(lines)


class _CallableModule(types.ModuleType):
    # `factory.audit` is both this package and the API function: once the package is
    # imported its module object shadows any function of that name on `factory`.
    def __call__(self, ref: str, **kwargs: Any) -> dict[str, Any]:
        return audit(ref, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["SUMMARY_KEYS", "audit", "summary_text"]
