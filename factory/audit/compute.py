"""The audit's numbers: noise rate and suspects, group breakdowns, biases, duplicates.

Everything is computed column-wise on one Polars frame of the version audited that holds
no texts: :func:`stream_frame` reads the version one batch at a time (through
:meth:`Catalog.batches`, which checks each file's sha256 first) and keeps, per row, only
the grouping keys, the text measures (lengths, which markdown each side has, a 128-bit key
of the pair's content for exact duplicates) and the score columns. The texts of the few
rows the report shows are read at the end by position (:func:`rows_at`), one row group at
a time. Memory is bounded by one batch of texts (8k rows) plus the frame, ~140 bytes a row
(pair id, keys, scores, votes; 0.13 GiB at 1M pairs) and the figures' working copies of a
few of its columns, whatever the texts' length: measured 0.9 GiB peak RSS for the whole
audit of 1M pairs with ~2 kB of text each (5.4 GiB when it read the whole table). Noise
scores are taken from where they already are, in this order: ``noise_*`` columns of the
version (it came out of ``prefab filter noise``, whose scores were computed on its input),
the stored scores of an earlier ``noise`` run on exactly this version (found through
:func:`factory.steps.api.find_stored_scores`), and only then computed in-process through
the step runner (minutes on CPU; skipped with ``compute=False``).

The rate reported is the version's own: for the survivors of a noise filter, the filter's
estimate on its input scaled by how suspicious the survivors are compared with all the
pairs it scored (the calibrated suspicions' expected count of wrong labels that remain).
Pairs are flagged by the noise filter's own rule (:func:`filters.noise.flag`) applied to
the version with that rate. A filtered version also reports what its filter removed and
why (:func:`filter_report`, from the scores the filter stored).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.errors import PrefabError
from schemas.prompts import prompt_text

NONE_GROUP = "(none)"
GROUPS = {"source": "source", "step": "generator", "attribute": "attribute", "task": "task"}
# A line that starts a list item, a header, bold text or a code fence: markdown an RM may
# prefer regardless of content (Crome's spurious attributes).
FORMATTING = {
    "list": r"(?m)^\s*(?:[-*+]|\d+[.)])\s+\S",
    "header": r"(?m)^#{1,6}\s+\S",
    "bold": r"\*\*[^*\n]+\*\*",
    "code": r"```",
}
TEXT_COLUMNS = ("prompt", "chosen", "rejected")
# Every column the audit reads from a version besides the noise_* ones (and the texts).
AUDIT_COLUMNS = ("pair_id", "tie", "attribute", "task", "provenance", "votes", "dedup_near_similarity",
                 "dedup_contamination")
# Seeds of the two 64-bit hashes that together key a pair's content for exact duplicates
# (the chance of any collision among 10^6 distinct pairs is ~10^-26).
_KEY_SEEDS = (0x5EED, 0xD0B1E)
SCORE_COLUMNS = ("oof_margin", "oof_spread", "cl_quality", "aum", "crm_loss", "knn_agreement",
                 "knn_wide_agreement", "length_diff", "judge_agreement", "votes_dissent", "model_logodds",
                 "votes_logodds")


@dataclass
class NoiseScores:
    """Per-row suspicion (null where unscored, e.g. ties) and where it came from."""

    scores_from: str  # columns | stored_scores | computed | none
    frame: pl.DataFrame | None = None  # suspicion, signals and the per-signal columns, row-aligned
    rate: float | None = None
    interval: list[float | None] | None = None
    cl_rate: float | None = None
    reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _first(frame: pl.DataFrame, column: str) -> float | None:
    if column not in frame.columns:
        return None
    values = frame[column].drop_nulls()
    values = values.filter(values.is_finite()) if values.dtype.is_float() else values
    return None if values.is_empty() else float(values[0])


def _from_prefixed(frame: pl.DataFrame, scores_from: str, stats: dict[str, Any]) -> NoiseScores:
    own = frame.select([c for c in frame.columns if c.startswith("noise_")])
    own = own.rename({c: c.removeprefix("noise_") for c in own.columns})
    if "signals" not in own.columns:
        own = own.with_columns(pl.lit(None, dtype=pl.String).alias("signals"))
    rate = _first(own, "rate_estimate")
    low, high = _first(own, "rate_low"), _first(own, "rate_high")
    if rate is None and stats.get("noise_rate") is not None:
        rate = float(stats["noise_rate"])
        low, high = (stats.get("noise_rate_interval") or [None, None])[:2]
    cl = _first(own, "cl_rate")
    if cl is None:
        cl = stats.get("cl_noise_rate")
    separation = _first(own, "separation")
    if separation is None:
        separation = stats.get("separation")
    return NoiseScores(scores_from, own, rate, [low, high] if rate is not None else None, cl,
                       extra={"annotator_accuracy": stats.get("annotator_accuracy"), "separation": separation,
                              "warnings": stats.get("warnings") or None})


def noise_scores(catalog: Any, info: Any, frame: pl.DataFrame, *, compute: bool = True,
                 settings: dict[str, Any] | None = None, seed: int = 0,
                 progress: bool | None = None) -> NoiseScores:
    """The version's noise scores, reused when stored and computed only when missing.

    Stored scores are read as they are (numbers and short signal strings, no texts). Only
    computing them reads the whole version, for the noise filter, whose memory bound is its own.
    """
    from factory.steps.api import find_stored_scores

    settings = settings or {}
    lineage = info.lineage or {}
    from_noise = (lineage.get("step") or {}).get("name") == "noise"
    stats = lineage.get("stats") or {} if from_noise else {}
    if "noise_suspicion" in frame.columns:
        scores = _from_prefixed(frame, "columns", stats)
        if "action" in scores.frame.columns:  # type: ignore[union-attr]
            # A pair the noise filter flipped now carries the other label: its stored suspicion
            # was about the old one.
            flipped = pl.col("action") == "flip"
            scores.frame = scores.frame.with_columns(  # type: ignore[union-attr]
                pl.when(flipped).then(1.0 - pl.col("suspicion")).otherwise(pl.col("suspicion")).alias("suspicion"),
                pl.when(flipped).then(pl.lit("flipped by the noise filter")).otherwise(pl.col("signals"))
                .alias("signals"))
        noise_run = info if from_noise else _noise_ancestor(catalog, info)
        if noise_run is not None:
            if not from_noise:  # the rate and interval of the run, when the columns lack them
                scores = _from_prefixed(scores.frame.rename(  # type: ignore[union-attr]
                    lambda c: f"noise_{c}"), "columns", (noise_run.lineage or {}).get("stats") or {})
            _rate_of_survivors(scores, catalog, noise_run)
        return scores
    try:
        stored = find_stored_scores("noise", info.ref, settings=settings, seed=seed, home=catalog.home)
    except PrefabError:
        stored = None
    if (stored is not None and stored.table.num_rows == frame.height
            and "noise_suspicion" in stored.table.column_names):
        scores = _from_prefixed(pl.from_arrow(stored.table), "stored_scores", stored.stats)
        scores.extra["stored_with"] = stored.version
        return scores
    if not compute:
        return NoiseScores("none", reason="no noise scores are stored with this version (run without "
                                          "--no-compute, or `prefab filter noise` first)")
    from factory.steps.context import StepContext
    from factory.steps.runner import execute, new_run_id, prepare

    prepared = prepare("filter", "noise", settings)
    ctx = StepContext("noise", prepared.params, seed=seed, run_id=new_run_id(), home=catalog.home,
                      progress=progress)
    try:
        result = execute(prepared, catalog.read_table(info), ctx)
    except PrefabError as exc:  # too few pairs or prompts: the rest of the audit still stands
        return NoiseScores("none", reason=str(exc))
    scored = pl.from_arrow(result.table)
    scored = scored.rename({c: f"noise_{c}" for c in scored.columns if not c.startswith("noise_")})
    return _from_prefixed(scored, "computed", result.stats)


def _noise_ancestor(catalog: Any, info: Any, depth: int = 12) -> Any:
    """The nearest version up the lineage that the noise filter made (whose ``noise_*``
    columns a later step carried on), or None."""
    frontier, seen = list((info.lineage or {}).get("parents") or []), set()
    for _ in range(depth):
        following = []
        for ref in frontier:
            if ref in seen:
                continue
            seen.add(ref)
            try:
                parent = catalog.resolve(ref)
            except PrefabError:
                continue
            lineage = parent.lineage or {}
            if (lineage.get("step") or {}).get("name") == "noise":
                return parent
            following += lineage.get("parents") or []
        if not following:
            return None
        frontier = following
    return None


def _rate_of_survivors(scores: NoiseScores, catalog: Any, info: Any) -> None:
    """The noise filter estimated the rate on its input; the version holds what it kept.

    Suspicions are calibrated probabilities, so the wrong labels expected among the
    survivors are their suspicions' sum: the version's rate is the input's rate times the
    survivors' mean suspicion over the mean of every pair the filter scored (the interval
    scales alike). ``info`` is the version the noise filter made (the audited one or its
    ancestor). The input's figures stay in ``extra`` as ``input_rate``/``input_interval``.
    """
    stored = _attachment_columns(catalog, info, "scores", ["noise_suspicion"])
    if stored is None or "noise_suspicion" not in stored.columns or scores.rate is None or scores.frame is None:
        return
    everything = stored["noise_suspicion"].cast(pl.Float64)
    everything = everything.fill_nan(None).drop_nulls()
    kept = scores.frame["suspicion"].cast(pl.Float64).fill_nan(None).drop_nulls()
    if everything.is_empty() or kept.is_empty() or not everything.mean():
        return
    factor = float(kept.mean()) / float(everything.mean())  # type: ignore[arg-type]
    scores.extra.update(input_rate=round(scores.rate, 4), input_interval=scores.interval,
                        rate_estimated_on=(info.lineage or {}).get("parents"), scored_by=info.ref,
                        rate_of="the version's pairs: the input's rate x survivors' mean suspicion / input's")
    scores.rate = scores.rate * factor
    if scores.interval is not None:
        scores.interval = [None if v is None else round(v * factor, 4) for v in scores.interval]


def _attachment_columns(catalog: Any, info: Any, role: str, columns: list[str]) -> pl.DataFrame | None:
    """Those of ``columns`` that a version's attached table (e.g. a filter's ``scores``) has,
    its file checked like the data's; None when there is no such table or it cannot be read."""
    try:
        (path,) = catalog.checked_paths(info, role)
        present = set(pq.read_schema(path).names)
        frame = pl.from_arrow(pq.read_table(path, columns=[c for c in columns if c in present]))
    except (PrefabError, OSError, ValueError):
        return None
    assert isinstance(frame, pl.DataFrame)
    return frame


