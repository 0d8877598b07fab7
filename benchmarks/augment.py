"""Augmentation benchmark (issue 10): does generated data make a reward model more robust
without costing accuracy?

A head-mode RM (frozen all-MiniLM-L6-v2, small trained head) is trained on real pairs, then
again with each offline generator's output added -- ``master_keys``, ``causal``,
``neutral``, ``hard_negatives`` (Contrast Instructions) -- and with all four together.
Splits are by prompt, k-fold (default 5): every real pair is held out once, and a fold
trains only on generated pairs that touch none of its held-out data (every parent pair is
a training pair; neither the prompt nor an answer is held out). The generators run once
on the whole pool; ``--aug-fraction`` of each one's output is used. Each fold trains
``--train-seeds`` heads (default 3): a head's accuracy moves by up to two points with its
training seed alone (the "other training seeds" reference row shows it), as much as the
effects measured. Metrics, pooled over the folds' held-out shares and the seeds:

- accuracy (RewardBench-strict) in distribution (with a paired standard error against the
  base) and on LLMBar Natural and MT-Bench (never trained on; mean over the fold models);
- master-key false-positive rate (a key scoring >= the chosen answer) for the keys the
  generator used (*listed*) and for keys it never saw (*unseen*: ",", "Solution" and
  "かいせつ" held out of the paper's list, plus "Answer:", "Sure.", "Let me think.",
  "答案", "Réponse", "...", "Step 1:"), on probe prompts and on the OOD sets;
- Contrast-Instructions consistency: held-out prompts with their most similar other
  instruction (cosine in [--ci-min-sim, 0.995]), both halves of the test;
- tie ratio: mean |Δ| on neutral style rewrites of held-out answers over mean |Δ| of the
  real held-out pairs (also per transform, and on rewrites of the fold's training answers:
  learnt there but not on held-out answers means it does not generalise);
- length bias: share of held-out pairs where the RM prefers the longer answer minus the
  share where the label does.

Suites: HH-RLHF harmless, and the non-HH shared sets (PandaLM + LLMBar FairEval +
LLMEval²; Natural and MT-Bench stay out of training). Every run uses ``RECIPE`` below (the
base too); reference rows repeat the base with other training seeds (the noise floor) and
base and all-four with the old default "pair" features. One more row trains all four
with ``--residual-of`` the base (reward = base + a residual head fitted to the generated
pairs with the real pairs as its ties; see factory/trainer/residual.py). A last table trains a trajectory RM on τ-bench airline runs, k-fold by task_id
over several fold seeds: the training tasks' real success-vs-failure pairs alone, against
the same plus UI-Genie corruptions of their successful runs, scored on the held-out tasks'
real pairs.

Data is read in place from ../shared/data (never copied). Embeddings are cached under the
home folder (``--home``, default ``$PREFAB_HOME`` or ``./.prefab``): a rerun only trains
heads (about 8 minutes on two busy cores); a cold run embeds ~30k texts (about 30).

    python benchmarks/augment.py              # both suites + trajectories
    python benchmarks/augment.py --quick      # 3 folds, smaller caps: a first look
    python benchmarks/augment.py --suites shared --recipe '{"features": "pair"}' --json out.json
    python benchmarks/augment.py --suites hh --runs neutral,all     # the base and two runs only
    python benchmarks/augment.py --suites shared --runs neutral --only-folds 1 \
        --recipe '{"mode": "full", "epochs": 2}'                   # full fine-tuning, one fold
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factory.columns import text_lengths  # noqa: E402
from factory.home import resolve_home  # noqa: E402
from factory.steps import StepContext  # noqa: E402
from factory.steps.runner import execute, prepare, stamp_generated  # noqa: E402
from factory.trainer import RewardModel, train  # noqa: E402
from factory.trainer.data import PairData, kfold_by_prompt, pair_data  # noqa: E402
from factory.trainer.evaluate import score_pairs  # noqa: E402
from factory.trainer.robustness import master_key_fpr, mine_contrast_pairs  # noqa: E402
from generators.master_keys import DEFAULT_KEYS  # noqa: E402
from schemas.prompts import last_user_text  # noqa: E402
from schemas.readers import read_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
TAU = DATA / "trajectories" / "tau-bench-airline-gpt4o.jsonl"

# Keys the master_keys generator trains with (listed) and keys it never sees (unseen):
# one of each family of the paper's list held out, plus new keys in the same families.
HELD_OUT_KEYS = (",", "Solution", "かいせつ")
LISTED_KEYS = tuple(k for k in DEFAULT_KEYS if k not in HELD_OUT_KEYS)
NEW_KEYS = ("Answer:", "Sure.", "Let me think.", "答案", "Réponse", "...", "Step 1:")
UNSEEN_KEYS = HELD_OUT_KEYS + NEW_KEYS
GENERATORS = ("master_keys", "causal", "neutral", "hard_negatives")
RUNS = (*GENERATORS, "all", "residual", "ref")  # the base always runs: every accuracy is paired with it
# Neutral rewrites of held-out answers (style only: no unrelated-prompt pairs).
STYLE_TRANSFORMS = ["list_to_prose", "prose_to_list", "markdown_off", "markdown_on", "whitespace",
                    "casing", "preamble", "signoff", "padding"]

# The training recipe every run uses, the base included (chosen by the sweeps in the issue
# note). "pair+parts" features: the answer read alone and its match with the prompt (with the
# joint reading alone, a key after a long prompt embeds like the prompt). Best epoch by the
# real validation pairs' loss. Per generator, its pairs together weigh this share of the
# real ones: the smallest that still meets its robustness target (more costs in-distribution
# accuracy); neutral ties 10x, as the tie loss pulls weakly near Δ = 0 (gradient ~Δ/4).
RECIPE: dict[str, Any] = {
    "features": "pair+parts",
    "val_on": "real",
    "augment_weight": {"master_keys": 0.25, "causal": 0.1, "hard_negatives": 0.25, "neutral": 10.0},
}

RECIPE_EPOCHS = 30  # the head mode default, for the trajectory note

TARGETS = {
    "mk_listed": "< 2%", "mk_unseen": "< 5%", "ci": "+10 pts vs base", "tie_ratio": "<= 0.5x base",
    "acc": ">= base - 1 pt", "length_bias": "within ±5 pts", "trajectory": "> real pairs only",
}


# --------------------------------------------------------------------------- data


def read(name: str, task: str | None = None) -> pa.Table:
    table = read_path(DATA / name, on_error="quarantine").table
    if task is not None:  # e.g. HH harmless: no unrelated-prompt ties for safety data
        table = table.set_column(table.schema.get_field_index("task"), "task", pa.array([task] * table.num_rows))
    return table


def sample(table: pa.Table, n: int | None, seed: int) -> pa.Table:
    if n is None or table.num_rows <= n:
        return table
    pick = np.sort(np.random.default_rng(seed).choice(table.num_rows, n, replace=False))
    return table.take(pick)


def generate(step: str, table: pa.Table, settings: dict[str, Any], seed: int, home: Path) -> pa.Table:
    """The registered step run in-process, with the runner's provenance stamping."""
    prepared = prepare("generator", step, {k: json.dumps(v) if isinstance(v, list) else str(v)
                                           for k, v in settings.items()})
    ctx = StepContext(step, prepared.params, seed=seed, run_id="bench", home=home, progress=False)
    result = execute(prepared, table, ctx)
    return stamp_generated(result.table, table, pa.array([f"bench:{step}"] * table.num_rows), prepared, ctx)


