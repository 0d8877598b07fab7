"""Scale benchmark: every step of the factory at 10k, 100k and 1M pairs — wall time, rows/s, peak RSS.

    python benchmarks/scale.py                                  # 10k and 100k, every step
    python benchmarks/scale.py --sizes 10k,100k,1M --out results.json
    python benchmarks/scale.py --sizes 1M --steps ingest,merge,causal,export_trl --keep-home /data/scale
    python benchmarks/scale.py --ray                            # also the steps that take --engine ray
    python benchmarks/scale.py --ray-only --keep-home DIR --out ray.json   # only those, joined later:
    python benchmarks/scale.py --table-from local.json ray.json           # one table from saved runs

Data: pairs drawn from the real human-labelled sets in ../shared/data (HH-RLHF harmless,
PandaLM, LLMBar: about 3,900 pairs), each copy perturbed so every prompt and pair is distinct
(``benchmarks/_scale_data.py``: a quarter of the plain words replaced, seeded by row, and
the row number on the last prompt turn; labels, ties and votes kept). Short answers ("Yes.")
still repeat across copies, as they do in real data. Written as Parquet in chunks.

Each step is the real CLI (``python -m factory ...``) in its own process, started by a tiny
wrapper process that reports its child's wall time and peak RSS
(``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest single process, the whole CLI
process with its imports and models, not a baseline-subtracted figure). One fresh home per
size. The steps, all on the ingested pairs ``seeds`` (N rows) unless said:

- ``ingest``: ``prefab ingest FILE.parquet --format parquet``;
- ``master_keys``: ``keys_per_pair=1`` (one key and one first-sentence cut per seed: about
  2 rows out per seed instead of 11 with every key; the work per output row is the same);
- ``causal``, ``neutral``: rules mode, ``max_per_seed=1`` (one pair per seed, drawn from the
  attributes/transforms, instead of up to 4 and 10): the step still reads every seed;
- ``merge``: ``catalog merge seeds causal`` (2N rows in);
- ``dedup_minhash``, ``dedup_embedding``: ``filter dedup --set near=minhash|embedding``;
- ``hard_negatives``: contrast mode, defaults;
- ``noise``: ``filter noise`` (head mode: out-of-fold reward heads on frozen MiniLM), defaults;
- ``noise_static``: the same with ``base=static embedder=static`` (every vector from the
  static model distilled from MiniLM: no transformer runs);
- ``train``: ``prefab train --mode head`` on seeds, defaults;
- ``audit``: ``prefab audit seeds --no-compute --html``: reuses the noise step's stored
  scores where the noise step ran at that size, and reports without noise where it did not
  (so the audit row measures the report, never a second noise run);
- ``export_trl``: ``prefab catalog export seeds --format trl``.

Embedding caches (``embeddings/``, ``noise/``, ``tokens/`` under the home) are cleared before
every step (``--warm-caches`` keeps them), so each step pays for its own embeddings; the
static model distilled under ``embeddings/static-*`` is kept (a one-time set-up per home,
not an embedding: the first step that needs it in a fresh home pays ~20 s for it).

Budget: a step whose projected time at a size (N / the rows/s it reached at the largest
smaller size, or, for the embedding-bound steps at the first size, texts per row /
``--embed-rate`` texts/s) exceeds ``--budget-s`` is not run at that size: its time is
projected from the measured throughput of the largest size it ran at and printed with a
``~`` and a ``projected`` mark (peak RSS is then unknown: ``-``). Linear projection is a
lower bound for steps that grow faster than linearly. A step that runs past
``--step-timeout-s`` (default twice the budget) is stopped and marked ``timeout``.

``--ray`` runs the steps that take ``--engine`` (``generate``/``filter``) again with
``--engine ray`` on a local Ray with 2 CPUs (``RAY_ADDRESS`` unset; prefab's ``ray.init``
sees the machine's cores) as extra rows; each says whether the process started Ray at all
(steps that need the whole table run in the CLI process whatever the engine). Each engine
starts from a copy of the ingested home, since prefab would otherwise return the first
engine's stored versions; a step that reports ``unchanged`` is marked ``cached``, never timed.
Their peak
RSS is the driver's: Ray workers are not waited-for children of the CLI.

The targets table: peak RSS at 1M, row-local growth (ingest, merge, export), the catalog
commit of 1M pairs against ``pq.write_table`` (``benchmarks/catalog.py``'s own steps), the
neighbour index at 100k x 384 (``benchmarks/neighbours.py``'s functions), the static
embedder against MiniLM (``benchmarks/embedders.py``) and the noise filter at 100k.
``--no-targets`` skips the three benchmarks it calls.

Progress goes to stderr; Ctrl+C stops the running step (prefab stops cleanly) and prints the
rows done so far. The tables go to stdout as markdown; ``--out`` writes the raw figures.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CACHES = ("embeddings", "noise", "tokens")
ROW_LOCAL = ("ingest", "merge", "export_trl")
RSS_TARGET_MIB = 4 * 1024


def clear_cache(folder: Path) -> None:
    """Remove a cache folder, but keep the static model distilled under ``embeddings/``: it
    is the home's one-time model set-up (~20 s idle), as MiniLM's weights ship in a package,
    not a step's embedding work (each step still computes every static vector itself)."""
    if folder.name != "embeddings" or not folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
        return
    for child in folder.iterdir():
        if child.name.startswith("static-") and not child.name.endswith(".tmp"):
            continue
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@dataclass(frozen=True)
class Step:
    name: str
    args: tuple[str, ...]          # after `python -m factory`; {file}, {out} filled in
    settings: str                  # what the table says about how it ran
    embedding_texts: float = 0.0   # texts embedded per input row (0: not embedding-bound)
    needs: tuple[str, ...] = ()    # steps whose outputs it reads, besides ingest
    engine: bool = False           # takes --engine ray