def flag_suspects(suspicion: pl.Series, rate: float | None, separation: float | None,
                  settings: dict[str, Any] | None = None) -> tuple[np.ndarray, str]:
    """The noise filter's own rule (:func:`filters.noise.flag`, with the filter's parameters
    from ``settings``) applied to the audited version's suspicions and rate."""
    from factory.steps.runner import prepare
    from filters.noise import flag

    n = len(suspicion)
    table = pa.table({
        "suspicion": suspicion.cast(pl.Float64).fill_nan(None).to_arrow(),
        "rate_estimate": pa.array([rate] * n, pa.float64()),
        "separation": pa.array([separation] * n, pa.float64()),
    })
    return flag(table, prepare("filter", "noise", settings or {}).params)


# ---- what a filter removed and why -------------------------------------------------------

# Numbers and ids vary from pair to pair; the rest of a reason names its cause.
_VARIABLE = re.compile(r"\b[0-9a-f]{12,}\b|-?\d+(?:\.\d+)?%?")


def reason_kind(reason: str) -> str:
    """A filter's reason with its numbers and pair ids blanked: the cause, for counting."""
    return _VARIABLE.sub("#", reason)


def filter_report(catalog: Any, info: Any, top: int) -> dict[str, Any] | None:
    """For a version a filter made: its input, what it did to how many rows (by action and by
    cause) and the ``top`` rows it removed or changed, most suspicious first, from the scores
    the filter stored with the version."""
    lineage = info.lineage or {}
    if lineage.get("command") != "filter":
        return None
    step = (lineage.get("step") or {}).get("name") or ""
    out: dict[str, Any] = {
        "step": step, "inputs": lineage.get("parents"), "params": lineage.get("params"),
        "rows_in": lineage.get("rows_in"), "rows_kept": lineage.get("rows_kept"),
        "rows_dropped": lineage.get("rows_dropped"), "rows_flipped": lineage.get("rows_flipped"),
        "rows_reweighted": lineage.get("rows_reweighted"), "rows_failed": lineage.get("rows_failed"),
        "input_summary": (lineage.get("stats") or {}).get("summary"),
        "warnings": (lineage.get("stats") or {}).get("warnings") or [],
        "by_action": {}, "by_reason": [], "removed": [],
    }
    action, reason = f"{step}_action", f"{step}_reason"
    signals, suspicion = f"{step}_signals", f"{step}_suspicion"
    stored = _attachment_columns(catalog, info, "scores", ["row", "pair_id", action, reason, signals, suspicion])
    if stored is None:
        out["reason"] = "the filter stored no scores with this version"
        return out
    if action not in stored.columns:
        out["reason"] = f"the stored scores lack {action}"
        return out
    out["by_action"] = {str(k): int(v) for k, v in stored[action].fill_null("failed").value_counts()
                        .sort("count", descending=True).iter_rows()}
    acted = stored.filter(pl.col(action).fill_null("keep") != "keep")
    if reason in acted.columns:
        kinds = acted.select(
            pl.col(action),
            (pl.lit("flagged by ") + pl.col(signals).replace("", "the combined score only")
             if signals in acted.columns else
             pl.col(reason).fill_null("").map_elements(reason_kind, return_dtype=pl.String)).alias("kind"))
        counted = kinds.group_by(["kind", action]).len().sort(["len", "kind"], descending=[True, False])
        out["by_reason"] = [{"reason": k, "action": a, "rows": int(c)} for k, a, c in counted.iter_rows()]
    order = f"{step}_suspicion" if f"{step}_suspicion" in acted.columns else "row"
    picked = acted.sort([order, "row"], descending=[order != "row", False]).head(max(top, 0))
    texts = _input_rows(catalog, lineage.get("parents") or [], picked["row"].to_list())
    for r in picked.iter_rows(named=True):
        text = texts.get(int(r["row"]), {})
        out["removed"].append({
            "row": int(r["row"]), "pair_id": r["pair_id"], "action": r[action], "reason": r.get(reason),
            **({"suspicion": None if r[order] is None else round(float(r[order]), 4)} if order != "row" else {}),
            "prompt": prompt_text(text.get("prompt")), "chosen": text.get("chosen"),
            "rejected": text.get("rejected"),
        })
    return out