def concat(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables([t.select(tables[0].column_names) for t in tables], promote_options="default")


@dataclass
class Suite:
    """A pool of real pairs dealt into folds by prompt, the generators' output on the whole
    pool (each fold trains only on the pairs that touch none of its held-out data), and
    the fixed probes every fold evaluates on its held-out share."""

    name: str
    pool: pa.Table
    folds: np.ndarray  # fold of each pool row
    ood: dict[str, pa.Table]
    generated: dict[str, pa.Table] = field(default_factory=dict)
    rewrites: pa.Table | None = None  # neutral style rewrites of pool answers (tie pairs)
    probe_prompts: set[str] = field(default_factory=set)  # prompt ids probed with master keys
    contrast: list[tuple[int, int, float]] = field(default_factory=list)  # pool rows (a, b, cosine)


def build_suite(name: str, args: argparse.Namespace, home: Path) -> Suite:
    seed = args.seed
    if name == "hh":
        pool = read("hh-rlhf-harmless-base-test.jsonl.gz", task="harmless")
    else:
        pool = concat([read("pandalm-testset-v1.json"), read("llmbar/processed-faireval.json"),
                       read("llmbar/processed-llmeval22.json")])
    pool = sample(pool, args.pool_pairs, seed)
    folds = kfold_by_prompt(pool.column("prompt_id").to_pylist(), args.folds, seed)
    ood = {"natural": sample(read("llmbar/natural.json"), args.ood_pairs, seed),
           "mtbench": sample(read("llmbar/processed-mt-bench.json"), args.ood_pairs, seed)}
    suite = Suite(name, pool, folds, ood)
    settings = {
        "master_keys": {"keys": list(LISTED_KEYS), "keys_per_pair": args.keys_per_pair,
                        "first_sentence": first_sentence(name, args), "length_matched": args.length_matched},
        "causal": {"max_per_seed": 1},
        "neutral": {"max_per_seed": args.neutral_per_seed},
        "hard_negatives": {"mode": "contrast", "min_similarity": args.ci_min_sim},
    }
    for step in GENERATORS:
        out = generate(step, pool, settings[step], seed, home)
        suite.generated[step] = sample(out, round(args.aug_fraction * out.num_rows), seed)
    rewrites = generate("neutral", pool, {"transforms": STYLE_TRANSFORMS, "max_per_seed": 1}, seed, home)
    suite.rewrites = sample(rewrites, args.rewrite_pairs, seed)
    data = pair_data(pool)
    prompts = sorted(set(data.prompt_ids[i] for i in np.flatnonzero(~data.tie)))
    pick = np.random.default_rng(seed).permutation(len(prompts))[: args.probe_prompts]
    suite.probe_prompts = {prompts[i] for i in pick}
    suite.contrast = mine_contrast(data, args.ci_min_sim, args.ci_pairs, seed, home)
    return suite


def first_sentence(suite: str, args: argparse.Namespace) -> bool:
    """master_keys' first-sentence cuts: off on HH by default. Its chosen answers are short
    conversational turns (often a refusal), whose first sentence is as good an answer: as
    rejected answers they are label noise there, not the cut-off reasoning of the paper."""
    return args.first_sentence == "on" or (args.first_sentence == "auto" and suite != "hh")


def mine_contrast(data: PairData, min_sim: float, max_pairs: int, seed: int, home: Path) -> list[tuple[int, int, float]]:
    """Contrast-Instructions probes: each prompt with its most similar other instruction in
    [min_sim, 0.995] (both with their own, different chosen answers), a seeded sample."""
    from factory.embed import embed_texts

    first: dict[str, int] = {}
    for i in np.flatnonzero(~data.tie):
        first.setdefault(data.prompt_ids[i], int(i))
    rows = list(first.values())
    instructions = [last_user_text(data.prompts[i]) for i in rows]
    answers = [data.chosen[i] for i in rows]
    pairs = mine_contrast_pairs(instructions, answers, embed_texts(instructions, home=home, progress=False),
                                threshold=min_sim, max_pairs=len(rows))
    pairs = [(rows[a], rows[b], sim) for a, b, sim in pairs]
    if len(pairs) > max_pairs:
        keep = np.sort(np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False))
        pairs = [pairs[i] for i in keep]
    return pairs


