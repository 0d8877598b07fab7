"""Label noise: which preference labels are probably flipped, how many there are, and why.

``prefab filter noise --from REF --name CLEAN`` runs offline on CPU. Every pair gets a
calibrated *suspicion* (the probability that its label is wrong) from signals that err
in different ways (see :mod:`filters._noise_core` for each one):

- an out-of-fold reward-model ensemble (k folds split by prompt x seeds; frozen MiniLM
  features of prompt+response and of the response alone, small Bradley–Terry heads):
  margin mean and spread;
- confident learning on the pairs with a random A/B side per pair: the calibrated
  confident joint's noise rate with a bootstrap interval, and cleanlab's issue flag;
- training dynamics: area under the margin, forgetting events, in-sample reward gap;
- CRM peer review: co-taught peer heads, each learning from the other's small-loss pairs;
- neighbourhood agreement of the pair's preference direction (no model);
- the responses' length difference; judge agreement from a ``consistency_*`` column
  (the share of judge verdicts that agree with the label) when the table has one;
- annotator votes where rows have them, as a Bayesian log-likelihood ratio.

The signals are combined by a logistic model whose labels are synthetic flips: copies of
the data with a known, disjoint share of pairs flipped on purpose (models retrained on
each copy). The same copies estimate the noise rate (mixture proportion estimation),
with a bootstrap interval; the combined log-odds are shifted so that the mean suspicion
equals it.

Decision (thresholds: changing them re-decides from the stored scores; :func:`flag` is the
rule, which the audit applies too): pairs at or above ``threshold``, or the ``share`` most
suspicious, or by default the estimated noise rate's share, are dropped, flipped or
down-weighted; the reason names the signals that flagged each one. The default rule flags
nothing when the scores cannot separate mislabelled pairs: the combined score's AUROC for
the synthetic flips on held-out copies (``separation``) below ``min_separation`` (on real
HH-RLHF every suspicion fell within 0.16-0.21: the top share cut there is arbitrary).

Only human labels are scored. Tie pairs and generated pairs (``provenance`` names parent
pairs or a generated side) get no suspicion and are always kept: a generator's label is
its construction, not a judgment, so it is no evidence of label noise, and thousands of
easy generated pairs drown the real pairs' noise (HH-RLHF + 28,901 generated pairs: 0 of
31,213 flagged). Their presence is reported as a warning; run the filter before adding
generated pairs. ``stats["summary"]`` is the one-line result (rate, interval, separation).

Encoders: ``base`` reads prompt+response for the heads (MiniLM by default), ``embedder`` each
response alone. ``--set base=static --set embedder=static`` takes every vector from the
model2vec table distilled from MiniLM (:mod:`factory.embed.static`; no transformer runs:
100k pairs took 1,145 CPU s and 3.1 GiB peak RSS in ``benchmarks/scale.py``'s
``noise_static``, where MiniLM needs ~400k transformer passes, hours on 2 cores) at a cost in
detection: on
``benchmarks/noise.py`` (HH-RLHF and PandaLM, 20%/40% flips, 2 seeds) the ensemble's AUROC
fell by 0.011-0.021 in three settings and by 0.076 on PandaLM at 40% flips (one seed of two
dropped to 0.58), so MiniLM stays the default and static is the option for large sets.

A rerun reuses the cached embeddings (``$PREFAB_HOME/embeddings``) and the trained
heads' outputs (``$PREFAB_HOME/noise/<key>.npz``, keyed by pair ids, labels, prompts
and the scoring parameters).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from factory.embed import Embedder
from factory.embed.ray_embed import EmbedRequest
from factory.home import resolve_home
from factory.steps import Decision, StepContext, StepResult, filter_step, param
from filters._noise_signals import noise_rate, noise_rate_interval, sigmoid, vote_evidence
from schemas.errors import PrefabError
from schemas.pairs import generated_mask

if TYPE_CHECKING:  # the model code imports torch: only when the filter runs, not on `--help`
    from factory.trainer.data import PairData
    from filters._noise_core import Combined, Evidence, ModelConfig, ModelSignals

CACHE_VERSION = "2"  # 2: projection from the covariance, signed by its largest entry
MIN_PAIRS = 20
GENERATED_WARNING = ("{generated} generated pairs are not scored for label noise (a generator's label is "
                     "not a human judgment): the rate is estimated on the {real} real pairs; run the "
                     "noise filter before adding generated pairs")


@dataclass(frozen=True)
class NoiseParams:
    action: Literal["drop", "flip", "weight"] = param(
        "drop", "what to do with a suspect pair: drop it, flip its label, or down-weight it", decision=True)
    threshold: float | None = param(
        None, "suspicion (probability that the label is wrong) at or above which a pair is a suspect; "
              "default: the top estimated-noise-rate share", low=0.0, high=1.0, decision=True)
    share: float | None = param(
        None, "flag this share of scored pairs, most suspicious first, instead of the estimated noise rate",
        low=0.0, high=1.0, decision=True)
    min_separation: float = param(
        0.65, "default rule only: flag nothing when the scores tell synthetic flips from the rest with "
              "an AUROC below this (they cannot separate mislabelled pairs; set share or threshold to "
              "cut anyway)", low=0.5, high=1.0, decision=True)
    weight_floor: float = param(
        0.0, "action=weight: a suspect's weight becomes its weight x (1 - suspicion), not below this",
        low=0.0, high=1.0, decision=True)
    folds: int = param(5, "out-of-fold splits (by prompt)", low=2)
    seeds: int = param(3, "seeds of the out-of-fold ensemble (each with its own split)", low=1)
    epochs: int = param(6, "epochs of each reward head (short: a head that memorises its noisy labels "
                           "stops telling them apart)", low=2)
    hidden: int = param(64, "hidden units of each reward head", low=1)
    lr: float = param(1e-3, "learning rate of the reward heads", low=1e-6)
    neighbours: int = param(10, "neighbours for the near neighbourhood-agreement signal", low=1)
    wide_neighbours: int = param(100, "neighbours for the wide neighbourhood-agreement signal", low=1)
    components: int = param(128, "principal components of the features the heads and neighbours read "
                                 "(0: all); the heads train several times faster at no loss", low=0)
    response_view: bool = param(True, "also embed each response alone: a long prompt fills the encoder's "
                                      "window and hides how the two responses differ")
    synthetic_rate: float = param(0.1, "share of pairs flipped on purpose in each copy that teaches the "
                                       "combiner and estimates the noise rate", low=0.01, high=0.5)
    synthetic_copies: int = param(5, "copies with synthetic flips (disjoint groups of pairs)", low=1)
    votes: bool = param(True, "use per-annotator votes where rows have them")
    judge_columns: list[str] = param(["consistency_agreement"], "columns holding the share of judge "
                                     "verdicts that agree with the label (first one present is used)")
    embedder: Embedder = param("minilm", "response_view: who embeds each response alone (minilm, "
                                         "minilm-onnx: the same vectors via ONNX Runtime, static: model2vec)")
    base: str = param("minilm", "frozen encoder of the reward heads over prompt+response: minilm, static "
                                "(model2vec vectors distilled from it; with embedder=static no transformer "
                                "runs: the fast option for 100k+ pairs on CPU, detection AUROC 0.01-0.08 "
                                "lower on benchmarks/noise.py) or a local model folder")
    max_length: int = param(256, "tokens per prompt+response for the encoder", low=8)

    def __post_init__(self) -> None:
        if self.threshold is not None and self.share is not None:
            raise ValueError("set either 'threshold' or 'share', not both")
        if self.synthetic_rate * self.synthetic_copies > 1.0:
            raise ValueError(f"'synthetic_rate' x 'synthetic_copies' must not exceed 1 "
                             f"({self.synthetic_rate} x {self.synthetic_copies})")


# ---- decision -----------------------------------------------------------------------------


def flag(scores: pa.Table, params: NoiseParams) -> tuple[np.ndarray, str]:
    """The noise filter's rule: which rows are suspects (bool per row), and the rule in words.

    ``scores`` needs ``suspicion`` (null: not scored, never flagged); the default rule also
    reads ``rate_estimate`` (the share to flag) and ``separation`` (the synthetic-flip AUROC;
    absent or null: assumed to separate). With ``threshold``, pairs at or above it; with
    ``share``, that share of scored pairs; by default the estimated noise rate's share, or
    none when the scores cannot separate mislabelled pairs (``min_separation``). The audit
    applies this same function to the version it audits.
    """
    frame = pl.from_arrow(scores.select([c for c in ("suspicion", "rate_estimate", "separation")
                                         if c in scores.column_names])).with_row_index("_row")
    suspicion = pl.col("suspicion").cast(pl.Float64).fill_nan(None)
    scored = frame.filter(suspicion.is_not_null())
    if params.threshold is not None:
        rule = f"suspicion >= {params.threshold:g}"
        chosen = scored.filter(suspicion >= params.threshold)
    else:
        if params.share is not None:
            share, rule = params.share, f"top {params.share:.1%} by suspicion"
        else:
            share = _first_value(scored, "rate_estimate") or 0.0
            rule = f"top {share:.1%} by suspicion (the estimated noise rate)"
            separation = _first_value(scored, "separation")
            if separation is not None and separation < params.min_separation:
                share = 0.0
                rule = (f"none: the scores cannot separate mislabelled pairs (synthetic-flip AUROC "
                        f"{separation:.2f} < min_separation {params.min_separation:g})")
        count = int(round(share * scored.height))
        chosen = scored.sort(["suspicion", "_row"], descending=[True, False]).head(count)
    mask = np.zeros(frame.height, dtype=bool)
    mask[chosen["_row"].to_numpy()] = True
    return mask, rule


def _first_value(frame: pl.DataFrame, column: str) -> float | None:
    if column not in frame.columns:
        return None
    values = frame[column].cast(pl.Float64).fill_nan(None).drop_nulls()
    return float(values[0]) if len(values) else None


def decide_noise(scores: pa.Table, params: NoiseParams) -> Decision:
    suspect, rule = flag(scores, params)
    suspicion = pl.col("suspicion")
    frame = pl.from_arrow(scores).with_columns(pl.Series("suspect", suspect))
    decided = frame.select(
        pl.when(pl.col("suspect")).then(pl.lit(params.action)).otherwise(pl.lit("keep")).alias("action"),
        pl.when(pl.col("suspect")).then(pl.format(
            "label noise suspect: suspicion {} ({}); flagged by {}", suspicion.round(3), pl.lit(rule),
            pl.when(pl.col("signals") == "").then(pl.lit("the combined score only")).otherwise(pl.col("signals")),
        )).otherwise(pl.lit(None, dtype=pl.String)).alias("reason"),
        (pl.col("base_weight") * pl.max_horizontal(pl.lit(params.weight_floor), 1.0 - suspicion.fill_null(0.0)))
        .alias("weight"),
    )
    weight = decided["weight"].to_arrow() if params.action == "weight" else None
    return Decision(decided["action"].to_arrow(), decided["reason"].to_arrow(), weight)


# ---- the step -----------------------------------------------------------------------------


def _unscored(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(ties, generated non-ties): the rows the step keeps without scoring."""
    tie = (pc.fill_null(table.column("tie"), False).to_numpy(zero_copy_only=False)
           if "tie" in table.column_names else np.zeros(table.num_rows, bool))
    # Generated pairs are right by construction (or wrong by the generator's design): they are
    # no evidence of human label noise, and, easy to learn, they drown it. Kept, not scored.
    return tie, generated_mask(table) & ~tie


