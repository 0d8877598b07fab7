"""``prefab train``, ``prefab eval`` and ``prefab models``: Bradley–Terry reward models on
catalog versions."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from factory.cli import CommandResult, home_from
from schemas.errors import PrefabError


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    train = subparsers.add_parser(
        "train", parents=parents, help="train a reward model on a dataset version",
        description=(
            "Train a Bradley–Terry reward model (ties, margins and per-pair weights) on a catalog "
            "version and register it with the version it saw and its metrics. head: frozen "
            "encoder with cached embeddings and a small MLP (fast on CPU); tokens: the frozen "
            "encoder's per-token states (cached) read by a learned attention pooling and the MLP; "
            "top-k: also train the encoder's last --trainable-layers layers on cached states; full: "
            "fine-tune the whole backbone (bf16 and gradient checkpointing on CUDA). With a validation split "
            "the epoch with the lowest validation loss is kept. --resume continues an "
            "interrupted run with the settings (and data) of its checkpoint."
        ),
    )
    # Settings default to None so that --resume can tell a flag given from a default.
    train.add_argument("--data", metavar="REF",
                       help="training data: name, name@N or name@tag (with --resume: the checkpoint's)")
    train.add_argument("--name", required=True, metavar="MODEL",
                       help="model name in the catalog (letters, digits, '_', '.', '-'); one run of a "
                            "name at a time")
    train.add_argument("--base", default=None,
                       help="backbone: 'minilm' (embedded all-MiniLM-L6-v2, the default) or a "
                            "Hugging Face model folder")
    train.add_argument("--mode", choices=["head", "tokens", "top-k", "full"], default=None, help="default: head")
    train.add_argument("--trainable-layers", type=int, default=None, metavar="N",
                       help="top-k mode: train the backbone's last N layers (1 to its layer count)")
    train.add_argument("--eval", action="append", default=[], metavar="REF",
                       help="evaluate on this version after training (repeatable)")
    train.add_argument("--epochs", type=int, default=None,
                       help="at most this many; default 30 (head, tokens), 10 (top-k), 1 (full)")
    train.add_argument("--lr", type=float, default=None,
                       help="default: 1e-3 (head, tokens, top-k: its layers at 1/20 of it), 2e-5 (full)")
    train.add_argument("--batch-size", type=int, default=None,
                       help="pairs per step; default 64 (head, tokens), 32 (top-k), 16 (full)")
    train.add_argument("--max-length", type=int, default=None,
                       help="tokens per prompt+response (default 256); longer pairs lose older "
                            "turns first and keep the end of the response")
    train.add_argument("--patience", type=int, default=None,
                       help="stop after N epochs without a better validation loss (default 5 head and "
                            "tokens, 2 top-k, 1 full; 0: never); the best epoch is kept either way")
    train.add_argument("--seed", type=int, default=None, help="default 0")
    train.add_argument("--val-fraction", type=float, default=None,
                       help="share of prompts held out for validation, split by prompt_id (default 0.1)")
    train.add_argument("--center-rewards", type=float, default=None, metavar="COEF",
                       help="reward-centering coefficient (TRL's center_rewards_coefficient; e.g. 0.01)")
    train.add_argument("--checkpoint-steps", type=int, default=None,
                       help="also checkpoint every N steps (default: 200 in full mode; epochs always)")
    train.add_argument("--features", choices=["pair", "pair+parts"], default=None,
                       help="head, tokens and top-k mode inputs: the prompt+response embedding ('pair', the default), or "
                            "also the response alone and its product with the prompt ('pair+parts')")
    train.add_argument("--head-hidden", type=int, default=None, help="head mode MLP width (default 256; 0: linear)")
    train.add_argument("--augment-weight", type=augment_weight, default=None, metavar="W|GEN=W,…",
                       help="generated pairs (by provenance step) together weigh W times the real pairs, "
                            "balanced by generator; or per generator, e.g. master_keys=0.25,neutral=10")
    train.add_argument("--residual-of", default=None, metavar="MODEL",
                       help="head mode: train a residual on top of this model (trained on the real pairs): "
                            "reward = base + residual, fitted to the generated pairs (a generated tie "
                            "ties in base + residual) while the real pairs count as ties of the residual, "
                            "so their order stays the base's")
    train.add_argument("--val-on", choices=["all", "real"], default=None,
                       help="validation loss (best epoch, early stopping) on all validation pairs or only "
                            "the real, not generated, ones (default all)")
    train.add_argument("--max-pairs", type=int, default=None, help="train on at most N pairs")
    train.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: CUDA when present)")
    train.add_argument("--resume", action="store_true",
                       help="continue the model's interrupted run with its checkpoint's settings")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    train.set_defaults(handler=run_train)

    evaluate = subparsers.add_parser(
        "eval", parents=parents, help="evaluate a reward model on a dataset version",
        description=(
            "Pairwise accuracy over preference pairs (equal rewards count as errors, as in "
            "RewardBench); tie-labelled pairs are left out of it and scored by |Δ| threshold; "
            "share of truncated pairs; per-source/attribute/task breakdown, margin histogram, "
            "master-key false-positive rate and Contrast-Instructions consistency."
        ),
    )
    evaluate.add_argument("model", metavar="MODEL", help="registered model (name or name@N) or a model folder")
    evaluate.add_argument("--data", required=True, metavar="REF", help="evaluation data: name, name@N or name@tag")
    evaluate.add_argument("--max-length", type=int, default=None,
                          help="tokens per prompt+response (default: what the model trained at)")
    evaluate.add_argument("--no-robustness", action="store_true",
                          help="skip the master-key and contrast-instruction probes")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    evaluate.set_defaults(handler=run_eval)

    models = subparsers.add_parser(
        "models", parents=parents, help="list trained reward models",
        description="Registered reward models: version, the dataset version each was trained "
                    "on, mode and base, and key metrics (newest version of each name; --all: every version).",
    )
    models.add_argument("--all", action="store_true", help="list every version, not only the newest")
    models.set_defaults(handler=run_models)


def augment_weight(text: str) -> float | dict[str, float]:
    """``0.5`` or ``master_keys=0.25,neutral=10``."""
    try:
        if "=" not in text:
            return float(text)
        weights = {}
        for part in text.split(","):
            step, _, value = part.partition("=")
            if not step.strip():
                raise ValueError(part)
            weights[step.strip()] = float(value)
        return weights
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected W or GEN=W,GEN=W (e.g. master_keys=0.25,neutral=10), "
                                         f"got {text!r}") from None


def _progress(args: argparse.Namespace) -> bool:
    # Bars and phase lines on a terminal, decided here once: a loaded model's featurizer is
    # quiet unless told (library scoring), so "unset" must not reach it. Never with --json.
    return not (args.no_progress or args.json) and sys.stderr.isatty()


def run_train(args: argparse.Namespace) -> CommandResult:
    from factory.embed import EmbeddingInterrupted
    from factory.trainer import TrainingInterrupted, train
    from factory.trainer.api import EvaluationInterrupted
    from factory.trainer.evaluate import summary_text

    if args.data is None and not args.resume:
        raise PrefabError("--data is required (except with --resume)")
    try:
        result = train(
            args.data, args.name, home=home_from(args), base=args.base, mode=args.mode,
            eval=args.eval, resume=args.resume,
            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
            max_length=args.max_length, seed=args.seed, val_fraction=args.val_fraction,
            center_coef=args.center_rewards, checkpoint_steps=args.checkpoint_steps,
            max_pairs=args.max_pairs, device=args.device, patience=args.patience,
            features=args.features, head_hidden=args.head_hidden, augment_weight=args.augment_weight,
            val_on=args.val_on, residual_of=args.residual_of, trainable_layers=args.trainable_layers,
            progress=_progress(args),
        )
    except EvaluationInterrupted as exc:
        print(f"prefab: {exc}", file=sys.stderr)
        raise
    except TrainingInterrupted as exc:
        print(f"prefab: training stopped at step {exc.step}; checkpoint kept at {exc.checkpoint}; "
              "rerun with --resume to continue", file=sys.stderr)
        raise
    except EmbeddingInterrupted as exc:
        print(f"prefab: {exc}", file=sys.stderr)
        raise
    m = result.metrics
    payload: dict[str, Any] = {
        "model": result.name,
        "version": (result.registered or {}).get("version"),
        "path": str(result.path),
        "dataset": result.dataset,
        "mode": result.params["mode"],
        "base": result.params["base"],
        **m,
    }

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    kept = f"epoch {m['best_epoch']} of {m['epochs_run']}"
    if m["stopped_early"]:
        kept += " (stopped early: no better validation loss)"
    lines = [
        f"trained {result.name} ({result.params['mode']}, base {result.params['base']}) on "
        f"{result.dataset}: {m['train_pairs']} pairs, {m['steps']} steps, {m['total_seconds']:.1f}s "
        f"({m['pairs_per_second']:.1f} pairs/s over the whole run; embedding {m['embed_seconds']:.1f}s, "
        f"training {m['train_seconds']:.1f}s)",
        f"truncated at {m['max_length']} tokens: {m['truncated_pairs']} pairs ({pct(m['truncated_share'])})",
        f"validation: {m['val_pairs']} pairs, accuracy {pct(m['val_accuracy'])}, loss "
        + ("n/a" if m["val_loss"] is None else f"{m['val_loss']:.4f}") + f"; kept {kept}",
        f"saved to {result.path}",
    ]
    for ref, metrics in (m.get("eval") or {}).items():
        lines.append(summary_text(metrics, title=f"eval on {ref}:"))
    return CommandResult(payload, "\n".join(lines))


def run_eval(args: argparse.Namespace) -> CommandResult:
    from factory.trainer import evaluate
    from factory.trainer.evaluate import summary_text

    metrics = evaluate(args.model, args.data, home=home_from(args), max_length=args.max_length,
                       robustness=not args.no_robustness, seed=args.seed, progress=_progress(args))
    payload = {"model": args.model, **metrics}
    return CommandResult(payload, summary_text(metrics, title=f"{args.model} on {metrics['dataset']}:"))


def _model_row(entry: dict[str, Any]) -> dict[str, Any]:
    m, p = entry["metrics"], entry["params"]
    return {
        "name": entry["name"], "version": entry["version"], "dataset": entry["dataset"],
        "mode": p.get("mode"), "base": p.get("base"), "created_at": entry["created_at"],
        "path": entry["path"],
        "train_pairs": m.get("train_pairs"), "val_accuracy": m.get("val_accuracy"),
        "val_loss": m.get("val_loss"), "best_epoch": m.get("best_epoch"),
        "eval_accuracy": {ref: e.get("accuracy") for ref, e in (m.get("eval") or {}).items()},
    }


def run_models(args: argparse.Namespace) -> CommandResult:
    from factory.catalog import Catalog

    cat = Catalog(home_from(args))
    entries = cat.models()
    if args.all:
        entries = [cat.get_model(f"{e['name']}@{v}") for e in entries for v in range(e["version"], 0, -1)]
    rows = [_model_row(e) for e in entries]
    if not rows:
        return CommandResult({"models": []}, "no trained models yet (prefab train --data REF --name MODEL)")

    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    header = f"{'MODEL':<24} {'MODE':<6} {'DATASET':<24} {'PAIRS':>6} {'VAL ACC':>8} {'VAL LOSS':>8}  EVAL"
    lines = [header]
    for r in rows:
        evals = ", ".join(f"{ref} {pct(acc)}" for ref, acc in r["eval_accuracy"].items()) or "-"
        loss = "n/a" if r["val_loss"] is None else f"{r['val_loss']:.4f}"
        lines.append(f"{r['name'] + '@' + str(r['version']):<24} {r['mode'] or '?':<6} {r['dataset']:<24} "
                     f"{r['train_pairs'] if r['train_pairs'] is not None else '?':>6} "
                     f"{pct(r['val_accuracy']):>8} {loss:>8}  {evals}")
    return CommandResult({"models": rows}, "\n".join(lines))
