"""Label-noise benchmark: the ``noise`` filter's signals and ensemble against cleanlab and RwGap.

Data (read in place from ../shared/data, never copied): HH-RLHF harmless-base test and the
PandaLM human test set (majority labels, majority ties left out). Each set is split 80/20
by prompt; symmetric flips (20% and 40% of the training split, exact count) are injected
with three seeds. PandaLM's votes are withheld from the injected runs: flipping a label
without its votes would make the votes give every flip away, and flipping both leaves
them no signal about the flip, so votes are measured on the natural task instead
(below).

For each setting and method: detection AUROC and precision at the true flip count over
the training split, and the noise rate the method estimates against the injected one.
Methods: every signal of the filter, its combined suspicion, two cleanlab baselines --
(i) what a user would do: out-of-fold probabilities (5 folds by prompt) of sklearn's
LogisticRegression on [emb(prompt+A) - emb(prompt+B)] with a random A/B side, ranked
by ``get_label_quality_scores`` and counted by ``find_label_issues``; (ii) the same
cleanlab calls fed the filter's out-of-fold ensemble probabilities -- and PrefCleanBench's
RwGap (mean in-sample reward gap over several RMs). "est." for a signal without its own
estimator is the share of pairs it flags on its own (margin < 0, both peers reject...).

Then reward-model accuracy (``factory.trainer`` head mode, default settings, averaged over
``--rm-seeds`` training seeds) on the clean held-out split after training on the clean,
the noisy and the cleaned training split: the default decision (the estimated-noise-rate
share most suspect) with ``action=drop`` and with ``action=weight``. Finally, on PandaLM
without injection: AUROC of the suspicion against the pairs whose annotators disagree
(without votes; with votes it is circular and given for reference only).

    python benchmarks/noise.py             # 2 sets x {20%, 40%} x 3 seeds
    python benchmarks/noise.py --quick     # one seed
    python benchmarks/noise.py --set base=static --set embedder=static --no-rm   # the fast encoders

``--set KEY=VALUE`` passes a filter parameter to every filter run (the cleanlab baseline (i)
keeps MiniLM features, so it is the same yardstick whatever the filter reads); ``--no-rm``
skips the reward-model accuracy part (its RMs are the trainer's, not the filter's);
``--data`` is the shared data folder when this checkout is not beside it.

Measured (``--seeds 2 --no-rm``, 2 cores shared with other jobs), ensemble AUROC mean±sd
over seeds, MiniLM (defaults) vs ``--set base=static --set embedder=static``: HH 20% flips
0.670±0.003 vs 0.649±0.004, HH 40% 0.605±0.019 vs 0.594±0.006, PandaLM 20% 0.829±0.006 vs
0.814±0.002, PandaLM 40% 0.742±0.011 vs 0.666±0.084; PandaLM annotator disagreement 0.638 vs
0.629. Static is lower in every setting (by 0.011-0.021, 0.076 where one seed fell to 0.58),
still above baseline (i) in each; filter runs took a median 35 s vs 21 s here (most of the
MiniLM cost is in its embedding cache, filled once).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factory.steps import StepContext  # noqa: E402
from factory.steps.params import build_params  # noqa: E402
from factory.trainer.data import pair_data, split_by_prompt  # noqa: E402
from factory.trainer.evaluate import score_pairs  # noqa: E402
from factory.trainer.loop import TrainConfig, fit  # noqa: E402
from factory.trainer.model import HeadFeaturizer  # noqa: E402
from filters._noise_signals import auroc  # noqa: E402
from filters.noise import NoiseParams, decide_noise, noise  # noqa: E402
from schemas.readers import read_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = {"hh": "hh-rlhf-harmless-base-test.jsonl.gz", "pandalm": "pandalm-testset-v1.json"}

# method -> (score column or callable giving "higher = more suspicious", its own estimate)
SIGNALS: dict[str, tuple[str, float, str]] = {
    # name: (column, sign, flagged-alone rule)
    "oof ensemble margin": ("oof_margin", -1.0, "oof_margin<0"),
    "training dynamics AUM": ("aum", -1.0, "aum<0"),
    "forgetting events": ("forgetting", 1.0, "forgetting>0"),
    "CRM peer review": ("crm_loss", 1.0, "crm_suspect"),
    "neighbours k=10": ("knn_agreement", -1.0, "knn_agreement<0"),
    "neighbours k=100": ("knn_wide_agreement", -1.0, "knn_wide_agreement<0"),
    "RwGap (PrefCleanBench)": ("rwgap", -1.0, "rwgap<0"),
}


def read_set(key: str) -> pa.Table:
    table = read_path(DATA / SETS[key], "auto").table
    tie = np.asarray(table.column("tie").to_pylist(), dtype=bool)
    return table.filter(pa.array(~tie))


def inject(table: pa.Table, rate: float, seed: int) -> tuple[pa.Table, np.ndarray]:
    n = table.num_rows
    rng = np.random.default_rng(1000 + seed)
    flips = np.zeros(n, dtype=bool)
    flips[rng.choice(n, size=int(round(rate * n)), replace=False)] = True
    mask = pl.Series(flips)
    frame = pl.from_arrow(table).with_columns(
        pl.when(mask).then(pl.col("rejected")).otherwise(pl.col("chosen")).alias("chosen"),
        pl.when(mask).then(pl.col("chosen")).otherwise(pl.col("rejected")).alias("rejected"))
    return frame.to_arrow().cast(table.schema), flips


def without_votes(table: pa.Table) -> pa.Table:
    index = table.schema.get_field_index("votes")
    return table.set_column(index, "votes", pa.nulls(table.num_rows, table.schema.field("votes").type))


def precision_at(score: np.ndarray, positive: np.ndarray, k: int) -> float:
    if k == 0:
        return float("nan")
    top = np.argsort(-score, kind="stable")[:k]
    return float(positive[top].mean())


class Features:
    """Frozen-encoder features of each row's chosen and rejected (the embedding cache makes
    this a lookup after the first run)."""

    def __init__(self, table: pa.Table, home: Path):
        data = pair_data(table)
        featurizer = HeadFeaturizer("minilm", 256, home / "embeddings", progress=False)
        x, _ = featurizer.featurize(data.prompts + data.prompts, data.chosen + data.rejected)
        n = len(data)
        self.chosen, self.rejected = x[:n], x[n:]


def cleanlab_baselines(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, float]:
    """(suspicion = -label quality, estimated noise rate from find_label_issues)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(labels, pred_probs)
    issues = find_label_issues(labels, pred_probs)
    return -quality, float(issues.mean())