def noise_embeds(table: pa.Table, ctx: StepContext[NoiseParams]) -> Iterator[EmbedRequest]:
    """What :func:`_features` embeds (for ``--engine ray``): both sides of every scored pair as
    the head featurizer renders and cuts them, and each response alone."""
    from factory.embed.encoder import get_encoder
    from factory.trainer import backbones
    from factory.trainer.data import pair_data

    params = ctx.params
    # Static vectors are a lookup, computed in process and never cached: nothing to hand out.
    wants_base = params.base != backbones.STATIC
    wants_alone = params.response_view and params.embedder == "minilm"  # Ray actors run MiniLM on torch
    if not (wants_base or wants_alone):
        return
    tie, generated = _unscored(table)
    data = pair_data(table.take(pa.array(np.flatnonzero(~tie & ~generated), pa.int64())))
    if wants_base:
        base = backbones.resolve_base(params.base)
        encoded = backbones.encode_pairs(get_encoder(base).tokenizer, data.prompts + data.prompts,
                                         data.chosen + data.rejected, params.max_length)
        yield EmbedRequest(ids=encoded.ids, encoder=base)
    if wants_alone:
        yield EmbedRequest(data.chosen + data.rejected)


# version 3: one neighbour search serves every labelling (a flip mirrors a direction); above
# the exact-search size the approximate index's neighbours, hence knn signals, differ
@filter_step("noise", params=NoiseParams, decide=decide_noise, version="3", embeds=noise_embeds)
def noise(table: pa.Table, ctx: StepContext[NoiseParams]) -> StepResult:
    """Label noise: out-of-fold RM ensemble, confident learning, training dynamics, CRM peer
    review, neighbour agreement, votes and judges, combined into one calibrated suspicion."""
    params = ctx.params
    n_rows = table.num_rows
    frame = pl.from_arrow(table.select([c for c in ("pair_id", "prompt_id", "chosen", "rejected", "tie",
                                                    "weight") if c in table.column_names]))
    tie, generated = _unscored(table)
    rows = np.flatnonzero(~tie & ~generated)
    prompts = frame.filter(pl.Series(~tie & ~generated))["prompt_id"].n_unique()
    if len(rows) < MIN_PAIRS or prompts < params.folds:
        made = f" ({int(generated.sum())} generated pairs are not scored)" if generated.any() else ""
        raise PrefabError(f"noise needs at least {MIN_PAIRS} real non-tie pairs over at least {params.folds} "
                          f"prompts (folds); this table has {len(rows)} pairs over {prompts} prompts{made}")
    say = _reporter(ctx.progress)
    warnings = []
    if generated.any():
        warnings.append(GENERATED_WARNING.format(generated=int(generated.sum()), real=len(rows)))
        say("warning: " + warnings[-1])
    say(f"noise: scoring {len(rows):,} real pairs over {prompts:,} prompts "
        f"({int(tie.sum()):,} ties and {int(generated.sum()):,} generated pairs not scored)")
    part = table.take(pa.array(rows, pa.int64()))
    views = _views(part, ctx)
    result, stats = score_views(views, ctx)
    scores = _expand(result, rows, n_rows, frame)
    stats.update({"pairs_scored": int(len(rows)), "ties_unscored": int(tie.sum()),
                  "generated_unscored": int(generated.sum()), "warnings": warnings})
    flagged, _ = flag(scores, params)
    stats["flagged"] = int(flagged.sum())
    # calibrated suspicions: their mean over the flagged pairs is the share expected mislabelled
    stats["flagged_expected_wrong"] = _round(float(np.nanmean(result.columns["suspicion"][flagged[rows]]))
                                             if flagged.any() else None)
    stats["summary"] = summary_line(stats, params)
    say(stats["summary"])
    return StepResult(scores, None, stats)