STEPS = (
    Step("ingest", ("ingest", "{file}", "--name", "seeds", "--format", "parquet", "--json",
                    "--no-progress"), "parquet file"),
    Step("master_keys", ("generate", "master_keys", "--from", "seeds", "--name", "mk", "--set",
                         "keys_per_pair=1", "--json", "--no-progress"), "keys_per_pair=1", engine=True),
    Step("causal", ("generate", "causal", "--from", "seeds", "--name", "causal", "--set",
                    "max_per_seed=1", "--json", "--no-progress"), "rules, max_per_seed=1", engine=True),
    Step("neutral", ("generate", "neutral", "--from", "seeds", "--name", "neutral", "--set",
                     "max_per_seed=1", "--json", "--no-progress"), "rules, max_per_seed=1", engine=True),
    Step("merge", ("catalog", "merge", "seeds", "causal", "--name", "merged", "--json"),
         "seeds + causal", needs=("causal",)),
    Step("dedup_minhash", ("filter", "dedup", "--from", "seeds", "--name", "dd-minhash", "--set",
                           "near=minhash", "--json", "--no-progress"), "near=minhash", engine=True),
    Step("dedup_embedding", ("filter", "dedup", "--from", "seeds", "--name", "dd-embedding", "--set",
                             "near=embedding", "--json", "--no-progress"), "near=embedding",
         embedding_texts=3, engine=True),
    Step("hard_negatives", ("generate", "hard_negatives", "--from", "seeds", "--name", "hn", "--json",
                            "--no-progress"), "contrast", embedding_texts=3, engine=True),
    Step("dedup_static", ("filter", "dedup", "--from", "seeds", "--name", "dd-static", "--set",
                          "near=embedding", "--set", "embedder=static", "--set", "near_threshold=0.94",
                          "--json", "--no-progress"), "near=embedding, embedder=static"),
    Step("hard_negatives_static", ("generate", "hard_negatives", "--from", "seeds", "--name", "hn-static",
                                   "--set", "embedder=static", "--json", "--no-progress"),
         "contrast, embedder=static"),
    Step("noise", ("filter", "noise", "--from", "seeds", "--name", "denoised", "--json", "--no-progress"),
         "head (defaults)", embedding_texts=4, engine=True),
    Step("noise_static", ("filter", "noise", "--from", "seeds", "--name", "denoised-static", "--set",
                          "base=static", "--set", "embedder=static", "--json", "--no-progress"),
         "head, base=static embedder=static"),
    Step("train", ("train", "--data", "seeds", "--name", "rm", "--mode", "head", "--json",
                   "--no-progress"), "head (defaults)", embedding_texts=2),
    Step("audit", ("audit", "seeds", "--no-compute", "--html", "{out}/audit.html", "--json",
                   "--no-progress"), "stored noise scores only"),
    Step("export_trl", ("catalog", "export", "seeds", "--format", "trl", "--out", "{out}/seeds.trl.jsonl",
                        "--json"), "streaming"),
)
BY_NAME = {s.name: s for s in STEPS}