def lr_pred_probs(x_a_minus_b: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_predict

    return cross_val_predict(LogisticRegression(max_iter=2000), x_a_minus_b, labels, cv=GroupKFold(5),
                             groups=groups, method="predict_proba")


# Filter parameters every run_filter call gets (``--set``), before its own settings.
FILTER_SETTINGS: dict[str, str] = {}


def run_filter(table: pa.Table, home: Path, **settings: Any) -> tuple[pa.Table, dict, float]:
    params = build_params(NoiseParams, {**FILTER_SETTINGS, **settings}, step="noise")
    ctx = StepContext("noise", params, seed=0, home=home, progress=False)
    started = time.perf_counter()
    result = noise(table, ctx)
    return result.table, result.stats, time.perf_counter() - started


def rm_accuracy(train: pa.Table, test: pa.Table, home: Path, seeds: int) -> float:
    """Mean pairwise accuracy on ``test`` of head-mode RMs (trainer defaults) over seeds:
    on a few hundred pairs one training run's luck moves accuracy by points."""
    data, test_data = pair_data(train), pair_data(test)
    accuracies = []
    for seed in range(seeds):
        result = fit(data, TrainConfig(mode="head", seed=seed, progress=False), cache_root=home / "embeddings")
        r_c, r_r = score_pairs(result.model, test_data)
        accuracies.append(float((r_c > r_r).mean()))
    return float(np.mean(accuracies))


def apply_action(noisy: pa.Table, scores: pa.Table, action: str) -> tuple[pa.Table, float]:
    """The training set the default decision leaves (drop) or reweights (weight)."""
    decision = decide_noise(scores, NoiseParams(action=action))
    suspect = np.asarray(decision.action.to_pylist()) != "keep"
    if action == "drop":
        return noisy.filter(pa.array(~suspect)), float(1 - suspect.mean())
    weight = np.where(suspect, decision.weight.to_numpy(zero_copy_only=False), 1.0)
    index = noisy.schema.get_field_index("weight")
    return noisy.set_column(index, "weight", pa.array(weight, pa.float64())), float(1 - suspect.mean())


def evaluate_setting(noisy: pa.Table, flips: np.ndarray, feats: Features, home: Path, seed: int,
                     ) -> tuple[dict[str, dict[str, float]], pa.Table, dict, float]:
    scores, stats, seconds = run_filter(noisy, home)
    frame = pl.from_arrow(scores)
    k = int(flips.sum())
    rows: dict[str, dict[str, float]] = {}

    def add(name: str, suspicion: np.ndarray, estimate: float) -> None:
        rows[name] = {"auroc": auroc(suspicion, flips), "p_at_k": precision_at(suspicion, flips, k),
                      "est": estimate}

    for name, (column, sign, rule) in SIGNALS.items():
        values = frame[column].to_numpy()
        if rule == "crm_suspect":
            flagged = frame["crm_suspect"].to_numpy()
        else:
            col, op = (rule.split("<")[0], "<") if "<" in rule else (rule.split(">")[0], ">")
            flagged = values < 0 if op == "<" else values > 0
            assert col == column
        add(name, sign * values, float(np.mean(flagged)))
    add("confident learning (ours)", -frame["cl_quality"].to_numpy(), float(frame["cl_rate"][0]))
    add("ENSEMBLE (suspicion)", frame["suspicion"].to_numpy(), float(frame["rate_estimate"][0]))

    rng = np.random.default_rng(seed)
    a_first = rng.random(noisy.num_rows) < 0.5
    labels = a_first.astype(np.int64)
    # ``feats`` holds the clean rows in order; the noisy label decides which side is chosen.
    xc = np.where(flips[:, None], feats.rejected, feats.chosen)
    xr = np.where(flips[:, None], feats.chosen, feats.rejected)
    x = np.where(a_first[:, None], xc - xr, xr - xc)
    groups = np.unique(noisy.column("prompt_id").to_pylist(), return_inverse=True)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suspicion, estimate = cleanlab_baselines(labels, lr_pred_probs(x, labels, groups))
        add("cleanlab (i) LR on emb diff", suspicion, estimate)
        p_chosen = frame["cl_quality"].to_numpy()
        p_a = np.where(a_first, p_chosen, 1 - p_chosen)
        suspicion, estimate = cleanlab_baselines(labels, np.column_stack([1 - p_a, p_a]))
        add("cleanlab (ii) our OOF probs", suspicion, estimate)
    return rows, scores, stats, seconds


def fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if np.isfinite(v)]
    if not values:
        return "-"
    mean = float(np.mean(values))
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f}±{float(np.std(values)):.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    global DATA
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed")
    parser.add_argument("--sets", default="hh,pandalm")
    parser.add_argument("--rates", default="0.2,0.4")
    parser.add_argument("--seeds", type=int, default=3, help="injection seeds")
    parser.add_argument("--rm-seeds", type=int, default=2, help="RM training seeds averaged per training set")
    parser.add_argument("--home", default=str(ROOT / ".prefab" / "bench-noise"),
                        help="embedding and OOF cache folder (reused across runs)")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a noise filter parameter for every filter run (repeatable)")
    parser.add_argument("--no-rm", action="store_true", help="skip the reward-model accuracy part")
    parser.add_argument("--data", default=str(DATA), help="the shared data folder")
    args = parser.parse_args(argv)
    home = Path(args.home)
    DATA = Path(args.data)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        FILTER_SETTINGS[key] = value
    seeds = [0] if args.quick else list(range(args.seeds))
    rates = [float(r) for r in args.rates.split(",")]
    started = time.perf_counter()
    detection: dict[tuple[str, float, str], dict[str, list[float]]] = {}
    accuracy: dict[tuple[str, str], list[float]] = {}
    estimates: dict[tuple[str, float], list[dict[str, Any]]] = {}
    timings: list[float] = []
    natural: dict[str, float] = {}

    for key in args.sets.split(","):
        table = read_set(key)
        train_idx, test_idx = split_by_prompt(table.column("prompt_id").to_pylist(), 0.2, 0)
        train = table.take(pa.array(train_idx))
        test = table.take(pa.array(test_idx))
        feats = Features(train, home)
        if key == "pandalm":
            train = without_votes(train)
        if not args.no_rm:
            accuracy[(key, "clean")] = [rm_accuracy(train, test, home, args.rm_seeds)]
        clean_scores, clean_stats, seconds = run_filter(train, home)
        timings.append(seconds)
        estimates[(key, 0.0)] = [{"ensemble": clean_stats["noise_rate"], "cl": clean_stats["cl_noise_rate"]}]
        print(f"[{time.perf_counter() - started:6.0f}s] {key}: {train.num_rows} train / {test.num_rows} test "
              f"pairs; clean-data noise estimate {clean_stats['noise_rate']:.3f} "
              f"(CL {clean_stats['cl_noise_rate']:.3f})", file=sys.stderr, flush=True)
        for rate in rates:
            for seed in seeds:
                noisy, flips = inject(train, rate, seed)
                rows, scores, stats, seconds = evaluate_setting(noisy, flips, feats, home, seed)
                timings.append(seconds)
                for method, values in rows.items():
                    cell = detection.setdefault((key, rate, method), {"auroc": [], "p_at_k": [], "est": []})
                    for metric, value in values.items():
                        cell[metric].append(value)
                estimates.setdefault((key, rate), []).append(
                    {"ensemble": stats["noise_rate"], "interval": stats["noise_rate_interval"],
                     "cl": stats["cl_noise_rate"], "cl_interval": stats["cl_noise_rate_interval"]})
                if not args.no_rm:
                    accuracy.setdefault((key, f"noisy {rate:.0%}"), []).append(
                        rm_accuracy(noisy, test, home, args.rm_seeds))
                    for action in ("drop", "weight"):
                        cleaned, kept = apply_action(noisy, scores, action)
                        accuracy.setdefault((key, f"{action} {rate:.0%}"), []).append(
                            rm_accuracy(cleaned, test, home, args.rm_seeds))
                    accuracy.setdefault((key, f"(kept share {rate:.0%})"), []).append(kept)
                print(f"[{time.perf_counter() - started:6.0f}s] {key} {rate:.0%} seed {seed}: ensemble AUROC "
                      f"{rows['ENSEMBLE (suspicion)']['auroc']:.3f}, baseline (i) "
                      f"{rows['cleanlab (i) LR on emb diff']['auroc']:.3f}, est. {stats['noise_rate']:.3f} "
                      f"(filter {seconds:.0f}s)", file=sys.stderr, flush=True)
        if key == "pandalm":
            natural = natural_disagreement(table, Features(table, home), home)

    print_tables(detection, accuracy, estimates, natural, rates, timings, time.perf_counter() - started)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "detection": {"|".join(map(str, k)): v for k, v in detection.items()},
            "accuracy": {"|".join(k): v for k, v in accuracy.items()},
            "estimates": {"|".join(map(str, k)): v for k, v in estimates.items()},
            "natural": natural, "filter_seconds": timings, "settings": FILTER_SETTINGS}, indent=1,
            default=float))
    return 0