def summary_line(stats: dict, params: NoiseParams) -> str:
    """One line: the estimated rate with its interval, on how many pairs, and whether the
    scores can separate mislabelled pairs at all."""
    low, high = (stats.get("noise_rate_interval") or [None, None])[:2]
    interval = f" [{_pct(low)}, {_pct(high)}]" if low is not None and high is not None else ""
    line = (f"estimated noise rate {_pct(stats.get('noise_rate'))}{interval} on {stats.get('pairs_scored', 0):,} "
            f"real pairs")
    separation = stats.get("separation")
    if separation is not None:
        line += f"; synthetic-flip AUROC {separation:.2f}"
        if separation < params.min_separation and params.threshold is None and params.share is None:
            line += (f" < min_separation {params.min_separation:g}: the scores cannot separate mislabelled "
                     "pairs, none flagged (set share or threshold to cut anyway)")
    if stats.get("flagged") and stats.get("flagged_expected_wrong") is not None:
        line += (f"; flags {stats['flagged']:,}, {_pct(stats['flagged_expected_wrong'])} of them expected "
                 "mislabelled")
    if stats.get("generated_unscored"):
        line += f"; {stats['generated_unscored']:,} generated pairs not scored"
    return line


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _shown(progress: bool | None) -> bool:
    from factory.embed.cache import show_progress

    return show_progress(progress)