def fold_training(suite: Suite, fold: int, gens: list[str]) -> pa.Table:
    """The fold's real training pairs plus the generated pairs that touch none of its held-out
    data: every parent is a training pair, and neither the prompt nor an answer is held out."""
    held = suite.folds == fold
    train = suite.pool.filter(pa.array(~held))
    test = suite.pool.filter(pa.array(held))
    train_ids = set(train.column("pair_id").to_pylist())
    held_prompts = set(test.column("prompt_id").to_pylist())
    held_texts = set(test.column("chosen").to_pylist()) | set(test.column("rejected").to_pylist())
    parts = [train]
    for g in gens:
        table = suite.generated[g]
        parents = table.column("provenance").combine_chunks().field("parent_ids").to_pylist()
        keep = [all(p in train_ids for p in ps) and prompt not in held_prompts and c not in held_texts
                and r not in held_texts
                for ps, prompt, c, r in zip(parents, table.column("prompt_id").to_pylist(),
                                            table.column("chosen").to_pylist(),
                                            table.column("rejected").to_pylist(), strict=True)]
        parts.append(table.filter(pa.array(keep, pa.bool_())))
    return concat(parts)


# --------------------------------------------------------------------------- evaluation


@dataclass
class Scores:
    """What every fold's model said about its held-out share, pooled over the folds."""

    r_c: list[float] = field(default_factory=list)
    r_r: list[float] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    tie_gaps: list[float] = field(default_factory=list)
    tie_gaps_train: list[float] = field(default_factory=list)  # rewrites of the fold's training answers
    tie_gaps_by_transform: dict[str, list[float]] = field(default_factory=dict)  # held-out rewrites
    mk: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: {"listed": [], "unseen": []})
    mk_keys: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    ci_same_prompt: list[bool] = field(default_factory=list)
    ci_same_answer: list[bool] = field(default_factory=list)
    ood: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0
    train_pairs: list[int] = field(default_factory=list)
    model_seconds: list[float] = field(default_factory=list)  # wall time to train each fold model


def score_fold(model: RewardModel, suite: Suite, fold: int, args: argparse.Namespace, into: Scores) -> None:
    data = pair_data(suite.pool)
    held = np.flatnonzero(suite.folds == fold)
    test = data.subset(held)
    r_c, r_r = score_pairs(model, test)
    into.r_c += r_c.tolist()
    into.r_r += r_r.tolist()
    into.rows += held.tolist()
    held_ids = set(test.prompt_ids)
    # master keys: the probe prompts held out in this fold, every key once per prompt
    probe = np.flatnonzero([p in suite.probe_prompts for p in test.prompt_ids])
    if len(probe):
        for label, keys in (("listed", LISTED_KEYS), ("unseen", UNSEEN_KEYS)):
            mk = master_key_fpr(model, test.subset(probe), r_c[probe], r_r[probe], keys=keys,
                                max_prompts=len(probe), seed=args.seed)
            into.mk[label].append((mk["fpr"], mk["comparisons"]))
            for k in keys:
                into.mk_keys.setdefault(k, []).append((mk["by_key"][k]["vs_chosen"], mk["pairs"]))
    # neutral rewrites of held-out answers
    rewrites = suite.rewrites
    parents = rewrites.column("provenance").combine_chunks().field("parent_ids").to_pylist()
    held_pairs = set(test_ids(suite, fold))
    mask = [bool(ps) and all(p in held_pairs for p in ps) for ps in parents]
    if any(mask):
        held_rewrites = rewrites.filter(pa.array(mask))
        n_c, n_r = score_pairs(model, pair_data(held_rewrites))
        into.tie_gaps += np.abs(n_c - n_r).tolist()
        methods = held_rewrites.column("provenance").combine_chunks().field("method").to_pylist()
        for method, gap in zip(methods, np.abs(n_c - n_r).tolist(), strict=True):
            into.tie_gaps_by_transform.setdefault(str(method).split(":", 1)[0], []).append(gap)
    # the same on answers the model trained on: a low ratio here and a high one above means
    # the invariance is learnt but does not carry to unseen answers; high on both, not learnt
    seen = [bool(ps) and not any(p in held_pairs for p in ps) for ps in parents]
    if any(seen):
        n_c, n_r = score_pairs(model, pair_data(rewrites.filter(pa.array(seen))))
        into.tie_gaps_train += np.abs(n_c - n_r).tolist()
    # Contrast Instructions: probes whose first prompt is held out in this fold
    probes = [(a, b) for a, b, _ in suite.contrast if data.prompt_ids[a] in held_ids]
    if probes:
        prompts, responses = [], []
        for a, b in probes:
            prompts += [data.prompts[a], data.prompts[a], data.prompts[b], data.prompts[b]]
            responses += [data.chosen[a], data.chosen[b], data.chosen[b], data.chosen[a]]
        aa, ab, bb, ba = model.reward(prompts, responses).reshape(len(probes), 4).T
        into.ci_same_prompt += (aa > ab).tolist() + (bb > ba).tolist()
        into.ci_same_answer += (aa > ba).tolist() + (bb > ab).tolist()
    for key, table in suite.ood.items():
        ood = pair_data(table)
        o_c, o_r = score_pairs(model, ood)
        into.ood.setdefault(key, []).append(float((o_c[~ood.tie] > o_r[~ood.tie]).mean()))
        mk = master_key_fpr(model, ood, o_c, o_r, keys=UNSEEN_KEYS, max_prompts=args.ood_probe_prompts,
                            seed=args.seed)
        into.ood.setdefault(f"mk_{key}", []).append(mk["fpr"])


