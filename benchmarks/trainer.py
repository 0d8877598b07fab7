"""Trainer benchmark: head vs full mode on real preference data, and full mode vs TRL.

Data (read in place from ../shared/data, never copied): HH-RLHF harmless-base test split
into 80/20 by prompt; LLMBar Natural and MT-Bench (LLMBar's processing) as
out-of-distribution evaluation. Full mode and TRL's RewardTrainer run on the same
backbone (all-MiniLM-L6-v2 with a one-output score head), the same pairs, the same token
ids (our prompt-tail/response-head truncation, so TRL filters nothing), seed,
learning rate, batch size, one epoch, fp32, no gradient checkpointing (CPU), dropout
disabled (TRL's default), linear decay without warm-up.

    python benchmarks/trainer.py                 # defaults: 256 full-mode pairs
    python benchmarks/trainer.py --full-pairs 64 --skip-trl   # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from factory.trainer import backbones  # noqa: E402
from factory.trainer.data import PairData, pair_data, split_by_prompt  # noqa: E402
from factory.trainer.evaluate import evaluate_model  # noqa: E402
from factory.trainer.loop import TrainConfig, fit  # noqa: E402
from factory.trainer.model import ModelSpec, RewardModel  # noqa: E402
from schemas.readers import read_path  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SETS = {
    "hh": ("hh-rlhf-harmless-base-test.jsonl.gz", "hh-rlhf-harmless"),
    "natural": ("llmbar/natural.json", "llmbar-natural"),
    "mtbench": ("llmbar/processed-mt-bench.json", "mt-bench"),
}


# --------------------------------------------------------------------------- data


def read_set(key: str) -> PairData:
    name, source = SETS[key]
    path = DATA / name
    table = read_path(path, on_error="quarantine").table
    data = pair_data(table)
    data.sources = [s or source for s in data.sources]
    return data


# --------------------------------------------------------------------------- TRL


def run_trl(model_path: str, train: PairData, cfg: TrainConfig) -> tuple[RewardModel, float, float]:
    """TRL RewardTrainer on the same token ids; returns (model, train seconds, pairs/s)."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tok = backbones.load_tokenizer(model_path)
    chosen = backbones.encode_pairs(tok, train.prompts, train.chosen, cfg.max_length).ids
    rejected = backbones.encode_pairs(tok, train.prompts, train.rejected, cfg.max_length).ids
    dataset = Dataset.from_dict({"chosen_ids": [c.tolist() for c in chosen],
                                 "rejected_ids": [r.tolist() for r in rejected]})
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out, per_device_train_batch_size=cfg.batch_size, num_train_epochs=1,
            learning_rate=cfg.lr, max_length=cfg.max_length, seed=cfg.seed, bf16=False,
            gradient_checkpointing=False, save_strategy="no", report_to="none",
            logging_steps=10, disable_tqdm=True, weight_decay=0.0, warmup_steps=0,
            use_cpu=not torch.cuda.is_available(),
        )
        with backbones.quiet_hf():
            trainer = RewardTrainer(model=model_path, args=args, train_dataset=dataset,
                                    processing_class=tok)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    model = trainer.model.eval()
    spec = ModelSpec("full", model_path, cfg.max_length)
    rm = RewardModel(spec, hf_model=model, tokenizer=tok, device=next(model.parameters()).device)
    return rm, seconds, len(train) / seconds


# --------------------------------------------------------------------------- runs


def evaluate_all(model: RewardModel, sets: dict[str, PairData], probe: int, home: Path) -> dict[str, Any]:
    out = {}
    for key, data in sets.items():
        # Robustness probes on the in-distribution test set only: they cost forward passes.
        m = evaluate_model(model, data, robustness=key == "hh", max_probe_prompts=probe, home=home,
                           progress=False)
        out[key] = m
    return out