def _reporter(progress: bool | None) -> Callable[[str], None]:
    """Phase lines on stderr where progress is shown (a terminal, or ``progress=True``)."""
    if not _shown(progress):
        return lambda _text: None
    return lambda text: print(text, file=sys.stderr, flush=True)


@dataclass
class Views:
    """What the signals read, for the rows being scored (ties left out)."""

    x_chosen: np.ndarray
    x_rejected: np.ndarray
    pair_ids: Sequence[str]
    prompt_ids: Sequence[str]
    length_diff: np.ndarray
    votes_agree: np.ndarray | None
    votes_against: np.ndarray | None
    judge: np.ndarray | None
    judge_column: str | None
    label_key: str  # which side is chosen, per row (for the cache key)


def _features(data: PairData, ctx: StepContext[NoiseParams]) -> tuple[np.ndarray, np.ndarray]:
    """Frozen-encoder features of (prompt + chosen) and (prompt + rejected), each followed
    by the response embedded alone; both come from (and fill) the embedding cache."""
    from factory.columns import take
    from factory.trainer.model import HeadFeaturizer

    params = ctx.params
    n = len(data)
    featurizer = HeadFeaturizer(params.base, params.max_length, resolve_home(ctx.home) / "embeddings",
                                progress=ctx.progress)
    # Chosen and rejected side by side: a pair's prompt is then tokenised once, not twice
    # (the tokeniser dedups prompts within a chunk; each pair's ids are its own either way).
    # Arrow takes (lazy columns): chosen_0, rejected_0, chosen_1, ... without a list of texts.
    interleaved = np.arange(2 * n).reshape(2, n).T.reshape(-1)
    sides = take(data.chosen + data.rejected, interleaved)
    joint, _ = featurizer.featurize(take(data.prompts, np.arange(n).repeat(2)), sides)
    blocks_c, blocks_r = [joint[0::2]], [joint[1::2]]
    if params.response_view:
        alone = ctx.embed(data.chosen + data.rejected, embedder=params.embedder)
        blocks_c.append(alone[:n])
        blocks_r.append(alone[n:])
    return np.hstack(blocks_c).astype(np.float32), np.hstack(blocks_r).astype(np.float32)