def test_ids(suite: Suite, fold: int) -> list[str]:
    return [p for p, f in zip(suite.pool.column("pair_id").to_pylist(), suite.folds, strict=True) if f == fold]


def length_bias(r_c: np.ndarray, r_r: np.ndarray, data: PairData) -> float | None:
    """Share of pairs where the RM prefers the longer answer minus the share where the label does."""
    len_c = text_lengths(data.chosen)
    len_r = text_lengths(data.rejected)
    keep = ~data.tie & (len_c != len_r)
    if not keep.any():
        return None
    chosen_longer = len_c[keep] > len_r[keep]
    rm_prefers_chosen = r_c[keep] > r_r[keep]
    rm_prefers_longer = np.where(chosen_longer, rm_prefers_chosen, ~rm_prefers_chosen)
    return float(rm_prefers_longer.mean() - chosen_longer.mean())


def weighted(rates: list[tuple[float, int]]) -> float | None:
    total = sum(n for _, n in rates)
    return sum(r * n for r, n in rates) / total if total else None


def summarise(scores: Scores, suite: Suite) -> dict[str, Any]:
    data = pair_data(suite.pool).subset(scores.rows)
    r_c, r_r = np.asarray(scores.r_c), np.asarray(scores.r_r)
    pref = ~data.tie
    real_gap = float(np.abs(r_c - r_r)[pref].mean())
    tie_gap = float(np.mean(scores.tie_gaps)) if scores.tie_gaps else None
    ci = scores.ci_same_prompt + scores.ci_same_answer
    models = max(round(len(scores.rows) / max(len(set(scores.rows)), 1)), 1)  # training seeds per fold
    return {
        "train_pairs": int(np.mean(scores.train_pairs)),
        "acc": float((r_c[pref] > r_r[pref]).mean()),
        "models_per_pair": models,
        "held_out_pairs": int((~pair_data(suite.pool).tie[np.unique(scores.rows)]).sum()),
        "length_bias": length_bias(r_c, r_r, data),
        "mk_listed": weighted(scores.mk["listed"]),
        "mk_unseen": weighted(scores.mk["unseen"]),
        "mk_by_key": {k: weighted(v) for k, v in scores.mk_keys.items()},
        "ci": float(np.mean(ci)) if ci else None,
        "ci_same_prompt": float(np.mean(scores.ci_same_prompt)) if ci else None,
        "ci_same_answer": float(np.mean(scores.ci_same_answer)) if ci else None,
        "ci_probes": len(scores.ci_same_prompt) // 2 // models,
        "tie_gap": tie_gap,
        "real_gap": real_gap,
        "tie_ratio": tie_gap / real_gap if tie_gap is not None and real_gap > 0 else None,
        "tie_ratio_train": (float(np.mean(scores.tie_gaps_train)) / real_gap
                            if scores.tie_gaps_train and real_gap > 0 else None),
        "tie_pairs": len(scores.tie_gaps) // models,
        "tie_ratio_by_transform": ({k: float(np.mean(v)) / real_gap for k, v in sorted(scores.tie_gaps_by_transform.items())}
                                   if real_gap > 0 else {}),
        **{f"acc_{k}": float(np.mean(v)) for k, v in scores.ood.items() if not k.startswith("mk_")},
        **{f"mk_unseen_{k[3:]}": float(np.mean(v)) for k, v in scores.ood.items() if k.startswith("mk_")},
        "seconds": scores.seconds,
        "seconds_per_model": float(np.mean(scores.model_seconds)) if scores.model_seconds else None,
    }


# --------------------------------------------------------------------------- trajectories

CORRUPTIONS = ("truncation", "wrong_instruction", "continuation", "action_replacement")


def trajectory_folds(task_ids: list[str], outcomes: list[str], k: int, seed: int) -> dict[str, int]:
    """Fold of each task: tasks with both outcomes (the only ones with real pairs) dealt out
    evenly, then the rest, each group in a seeded order."""
    by_task: dict[str, set[str]] = {}
    for t, o in zip(task_ids, outcomes, strict=True):
        by_task.setdefault(t, set()).add(o)
    mixed = sorted(t for t, o in by_task.items() if {"success", "failure"} <= o)
    rest = sorted(t for t in by_task if t not in set(mixed))
    rng = np.random.default_rng(seed)
    order = [mixed[i] for i in rng.permutation(len(mixed))] + [rest[i] for i in rng.permutation(len(rest))]
    return {t: i % k for i, t in enumerate(order)}


