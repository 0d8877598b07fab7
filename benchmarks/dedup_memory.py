"""Memory of dedup's near=embedding matching stage: float16 memory maps against the old float32 path.

Data: ``--rows`` synthetic rows of ``--parts`` parts (prompt, chosen, rejected) of ``--dim``
dimensions, like MiniLM embeddings: unit vectors around 1,000 topic centres of a 48-dimensional
latent space mapped into ``dim`` dimensions plus a little isotropic noise, a row's parts on the
same topic (see ``benchmarks/neighbours.py``), fixed seed; 1% of the rows of the second half
are planted near duplicates of a random earlier row (each part that row's plus noise of norm ~0.3,
renormalised), so what is found can be checked.

Each run is a fresh subprocess (its own peak RSS), timing ``best_earlier_match`` on the parts
as the dedup step hands them over:

- ``new``: float16 ``.npy`` memory maps (as ``filters.dedup._near_embedding`` writes them),
  written ``READ_ROWS`` rows at a time, so generating them holds no whole part;
- ``old``: float32 arrays in memory, matched by the code of ``--old-ref`` (default: the commit
  before the float16 maps), extracted with ``git archive`` into a temporary folder: it held
  every part and normalised float32 copies of them, int64 candidates of all parts at once.

Peak RSS is ``ru_maxrss`` of the subprocess (data generation included; for ``old`` the float32
parts are part of what the old step held); anonymous and file-backed (mapped pages) peaks
are sampled every 0.1 s from ``/proc/self/status``.

    python benchmarks/dedup_memory.py                          # new at 1M, old at 250k
    python benchmarks/dedup_memory.py --rows 250000 --old-rows 250000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

OLD_REF = "a017830"  # h-f16's base: float32 parts, int64 candidates of every part at once
CHUNK = 65_536
LATENT, TOPICS = 48, 1000
NOISE = 0.015  # per coordinate: noise of norm ~0.3 at 384 dims, a cosine of ~0.95 to the source


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Sampler(threading.Thread):
    """Peaks of RssAnon and RssFile, sampled."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.anon = self.file = 0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.file = max(self.file, _status_kib("RssFile"))
            time.sleep(0.1)


def _generate(rows: int, parts: int, dim: int, out: list[np.ndarray], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fill ``out`` (parts arrays or maps, (rows, dim)) a chunk at a time; returns the planted
    (later, source) rows."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(TOPICS, LATENT)).astype(np.float32)
    weights = 1.0 / np.arange(1, TOPICS + 1) ** 0.8
    spread = rng.uniform(0.3, 1.0, size=TOPICS).astype(np.float32)
    mappings = [rng.normal(size=(LATENT, dim)).astype(np.float32) / np.sqrt(LATENT) for _ in range(parts)]
    for start in range(0, rows, CHUNK):
        b = min(CHUNK, rows - start)
        topic = rng.choice(TOPICS, size=b, p=weights / weights.sum())
        for target, mapping in zip(out, mappings, strict=True):
            z = centres[topic] + spread[topic, None] * rng.normal(size=(b, LATENT)).astype(np.float32)
            x = z @ mapping + 0.1 * rng.normal(size=(b, dim)).astype(np.float32)
            target[start:start + b] = x / np.linalg.norm(x, axis=1, keepdims=True)
    later = np.sort(rng.choice(np.arange(rows // 2, rows), size=rows // 200, replace=False))
    source = rng.integers(0, rows // 2, size=len(later))
    for target in out:
        noisy = np.asarray(target[source], dtype=np.float32) + NOISE * rng.normal(size=(len(later), dim)).astype(np.float32)
        target[later] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return later, source


def child(path: str, rows: int, parts: int, dim: int) -> None:
    """One measurement, printed as JSON."""
    sampler = _Sampler()
    sampler.start()
    from factory.embed import best_earlier_match

    with tempfile.TemporaryDirectory(prefix="dedup-memory-") as folder:
        if path == "new":
            files = [Path(folder) / f"part{k}.npy" for k in range(parts)]
            maps = [np.lib.format.open_memmap(f, mode="w+", dtype=np.float16, shape=(rows, dim)) for f in files]
            later, source = _generate(rows, parts, dim, maps)
            while maps:
                maps.pop().flush()
            data = [np.load(f, mmap_mode="r") for f in files]
        else:
            data = [np.empty((rows, dim), dtype=np.float32) for _ in range(parts)]
            later, source = _generate(rows, parts, dim, data)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started, cpu = time.perf_counter(), time.process_time()
        best, sims = best_earlier_match(data)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        del data
    sampler.stop = True
    # a planted row's match is its source, or an earlier planted copy of that source (alike in
    # every part, it may win by noise); either way the row is a near duplicate at 0.85
    found = sims[later] >= 0.85
    print(json.dumps({
        "path": path, "rows": rows, "parts": parts, "dim": dim, "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu, 1),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
        "before_matching_mib": before // 1024,
        "anon_peak_mib": sampler.anon // 1024, "file_peak_mib": sampler.file // 1024,
        "planted": len(later), "planted_found": int(found.sum()),
        "planted_source": int((best[later] == source).sum()),
    }))


def run(path: str, rows: int, parts: int, dim: int, old_ref: str) -> dict:
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="dedup-memory-old-") as old:
        if path == "old":
            archive = subprocess.run(["git", "-C", str(root), "archive", old_ref, "factory", "schemas"],
                                     check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
            env["PYTHONPATH"] = old
        else:
            env["PYTHONPATH"] = str(root)
        done = subprocess.run([sys.executable, __file__, "--child", path, "--rows", str(rows), "--parts",
                               str(parts), "--dim", str(dim)], env=env, capture_output=True, text=True)
    if done.returncode:
        return {"path": path, "rows": rows, "error": (done.stderr or "")[-500:], "returncode": done.returncode}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows for the new path")
    parser.add_argument("--old-rows", type=int, default=250_000,
                        help="rows for the old path (0: skip; 1M float32 needs ~12 GiB)")
    parser.add_argument("--also-new-at-old-rows", action="store_true",
                        help="also run the new path at --old-rows, for a like-for-like row")
    parser.add_argument("--parts", type=int, default=3)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--old-ref", default=OLD_REF)
    parser.add_argument("--child", choices=["new", "old"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rows, args.parts, args.dim)
        return
    runs = []
    if args.old_rows:
        runs.append(("old", args.old_rows))
        if args.also_new_at_old_rows and args.old_rows != args.rows:
            runs.append(("new", args.old_rows))
    runs.append(("new", args.rows))
    print(f"{'path':<5} {'rows':>9} {'parts':>5} {'dim':>4} {'wall s':>7} {'cpu s':>7} {'peak RSS MiB':>12} "
          f"{'anon MiB':>8} {'file MiB':>8} {'planted found':>14}", flush=True)
    for path, rows in runs:
        r = run(path, rows, args.parts, args.dim, args.old_ref)
        if "error" in r:
            print(f"{path:<5} {rows:>9,} failed ({r['returncode']}): {r['error']}", flush=True)
            continue
        print(f"{path:<5} {rows:>9,} {r['parts']:>5} {r['dim']:>4} {r['seconds']:>7.1f} {r['cpu_seconds']:>7.1f} "
              f"{r['peak_rss_mib']:>12,} {r['anon_peak_mib']:>8,} {r['file_peak_mib']:>8,} "
              f"{r['planted_found']:>6}/{r['planted']:<7}", flush=True)
        print("      " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
