"""Memory of the trainer's input side: PairData from a pair table, then the token cache.

Each run is a fresh subprocess (its own peak RSS) that, on ``--pairs`` (a Parquet pair file;
by default ``--rows`` distinct pairs, 1M unless given, made from ../shared/data by
``benchmarks/_scale_data.py`` into a temporary folder first; with ``--pairs``, ``--rows``
keeps the first rows):

1. reads the Parquet file (``pyarrow.parquet.read_table``) and builds ``pair_data(table)``;
2. splits it by prompt (``split_by_prompt``, 10% validation) and takes the training rows
   (``PairData.subset``), as head and tokens modes do;
3. tokenizes chosen and rejected into the token cache (``encode_cached``, MiniLM's
   tokenizer, ``--max-length``, into a fresh temporary root), as full mode does.

``new`` is this checkout (texts in lazy Arrow columns, :mod:`factory.columns`); ``old`` is
``--old-ref`` (default 8909446, the last commit before them: every text a Python object), extracted with
``git archive`` into a temporary folder. Figures per phase: wall s, CPU s (user + system of
the process), peak RSS (``ru_maxrss``, whole process: imports, the Arrow table, the
tokenizer) and RSS at the end of the phase.

    python benchmarks/trainer_memory.py                      # both, 1M pairs, max_length 128
    python benchmarks/trainer_memory.py --rows 100000 --which new
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The last commit whose trainer held every text as a Python object.
OLD_REF = "8909446"


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _worker(args: argparse.Namespace) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from factory.trainer.backbones import load_tokenizer, minilm_path
    from factory.trainer.data import pair_data, split_by_prompt
    from factory.trainer.token_cache import encode_cached

    phases = []

    def measure(name: str, run) -> object:
        usage, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = run()
        after = resource.getrusage(resource.RUSAGE_SELF)
        phases.append({"phase": name, "wall_s": time.perf_counter() - wall,
                       "cpu_s": after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime,
                       "peak_rss_mib": after.ru_maxrss / 1024, "rss_mib": _rss_mib()})
        return out

    def read():
        table = pq.read_table(args.pairs)
        return table.slice(0, args.rows) if args.rows else table

    tokenizer = load_tokenizer(minilm_path())
    table = measure("read parquet", read)
    data = measure("pair_data", lambda: pair_data(table))
    train = measure("split + subset", lambda: data.subset(split_by_prompt(data.prompt_ids, 0.1, 0)[0]))
    with tempfile.TemporaryDirectory(prefix="trainer-memory-") as root:
        def tokenize():
            ids = [encode_cached(tokenizer, train.prompts, side, args.max_length, root)
                   for side in (train.chosen, train.rejected)]
            return int(sum(int(np.asarray(i.offsets)[-1]) for i in ids))

        tokens = measure("encode_cached (chosen + rejected)", tokenize)
    print(json.dumps({"pairs": len(data), "train_pairs": len(train), "tokens": tokens, "phases": phases}))


def _run(which: str, code: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--pairs", args.pairs,
               "--rows", str(args.rows), "--max-length", str(args.max_length)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=code, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{which} run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(which=which, process_wall_s=time.perf_counter() - started)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", help="a Parquet pair file (default: make --rows pairs)")
    parser.add_argument("--rows", type=int, default=0, help="first rows only (0: all)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--which", choices=["both", "new", "old"], default="both")
    parser.add_argument("--old-ref", default=OLD_REF, help="the list-based code to compare against")
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    results = []
    with (tempfile.TemporaryDirectory(prefix="trainer-memory-old-") as old_code,
          tempfile.TemporaryDirectory(prefix="trainer-memory-pairs-") as made):
        if not args.pairs:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from _scale_data import write_pairs

            args.rows = args.rows or 1_000_000
            args.pairs = str(write_pairs(Path(made) / "pairs.parquet", args.rows))
        if args.which in ("both", "old"):
            archive = subprocess.run(["git", "archive", args.old_ref], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", old_code], input=archive.stdout, check=True)
            results.append(_run(f"old ({args.old_ref})", Path(old_code), args))
        if args.which in ("both", "new"):
            results.append(_run("new (lazy columns)", ROOT, args))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"pairs: {results[0]['pairs']:,} ({results[0]['train_pairs']:,} train), max_length "
          f"{args.max_length}, tokens {results[0]['tokens']:,}")
    print("| code | phase | wall s | CPU s | peak RSS MiB | RSS after MiB |\n|---|---|---:|---:|---:|---:|")
    for result in results:
        for p in result["phases"]:
            print(f"| {result['which']} | {p['phase']} | {p['wall_s']:.1f} | {p['cpu_s']:.1f} | "
                  f"{p['peak_rss_mib']:.0f} | {p['rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
