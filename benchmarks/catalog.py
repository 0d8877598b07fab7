"""Catalog benchmark: commit, diff and export of a million synthetic pairs, against their floors.

    python benchmarks/catalog.py [--rows 1000000] [--workdir /tmp/prefab-bench]

Prints one table. Each measured step runs in a fresh subprocess so its peak memory
(max RSS above the process's baseline after loading its input) is its own.

- commit vs `pyarrow.parquet.write_table` of the same table with the same Parquet options
  (the physical floor; the ratio includes hashing, the key index, fsync and the catalog
  transaction), alternating over --repeat rounds, medians; the commit hashes ids and
  writes the key index on one thread while a second compresses and writes the data file
  (about equal CPU each), so the ratio needs two free cores: on a loaded machine it reads
  high. `pq.write_table` with its own defaults (snappy, 1Mi-row groups) is about 1.8x
  faster than with the catalog's zstd-1 and 64Ki-row groups;
- content ids alone (`schemas.content_ids` over the table in row-group batches), the part
  of the commit that pyarrow's write does not do;
- diff of two versions that differ in 1% of rows (half relabelled, half new responses);
- `factory.catalog.load` vs `datasets.Dataset.from_parquet` on the same files, each into
  an empty cache folder, alternating over --repeat rounds, medians;
- streaming exports to JSONL and TRL JSONL.

    python benchmarks/catalog.py --catalog 'ducklake:/tmp/lake/catalog.ducklake' [--rows ...]
    python benchmarks/catalog.py --catalog 'ducklake:postgres:dbname=bench host=... DATA_PATH /tmp/lake-data'

    python benchmarks/catalog.py --compare [--postgres DSN] [--rows ...]

prints the home catalog, a lake on a DuckDB file and a lake on PostgreSQL (a throwaway server
from tests/postgres_server.py unless --postgres names an empty database) side by side, on the
same pairs. The single-catalog forms measure the same steps on a DuckLake catalog (a fresh one: an empty PostgreSQL database, a
metadata file that does not exist yet); "time travel" reads version 1 after version 2 was
committed, through the catalog, and on a lake also with plain DuckDB SQL (``AT (VERSION => n)``).

    python benchmarks/catalog.py --memory [--rows 1000000]

measures instead the peak RSS of two whole commands, each under ``/usr/bin/time -v`` in
its own process: ``prefab ingest`` of a TRL JSONL file of --rows synthetic pairs, and
``prefab catalog export --format hf`` of the version it made.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = ["the", "model", "answer", "prompt", "reward", "human", "preference", "helpful", "harmless", "careful", "response", "explains", "reasoning", "correct", "step", "because", "therefore", "example", "data", "train", "evaluate", "robust", "quality", "pair", "chosen", "rejected", "judge", "rubric", "factual", "concise", "clear", "complete", "safe"]


def synthetic_pairs(rows: int, seed: int = 0):  # noqa: ANN201
    """`rows` pairs with ~500-byte responses, built column-wise (no per-row Python hashing)."""
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    vocabulary = np.array(WORDS)
    # 4,096 distinct sentences recombined: realistic text, cheap to make.
    sentences = [" ".join(vocabulary[rng.integers(0, len(WORDS), 12)]) + "." for _ in range(4096)]
    sentence_table = pl.Series(sentences)

    def responses(salt: int) -> pl.Series:
        parts = {f"s{i}": sentence_table.gather(rng.integers(0, 4096, rows)) for i in range(6)}
        parts["tag"] = pl.Series(np.char.mod("(%d)", np.arange(rows) * 7 + salt))
        return pl.DataFrame(parts).select(pl.concat_str(pl.all(), separator=" ")).to_series()

    frame = pl.DataFrame({
        "n": pl.Series(np.arange(rows)).cast(pl.Utf8),
        "topic": sentence_table.gather(rng.integers(0, 4096, rows)),
        "chosen": responses(1),
        "rejected": responses(2),
    }).select(
        pl.concat_str([pl.lit("Question"), "n", "topic"], separator=" ").alias("question"),
        "chosen", "rejected",
    )
    frame = frame.with_columns(
        pl.concat_list(pl.struct(role=pl.lit("user"), content=pl.col("question"))).alias("prompt"),
        pl.lit(False).alias("tie"),
    ).drop("question")
    return with_content_ids(frame.to_arrow())


def with_content_ids(table):  # noqa: ANN001, ANN201
    """The table with real pair_id/prompt_id (content hashes), as a commit requires."""
    import pyarrow as pa

    from schemas import conform, content_ids

    table = table.drop_columns([c for c in ("pair_id", "prompt_id") if c in table.column_names])
    chunks = [content_ids(part) for part in table.to_batches(max_chunksize=65_536)]
    table = table.append_column("pair_id", pa.chunked_array([c[0] for c in chunks], pa.string()))
    return conform(table.append_column("prompt_id", pa.chunked_array([c[1] for c in chunks], pa.string())))


def edited_copy(table, fraction: float = 0.01):  # noqa: ANN001, ANN201
    """Relabel half of `fraction` of the rows and give the other half a new rejected answer."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = table.num_rows
    k = int(n * fraction / 2)
    flip = np.zeros(n, bool)
    flip[:k] = True
    edit = np.zeros(n, bool)
    edit[k: 2 * k] = True
    chosen = pc.if_else(pa.array(flip), table["rejected"], table["chosen"])
    rejected = pc.if_else(pa.array(flip), table["chosen"], table["rejected"])
    rejected = pc.if_else(pa.array(edit), pc.binary_join_element_wise(rejected, " (edited)", ""), rejected)
    out = table.set_column(table.schema.get_field_index("chosen"), "chosen", chosen)
    out = out.set_column(out.schema.get_field_index("rejected"), "rejected", rejected)
    return with_content_ids(out)