def _views(part: pa.Table, ctx: StepContext[NoiseParams]) -> Views:
    from factory.trainer.data import pair_data

    params = ctx.params
    data = pair_data(part)
    n = len(data)
    x_chosen, x_rejected = _features(data, ctx)
    frame = pl.from_arrow(part.select(["pair_id", "chosen", "rejected"]))
    lengths = frame.select(
        pl.col("chosen").str.len_chars().log1p().alias("c"), pl.col("rejected").str.len_chars().log1p().alias("r"))
    agree = against = None
    if params.votes and "votes" in part.column_names and part.column("votes").null_count < n:
        counted = pl.from_arrow(part.select(["votes"])).select(
            pl.col("votes").list.eval((pl.element() > 0).cast(pl.Int64)).list.sum().fill_null(0).alias("agree"),
            pl.col("votes").list.eval((pl.element() < 0).cast(pl.Int64)).list.sum().fill_null(0).alias("against"))
        agree, against = counted["agree"].to_numpy(), counted["against"].to_numpy()
    judge, judge_column = None, None
    for column in params.judge_columns:
        if column in part.column_names and part.column(column).null_count < n:
            values = part.column(column).cast(pa.float64()).to_numpy(zero_copy_only=False)
            # The filter that stored the agreement may have flipped the pair after scoring it
            # (its action column says so): the agreement is then with the other side.
            action = column.rsplit("_", 1)[0] + "_action"
            if action in part.column_names:
                flipped = pc.equal(part.column(action), "flip").fill_null(False).to_numpy(zero_copy_only=False)
                values = np.where(flipped, 1.0 - values, values)
            judge, judge_column = np.clip(values, 0.0, 1.0), column
            break
    # Which side is chosen, per row: a flipped label changes the key (polars' hash is
    # columnar; a new polars version may change it, which only costs a recompute).
    digest = hashlib.sha256(frame["chosen"].hash(seed=0).to_numpy().tobytes())
    return Views(
        x_chosen=x_chosen, x_rejected=x_rejected,
        pair_ids=part.column("pair_id").to_pylist(), prompt_ids=data.prompt_ids,
        length_diff=(lengths["c"] - lengths["r"]).to_numpy(), votes_agree=agree, votes_against=against,
        judge=judge, judge_column=judge_column, label_key=digest.hexdigest())


@dataclass
class Scored:
    columns: dict[str, np.ndarray]
    signals: list[str]
    combined: Combined
    cl_rate: tuple[float, float, float]


def model_config(params: NoiseParams, seed: int) -> ModelConfig:
    from filters._noise_core import ModelConfig
    from filters._noise_heads import HeadConfig

    head = HeadConfig(epochs=params.epochs, lr=params.lr, hidden=params.hidden, seed=seed)
    return ModelConfig(folds=params.folds, seeds=params.seeds, head=head, seed=seed)