def natural_disagreement(table: pa.Table, feats: Features, home: Path) -> dict[str, float]:
    """PandaLM without injection: does the suspicion find pairs whose annotators split?"""
    votes = table.column("votes").to_pylist()
    split = np.array([len(set(vs or [])) > 1 for vs in votes])
    out = {"pairs": float(len(split)), "disagreeing": float(split.sum())}
    scores, _, _ = run_filter(without_votes(table), home)
    out["ensemble (no votes)"] = auroc(scores.column("suspicion").to_numpy(), split)
    out["oof ensemble margin"] = auroc(-scores.column("oof_margin").to_numpy(), split)
    with_votes, _, _ = run_filter(table, home)
    out["ensemble with votes (circular)"] = auroc(with_votes.column("suspicion").to_numpy(), split)
    rng = np.random.default_rng(0)
    a_first = rng.random(table.num_rows) < 0.5
    x = np.where(a_first[:, None], feats.chosen - feats.rejected, feats.rejected - feats.chosen)
    labels = a_first.astype(np.int64)
    groups = np.unique(table.column("prompt_id").to_pylist(), return_inverse=True)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        suspicion, _ = cleanlab_baselines(labels, lr_pred_probs(x, labels, groups))
    out["cleanlab (i) LR on emb diff"] = auroc(suspicion, split)
    return out