STEP = r"""
import json, os, sys, threading, time
sys.path.insert(0, {root!r})
import pyarrow.parquet as pq
step, work = sys.argv[1], sys.argv[2]
PAGE = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE
peak = [0]
def sample():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.005)
from factory.catalog import Catalog, diff, export, load
from factory.catalog.store import PARQUET_OPTIONS
import datasets
datasets.disable_progress_bars()
catalog = Catalog(work + "/home")
table = pq.read_table(work + "/v1.parquet") if step in ("floor", "commit1", "ids") else None
table = pq.read_table(work + "/v2.parquet") if step == "commit2" else table
base = rss()
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
if step == "floor":
    pq.write_table(table, work + "/floor.parquet", **PARQUET_OPTIONS)
elif step.startswith("commit"):
    catalog.commit("bench", table)
elif step == "ids":
    from schemas import content_ids
    for batch in table.to_batches(max_chunksize=65_536):
        content_ids(batch)
elif step == "diff":
    result = diff(catalog, "bench@1", "bench")
elif step == "load":
    ds = load("bench@1", work + "/home"); n = ds.num_rows
elif step == "from_parquet":
    files = [str(p) for p in catalog.paths("bench@1")]
    ds = datasets.Dataset.from_parquet(files, cache_dir=os.environ["HF_DATASETS_CACHE"]); n = ds.num_rows
elif step == "timetravel":
    n = catalog.read_table("bench@1", columns=["pair_id"]).num_rows
elif step == "timetravel_sql":
    from factory.catalog.lake import lake_opener
    opener = lake_opener(catalog.lake)
    connection = opener.open(True)
    a = catalog.lake.alias
    connection.execute(f"SET VARIABLE v = (SELECT snapshot_id FROM {{a}}.snapshots() WHERE commit_message = 'prefab: bench@1')")
    n = connection.sql(f"SELECT count(DISTINCT pair_id) FROM {{a}}.pairs_bench AT (VERSION => getvariable('v'))").fetchone()[0]
    opener.close(connection)
elif step in ("jsonl", "trl"):
    export(catalog, "bench@1", step, work + "/out." + step)
seconds = time.perf_counter() - t
extra = {{k: result[k] for k in ("added", "removed", "changed", "unchanged")}} if step == "diff" else {{}}
print(json.dumps({{"seconds": seconds, "peak_mb": (max(peak[0], rss()) - base) / 2**20, **extra}}))
"""


