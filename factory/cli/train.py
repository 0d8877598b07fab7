"""``prefab train`` and ``prefab eval``: Bradley–Terry reward models on catalog versions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from factory.cli import CommandResult, home_from


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    train = subparsers.add_parser(
        "train", parents=parents, help="train a reward model on a dataset version",
        description=(
            "Train a Bradley–Terry reward model (ties, margins and per-pair weights) on a catalog "
            "version and register it with the version it saw and its metrics. head: frozen "
            "encoder with cached embeddings and a small MLP (fast on CPU); full: fine-tune the "
            "whole backbone (bf16 and gradient checkpointing on CUDA)."
        ),
    )
    train.add_argument("--data", required=True, metavar="REF", help="training data: name, name@N or name@tag")
    train.add_argument("--name", required=True, metavar="MODEL", help="model name in the catalog")
    train.add_argument("--base", default="minilm",
                       help="backbone: 'minilm' (embedded all-MiniLM-L6-v2) or a Hugging Face model folder")
    train.add_argument("--mode", choices=["head", "full"], default="head")
    train.add_argument("--eval", action="append", default=[], metavar="REF",
                       help="evaluate on this version after training (repeatable)")
    train.add_argument("--epochs", type=int, default=None, help="default: 30 (head), 1 (full)")
    train.add_argument("--lr", type=float, default=None, help="default: 1e-3 (head), 2e-5 (full)")
    train.add_argument("--batch-size", type=int, default=None, help="pairs per step; default 64 (head), 16 (full)")
    train.add_argument("--max-length", type=int, default=256, help="tokens per prompt+response (default 256)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--val-fraction", type=float, default=0.1,
                       help="share of prompts held out for validation (split by prompt_id)")
    train.add_argument("--center-rewards", type=float, default=0.0, metavar="COEF",
                       help="reward-centering coefficient (TRL's center_rewards_coefficient; e.g. 0.01)")
    train.add_argument("--checkpoint-steps", type=int, default=None,
                       help="also checkpoint every N steps (default: 200 in full mode; epochs always)")
    train.add_argument("--max-pairs", type=int, default=None, help="train on at most N pairs")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    train.add_argument("--resume", action="store_true", help="continue from the model's last checkpoint")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "eval", parents=parents, help="evaluate a reward model on a dataset version",
        description=(
            "Pairwise accuracy (ties in reward count as errors, as in RewardBench), accuracy on "
            "tie pairs by |Δ| threshold, per-source/attribute/task breakdown, margin histogram, "
            "master-key false-positive rate and Contrast-Instructions consistency."
        ),
    )
    evaluate.add_argument("model", metavar="MODEL", help="registered model (name or name@N) or a model folder")
    evaluate.add_argument("--data", required=True, metavar="REF", help="evaluation data: name, name@N or name@tag")
    evaluate.add_argument("--no-robustness", action="store_true",
                          help="skip the master-key and contrast-instruction probes")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(handler=run_eval)


def run_train(args: argparse.Namespace) -> CommandResult:
    from factory.trainer import TrainingInterrupted, train
    from factory.trainer.evaluate import summary_text

    try:
        result = train(
            args.data, args.name, home=home_from(args), base=args.base, mode=args.mode,
            eval=args.eval, resume=args.resume,
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            max_length=args.max_length, seed=args.seed, val_fraction=args.val_fraction,
            center_coef=args.center_rewards, checkpoint_steps=args.checkpoint_steps,
            max_pairs=args.max_pairs, device=args.device,
            progress=not (args.no_progress or args.json),
        )
    except TrainingInterrupted as exc:
        print(f"prefab: training stopped at step {exc.step}; checkpoint kept at {exc.checkpoint}; "
              "rerun with --resume to continue", file=sys.stderr)
        raise
    m = result.metrics
    payload: dict[str, Any] = {
        "model": result.name,
        "version": (result.registered or {}).get("version"),
        "path": str(result.path),
        "dataset": result.dataset,
        "mode": args.mode,
        "base": args.base,
        **m,
    }

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"trained {result.name} ({args.mode}, base {args.base}) on {result.dataset}: "
        f"{m['train_pairs']} pairs, {m['steps']} steps, {m['train_seconds']:.1f}s "
        f"({m['pairs_per_second']:.1f} pairs/s)",
        f"validation: {m['val_pairs']} pairs, accuracy {pct(m['val_accuracy'])}, loss "
        + ("n/a" if m["val_loss"] is None else f"{m['val_loss']:.4f}"),
        f"saved to {result.path}",
    ]
    for ref, metrics in (m.get("eval") or {}).items():
        lines.append(summary_text(metrics, title=f"eval on {ref}:"))
    return CommandResult(payload, "\n".join(lines))


def run_eval(args: argparse.Namespace) -> CommandResult:
    from factory.trainer import evaluate
    from factory.trainer.evaluate import summary_text

    metrics = evaluate(args.model, args.data, home=home_from(args),
                       robustness=not args.no_robustness, seed=args.seed)
    payload = {"model": args.model, **metrics}
    return CommandResult(payload, summary_text(metrics, title=f"{args.model} on {metrics['dataset']}:"))