def _input_rows(catalog: Any, parents: list[str], rows: list[int]) -> dict[int, dict[str, Any]]:
    """Rows (positions in the filter's concatenated input) with their prompt and answers."""
    if not rows or not parents:
        return {}
    try:
        return rows_at(catalog, parents, rows, list(TEXT_COLUMNS))
    except (PrefabError, OSError, ValueError, KeyError):
        return {}


def rows_at(catalog: Any, refs: list[Any], rows: list[int], columns: list[str],
            batch_rows: int = 4096) -> dict[int, dict[str, Any]]:
    """Row position -> ``columns`` (those present) of the rows at ``rows`` in the versions
    ``refs`` read one after another; positions past the end are left out.

    Only the row groups holding a wanted row are read, ``batch_rows`` rows at a time, from
    files checked against their sha256 as :meth:`Catalog.batches` checks them; memory is one
    such batch plus the rows returned.
    """
    wanted = np.unique(np.asarray(rows, dtype=np.int64))
    out: dict[int, dict[str, Any]] = {}
    offset = 0
    for ref in refs:
        for path in catalog.checked_paths(ref):
            reader = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
            present = [c for c in columns if c in reader.schema_arrow.names]
            for group in range(reader.num_row_groups):
                size = reader.metadata.row_group(group).num_rows
                inside = wanted[(wanted >= offset) & (wanted < offset + size)]
                start = offset
                offset += size
                if not inside.size:
                    continue
                for batch in reader.iter_batches(batch_size=batch_rows, row_groups=[group], columns=present):
                    local = inside[(inside >= start) & (inside < start + batch.num_rows)] - start
                    if local.size:
                        picked = batch.take(pa.array(local)).to_pylist()
                        out.update(zip((local + start).tolist(), picked, strict=True))
                    start += batch.num_rows
    return out