TRAJ_FEATURES = ("pair", "pair+parts")


def run_trajectories(args: argparse.Namespace, home: Path, options: dict[str, Any], work: Path) -> list[dict[str, Any]]:
    """k-fold by task_id, repeated over fold seeds: real pairs of the training tasks alone vs
    real + corruptions of their successful runs, with either head feature set."""
    from schemas.readers.trajectories import read_trajectories

    runs = read_trajectories(TAU)
    variants = {"real pairs only": ()} | {f"real + {c}": (c,) for c in CORRUPTIONS} | {
        "real + all corruptions": CORRUPTIONS}
    if args.quick:
        variants = {k: v for k, v in variants.items() if len(v) != 1}
    correct = {(v, f): [] for v in variants for f in TRAJ_FEATURES}
    sizes = {v: [] for v in variants}
    held_pairs: set[str] = set()
    for repeat in range(args.traj_repeats):
        seed = args.seed + repeat
        fold_of = trajectory_folds(runs["task_id"].to_pylist(), runs["outcome"].to_pylist(), args.traj_folds, seed)
        folds = np.asarray([fold_of[t] for t in runs["task_id"].to_pylist()])
        for fold in range(args.traj_folds):
            train_runs, held_runs = runs.filter(pa.array(folds != fold)), runs.filter(pa.array(folds == fold))
            held = generate("trajectories", held_runs, {"kinds": ["natural"], "max_natural_per_task": 0}, seed, home)
            if held.num_rows == 0:
                continue
            held_pairs |= set(held.column("pair_id").to_pylist())
            real = generate("trajectories", train_runs, {"kinds": ["natural"], "max_natural_per_task": 0}, seed, home)
            made = generate("trajectories", train_runs, {"kinds": list(CORRUPTIONS)}, seed, home)
            held_data = pair_data(held)
            for label, kinds in variants.items():
                table = concat([real, made.filter(pc.is_in(made["attribute"], pa.array(list(kinds))))]) if kinds else real
                sizes[label].append(table.num_rows)
                for features in TRAJ_FEATURES:
                    # every trajectory pair is "generated" (natural ones too): no per-generator
                    # weights and no validation split on 70 real pairs
                    opts = {k: v for k, v in options.items() if k not in ("augment_weight", "val_on")}
                    model = fit_model(table, f"traj-{fold}-{len(kinds)}", home, work,
                                      opts | {"features": features, "val_fraction": 0.0, "seed": seed})
                    r_c, r_r = score_pairs(model, held_data)
                    correct[(label, features)] += (r_c > r_r).tolist()
    return [{"run": label, "train_pairs": int(np.mean(sizes[label])), "held_pairs": len(held_pairs),
             "scored": len(correct[(label, TRAJ_FEATURES[0])]),
             **{f"acc_{f}": float(np.mean(correct[(label, f)])) for f in TRAJ_FEATURES}} for label in variants]


# --------------------------------------------------------------------------- runs


def fit_model(table: pa.Table, name: str, home: Path, work: Path, options: dict[str, Any]) -> RewardModel:
    out = work / f"{name}-{time.perf_counter_ns()}"
    result = train(table, name, home=home, out=out, robustness=False, progress=False, **({"mode": "head"} | options))
    return result.model


RESIDUAL = "+ all four, residual on the base"


def fit_residual(real: pa.Table, with_generated: pa.Table, home: Path, work: Path, options: dict[str, Any],
                 share: float) -> RewardModel:
    """The trainer's residual mode: the base trained on the real pairs alone, then
    ``--residual-of`` it on real + generated pairs (reward = base + residual; the real pairs
    are ties for the residual). ``share`` scales the recipe's per-generator weights."""
    base = train(real, "residual-base", home=home, out=work / f"base-{time.perf_counter_ns()}",
                 robustness=False, progress=False, **({"mode": "head"} | options))
    weights = options.get("augment_weight")
    if isinstance(weights, dict):
        weights = {k: v * share for k, v in weights.items()}
    elif weights is not None:
        weights *= share
    # the real pairs are the residual's ties: their validation loss is not "real" BT any more
    opts = {k: v for k, v in options.items() if k != "val_on"} | {"augment_weight": weights,
                                                                 "residual_of": str(base.path)}
    return fit_model(with_generated, "residual", home, work, opts)