def run_step(step: str, work: Path, cache: str = "hfcache") -> dict:
    # Each datasets conversion gets its own empty cache folder, so every one is cold.
    env = {**os.environ, "HF_DATASETS_CACHE": str(work / cache), "PREFAB_HOME": str(work / "home"),
           "PREFAB_CATALOG": os.environ.get("PREFAB_CATALOG", "")}
    output = subprocess.run([sys.executable, "-c", STEP.format(root=str(ROOT)), step, str(work)],
                            capture_output=True, text=True, env=env)
    if output.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def memory(rows: int, workdir: Path) -> None:
    """Peak RSS of `prefab ingest` and of the `hf` export, each a whole CLI process."""
    import polars as pl

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    source = workdir / "pairs.jsonl"
    pl.from_arrow(synthetic_pairs(rows).select(["prompt", "chosen", "rejected"])).write_ndjson(source)
    env = {**os.environ, "PREFAB_HOME": str(workdir / "home"), "HF_DATASETS_CACHE": str(workdir / "hfcache")}
    commands = {
        "ingest": ["ingest", str(source), "--name", "bench", "--no-progress"],
        "export hf": ["catalog", "export", "bench", "--format", "hf", "--out", str(workdir / "hf")],
    }
    print(f"{rows:,} synthetic pairs, {source.stat().st_size / 2**20:,.0f} MiB of JSONL")
    print(f"{'command':<12} {'seconds':>8} {'peak RSS MiB':>13}")
    for label, argv in commands.items():
        output = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "factory", *argv],
                                capture_output=True, text=True, env=env, cwd=ROOT)
        if output.returncode != 0:
            raise SystemExit(f"{label} failed:\n{output.stderr}")
        stats = dict(line.strip().rsplit(": ", 1) for line in output.stderr.splitlines()
                     if ": " in line and line.startswith("\t"))
        peak = int(stats["Maximum resident set size (kbytes)"]) / 1024
        wall = stats["Elapsed (wall clock) time (h:mm:ss or m:ss)"]
        minutes, _, seconds = wall.rpartition(":")
        hours, _, minutes = minutes.rpartition(":")
        total = float(seconds) + 60 * float(minutes or 0) + 3600 * float(hours or 0)
        print(f"{label:<12} {total:8.1f} {peak:13.0f}")
    shutil.rmtree(workdir, ignore_errors=True)


def measure(catalog_url: str, workdir: Path, rows: int, repeat: int) -> dict[str, dict]:
    """Every step on one catalog (``""``: the home's own) over the pairs in ``workdir``."""
    os.environ["PREFAB_CATALOG"] = catalog_url
    shutil.rmtree(workdir / "home", ignore_errors=True)  # each catalog starts empty
    for cache in workdir.glob("hf*"):
        shutil.rmtree(cache, ignore_errors=True)
    # Floor and commit alternate, --repeat rounds, medians: the disk and page cache are shared.
    rounds = [(run_step("floor", workdir), run_step("commit1", workdir)) for _ in range(repeat)]
    travel = ("timetravel", "timetravel_sql") if catalog_url else ("timetravel",)
    results = {step: run_step(step, workdir) for step in ("ids", "commit2", "diff", *travel, "jsonl", "trl")}
    conversions = [(run_step("from_parquet", workdir, f"hf-ref-{i}"),
                    run_step("load", workdir, f"hf-load-{i}")) for i in range(repeat)]
    for position, step in enumerate(("from_parquet", "load")):
        results[step] = {"seconds": statistics.median(c[position]["seconds"] for c in conversions),
                         "peak_mb": max(c[position]["peak_mb"] for c in conversions)}
    results["floor"] = {"seconds": statistics.median(f["seconds"] for f, _ in rounds),
                        "peak_mb": max(f["peak_mb"] for f, _ in rounds)}
    results["commit"] = {"seconds": statistics.median(c["seconds"] for _, c in rounds),
                         "peak_mb": max(c["peak_mb"] for _, c in rounds)}
    return results