# ---- the frame the audit reads ---------------------------------------------------------


def audit_frame(table: pa.Table, row_offset: int = 0) -> pl.DataFrame:
    """One row per pair with the grouping keys and the text measures the audit needs: the
    lengths (``len_*``), which markdown each side has (``fmt_<feature>_chosen``/``_rejected``)
    and the content key for exact duplicates (``dup_key_a``, ``dup_key_b``). Rows are
    numbered (``row``) from ``row_offset``: their position in the version."""
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    n = frame.height

    def col(name: str, dtype: Any, default: Any = None) -> pl.Expr:
        return pl.col(name) if name in frame.columns else pl.lit(default, dtype=dtype).alias(name)

    prov = "provenance" in frame.columns
    frame = frame.with_row_index("row", offset=row_offset).with_columns(
        col("tie", pl.Boolean, False).fill_null(False).alias("tie"),
        col("attribute", pl.String).fill_null(NONE_GROUP).alias("g_attribute"),
        col("task", pl.String).fill_null(NONE_GROUP).alias("g_task"),
        (pl.col("provenance").struct.field("source") if prov else pl.lit(None, pl.String))
        .fill_null(NONE_GROUP).alias("g_source"),
        (pl.col("provenance").struct.field("step") if prov else pl.lit(None, pl.String))
        .fill_null(NONE_GROUP).alias("g_step"),
        pl.col("chosen").str.len_chars().alias("len_chosen"),
        pl.col("rejected").str.len_chars().alias("len_rejected"),
        *(pl.col(side).str.contains(pattern).alias(f"fmt_{name}_{side}")
          for name, pattern in FORMATTING.items() for side in ("chosen", "rejected")),
    )
    content = pl.struct(
        pl.col("prompt").list.eval(pl.element().struct.field("content")).list.join("\x1f"),
        "chosen", "rejected", "tie")
    frame = frame.with_columns(content.hash(_KEY_SEEDS[0]).alias("dup_key_a"),
                               content.hash(_KEY_SEEDS[1]).alias("dup_key_b"))
    assert frame.height == n
    return frame