def run_suite(suite: Suite, args: argparse.Namespace, home: Path, options: dict[str, Any],
              work: Path) -> list[dict[str, Any]]:
    runs: dict[str, tuple[list[str], dict[str, Any]]] = {"base (real pairs)": ([], options)}
    runs |= {f"+ {g}": ([g], options) for g in GENERATORS if g in args.runs}
    if "all" in args.runs:
        runs["+ all four"] = (list(GENERATORS), options)
    if "residual" in args.runs:
        runs[RESIDUAL] = (list(GENERATORS), options)
    if "ref" in args.runs:
        # the noise floor: the base again with other training seeds (the same data and folds)
        runs["ref: base, other training seeds"] = ([], options | {"seed": options.get("seed", 0) + args.train_seeds})
    if "ref" in args.runs and options.get("features", "pair") != "pair":  # the same on "pair" features
        plain = options | {"features": "pair"}
        runs |= {"ref: base, pair features": ([], plain), "ref: + all four, pair features": (list(GENERATORS), plain)}
    rows: list[dict[str, Any]] = []
    base_rate = np.zeros(0)
    for label, (gens, opts) in runs.items():
        scores = Scores()
        started = time.perf_counter()
        for fold in range(args.only_folds or args.folds):
            table = fold_training(suite, fold, gens)
            scores.train_pairs.append(table.num_rows)
            # several training seeds per fold: a head's accuracy moves by a point or two with
            # its seed alone, more than the effects measured here; every metric pools them
            for k in range(args.train_seeds):
                seeded = opts | {"seed": opts.get("seed", 0) + k}
                fit_started = time.perf_counter()  # the cost column: training (and filling caches) only
                if label == RESIDUAL:
                    model = fit_residual(fold_training(suite, fold, []), table, home, work, seeded, args.residual_share)
                else:
                    model = fit_model(table, f"{suite.name}-{len(gens)}", home, work, seeded)
                scores.model_seconds.append(time.perf_counter() - fit_started)
                score_fold(model, suite, fold, args, scores)
        scores.seconds = time.perf_counter() - started
        row = {"run": label, **summarise(scores, suite)}
        rate = correct_rate(scores, suite)
        if not rows:
            base_rate = rate
        # paired with the base run: each held-out pair's share of seeds that got it right
        diff = rate - base_rate
        row["acc_diff"], row["acc_diff_se"] = float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(len(diff)))
        rows.append(row)
        print(f"  {suite.name} {label}: {scores.seconds:.0f}s", file=sys.stderr, flush=True)
    return rows


def correct_rate(scores: Scores, suite: Suite) -> np.ndarray:
    """Per held-out preference pair (in pool order), the share of its models that ranked it right."""
    rows = np.asarray(scores.rows)
    right = np.asarray(scores.r_c) > np.asarray(scores.r_r)
    n = suite.pool.num_rows
    rate = np.bincount(rows, weights=right, minlength=n) / np.maximum(np.bincount(rows, minlength=n), 1)
    return rate[~pair_data(suite.pool).tie & (np.bincount(rows, minlength=n) > 0)]


def pct(v: Any, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:+.1f}" if signed else f"{100 * v:.1f}"