# Runs the command given after the output path and writes its wall time and its peak RSS:
# RUSAGE_CHILDREN of this otherwise idle process is exactly the one child's (and any
# process that child waited for). It runs in its own session, so a terminal's Ctrl+C reaches
# only the harness, which passes one SIGINT on (prefab's second Ctrl+C would abort at once);
# SIGTERM (the harness's timeout) is passed on as well.
WRAPPER = r"""
import json, resource, signal, subprocess, sys, time
out, argv = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
child = subprocess.Popen(argv)
signal.signal(signal.SIGINT, lambda *_: child.send_signal(signal.SIGINT))
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
code = child.wait()
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(out, "w") as f:
    json.dump({"rc": code, "pid": child.pid, "wall_s": wall, "maxrss_kib": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime}, f)
"""


@dataclass
class Result:
    step: str
    engine: str
    size: int
    status: str  # measured | projected | failed | timeout | interrupted | skipped | reused
    rows_in: int = 0
    rows_out: int | None = None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    cpu_s: float | None = None
    note: str = ""
    command: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        if self.seconds and self.rows_in and self.status in ("measured", "reused", "projected"):
            return self.rows_in / self.seconds
        return None

    @property
    def key(self) -> str:
        return self.step if self.engine == "local" else f"{self.step} (ray)"


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def size_label(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    return f"{n // 1_000}k" if n >= 1_000 and n % 1_000 == 0 else str(n)


def started_ray(pid: int) -> bool:
    """Whether process ``pid`` started a Ray cluster (Ray names its session folder after the
    driver's pid), so a ray row can say whether any of the step ran on Ray."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    return any(root.glob(f"session_*_{pid}"))


def say(message: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rows_out_of(report: Any) -> int | None:
    """The committed row count of a CLI --json report (its keys differ by command)."""
    if not isinstance(report, dict):
        return None
    for key in ("committed", "rows_out", "rows", "pairs", "kept"):
        value = report.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    for value in report.values():
        if isinstance(value, dict) and (found := rows_out_of(value)) is not None:
            return found
    return None


class Harness:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: list[Result] = []

    # ---- data and homes -------------------------------------------------------------
    def data_file(self, size: int) -> Path:
        from _scale_data import write_pairs

        path = self.workdir / f"pairs-{size_label(size)}.parquet"
        if path.is_file():
            say(f"{size_label(size)}: reusing {path}")
            return path
        say(f"{size_label(size)}: making {size:,} pairs from ../shared/data -> {path}")
        started = time.perf_counter()
        write_pairs(path, size, data=self.args.data, progress=lambda done: say(f"  made {done:,} pairs"),
                    chunk_rows=min(50_000, max(20_000, size // 10)))
        say(f"{size_label(size)}: made in {time.perf_counter() - started:.1f} s "
            f"({path.stat().st_size / 2**20:,.0f} MiB)")
        return path

    def snapshot(self, size: int) -> Path:
        return self.workdir / size_label(size) / "ingested-home"

    def fresh_home(self, size: int) -> tuple[Path, Path]:
        folder = self.workdir / size_label(size)
        home, out = folder / "home", folder / "out"
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return home, out

    # ---- one step -------------------------------------------------------------------
    def run(self, step: Step, size: int, engine: str, home: Path, out: Path, file: Path) -> Result:
        argv = [a.format(file=file, out=out) for a in step.args]
        if engine == "ray":
            argv += ["--engine", "ray"]
        command = [sys.executable, "-m", "factory", *argv, "--home", str(home)]
        if not self.args.warm_caches:
            for cache in CACHES:
                clear_cache(home / cache)
        tag = f"{step.name}{'-ray' if engine == 'ray' else ''}"
        log, report_file = out / f"{tag}.log", out / f"{tag}.json"
        stats_file = out / f"{tag}.rusage.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        say(f"{size_label(size)} {tag}: {' '.join(argv)}")
        started = time.perf_counter()
        with open(report_file, "w") as stdout, open(log, "w") as stderr:
            wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, str(stats_file), *command],
                                       stdout=stdout, stderr=stderr, env=env, cwd=ROOT,
                                       start_new_session=True)
            try:
                wrapper.wait(timeout=self.args.step_timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                wrapper.terminate()
                try:
                    wrapper.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    wrapper.kill()
                    wrapper.wait()
                timed_out = True
            except KeyboardInterrupt:
                say(f"{tag}: Ctrl+C passed on; waiting for prefab to stop cleanly")
                wrapper.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    wrapper.wait(timeout=120)
                if wrapper.poll() is None:
                    wrapper.kill()
                self.results.append(Result(step.name, engine, size, "interrupted", self.rows_in(step, size, engine),
                                           seconds=time.perf_counter() - started,
                                           note="Ctrl+C: stopped before the end", command=argv))
                raise
        result = Result(step.name, engine, size, "measured", command=argv)
        if stats_file.is_file():
            stats = json.loads(stats_file.read_text())
            result.seconds = stats["wall_s"]
            result.peak_rss_mib = stats["maxrss_kib"] / 1024
            result.cpu_s = stats["cpu_s"]
            if engine == "ray" and stats["rc"] == 0:
                result.note = ("started a local Ray" if started_ray(stats["pid"]) else
                               "no Ray stage: ran in the CLI process (whole-table step)")
            if stats["rc"] != 0:
                result.status = "failed"
                lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
                result.note = (lines[-1] if lines else f"exit code {stats['rc']}")[:200]
        if timed_out:
            result.status, result.note = "timeout", f"stopped after {self.args.step_timeout_s:.0f} s"
        with contextlib.suppress(json.JSONDecodeError, OSError):
            report = json.loads(report_file.read_text())
            result.rows_out = rows_out_of(report)
            if result.status == "measured" and isinstance(report, dict) and report.get("unchanged"):
                # prefab returned the stored version of an identical step: its time is a lookup,
                # not the step's cost, so it must not be reported or projected from.
                result.status = "cached"
                result.note = "prefab reused the stored result of an identical step: not a measurement"
        return result

    # ---- budget and projections -----------------------------------------------------
    def measured(self, step: str, engine: str, below: int) -> Result | None:
        """The largest size below ``below`` at which the step ran to the end."""
        done = [r for r in self.results if r.step == step and r.engine == engine
                and r.status in ("measured", "reused") and r.size < below]
        return max(done, key=lambda r: r.size, default=None)

    def projection(self, step: Step, size: int, engine: str, rows_in: int) -> tuple[float, str] | None:
        before = self.measured(step.name, engine, size)
        if before is not None and before.rate:
            return rows_in / before.rate, f"from {before.rate:,.1f} rows/s at {size_label(before.size)}"
        if step.embedding_texts:
            seconds = rows_in * step.embedding_texts / self.args.embed_rate
            return seconds, (f"{step.embedding_texts:g} texts/row at {self.args.embed_rate:g} texts/s "
                             "(not measured)")
        return None

    def rows_in(self, step: Step, size: int, engine: str) -> int:
        if step.name != "merge":
            return size
        causal = [r for r in self.results if r.step == "causal" and r.size == size
                  and r.engine == "local" and r.rows_out is not None]
        return size + (causal[-1].rows_out if causal else size)

    # ---- the whole run --------------------------------------------------------------
    def run_size(self, size: int, steps: list[Step], engines: list[str]) -> None:
        home, out = self.fresh_home(size)
        file = self.data_file(size)
        snapshot = self.snapshot(size)
        for engine in engines:
            if engine != engines[0]:
                # Each engine starts from the ingested seeds alone: steps are keyed by what made
                # them, not by the engine, so a second pass in the same home would only look up
                # the first pass's versions.
                self.restore_ingested(size, home, snapshot)
            for step in steps:
                if step.name == "ingest":
                    if engine == engines[0]:
                        self.ingest(step, size, home, out, file, snapshot)
                    continue
                if engine == "ray" and not step.engine:
                    continue
                if not (home / "catalog.duckdb").exists():
                    self.results.append(Result(step.name, engine, size, "skipped", note="no ingested seeds"))
                    continue
                missing = [n for n in step.needs if not self.has_output(n, size)]
                rows_in = self.rows_in(step, size, engine)
                projected = self.projection(step, size, engine, rows_in)
                if missing or (projected and projected[0] > self.args.budget_s):
                    self.results.append(self.projected(step, size, engine, rows_in, missing, projected))
                    say(f"{size_label(size)} {step.name}: {self.results[-1].note}")
                    continue
                result = self.run(step, size, engine, home, out, file)
                result.rows_in = rows_in
                self.results.append(result)
                self.report(result)

    def ingest(self, step: Step, size: int, home: Path, out: Path, file: Path, snapshot: Path) -> None:
        recorded = snapshot.parent / "ingest.json"
        if self.args.keep_home and recorded.is_file() and snapshot.is_dir():
            shutil.copytree(snapshot, home)
            result = Result(**json.loads(recorded.read_text()))
            result.status, result.note = "reused", f"home copied from {snapshot}"
            self.results.append(result)
            say(f"{size_label(size)} ingest: reused the ingested home {snapshot}")
            return
        result = self.run(step, size, "local", home, out, file)
        result.rows_in = size
        self.results.append(result)
        self.report(result)
        if (self.args.keep_home or self.args.ray) and result.status == "measured":
            shutil.rmtree(snapshot, ignore_errors=True)
            shutil.copytree(home, snapshot)
            recorded.write_text(json.dumps(asdict(result)))

    def restore_ingested(self, size: int, home: Path, snapshot: Path) -> None:
        if not snapshot.is_dir():
            return
        shutil.rmtree(home, ignore_errors=True)
        shutil.copytree(snapshot, home)
        say(f"{size_label(size)}: home reset to the ingested seeds ({snapshot})")

    def has_output(self, step: str, size: int) -> bool:
        return any(r.step == step and r.size == size and r.status in ("measured", "reused", "cached")
                   for r in self.results)

    def projected(self, step: Step, size: int, engine: str, rows_in: int, missing: list[str],
                  estimate: tuple[float, str] | None) -> Result:
        """The row of a step not run at this size: projected when there is a figure to go by."""
        why = (f"needs {', '.join(missing)} (not run at this size); " if missing
               else f"over the {self.args.budget_s:.0f} s budget; ")
        if estimate is None:
            return Result(step.name, engine, size, "skipped", rows_in, note=why + "nothing to project from")
        return Result(step.name, engine, size, "projected", rows_in, seconds=estimate[0],
                      note=f"{why}projected {estimate[1]}")

    def report(self, r: Result) -> None:
        if r.status == "measured":
            say(f"{size_label(r.size)} {r.key}: {r.seconds:.1f} s, {r.rate or 0:,.0f} rows/s, "
                f"peak RSS {r.peak_rss_mib:,.0f} MiB, rows out {r.rows_out}")
        else:
            say(f"{size_label(r.size)} {r.key}: {r.status.upper()} {r.note}")


# ---- tables -----------------------------------------------------------------------------
def cell_seconds(r: Result | None) -> str:
    if r is None or r.seconds is None:
        return "-" if r is None else r.status
    mark = "~" if r.status == "projected" else ""
    text = f"{mark}{r.seconds:,.1f}"
    return text if r.status in ("measured", "reused", "projected") else f"{r.status} ({text})"


def cell_rate(r: Result | None) -> str:
    return "-" if r is None or r.rate is None else f"{'~' if r.status == 'projected' else ''}{r.rate:,.0f}"


def cell_rss(r: Result | None) -> str:
    return "-" if r is None or r.peak_rss_mib is None else f"{r.peak_rss_mib:,.0f}"


def growth(a: Result | None, b: Result | None) -> tuple[str, str]:
    """(time ratio, RSS ratio) from size a to size b, ``~`` when either side is projected."""
    if a is None or b is None or not a.seconds or not b.seconds:
        return "-", "-"
    if a.status not in ("measured", "reused", "projected") or b.status not in ("measured", "reused", "projected"):
        return "-", "-"
    mark = "~" if "projected" in (a.status, b.status) else ""
    rss = (f"{b.peak_rss_mib / a.peak_rss_mib:.2f}x" if a.peak_rss_mib and b.peak_rss_mib else "-")
    return f"{mark}{b.seconds / a.seconds:.1f}x", rss


def step_table(results: list[Result], sizes: list[int]) -> list[str]:
    keys = list(dict.fromkeys(r.key for r in results))
    header = ["step", "settings"]
    for n in sizes:
        label = size_label(n)
        header += [f"{label} s", f"{label} CPU s", f"{label} rows/s", f"{label} peak RSS MiB"]
    pair = f"{size_label(sizes[-2])}->{size_label(sizes[-1])}" if len(sizes) > 1 else None
    if pair:
        header += [f"{pair} time", f"{pair} RSS"]
    header += ["rows in -> out (largest measured)", "projected", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        mine = {r.size: r for r in results if r.key == key}
        name = key.split(" ")[0]
        cells = [key, BY_NAME[name].settings if name in BY_NAME else ""]
        for n in sizes:
            r = mine.get(n)
            cells += [cell_seconds(r), "-" if r is None or r.cpu_s is None else f"{r.cpu_s:,.1f}",
                      cell_rate(r), cell_rss(r)]
        if pair:
            cells += list(growth(mine.get(sizes[-2]), mine.get(sizes[-1])))
        done = [r for r in mine.values() if r.status in ("measured", "reused")]
        largest = max(done, key=lambda r: r.size, default=None)
        cells.append(f"{largest.rows_in:,} -> {largest.rows_out:,}" if largest and largest.rows_out is not None
                     else (f"{largest.rows_in:,}" if largest else "-"))
        cells.append(", ".join(size_label(r.size) for r in mine.values() if r.status == "projected") or "")
        cells.append("; ".join(f"{size_label(r.size)}: {r.note}" for r in mine.values() if r.note))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def target_rows(results: list[Result], sizes: list[int], extra: dict[str, Any]) -> list[str]:
    lines = ["| measure | target | measured | result |", "|---|---|---|---|"]
    local = [r for r in results if r.engine == "local"]
    at_1m = [r for r in local if r.size == 1_000_000 and r.status in ("measured", "reused")
             and r.peak_rss_mib is not None]
    if at_1m:
        worst = max(at_1m, key=lambda r: r.peak_rss_mib)
        unmeasured = sorted({r.step for r in local if r.size == 1_000_000} - {r.step for r in at_1m})
        verdict = "met" if worst.peak_rss_mib < RSS_TARGET_MIB else "missed"
        if unmeasured and verdict == "met":
            verdict = f"met where measured; not measured: {', '.join(unmeasured)}"
        lines.append(f"| peak RSS of every step at 1M pairs | < 4 GiB | {worst.peak_rss_mib:,.0f} MiB "
                     f"({worst.step}) | {verdict} |")
    else:
        sized = [r for r in local if r.peak_rss_mib is not None and r.status in ("measured", "reused")]
        worst = max(sized, key=lambda r: r.peak_rss_mib, default=None)
        figure = (f"{worst.peak_rss_mib:,.0f} MiB ({worst.step} at {size_label(worst.size)})"
                  if worst else "-")
        lines.append(f"| peak RSS of every step at 1M pairs | < 4 GiB | 1M not run; largest {figure} "
                     "| not measured |")
    if len(sizes) > 1:
        a, b = sizes[-2], sizes[-1]
        ratios = []
        for step in ROW_LOCAL:
            ra = next((r for r in local if r.step == step and r.size == a), None)
            rb = next((r for r in local if r.step == step and r.size == b), None)
            t, _ = growth(ra, rb)
            if t != "-":
                ratios.append((step, t))
        label = f"row-local steps ({', '.join(ROW_LOCAL)}), time {size_label(a)} -> {size_label(b)}"
        scale = b / a
        limit = 12 * scale / 10
        measured = [(s, t) for s, t in ratios if not t.startswith("~")]
        if measured:
            worst = max(float(t.strip("x")) for _, t in measured)
            verdict = "met" if worst <= limit else "missed"
            if len(measured) < len(ratios):
                verdict += " where measured (the ~ ratios are linear projections)"
        else:
            verdict = "not measured (only linear projections)" if ratios else "not measured"
        figures = ", ".join(f"{s} {t}" for s, t in ratios) or "-"
        lines.append(f"| {label} | <= {limit:g}x ({scale:g}x rows) | {figures} | {verdict} |")
    for key in ("neighbours", "commit", "embedders"):
        if key in extra:
            lines.append(extra[key])
    for name in ("noise", "noise_static"):
        label = f"noise filter at 100k pairs, head mode ({BY_NAME[name].settings}), 2 cores"
        noise = next((r for r in local if r.step == name and r.size == 100_000), None)
        if noise and noise.seconds:
            mark = "~" if noise.status == "projected" else ""
            ok = noise.seconds < 1800
            lines.append(f"| {label} | < 30 min | {mark}{noise.seconds / 60:,.1f} min ({noise.status}) | "
                         f"{'met' if ok else 'missed'}{' (projected)' if mark else ''}; AUROC: benchmarks/noise.py |")
        elif name == "noise" or any(r.step == name for r in local):
            lines.append(f"| {label} | < 30 min | not run at 100k | - |")
    return lines


# ---- the other benchmarks' figures, through their own functions ---------------------------
def neighbours_row(n: int) -> str:
    """``benchmarks/neighbours.py`` at n x 384: exact (sampled, projected) vs the IVF index."""
    import neighbours as nb

    x = nb.clustered(n)
    rows, truth, exact_s, projected = nb.exact_neighbours(x, 10_000)
    found, build_s, query_s, index = nb.index_neighbours(x)
    total = build_s + query_s
    speedup = exact_s / total
    recall = nb.recall(found[rows], truth)
    ok = speedup >= 10 and recall >= 0.95
    return (f"| neighbours at {size_label(n)} x 384, k=10 | >= 10x faster than exact, recall@10 >= 0.95 "
            f"| {speedup:.1f}x (exact {exact_s:.0f} s{' projected' if projected else ''}, index {total:.1f} s), "
            f"recall@10 {recall:.3f} | {'met' if ok else 'missed'} |")


def commit_row(rows: int, workdir: Path) -> str:
    """``benchmarks/catalog.py``'s floor and commit steps on its synthetic pairs (median of 3)."""
    import statistics

    import catalog as cb
    import pyarrow.parquet as pq

    work = workdir / "commit"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    table = cb.synthetic_pairs(rows)
    pq.write_table(table, work / "v1.parquet")
    del table
    rounds = [(cb.run_step("floor", work), cb.run_step("commit1", work)) for _ in range(3)]
    floor = statistics.median(f["seconds"] for f, _ in rounds)
    commit = statistics.median(c["seconds"] for _, c in rounds)
    shutil.rmtree(work, ignore_errors=True)
    ratio = commit / floor
    return (f"| catalog commit of {size_label(rows)} pairs, ids verified | <= 1.3x pq.write_table "
            f"| {ratio:.2f}x ({commit:.1f} s vs {floor:.1f} s) | {'met' if ratio <= 1.3 else 'missed'} |")


def embedders_row(texts: int) -> str:
    """``benchmarks/embedders.py`` (its own table, read back): static vs MiniLM texts/s."""
    import embedders as eb

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        eb.main(["--texts", str(texts)])
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in printed.getvalue().splitlines() if line.startswith("|")]
    header, body = rows[0], [r for r in rows[1:] if not set("".join(r)) <= set("- |")]
    figures = {r[0]: dict(zip(header, r, strict=False)) for r in body}
    fast = next((f for name, f in figures.items() if not name.startswith("MiniLM")), None)
    if fast is None:
        return "| embeddings for dedup and neighbours, 2 cores | >= 5x MiniLM | no row | - |"
    speedup = float(fast["speedup"].rstrip("x"))
    return (f"| embeddings for dedup and neighbours, 2 cores ({texts:,} texts) | >= 5x today's MiniLM, "
            f"fidelity reported | {fast['embedder']}: {speedup:.0f}x ({fast['texts/s']} texts/s), "
            f"overlap@10 {fast['overlap@10']}, dedup P/R {fast['P']}/{fast['R']} "
            f"| {'met' if speedup >= 5 else 'missed'} (speed; overlap@10 is the fidelity gap) |")