def stream_frame(catalog: Any, info: Any, batch_rows: int = 8_192) -> pl.DataFrame:
    """:func:`audit_frame` of a whole version without its texts, built one batch at a time.

    Reads the texts, :data:`AUDIT_COLUMNS` and the ``noise_*`` columns only (any other extra
    column is left unread); keeps ``generated`` (:func:`schemas.pairs.generated_mask`) in
    place of the provenance. Memory: one batch of texts plus ~140 bytes a row (the frame).
    """
    from schemas.pairs import generated_mask

    names = catalog.schema(info).names
    wanted = [c for c in names if c in (*AUDIT_COLUMNS, *TEXT_COLUMNS) or c.startswith("noise_")]
    parts, offset = [], 0
    for batch in catalog.batches(info, columns=wanted, batch_rows=batch_rows):
        table = pa.Table.from_batches([batch])
        part = audit_frame(table, row_offset=offset).with_columns(
            pl.Series("generated", generated_mask(table), dtype=pl.Boolean))
        parts.append(part.drop([*TEXT_COLUMNS, "provenance"], strict=False))
        offset += batch.num_rows
    if not parts:  # an empty version: the frame's columns from an empty table
        table = catalog.schema(info).empty_table().select(wanted)
        part = audit_frame(table).with_columns(pl.Series("generated", [], dtype=pl.Boolean))
        return part.drop([*TEXT_COLUMNS, "provenance"], strict=False)
    # Not rechunked: one contiguous copy would double the frame at its peak.
    return pl.concat(parts, how="vertical", rechunk=False)