def print_tables(detection: dict, accuracy: dict, estimates: dict, natural: dict, rates: list[float],
                 timings: list[float], total: float) -> None:
    print("Label-noise detection (mean±sd over seeds; est. = estimated noise rate)")
    print(f"{'set':8} {'flips':>5}  {'method':30} {'AUROC':>12} {'P@k':>12} {'est.':>12}")
    for (key, rate, method), cell in detection.items():
        print(f"{key:8} {rate:>5.0%}  {method:30} {fmt(cell['auroc']):>12} {fmt(cell['p_at_k']):>12} "
              f"{fmt(cell['est']):>12}")
    print()
    print("Target: ensemble AUROC >= baseline (i) + 0.03, per seed")
    for (key, rate, method), cell in detection.items():
        if method == "ENSEMBLE (suspicion)":
            base = detection[(key, rate, "cleanlab (i) LR on emb diff")]["auroc"]
            gaps = [e - b for e, b in zip(cell["auroc"], base, strict=True)]
            print(f"  {key:8} {rate:>4.0%}: gap per seed " + ", ".join(f"{g:+.3f}" for g in gaps)
                  + ("  met" if min(gaps) >= 0.03 else "  MISSED"))
    print()
    print("Noise-rate estimate of the ensemble [90% bootstrap interval], CL's, vs injected")
    print("  (implied = (est - est on the clean split) / (1 - 2 x est on the clean split): the injected share")
    print("   once the set's own label noise, which the estimate counts too, is taken out)")
    for (key, rate), items in estimates.items():
        ens = [i["ensemble"] for i in items]
        cl = [i["cl"] for i in items]
        base = estimates[(key, 0.0)][0]["ensemble"]
        implied = [(e - base) / (1 - 2 * base) for e in ens]
        intervals = " ".join(f"[{i['interval'][0]:.2f},{i['interval'][1]:.2f}]" for i in items if i.get("interval"))
        line = f"  {key:8} injected {rate:>4.0%}: ensemble {fmt(ens)} {intervals}; CL {fmt(cl)}"
        if rate > 0:
            line += f"; implied {fmt(implied)}"
        print(line)
    print()
    print("RM accuracy on the clean held-out split (trainer head mode, defaults)"
          if accuracy else "RM accuracy: not measured (--no-rm)")
    for (key, what), values in accuracy.items():
        print(f"  {key:8} {what:16} {fmt(values)}")
    for key in sorted({k for k, _ in accuracy}):
        clean = accuracy[(key, "clean")][0]
        for rate in rates:
            noisy = accuracy.get((key, f"noisy {rate:.0%}"))
            if not noisy:
                continue
            cost = clean - float(np.mean(noisy))
            parts = []
            for action in ("drop", "weight"):
                gain = float(np.mean(accuracy[(key, f"{action} {rate:.0%}")])) - float(np.mean(noisy))
                parts.append(f"{action} recovered {gain:+.3f} ({gain / cost:.0%})" if cost > 0 else
                             f"{action} {gain:+.3f}")
            print(f"  {key:8} {rate:.0%}: noise cost {cost:+.3f}; " + "; ".join(parts))
    if natural:
        print()
        print(f"PandaLM without injection: AUROC against the {int(natural['disagreeing'])} of "
              f"{int(natural['pairs'])} pairs whose annotators disagree")
        for name, value in natural.items():
            if name not in ("pairs", "disagreeing"):
                print(f"  {name:32} {value:.3f}")
    print()
    print(f"filter wall time per run: median {np.median(timings):.0f}s, max {np.max(timings):.0f}s; "
          f"benchmark total {total / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