def score_views(views: Views, ctx: StepContext[NoiseParams]) -> tuple[Scored, dict]:
    """Every signal, the combiner and the noise rate for the rows in ``views``."""
    from filters._noise_core import combine, evidence, flip_views, synthetic_groups
    from filters._noise_signals import Neighbourhood

    params = ctx.params
    n = len(views.pair_ids)
    cfg = model_config(params, ctx.seed)
    x_chosen, x_rejected = project(views.x_chosen, views.x_rejected, params.components)
    a_is_chosen = ctx.row_uniform(views.pair_ids, "ab-side") < 0.5
    # Synthetic flips are drawn per row (a repeated comparison is a separate judgment,
    # whose errors are independent): the key is the pair id and its occurrence number.
    occurrence = pl.DataFrame({"id": views.pair_ids}).select(pl.col("id").cum_count().over("id"))["id"]
    keys = [f"{pid}#{k}" for pid, k in zip(views.pair_ids, occurrence.to_list(), strict=True)]
    groups = synthetic_groups(ctx.row_uniform(keys, "synthetic"), params.synthetic_rate, params.synthetic_copies)

    cache_path = _cache_path(views, params, ctx)
    cached = _load(cache_path, params.synthetic_copies)
    hit = cached is not None
    runs: list[ModelSignals] = []
    copies: list[tuple[Evidence, np.ndarray]] = []
    say = _reporter(ctx.progress)
    if hit:
        say(f"noise: trained heads' outputs reused from {cache_path}")
    # One neighbour search serves every labelling: a flip only mirrors a pair's direction.
    neighbourhood = Neighbourhood.search(x_chosen - x_rejected, max(params.neighbours, params.wide_neighbours))
    with _training_bar(not hit and _shown(ctx.progress), n, params, cfg) as tick:
        real = evidence(x_chosen, x_rejected, views.prompt_ids, a_is_chosen, views.length_diff,
                        views.judge, cfg, params.neighbours, params.wide_neighbours,
                        models=cached[0] if hit else None, on_epoch=tick("real labels"),
                        neighbourhood=neighbourhood)
        runs.append(real.models)
        for copy in range(params.synthetic_copies):
            flips = groups == copy
            xc, xr = flip_views(x_chosen, x_rejected, flips)
            judge = None if views.judge is None else np.where(flips, 1.0 - views.judge, views.judge)
            ev = evidence(xc, xr, views.prompt_ids, a_is_chosen,
                          np.where(flips, -views.length_diff, views.length_diff), judge, cfg, params.neighbours,
                          params.wide_neighbours, models=cached[copy + 1] if hit else None,
                          on_epoch=tick(f"copy {copy + 1}/{params.synthetic_copies}"),
                          neighbourhood=neighbourhood, flips=flips)
            copies.append((ev, flips))
            runs.append(ev.models)
    if not hit:
        _save(cache_path, runs)
    say("noise: combining the signals and estimating the noise rate (bootstrap)")

    cl_rate = noise_rate(real.cl_labels, real.cl_pred_probs)
    cl_low, cl_high = noise_rate_interval(real.cl_labels, real.cl_pred_probs, seed=ctx.seed)
    combined = combine(real, copies, use_judge=views.judge is not None, fallback_rate=cl_rate, seed=ctx.seed)
    logodds = combined.logit
    votes_logodds = np.zeros(n)
    votes_dissent = np.full(n, np.nan)
    vote_accuracy = None
    if views.votes_agree is not None:
        votes = vote_evidence(views.votes_agree, views.votes_against)
        votes_logodds, votes_dissent, vote_accuracy = votes.logodds, votes.dissent, votes.accuracy
    suspicion = sigmoid(logodds + votes_logodds)

    cols = real.columns
    columns = {
        "suspicion": suspicion,
        "model_logodds": logodds,
        "votes_logodds": votes_logodds,
        "oof_margin": cols["oof_margin"],
        "oof_spread": cols["oof_spread"],
        "cl_quality": real.models.oof_prob,  # self-confidence: P(given label) out of fold
        "cl_issue": real.cl_issue,
        "aum": cols["aum"],
        "forgetting": cols["forgetting"],
        "rwgap": cols["rwgap"],
        "crm_loss": cols["crm_loss"],
        "crm_suspect": real.models.crm_suspect,
        "crm_rejected": cols["crm_rejected"],
        "knn_agreement": cols["knn_agreement"],
        "knn_wide_agreement": cols["knn_wide_agreement"],
        "length_diff": cols["length_diff"],
        "judge_agreement": views.judge if views.judge is not None else np.full(n, np.nan),
        "votes_dissent": votes_dissent,
    }
    signals = _flagging_signals(columns, combined)
    stats = {
        "noise_rate": round(combined.noise_rate, 4),
        "noise_rate_interval": [_round(combined.noise_low), _round(combined.noise_high)],
        "cl_noise_rate": round(cl_rate, 4),
        "cl_noise_rate_interval": [_round(cl_low), _round(cl_high)],
        "combiner_weights": combined.weights(),
        "combiner_l2": combined.l2,
        "separation": _round(combined.separation),
        "judge_column": views.judge_column,
        "annotator_accuracy": _round(vote_accuracy) if vote_accuracy is not None else None,
        "oof_cache": "hit" if hit else "miss",
    }
    return Scored(columns, signals, combined, (cl_rate, cl_low, cl_high)), stats