def _share(num: int, den: int) -> float | None:
    return None if den == 0 else round(num / den, 4)


def length_bias(frame: pl.DataFrame) -> dict[str, Any]:
    """How often the longer answer is the chosen one, among non-tie pairs of unequal length."""

    def summary(part: pl.DataFrame) -> dict[str, Any]:
        pref = part.filter(~pl.col("tie"))
        unequal = pref.filter(pl.col("len_chosen") != pl.col("len_rejected"))
        longer = int((unequal["len_chosen"] > unequal["len_rejected"]).sum())
        ratio = (pref["len_chosen"].cast(pl.Float64) + 1).log() - (pref["len_rejected"].cast(pl.Float64) + 1).log()
        return {"pairs": pref.height, "comparable": unequal.height, "chosen_longer": longer,
                "share": _share(longer, unequal.height),
                "mean_log_length_ratio": None if pref.is_empty() else round(float(ratio.mean()), 4)}

    frame = frame.select("tie", "len_chosen", "len_rejected", "g_source")  # partitioned: copies only these
    out = summary(frame)
    out["by_source"] = [{"group": key, **summary(part)}
                        for key, part in _groups(frame, "g_source")]
    return out


def _groups(frame: pl.DataFrame, column: str) -> list[tuple[str, pl.DataFrame]]:
    parts = frame.partition_by(column, as_dict=True, maintain_order=True)
    items = [(str(key[0]), part) for key, part in parts.items()]
    return sorted(items, key=lambda kv: (-kv[1].height, kv[0]))


def formatting_bias(frame: pl.DataFrame) -> dict[str, Any]:
    """Per markdown feature: among pairs where exactly one side has it, how often that is chosen."""
    pref = frame.select("tie", pl.selectors.starts_with("fmt_")).filter(~pl.col("tie"))
    out: dict[str, Any] = {}
    for name in FORMATTING:
        has = pref.select(pl.col(f"fmt_{name}_chosen").alias("c"), pl.col(f"fmt_{name}_rejected").alias("r"))
        differ = has.filter(pl.col("c") != pl.col("r"))
        chosen_has = int(differ["c"].sum())
        out[name] = {"pairs_differing": differ.height, "chosen_has": chosen_has,
                     "share": _share(chosen_has, differ.height)}
    return out


def annotators(frame: pl.DataFrame) -> dict[str, Any] | None:
    """Agreement among per-annotator votes (+1 chosen, -1 rejected, 0 tie) where rows have them."""
    if "votes" not in frame.columns:
        return None
    voted = frame.select("tie", "votes").filter(pl.col("votes").list.len().fill_null(0) > 0).select(
        "tie",
        pl.col("votes").list.eval((pl.element() > 0).cast(pl.Int64)).list.sum().alias("p"),
        pl.col("votes").list.eval((pl.element() < 0).cast(pl.Int64)).list.sum().alias("m"),
        pl.col("votes").list.eval((pl.element() == 0).cast(pl.Int64)).list.sum().alias("z"),
    ).with_columns((pl.col("p") + pl.col("m") + pl.col("z")).alias("k"))
    if voted.is_empty():
        return None
    multi = voted.filter(pl.col("k") >= 2)
    pairwise = ((multi["p"] * (multi["p"] - 1) + multi["m"] * (multi["m"] - 1) + multi["z"] * (multi["z"] - 1))
                / (multi["k"] * (multi["k"] - 1)))
    unanimous = int((multi["p"] == multi["k"]).sum() + (multi["m"] == multi["k"]).sum()
                    + (multi["z"] == multi["k"]).sum())
    pref = voted.filter(~pl.col("tie"))
    return {
        "rows_with_votes": voted.height,
        "rows_with_several_votes": multi.height,
        "mean_votes": round(float(voted["k"].mean()), 3),
        "votes_agreeing_with_label": _share(int(pref["p"].sum()), int(pref["k"].sum())),
        "pairwise_agreement": None if multi.is_empty() else round(float(pairwise.mean()), 4),
        "unanimous_share": _share(unanimous, multi.height),
        "majority_against_label": int((pref["m"] > pref["p"]).sum()),
    }