def extra_targets(args: argparse.Namespace, workdir: Path) -> dict[str, str]:
    extra: dict[str, str] = {}
    jobs = (("neighbours", lambda: neighbours_row(args.neighbours_n)),
            ("commit", lambda: commit_row(args.commit_rows, workdir)),
            ("embedders", lambda: embedders_row(args.embedder_texts)))
    for key, job in jobs:
        say(f"target row: {key}")
        started = time.perf_counter()
        try:
            extra[key] = job()
        except Exception as exc:  # one broken benchmark must not lose the measured rows
            extra[key] = f"| {key} | | failed: {type(exc).__name__}: {str(exc)[:150]} | - |"
        say(f"target row: {key} done in {time.perf_counter() - started:.0f} s")
    return extra


def print_tables(results: list[Result], sizes: list[int], extra: dict[str, Any], note: str) -> None:
    print("\n".join(step_table(results, sizes)))
    print()
    print("\n".join(target_rows(results, sizes, extra)))
    print()
    print(note)


def print_saved(paths: list[Path]) -> None:
    """One table from the runs saved in ``paths`` (later files win for a step at a size)."""
    runs = [json.loads(p.read_text()) for p in paths]
    sizes = sorted({n for run in runs for n in run["sizes"]})
    latest: dict[tuple[str, str, int], Result] = {}
    for run in runs:
        for r in run["results"]:
            result = Result(**r)
            latest[(result.step, result.engine, result.size)] = result
    for step, engine in {(k[0], k[1]) for k in latest}:
        for n in sizes:
            if (step, engine, n) in latest:
                continue
            done = [r for (s, e, m), r in latest.items() if s == step and e == engine and m < n
                    and r.status in ("measured", "reused") and r.rate]
            if done:
                before = max(done, key=lambda r: r.size)
                rows_in = round(before.rows_in * n / before.size)
                latest[(step, engine, n)] = Result(
                    step, engine, n, "projected", rows_in, seconds=rows_in / before.rate,
                    note=f"not run; projected from {before.rate:,.1f} rows/s at {size_label(before.size)}")
    order = {s.name: i for i, s in enumerate(STEPS)}
    results = sorted(latest.values(), key=lambda r: (r.engine != "local", order.get(r.step, 99), r.size))
    targets = {k: v for run in runs for k, v in run["targets"].items()}
    print_tables(results, sizes, targets, "\n".join(dict.fromkeys(run["note"] for run in runs)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10k,100k", help="pair counts, e.g. 10k,100k,1M (default 10k,100k)")
    parser.add_argument("--steps", default=",".join(s.name for s in STEPS),
                        help=f"comma-separated subset of: {', '.join(s.name for s in STEPS)}")
    parser.add_argument("--budget-s", type=float, default=1200.0,
                        help="a step projected to take longer at a size is not run there, its time is "
                             "projected (default 1200)")
    parser.add_argument("--step-timeout-s", type=float, default=None,
                        help="stop a step running longer than this (default: twice --budget-s)")
    parser.add_argument("--embed-rate", type=float, default=40.0,
                        help="texts/s assumed for embedding-bound steps before any is measured (default 40)")
    parser.add_argument("--ray", action="store_true", help="also run the --engine steps with --engine ray")
    parser.add_argument("--ray-only", action="store_true",
                        help="only the --engine ray rows (join them to a local run with --table-from)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="keep embedding/noise/token caches between steps (default: cleared before each)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where data files and homes go (default: a temporary folder, removed)")
    parser.add_argument("--keep-home", type=Path, default=None, metavar="DIR",
                        help="work in DIR and keep it: data files and each size's ingested home are "
                             "reused by the next run (ingest is then reported from the first run)")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="the shared real data folder (default ../shared/data)")
    parser.add_argument("--no-targets", action="store_true",
                        help="skip the neighbours, commit and embedders benchmarks of the targets table")
    parser.add_argument("--neighbours-n", type=int, default=100_000)
    parser.add_argument("--commit-rows", type=int, default=1_000_000)
    parser.add_argument("--embedder-texts", type=int, default=2_000)
    parser.add_argument("--out", type=Path, default=None, help="write the raw figures as JSON")
    parser.add_argument("--table-from", type=Path, nargs="+", default=None, metavar="JSON",
                        help="run nothing: print the tables of runs saved with --out (several runs, e.g. "
                             "one per size, make one table; a step missing at a size is projected "
                             "from its largest smaller measured size)")
    parser.add_argument("--targets-only", action="store_true",
                        help="run no step: only the neighbours, commit and embedders target rows")
    args = parser.parse_args(argv)
    args.step_timeout_s = args.step_timeout_s or 2 * args.budget_s
    args.size_list = sorted({parse_size(s) for s in args.sizes.split(",") if s.strip()})
    names = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    # In pipeline order whatever order they were given in; ingest always runs first.
    args.step_list = [s for s in STEPS if s.name in names or s.name == "ingest"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table_from:
        print_saved(args.table_from)
        return 0
    args.ray = args.ray or args.ray_only
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            say("--ray: Ray is not installed (pip install 'prefab[ray]'); the ray rows are left out")
            args.ray = args.ray_only = False
    engines = ["ray"] if args.ray_only else ["local", "ray"] if args.ray else ["local"]
    workdir = args.keep_home or args.workdir or Path(tempfile.mkdtemp(prefix="prefab-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    harness = Harness(args, workdir)
    extra: dict[str, str] = {}
    interrupted = False
    started = time.perf_counter()
    try:
        for size in [] if args.targets_only else args.size_list:
            harness.run_size(size, args.step_list, engines)
        if not args.no_targets:
            extra = extra_targets(args, workdir)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: printing the rows done so far")
    finally:
        if not (args.keep_home or args.workdir):
            shutil.rmtree(workdir, ignore_errors=True)
    note = (f"{os.cpu_count()} CPUs; whole run {time.perf_counter() - started:,.0f} s. "
            "s = wall seconds of the whole CLI process (imports and model loads included); CPU s = its user + "
            "system time (both cores; less inflated than wall time on a shared machine); rows/s = rows in / s; "
            "peak RSS = ru_maxrss of the CLI process. ~ = projected from measured throughput (linear), "
            "not run. Embedding caches cleared before each step"
            f"{' (kept: --warm-caches)' if args.warm_caches else ''}."
            + (" INTERRUPTED: rows after the interruption are missing." if interrupted else ""))
    print_tables(harness.results, args.size_list, extra, note)
    if args.out:
        args.out.write_text(json.dumps({"sizes": args.size_list, "results": [asdict(r) for r in harness.results],
                                        "targets": extra, "note": note}, indent=2))
    return 130 if interrupted else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