@contextmanager
def _training_bar(enabled: bool, n: int, params: NoiseParams,
                  cfg: ModelConfig) -> Iterator[Callable[[str], Callable[[], None]]]:
    """A bar over every epoch the heads train (the ensemble and the peers, on the real labels
    and each synthetic copy), with the labelling in training and pairs per second."""
    from tqdm.auto import tqdm

    heads = cfg.folds * cfg.seeds + 2 * cfg.folds
    total = (1 + params.synthetic_copies) * 2 * params.epochs
    bar = tqdm(total=total, desc=f"noise: train {heads} heads x {1 + params.synthetic_copies} labellings",
               unit="epoch", dynamic_ncols=True, disable=not enabled,
               file=sys.stderr)
    started = time.monotonic()

    def tick(labelling: str) -> Callable[[], None]:
        def step() -> None:
            bar.update(1)
            rate = bar.n * n / max(time.monotonic() - started, 1e-9)
            bar.set_postfix_str(f"{labelling}, {n:,} pairs, {rate:,.0f} pair-epochs/s", refresh=False)
        return step

    try:
        yield tick
    finally:
        bar.close()


# Rows turned into float64 at once by the projection: 16k x 384 x 8 B = 48 MiB.
_PROJECT_ROWS = 1 << 14


def project(x_chosen: np.ndarray, x_rejected: np.ndarray, components: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sides on the leading principal components of all responses' features.

    The components come from the d x d covariance accumulated over row chunks, not from an
    SVD of the (2n x d) matrix: memory is the two float32 outputs plus O(d^2 + chunk x d)."""
    if components <= 0 or components >= x_chosen.shape[1]:
        return x_chosen, x_rejected
    centre, basis = principal_axes([x_chosen, x_rejected], components)
    return _projected(x_chosen, centre, basis), _projected(x_rejected, centre, basis)


def principal_axes(blocks: list[np.ndarray], components: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (d x components) leading eigenvectors of the covariance of the blocks' rows
    stacked, each eigenvector signed so its largest entry is positive (an SVD's signs are
    arbitrary; this makes them reproducible)."""
    rows = sum(len(block) for block in blocks)
    centre = sum(block.sum(0, dtype=np.float64) for block in blocks) / rows
    scatter = np.zeros((len(centre), len(centre)))
    for block in blocks:
        for start in range(0, len(block), _PROJECT_ROWS):
            chunk = block[start:start + _PROJECT_ROWS].astype(np.float64) - centre
            scatter += chunk.T @ chunk  # centred first: no cancellation in sum(x x^T) - n m m^T
    values, vectors = np.linalg.eigh(scatter)
    basis = vectors[:, np.argsort(values)[::-1][:components]]
    biggest = np.abs(basis).argmax(0)
    return centre, basis * np.sign(basis[biggest, np.arange(basis.shape[1])])


def _projected(x: np.ndarray, centre: np.ndarray, basis: np.ndarray) -> np.ndarray:
    out = np.empty((len(x), basis.shape[1]), dtype=np.float32)
    for start in range(0, len(x), _PROJECT_ROWS):
        out[start:start + _PROJECT_ROWS] = (x[start:start + _PROJECT_ROWS] - centre) @ basis
    return out


def _round(x: float | None) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), 4)