def print_one(results: dict[str, dict], catalog_url: str, rows: int) -> None:
    commit, floor = results["commit"], results["floor"]
    table = [
        (f"commit {rows:,} pairs", commit["seconds"], commit["peak_mb"], "pq.write_table", floor["seconds"],
         f"{commit['seconds'] / floor['seconds']:.2f}x (target <= 1.3)"),
        ("content ids (in commit)", results["ids"]["seconds"], results["ids"]["peak_mb"], "", None,
         f"{rows / results['ids']['seconds']:,.0f} pairs/s (pair_id + prompt_id)"),
        ("diff v1 vs v2 (1% differ)", results["diff"]["seconds"], results["diff"]["peak_mb"], "target", 3.0,
         f"added {results['diff']['added']}, removed {results['diff']['removed']}, changed {results['diff']['changed']}"),
        ("load -> datasets.Dataset", results["load"]["seconds"], results["load"]["peak_mb"],
         "Dataset.from_parquet", results["from_parquet"]["seconds"],
         f"{results['load']['seconds'] / results['from_parquet']['seconds']:.2f}x"),
        ("time travel: read v1 ids", results["timetravel"]["seconds"], results["timetravel"]["peak_mb"], "", None,
         "after v2; checks v1's sha256"),
        *([("time travel: plain SQL", results["timetravel_sql"]["seconds"], results["timetravel_sql"]["peak_mb"],
            "", None, "count(DISTINCT pair_id) AT (VERSION => v1)")] if catalog_url else []),
        ("export jsonl (streaming)", results["jsonl"]["seconds"], results["jsonl"]["peak_mb"], "", None, ""),
        ("export trl (streaming)", results["trl"]["seconds"], results["trl"]["peak_mb"], "", None, ""),
    ]
    print(f"catalog: {catalog_url or 'the home (catalog.duckdb)'}")
    print(f"\n{'step':<28} {'seconds':>8} {'peak MiB':>9}  {'reference':<22} {'ref s':>7}  result")
    for name, seconds, peak, reference, ref_seconds, note in table:
        ref = f"{ref_seconds:7.2f}" if ref_seconds is not None else " " * 7
        print(f"{name:<28} {seconds:8.2f} {peak:9.0f}  {reference:<22} {ref}  {note}")
    print(f"\n(peak MiB = peak RSS above the step's baseline after loading its input, sampled every 5 ms; "
          f"floor peak {results['floor']['peak_mb']:.0f} MiB, from_parquet peak {results['from_parquet']['peak_mb']:.0f} MiB)")