def print_suite(title: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n### {title}\n")
    header = ("run", "train pairs", "acc %", "Δ acc pts", "Natural %", "MT-Bench %", "MK listed %", "MK unseen %",
              "MK unseen OOD %", "CI cons. %", "tie ratio", "tie ratio (train answers)", "length bias pts",
              "s / fold model")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        ood_mk = np.mean([r["mk_unseen_natural"], r["mk_unseen_mtbench"]])
        diff = f"{pct(r['acc_diff'], True)}±{pct(r['acc_diff_se'])}" if r is not rows[0] else "-"
        cells = [r["run"], str(r["train_pairs"]), pct(r["acc"]), diff, pct(r["acc_natural"]), pct(r["acc_mtbench"]),
                 pct(r["mk_listed"]), pct(r["mk_unseen"]), pct(float(ood_mk)), pct(r["ci"]),
                 f"{r['tie_ratio']:.2f}" if r["tie_ratio"] is not None else "n/a",
                 f"{r['tie_ratio_train']:.2f}" if r.get("tie_ratio_train") is not None else "n/a",
                 pct(r["length_bias"], True),
                 f"{r['seconds_per_model']:.0f}" if r.get("seconds_per_model") is not None else "n/a"]
        print("| " + " | ".join(cells) + " |")
    base = rows[0]
    print(f"\n{base['held_out_pairs']} held-out preference pairs, each scored by {base['models_per_pair']} "
          f"models (training seeds); MK: "
          f"{len(LISTED_KEYS)} listed / {len(UNSEEN_KEYS)} unseen keys on the probe prompts; CI: "
          f"{base['ci_probes']} contrast probes x 4 comparisons; tie ratio over {base['tie_pairs']} neutral "
          f"rewrites (base |Δ| {base['tie_gap']:.3f} vs {base['real_gap']:.3f} on real pairs)")
    if base.get("tie_ratio_by_transform"):
        print("\ntie ratio on held-out rewrites by transform (" + ", ".join(
            f"{r['run']}: " + " ".join(f"{k} {v:.2f}" for k, v in r["tie_ratio_by_transform"].items())
            for r in rows if r.get("tie_ratio_by_transform")) + ")")


def verdicts(title: str, rows: list[dict[str, Any]]) -> list[str]:
    """Each target checked on the run it concerns and on all four generators together."""
    rows = [r for r in rows if not r["run"].startswith("ref:") and r["run"] != RESIDUAL]
    by = {r["run"]: r for r in rows}
    if not all(f"+ {g}" in by for g in (*GENERATORS, "all four")):
        return [f"{title}: targets are checked when every run is made (--runs {','.join(RUNS)})"]
    base, both = by["base (real pairs)"], by["+ all four"]
    out = []

    def line(name: str, ok: bool, detail: str) -> None:
        out.append(f"{title}: {name} ({TARGETS[name.split()[0]]}): {'MET' if ok else 'NOT MET'} - {detail}")

    def measured(name: str, *runs: dict[str, Any], key: str) -> bool:
        if all(r[key] is not None for r in (base, *runs)):
            return True
        out.append(f"{title}: {name} ({TARGETS[name]}): NOT MEASURED - no probes in this slice of the data")
        return False

    for key in ("mk_listed", "mk_unseen"):
        limit = 0.02 if key == "mk_listed" else 0.05
        if measured(key, by["+ master_keys"], both, key=key):
            got = [by["+ master_keys"][key], both[key]]
            line(f"{key}", all(v < limit for v in got),
                 f"base {pct(base[key])}%, +master_keys {pct(got[0])}%, all {pct(got[1])}%")
    if measured("ci", by["+ hard_negatives"], both, key="ci"):
        got = [by["+ hard_negatives"]["ci"] - base["ci"], both["ci"] - base["ci"]]
        line("ci", all(v >= 0.10 for v in got), f"base {pct(base['ci'])}%, +hard_negatives {pct(got[0], True)} "
             f"pts, all {pct(got[1], True)} pts")
    if measured("tie_ratio", by["+ neutral"], both, key="tie_ratio"):
        got = [by["+ neutral"]["tie_ratio"] / base["tie_ratio"], both["tie_ratio"] / base["tie_ratio"]]
        line("tie_ratio", all(v <= 0.5 for v in got), f"base {base['tie_ratio']:.2f}, +neutral x{got[0]:.2f}, "
             f"all x{got[1]:.2f}")
    line("acc", all(r["acc_diff"] >= -0.01 for r in rows[1:]),
         ", ".join(f"{r['run'].lstrip('+ ')} {pct(r['acc_diff'], True)}±{pct(r['acc_diff_se'])}" for r in rows[1:])
         + " pts vs base (± paired standard error)")
    biases = {r["run"].lstrip("+ "): r["length_bias"] for r in rows[1:]}
    line("length_bias", all(abs(v) <= 0.05 for v in biases.values() if v is not None),
         f"base {pct(base['length_bias'], True)}, " + ", ".join(f"{k} {pct(v, True)}" for k, v in biases.items()))
    return out


def mode_options(mode: str) -> dict[str, Any]:
    """Trainer options of a ``--modes`` entry: head, tokens, full or top-k:N."""
    name, _, layers = mode.partition(":")
    if name == "top-k" and layers.isdigit() and int(layers) >= 1:
        return {"mode": "top-k", "trainable_layers": int(layers)}
    if name in ("head", "tokens", "full") and not layers:
        return {"mode": name}
    raise SystemExit(f"--modes: unknown mode {mode!r} (head, tokens, full or top-k:N with N >= 1)")


def _cost(row: dict[str, Any] | None) -> str:
    return f"{row['seconds_per_model']:.0f}" if row and row.get("seconds_per_model") is not None else "n/a"


def print_modes(title: str, by_mode: dict[str, list[dict[str, Any]]]) -> None:
    """The modes side by side: base accuracy against head mode's, and the cost of a fold model."""
    print(f"\n### {title}: modes compared\n")
    print("| mode | base acc % | base acc vs head pts | + all four acc % | s / fold model (base) "
          "| s / fold model (+ all four) |")
    print("|---|---|---|---|---|---|")
    head = by_mode.get("head", [None])[0]
    for mode, rows in by_mode.items():
        by = {r["run"]: r for r in rows}
        base, both = by["base (real pairs)"], by.get("+ all four")
        vs_head = pct(base["acc"] - head["acc"], True) if head is not None else "n/a"
        print(f"| {mode} | {pct(base['acc'])} | {vs_head} | {pct(both['acc']) if both else 'n/a'} | {_cost(base)} "
              f"| {_cost(both)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", default="hh,shared,trajectories",
                    help="comma-separated: hh, shared (PandaLM + LLMBar), trajectories (τ-bench)")
    ap.add_argument("--quick", action="store_true", help="smaller caps (a first look; noisier numbers)")
    ap.add_argument("--home", type=Path, default=None, help="embedding cache home (default $PREFAB_HOME or ./.prefab)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--folds", type=int, default=None, help="folds by prompt (default 5; quick 3)")
    ap.add_argument("--aug-fraction", type=float, default=None,
                    help="share of each generator's output used (default 0.5; quick 0.3)")
    ap.add_argument("--pool-pairs", type=int, default=None, help="cap on real pairs per suite (default all; quick 1000)")
    ap.add_argument("--ood-pairs", type=int, default=None, help="cap on pairs per OOD set (default all)")
    ap.add_argument("--keys-per-pair", type=int, default=1, help="master keys drawn per seed pair")
    ap.add_argument("--first-sentence", choices=["auto", "on", "off"], default="auto",
                    help="master_keys' first-sentence negatives (auto: off on HH, on elsewhere)")
    ap.add_argument("--length-matched", type=float, default=0.0,
                    help="master_keys' length_matched: share of keys stretched to the chosen answer's length")
    ap.add_argument("--neutral-per-seed", type=int, default=1, help="neutral rewrites per seed pair (0: all)")
    ap.add_argument("--probe-prompts", type=int, default=None, help="prompts probed with master keys (default 150)")
    ap.add_argument("--ood-probe-prompts", type=int, default=None, help="OOD prompts probed with unseen keys (default 40)")
    ap.add_argument("--rewrite-pairs", type=int, default=None, help="neutral rewrites for the tie ratio (default 600)")
    ap.add_argument("--ci-pairs", type=int, default=None, help="Contrast-Instructions probes (default 300)")
    ap.add_argument("--ci-min-sim", type=float, default=0.6,
                    help="lowest instruction cosine of a contrast pair, in training (hard_negatives) and probes")
    ap.add_argument("--residual-share", type=float, default=1.0,
                    help="the residual-head experiment's generated-pair weights, as a multiple of the recipe's")
    ap.add_argument("--train-seeds", type=int, default=None,
                    help="heads trained per fold with different seeds, metrics pooled (default 3; quick 1)")
    ap.add_argument("--only-folds", type=int, default=None,
                    help="train and score only the first N folds (a cheaper look, e.g. full fine-tuning on CPU)")
    ap.add_argument("--traj-folds", type=int, default=5, help="folds over τ-bench task ids")
    ap.add_argument("--traj-repeats", type=int, default=None, help="fold seeds for trajectories (default 3; quick 1)")
    ap.add_argument("--recipe", type=json.loads, default=None,
                    help="JSON of trainer options replacing the recipe (e.g. '{\"val_on\": \"all\"}')")
    ap.add_argument("--runs", type=lambda v: [r.strip() for r in v.split(",") if r.strip()], default=list(RUNS),
                    help=f"runs besides the base (default all: {','.join(RUNS)})")
    ap.add_argument("--modes", type=lambda v: [m.strip() for m in v.split(",") if m.strip()], default=["head"],
                    help="trainer modes, each running every row: head, tokens, top-k:N (N trainable layers), "
                         "full; e.g. head,tokens,top-k:1 (default head)")
    ap.add_argument("--json", type=Path, default=None, help="also write every number here")
    args = ap.parse_args()
    quick = args.quick
    defaults = {"folds": (3, 5), "aug_fraction": (0.3, 0.5), "pool_pairs": (1000, None),
                "probe_prompts": (60, 150), "ood_probe_prompts": (20, 40), "rewrite_pairs": (250, 600),
                "ci_pairs": (150, 300), "traj_repeats": (1, 3), "train_seeds": (1, 3)}
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    if quick:
        args.traj_folds = min(args.traj_folds, 3)
    if not (DATA / "hh-rlhf-harmless-base-test.jsonl.gz").is_file():
        sys.exit(f"benchmark data not found under {DATA}")
    if unknown := set(args.runs) - set(RUNS):
        ap.error(f"unknown runs {sorted(unknown)}; choose from {','.join(RUNS)}")
    home = resolve_home(args.home)
    options = dict(RECIPE if args.recipe is None else args.recipe)
    for mode in args.modes:
        mode_options(mode)  # a misspelt mode fails now, not after the first suite
    options |= mode_options(args.modes[0])  # trajectories train in the first mode
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    results: dict[str, Any] = {"recipe": options, "args": {k: str(v) for k, v in vars(args).items()}}
    lines: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        titles = {"hh": "HH-RLHF harmless", "shared": "PandaLM + LLMBar FairEval/LLMEval²"}
        for name in [s for s in suites if s in titles]:
            t0 = time.perf_counter()
            suite = build_suite(name, args, home)
            print(f"{name}: {suite.pool.num_rows} real pairs in {args.folds} folds by prompt; generated (all folds) "
                  + ", ".join(f"{g} {t.num_rows}" for g, t in suite.generated.items())
                  + f"; prepared in {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
            by_mode: dict[str, list[dict[str, Any]]] = {}
            for mode in args.modes:
                rows = run_suite(suite, args, home, options | mode_options(mode), work)
                by_mode[mode] = rows
                results.setdefault(name, rows)  # the first mode's rows (one mode: the only ones)
                results.setdefault("by_mode", {})[f"{name} {mode}"] = rows
                folds = f"{args.only_folds} of {args.folds}" if args.only_folds else str(args.folds)
                print_suite(f"{titles[name]}, {mode} mode: {folds}-fold by prompt x {args.train_seeds} training "
                            "seeds; OOD LLMBar Natural and MT-Bench", rows)
                lines += verdicts(name if len(args.modes) == 1 else f"{name} [{mode}]", rows)
            if len(args.modes) > 1:
                print_modes(titles[name], by_mode)
        if "trajectories" in suites:
            rows = run_trajectories(args, home, options, work)
            results["trajectories"] = rows
            print(f"\n### τ-bench airline trajectory RM ({args.traj_folds} folds by task_id x {args.traj_repeats} "
                  "fold seeds; accuracy on the held-out tasks' real success-vs-failure pairs)\n")
            print("| run | train pairs / fold | acc % (pair features) | acc % (pair+parts) |")
            print("|---|---|---|---|")
            for r in rows:
                print(f"| {r['run']} | {r['train_pairs']} | {pct(r['acc_pair'])} | {pct(r['acc_pair+parts'])} |")
            print(f"\n{rows[0]['held_pairs']} distinct held-out pairs from the tasks with both outcomes, each scored "
                  f"{args.traj_repeats}x (fold seeds); no validation split, {RECIPE_EPOCHS} epochs")
            both = next(r for r in rows if r["run"] == "real + all corruptions")
            for f in TRAJ_FEATURES:
                ok = both[f"acc_{f}"] > rows[0][f"acc_{f}"]
                lines.append(f"trajectories ({f}): trajectory ({TARGETS['trajectory']}): {'MET' if ok else 'NOT MET'} - "
                             f"real only {pct(rows[0][f'acc_{f}'])}%, + all corruptions {pct(both[f'acc_{f}'])}%")
    print(f"\nrecipe: {options.get('mode', 'head')} mode, {json.dumps(options)}; {time.perf_counter() - started:.0f}s in all")
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