def _flagging_signals(columns: dict[str, np.ndarray], combined: Combined) -> list[str]:
    """Per row, the signals that on their own say the label is wrong (comma-separated)."""
    length_flag = np.zeros(len(columns["suspicion"]), dtype=bool)
    if "length_diff" in combined.names:
        at = combined.names.index("length_diff")
        length_flag = (combined.standardized[:, at] > 1.0) & (combined.model.coef[at] > 0.05)
    flags = {
        "rm": columns["oof_margin"] < 0,  # the out-of-fold ensemble prefers the rejected answer
        "confident-learning": columns["cl_issue"],
        "dynamics": columns["aum"] < 0,  # heads that trained on it still rank it backwards
        "peers": columns["crm_suspect"],
        "neighbours": columns["knn_agreement"] < 0,
        "length": length_flag,
        "judges": np.nan_to_num(columns["judge_agreement"], nan=1.0) < 0.5,
        "votes": np.nan_to_num(columns["votes_dissent"], nan=0.0) > 0,
    }
    frame = pl.DataFrame({name: flag for name, flag in flags.items()})
    joined = frame.select(pl.concat_list([
        pl.when(pl.col(name)).then(pl.lit(name)).otherwise(pl.lit(None, dtype=pl.String)) for name in flags
    ]).list.drop_nulls().list.join(", ").alias("signals"))
    return joined["signals"].to_list()


def _expand(result: Scored, rows: np.ndarray, n_rows: int, frame: pl.DataFrame) -> pa.Table:
    """Scores of the scored rows placed at their positions; ties get nulls."""
    out: dict[str, pa.Array] = {}
    for name, values in result.columns.items():
        values = np.asarray(values)
        if values.dtype == bool:
            full = np.zeros(n_rows, dtype=bool)
            full[rows] = values
            mask = np.ones(n_rows, dtype=bool)
            mask[rows] = False
            out[name] = pa.array(full, pa.bool_(), mask=mask)
        else:
            full = np.full(n_rows, np.nan)
            full[rows] = values
            out[name] = pa.array(full, pa.float64(), mask=~np.isfinite(full))
    signals = np.full(n_rows, None, dtype=object)
    signals[rows] = result.signals
    out["signals"] = pa.array(signals, pa.string())
    combined = result.combined
    # Names must not start with "noise_": the runner prefixes with it and strips it again.
    for name, value in (("rate_estimate", combined.noise_rate), ("rate_low", combined.noise_low),
                        ("rate_high", combined.noise_high), ("separation", combined.separation),
                        ("cl_rate", result.cl_rate[0]),
                        ("cl_rate_low", result.cl_rate[1]), ("cl_rate_high", result.cl_rate[2])):
        out[name] = pa.array(np.full(n_rows, value), pa.float64(), mask=np.full(n_rows, not np.isfinite(value)))
    weight = frame["weight"].fill_null(1.0).to_numpy() if "weight" in frame.columns else np.ones(n_rows)
    out["base_weight"] = pa.array(weight.astype(np.float64), pa.float64())
    return pa.table(out)


# ---- the cache of trained heads' outputs ----------------------------------------------------


def _cache_path(views: Views, params: NoiseParams, ctx: StepContext[NoiseParams]) -> Path:
    relevant = {k: getattr(params, k) for k in ("folds", "seeds", "epochs", "hidden", "lr", "response_view",
                                                 "components", "synthetic_rate", "synthetic_copies", "base",
                                                 "max_length")}
    if params.response_view:  # the heads read the response-alone vectors too
        relevant["embedder"] = params.embedder
    digest = hashlib.sha256()
    digest.update(json.dumps({"v": CACHE_VERSION, "seed": ctx.seed, **relevant}, sort_keys=True).encode())
    digest.update("\x00".join(views.pair_ids).encode())
    digest.update("\x00".join(views.prompt_ids).encode())  # the folds
    digest.update(views.label_key.encode())
    return resolve_home(ctx.home) / "noise" / f"{digest.hexdigest()[:32]}.npz"


def _save(path: Path, runs: list[ModelSignals]) -> None:
    arrays = {f"{i}:{k}": v for i, run in enumerate(runs) for k, v in run.as_arrays().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # whole or absent: a crash never leaves a torn cache file


def _load(path: Path, copies: int) -> list[ModelSignals] | None:
    from filters._noise_core import ModelSignals

    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            runs: list[dict[str, np.ndarray]] = [{} for _ in range(copies + 1)]
            for key in data.files:
                index, name = key.split(":", 1)
                runs[int(index)][name] = data[key]
        return [ModelSignals.from_arrays(run) for run in runs]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None  # unreadable: recompute (and overwrite)