def near_duplicate_threshold() -> float:
    """dedup's default near-duplicate threshold (so the audit counts what dedup would drop)."""
    from filters import dedup

    default = getattr(dedup, "NEAR_DUPLICATE_THRESHOLD", None)
    if default is None:
        default = next(f.default for f in dataclasses.fields(dedup.DedupParams) if f.name == "near_threshold")
    return float(default)


def duplicates(frame: pl.DataFrame, lineage: dict[str, Any]) -> dict[str, Any]:
    """Exact duplicates counted here (cheap); near duplicates and contamination from dedup scores."""
    n = frame.height
    repeated_ids = n - frame["pair_id"].n_unique() if "pair_id" in frame.columns else 0
    same_label = n - frame.select("dup_key_a", "dup_key_b").n_unique()
    out: dict[str, Any] = {
        "rows": n, "repeated_pair_ids": repeated_ids, "exact_duplicates": same_label,
        "exact_rate": _share(same_label, n), "near_duplicates": None, "near_rate": None,
        "contaminated": None, "contamination_rate": None, "from": "computed",
        "dropped_by_dedup": None,
    }
    params = lineage.get("params") or {} if (lineage.get("step") or {}).get("name") == "dedup" else {}
    if "dedup_near_similarity" in frame.columns:
        near = float(params.get("near_threshold", near_duplicate_threshold()))
        count = int((frame["dedup_near_similarity"].fill_null(0.0) >= near).sum())
        out.update(near_duplicates=count, near_rate=_share(count, n), near_threshold=near, **{"from": "dedup_scores"})
    if "dedup_contamination" in frame.columns:
        threshold = float(params.get("contamination_threshold", 0.5))
        count = int((frame["dedup_contamination"].fill_null(0.0) >= threshold).sum())
        out.update(contaminated=count, contamination_rate=_share(count, n), contamination_threshold=threshold,
                   **{"from": "dedup_scores"})
    if params and lineage.get("rows_in"):
        out["dropped_by_dedup"] = {"rows_in": lineage["rows_in"], "rows_dropped": lineage.get("rows_dropped"),
                                   "rate": _share(int(lineage.get("rows_dropped") or 0), int(lineage["rows_in"]))}
    return out


# ---- noise: flags, suspects and groups --------------------------------------------------