def row(label: str, pairs: int, seconds: float, pps: float, ev: dict[str, Any]) -> dict[str, Any]:
    hh = ev["hh"]
    return {
        "run": label, "train_pairs": pairs, "train_s": seconds, "pairs_s": pps,
        "hh_acc": hh["accuracy"], "natural_acc": ev["natural"]["accuracy"],
        "mtbench_acc": ev["mtbench"]["accuracy"], "mk_fpr": hh["master_key"]["fpr"],
        "mk_fpr_rejected": hh["master_key"]["fpr_vs_rejected"], "hh_truncated": hh["truncated_share"],
        "contrast": hh["contrast_instructions"]["consistency"],
        "contrast_pairs": hh["contrast_instructions"]["contrast_pairs"],
    }


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "n/a"
    if pct:
        return f"{100 * v:.1f}"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-pairs", type=int, default=256, help="training pairs for full mode and TRL")
    ap.add_argument("--head-pairs", type=int, default=None, help="cap on head-mode training pairs")
    ap.add_argument("--eval-pairs", type=int, default=300, help="cap on HH test pairs evaluated")
    ap.add_argument("--probe-prompts", type=int, default=60, help="prompts for the robustness probes")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if not (DATA / SETS["hh"][0]).is_file():
        sys.exit(f"benchmark data not found under {DATA}")

    import torch

    hh = read_set("hh")
    train_idx, test_idx = split_by_prompt(hh.prompt_ids, 0.2, args.seed)
    rng = np.random.default_rng(args.seed)
    if len(test_idx) > args.eval_pairs:
        test_idx = np.sort(rng.choice(test_idx, args.eval_pairs, replace=False))
    train = hh.subset(train_idx)
    sets = {"hh": hh.subset(test_idx), "natural": read_set("natural"), "mtbench": read_set("mtbench")}
    print(f"HH-RLHF harmless: {len(train)} train pairs / {len(sets['hh'])} test pairs (split by prompt); "
          f"OOD: LLMBar natural {len(sets['natural'])}, MT-Bench {len(sets['mtbench'])}; "
          f"torch threads {torch.get_num_threads()}, device {backbones.pick_device()}", flush=True)
    rows = []
    # One scratch home for the run: embedding caches (trainer and contrast mining) live there.
    scratch = tempfile.TemporaryDirectory()
    home = Path(scratch.name)
    for label in ("head (cold cache)", "head (warm cache)"):
        started = time.perf_counter()
        res = fit(train, TrainConfig(mode="head", max_length=args.max_length, seed=args.seed,
                                     val_fraction=0.0, progress=False,
                                     max_pairs=args.head_pairs), cache_root=home / "embeddings")
        wall = time.perf_counter() - started  # embedding included: what a user waits
        ev = evaluate_all(res.model, sets, args.probe_prompts, home)
        n = len(res.train_idx)
        rows.append(row(label, n, wall, n / wall, ev))
        print(f"  {label}: {wall:.1f}s (embedding {res.embed_seconds:.1f}s)", flush=True)

    full_cfg = TrainConfig(mode="full", epochs=1, lr=args.lr, batch_size=args.batch_size,
                           max_length=args.max_length, seed=args.seed, val_fraction=0.0,
                           max_pairs=args.full_pairs, progress=False, checkpoint_steps=0)
    res = fit(train, full_cfg)
    sub = train.subset(res.train_idx)
    ev = evaluate_all(res.model, sets, args.probe_prompts, home)
    # The training loop alone, as TRL's trainer.train() is timed below.
    rows.append(row("full (prefab)", len(sub), res.train_seconds, res.stats["train_pairs_per_second"], ev))
    print(f"  full (prefab): {res.train_seconds:.1f}s", flush=True)
    del res

    if not args.skip_trl:
        trl_model, seconds, pps = run_trl(backbones.minilm_path(), sub, full_cfg.resolved())
        ev = evaluate_all(trl_model, sets, args.probe_prompts, home)
        rows.append(row("full (TRL RewardTrainer)", len(sub), seconds, pps, ev))
        print(f"  TRL: {seconds:.1f}s", flush=True)
    scratch.cleanup()

    header = ("run", "pairs", "train s", "pairs/s", "HH acc %", "Natural %", "MT-Bench %",
              "MK FPR % (vs chosen)", "MK % vs rejected", "CI cons. %", "CI pairs", "HH cut %")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        cells = [r["run"], str(r["train_pairs"]), fmt(r["train_s"]), fmt(r["pairs_s"]),
                 fmt(r["hh_acc"], True), fmt(r["natural_acc"], True), fmt(r["mtbench_acc"], True),
                 fmt(r["mk_fpr"], True), fmt(r["mk_fpr_rejected"], True), fmt(r["contrast"], True),
                 str(r["contrast_pairs"]), fmt(r["hh_truncated"], True)]
        print("| " + " | ".join(cells) + " |")
    if not args.skip_trl:
        ours, trl = rows[-2], rows[-1]
        print(f"\nfull mode vs TRL: throughput ratio {ours['pairs_s'] / trl['pairs_s']:.2f}x "
              f"(target >= 1.0); HH accuracy difference {100 * (ours['hh_acc'] - trl['hh_acc']):+.1f} "
              f"points, Natural {100 * (ours['natural_acc'] - trl['natural_acc']):+.1f}, "
              f"MT-Bench {100 * (ours['mtbench_acc'] - trl['mtbench_acc']):+.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