def print_side_by_side(measured: dict[str, dict[str, dict]], rows: int) -> None:
    """One row per step, one column per catalog; targets: lake commit <= 1.5x, diff < 3 s."""
    names = list(measured)
    lines = [
        ("pq.write_table, same options", lambda r: f"{r['floor']['seconds']:.2f} s"),
        (f"commit {rows:,} pairs", lambda r: f"{r['commit']['seconds']:.2f} s"),
        ("commit / pq.write_table (<= 1.5x)", lambda r: f"{r['commit']['seconds'] / r['floor']['seconds']:.2f}x"),
        ("commit peak MiB", lambda r: f"{r['commit']['peak_mb']:.0f}"),
        ("diff of 1% (< 3 s)", lambda r: f"{r['diff']['seconds']:.2f} s"),
        ("load -> datasets.Dataset", lambda r: f"{r['load']['seconds']:.2f} s"),
        ("time travel: v1 through prefab", lambda r: f"{r['timetravel']['seconds']:.2f} s"),
        ("time travel: v1 in plain SQL", lambda r: f"{r['timetravel_sql']['seconds']:.2f} s" if "timetravel_sql" in r else "-"),
        ("export trl (streaming)", lambda r: f"{r['trl']['seconds']:.2f} s"),
    ]
    widths = [max(len(n), 12) for n in names]
    print(f"| {'step':<34} | " + " | ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True)) + " |")
    print(f"|{'-' * 36}|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for label, cell in lines:
        print(f"| {label:<34} | " + " | ".join(f"{cell(measured[n]):>{w}}" for n, w in zip(names, widths, strict=True)) + " |")


def _postgres_url(workdir: Path, dsn: str | None) -> tuple[str | None, object]:
    """A lake on PostgreSQL: ``dsn`` if given, else a throwaway server (tests/postgres_server.py)."""
    if dsn:
        return f"ducklake:postgres:{dsn} DATA_PATH {workdir / 'pg-lake-data'}", lambda: None
    from tests.postgres_server import PostgresUnavailable, start_postgres

    try:
        dsn, stop = start_postgres(workdir)
    except PostgresUnavailable as exc:
        print(f"(no PostgreSQL lake column: {exc})")
        return None, lambda: None
    return f"ducklake:postgres:{dsn} DATA_PATH {workdir / 'pg-lake-data'}", stop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of floor and commit (median)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/prefab-bench-catalog"))
    parser.add_argument("--catalog", default="", metavar="URL",
                        help="a fresh DuckLake to measure (default: the home's own catalog)")
    parser.add_argument("--compare", action="store_true",
                        help="the home catalog, a lake on a DuckDB file and a lake on PostgreSQL, side by side")
    parser.add_argument("--postgres", default=None, metavar="DSN",
                        help="with --compare: an empty PostgreSQL database (default: start a throwaway server)")
    parser.add_argument("--memory", action="store_true",
                        help="peak RSS of `prefab ingest` and of the hf export (whole processes)")
    args = parser.parse_args()
    if args.memory:
        memory(args.rows, args.workdir)
        return
    import pyarrow.parquet as pq

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    args.workdir.chmod(0o755)  # a throwaway PostgreSQL server runs as an unprivileged user
    started = time.perf_counter()
    table = synthetic_pairs(args.rows)
    mean_response = (sum(len(s) for s in table["chosen"].slice(0, 10_000).to_pylist()) / min(10_000, args.rows))
    pq.write_table(table, args.workdir / "v1.parquet")
    pq.write_table(edited_copy(table), args.workdir / "v2.parquet")
    print(f"{args.rows:,} synthetic pairs, mean response {mean_response:.0f} bytes, "
          f"{table.nbytes / 2**20:,.0f} MiB in Arrow (made in {time.perf_counter() - started:.1f} s)")
    del table
    if not args.compare:
        print_one(measure(args.catalog, args.workdir, args.rows, args.repeat), args.catalog, args.rows)
        shutil.rmtree(args.workdir, ignore_errors=True)
        return
    catalogs = {"home catalog": "", "lake, DuckDB file": f"ducklake:{args.workdir / 'file-lake' / 'catalog.ducklake'}"}
    postgres, stop = _postgres_url(args.workdir, args.postgres)
    if postgres:
        catalogs["lake, PostgreSQL"] = postgres
    try:
        measured = {name: measure(url, args.workdir, args.rows, args.repeat) for name, url in catalogs.items()}
    finally:
        stop()
    print()
    print_side_by_side(measured, args.rows)
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; medians of {args.repeat} "
          "rounds for commit/floor and load; one run each for the rest")
    shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