def group_breakdown(frame: pl.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Per group of each key: pairs, ties, scored, flagged, expected noisy (sum of suspicion)."""
    has_noise = "suspicion" in frame.columns
    out: dict[str, list[dict[str, Any]]] = {}
    for key in GROUPS:
        aggs = [pl.len().alias("pairs"), pl.col("tie").sum().alias("ties")]
        if has_noise:
            aggs += [pl.col("suspicion").is_not_null().sum().alias("scored"),
                     pl.col("flagged").sum().alias("flagged"),
                     pl.col("suspicion").sum().alias("expected_noisy"),
                     pl.col("suspicion").mean().alias("mean_suspicion")]
        columns = ["tie", f"g_{key}", *(["suspicion", "flagged"] if has_noise else [])]
        table = frame.select(columns).group_by(f"g_{key}").agg(aggs).sort(["pairs", f"g_{key}"], descending=[True, False])
        rows = []
        for r in table.iter_rows(named=True):
            row: dict[str, Any] = {"group": r[f"g_{key}"], "pairs": r["pairs"], "ties": int(r["ties"])}
            if has_noise:
                row.update(scored=int(r["scored"]), flagged=int(r["flagged"]),
                           flagged_share=_share(int(r["flagged"]), int(r["scored"])),
                           expected_noisy=round(float(r["expected_noisy"] or 0.0), 4),
                           mean_suspicion=None if r["mean_suspicion"] is None else round(float(r["mean_suspicion"]), 4))
            rows.append(row)
        out[key] = rows
    return out


def suspects(frame: pl.DataFrame, top: int,
             texts: Callable[[list[int]], dict[int, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """The ``top`` most suspicious pairs with their per-signal scores and flagging signals.

    Their prompt and answers come from the frame's text columns, or when it has none from
    ``texts`` (row positions -> those columns), asked once for the ``top`` rows only."""
    if "suspicion" not in frame.columns or top <= 0:
        return []
    # Lazily, so that only the ``top`` rows are gathered, not a sorted copy of the frame.
    picked = frame.lazy().filter(pl.col("suspicion").is_not_null()).sort(
        ["suspicion", "row"], descending=[True, False]).head(top).collect()
    score_cols = [c for c in SCORE_COLUMNS if c in picked.columns]
    if texts is not None and not set(TEXT_COLUMNS) <= set(picked.columns):
        found = texts(picked["row"].to_list())
        picked = picked.with_columns(
            pl.Series(name, [found.get(row, {}).get(name) for row in picked["row"]],
                      dtype=pl.String if name != "prompt" else None)
            for name in TEXT_COLUMNS)
    out = []
    for r in picked.iter_rows(named=True):
        signals = [s for s in (r.get("signals") or "").split(", ") if s]
        scores = {c: (None if r[c] is None or (isinstance(r[c], float) and not np.isfinite(r[c]))
                      else round(float(r[c]), 4)) for c in score_cols}
        flagged = bool(r["flagged"])
        named = ", ".join(signals) or "the combined score only"
        out.append({
            "row": int(r["row"]), "pair_id": r["pair_id"], "suspicion": round(float(r["suspicion"]), 4),
            "flagged": flagged, "signals": signals,
            # Only a flagged pair was flagged by anything; another's signals are what point at it most.
            "flagged_by": signals if flagged else [], "strongest_signals": [] if flagged else signals,
            "reason": (f"suspicion {r['suspicion']:.3f}; flagged by {named}" if flagged
                       else f"suspicion {r['suspicion']:.3f}; not flagged; strongest signals: {named}"),
            "source": r["g_source"], "step": r["g_step"], "attribute": r["g_attribute"], "task": r["g_task"],
            "votes": r.get("votes"), "scores": scores,
            "prompt": prompt_text(r.get("prompt"), separator="\n\n"), "chosen": r["chosen"], "rejected": r["rejected"],
        })
    return out


def model_metrics(model: str, ref: str, home: Path, progress: bool | None) -> tuple[dict[str, Any], np.ndarray]:
    """Master-key FPR, Contrast-Instructions consistency and accuracy of ``model`` on the
    version, plus its per-pair margins (r_chosen - r_rejected) for the margin plot."""
    import factory

    metrics = factory.evaluate(model, ref, home=home, progress=progress)
    table = factory.score(factory.load_model(model, home), ref, home=home)  # a ref gives a pa.Table
    margins = (table.column("reward_chosen").to_numpy(zero_copy_only=False).astype(np.float64)
               - table.column("reward_rejected").to_numpy(zero_copy_only=False).astype(np.float64))
    mk = metrics.get("master_key") or {}
    ci = metrics.get("contrast_instructions") or {}
    return {
        "model": model, "accuracy": metrics.get("accuracy"),
        "master_key_fpr": mk.get("fpr"), "master_key_fpr_vs_rejected": mk.get("fpr_vs_rejected"),
        "contrast_consistency": ci.get("consistency"), "contrast_pairs": ci.get("contrast_pairs"),
    }, margins
