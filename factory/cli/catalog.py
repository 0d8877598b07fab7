"""``prefab catalog ...``: list, inspect, tag, merge, diff, export, verify, clean and migrate the catalog.

Commands that only read open the catalog with ``create=False``: a mistyped ``--home``
fails in one line instead of leaving an empty catalog behind.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from factory.catalog import Catalog
from factory.catalog.housekeeping import DEFAULT_CACHE_GRACE_SECONDS
from factory.cli import CommandResult, home_from


def register(subparsers: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("catalog", help="inspect and manage dataset versions")
    commands = parser.add_subparsers(dest="catalog_command", metavar="SUBCOMMAND", required=True)

    commands.add_parser("list", parents=parents, help="datasets with their latest version and tags") \
        .set_defaults(handler=run_list)

    log = commands.add_parser("log", parents=parents, help="every version of a dataset with its lineage")
    log.add_argument("name")
    log.set_defaults(handler=run_log)

    show = commands.add_parser("show", parents=parents, help="one version: rows, lineage, sample")
    show.add_argument("ref", help="NAME, NAME@N or NAME@TAG")
    show.add_argument("--sample", type=int, default=3, help="rows to show (default 3)")
    show.set_defaults(handler=run_show)

    tag = commands.add_parser("tag", parents=parents, help="name a version (tags are immutable)")
    tag.add_argument("ref")
    tag.add_argument("tag")
    tag.add_argument("--force", action="store_true", help="move an existing tag (logged)")
    tag.set_defaults(handler=run_tag)

    export = commands.add_parser("export", parents=parents, help="write a version to a file")
    export.add_argument("ref")
    export.add_argument("--format", required=True, choices=["parquet", "jsonl", "trl", "hf"])
    export.add_argument("--out", required=True, help="output file (folder for hf)")
    export.set_defaults(handler=run_export)

    diff = commands.add_parser("diff", parents=parents, help="pairs added, removed and changed between versions")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.add_argument("--sample", type=int, default=5, help="pair ids to list per kind (default 5)")
    diff.set_defaults(handler=run_diff)

    verify = commands.add_parser("verify", parents=parents,
                                 help="re-hash every data file; name broken versions (on a lake, also check "
                                      "each dataset's pairs_<dataset> table)")
    verify.add_argument("--repair", action="store_true",
                        help="on a lake: re-make each wrong pairs_<dataset> table from its latest version's files")
    verify.set_defaults(handler=run_verify)

    gc = commands.add_parser("gc", parents=parents,
                             help="delete data files no version needs and caches no recent run used "
                                  "(dry run unless --yes)")
    gc.add_argument("--yes", action="store_true", help="really delete (default: only print what would go)")
    gc.add_argument("--grace", type=_seconds, default=3600.0, metavar="SECONDS",
                    help="keep unreferenced files younger than this (protects in-flight commits; default 3600)")
    gc.add_argument("--cache-grace", type=_seconds, default=DEFAULT_CACHE_GRACE_SECONDS, metavar="SECONDS",
                    help="keep steps/, noise/, embeddings/ and cache/datasets/ entries used within this "
                         "(default 604800, a week)")
    gc.add_argument("--llm-cache-grace", type=_seconds, default=None, metavar="SECONDS",
                    help="also delete LLM cache entries made longer ago than this (default: keep them all; "
                         "they are paid answers)")
    gc.set_defaults(handler=run_gc)

    quarantine = commands.add_parser("quarantine", parents=parents,
                                     help="rows an ingest quarantined, with file, line, field and reason")
    quarantine.add_argument("ref")
    quarantine.add_argument("--limit", type=int, default=20)
    quarantine.set_defaults(handler=run_quarantine)

    failures = commands.add_parser("failures", parents=parents,
                                   help="rows a step could not process, with step, pair_id and reason")
    failures.add_argument("ref")
    failures.add_argument("--limit", type=int, default=20, help="rows to list (default 20; --json lists all)")
    failures.set_defaults(handler=run_failures)

    merge = commands.add_parser(
        "merge", parents=parents, help="combine versions into one new version",
        description="Combine versions into a new version whose parents are all of them. A pair_id "
                    "found in several inputs is kept from the first input that has it (in the order "
                    "given); later inputs' rows for it are dropped and counted.",
    )
    merge.add_argument("refs", nargs="+", metavar="REF", help="versions to combine, in priority order")
    merge.add_argument("--name", required=True, help="dataset to commit the merge to")
    merge.add_argument("--message", "-m", default="", help="version message")
    merge.set_defaults(handler=run_merge)

    migrate = commands.add_parser(
        "migrate", parents=parents, help="copy the home's catalog into a DuckLake, every version and id unchanged",
        description="Copy the catalog of --home (every version, run, tag and tag move, lineage, quarantined "
                    "and failed row, model) into an empty DuckLake; its objects go under the lake's data path. "
                    "Check both sides afterwards with `prefab catalog verify` (with and without --catalog).",
    )
    migrate.add_argument("--to", required=True, metavar="URL",
                         help="the lake: ducklake:<file> or 'ducklake:postgres:<dsn> DATA_PATH <path>'")
    migrate.set_defaults(handler=run_migrate)


# Commands that write may create the home; the others refuse a home that is not there.
_WRITERS = {"tag", "merge", "migrate"}


def _catalog(args: argparse.Namespace) -> Catalog:
    return Catalog(home_from(args), create=args.catalog_command in _WRITERS)


def run_list(args: argparse.Namespace) -> CommandResult:
    datasets = _catalog(args).datasets()
    if not datasets:
        return CommandResult({"datasets": []}, f"no datasets in {home_from(args)}")
    lines = [f"{'NAME':<28} {'LATEST':>6} {'ROWS':>10}  UPDATED               TAGS"]
    for d in datasets:
        lines.append(f"{d['name']:<28} {d['latest']:>6} {d['rows']:>10}  {d['updated_at']:<21} {' '.join(d['tags'])}")
    return CommandResult({"datasets": datasets}, "\n".join(lines))


def _lineage_lines(lineage: dict[str, Any]) -> list[str]:
    keys = ("command", "parents", "rows_in", "rows_out", "rows_generated", "rows_filtered", "rows_quarantined",
            "rows_failed", "rows_flipped", "rows_reweighted", "seeds_used", "seeds_without_output",
            "duplicates_dropped", "label_conflicts", "annotation_conflicts", "scores_reused", "seed", "run_id", "code_version",
            "wall_seconds")
    lines = []
    if isinstance(lineage.get("step"), dict):
        step = lineage["step"]
        lines.append(f"    step: {step.get('kind')} {step.get('name')} v{step.get('version')}"
                     f" (params {step.get('params_hash')})")
    lines += [f"    {k}: {lineage[k]}" for k in keys if k in lineage]
    if lineage.get("params"):
        lines.append(f"    params: {json.dumps(lineage['params'], default=str)}")
    for key in ("models", "judges", "warnings", "coerced", "unknown_columns"):
        if lineage.get(key):
            lines.append(f"    {key}: {json.dumps(lineage[key], default=str)}")
    return lines


def _tag_history_lines(events: list[dict[str, Any]]) -> list[str]:
    lines = []
    for event in events:
        move = (f"{event['tag']} -> version {event['to_version']}" if event["from_version"] is None
                else f"{event['tag']} moved from version {event['from_version']} to {event['to_version']}")
        lines.append(f"    {event['at']}  {move}")
    return lines


def run_log(args: argparse.Namespace) -> CommandResult:
    catalog = _catalog(args)
    versions = catalog.log(args.name)
    history = catalog.tag_history(args.name)
    lines = []
    for info in versions:
        tags = f"  [{', '.join(info.tags)}]" if info.tags else ""
        lines.append(f"{info.ref}  {info.created_at:%Y-%m-%d %H:%M:%S}  {info.rows} rows{tags}  {info.message}")
        lines.extend(_lineage_lines(info.lineage))
    if history:
        lines += ["tag history:", *_tag_history_lines(history)]
    payload = {"name": args.name, "versions": [v.as_dict() for v in versions], "tag_history": history}
    return CommandResult(payload, "\n".join(lines))


def run_show(args: argparse.Namespace) -> CommandResult:
    catalog = _catalog(args)
    info = catalog.resolve(args.ref)
    sample = catalog.head(info, max(args.sample, 0)).to_pylist()
    history = catalog.tag_history(info.name, info.version)
    reruns = catalog.runs(info)[1:]
    payload = {**info.as_dict(), "tag_history": history, "sample": sample,
               "reruns": [{"run": r.run, "lineage": r.lineage} for r in reruns]}
    lines = [f"{info.ref}  {info.rows} rows  created {info.created_at:%Y-%m-%d %H:%M:%S}"
             + (f"  tags: {', '.join(info.tags)}" if info.tags else ""),
             f"  message: {info.message}", "  lineage:", *_lineage_lines(info.lineage)]
    for rerun in reruns:  # later commits whose rows equalled this version's
        lines += [f"  run {rerun.run} (same rows):", *_lineage_lines(rerun.lineage)]
    if history:
        lines += ["  tag history:", *_tag_history_lines(history)]
    for row in sample:
        prompt = row["prompt"][-1]["content"] if row["prompt"] else ""
        label = "tie" if row["tie"] else "chosen > rejected"
        lines.append(f"  - {row['pair_id'][:12]} [{label}] {_clip(prompt)}")
        lines.append(f"      chosen:   {_clip(row['chosen'])}")
        lines.append(f"      rejected: {_clip(row['rejected'])}")
    return CommandResult(payload, "\n".join(lines))


def _clip(text: str, width: int = 90) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def run_tag(args: argparse.Namespace) -> CommandResult:
    result = _catalog(args).tag(args.ref, args.tag, force=args.force)
    moved = f" (moved from version {result['moved_from']})" if result["moved_from"] not in (None, result["version"]) else ""
    return CommandResult(result, f"tagged {result['dataset']}@{result['version']} as {result['tag']}{moved}")


def run_export(args: argparse.Namespace) -> CommandResult:
    from factory.catalog import export

    result = export(_catalog(args), args.ref, args.format, args.out)
    text = f"exported {result['ref']} ({result['rows']} rows) as {args.format} to {args.out}"
    if result.get("ties_skipped"):
        text += f"\n  left out {result['ties_skipped']} tie pairs (TRL has no ties)"
    if result.get("margin_missing"):
        text += f"\n  margin not written: {result['margin_missing']} rows have none (TRL needs it on every row)"
    return CommandResult(result, text)


def run_merge(args: argparse.Namespace) -> CommandResult:
    info = _catalog(args).merge(args.refs, args.name, message=args.message)
    lineage = info.lineage
    if info.unchanged:
        text = f"unchanged: the merge equals {info.ref}; no new version"
        return CommandResult({**info.as_dict(), "unchanged": True}, text)
    lines = [f"merged {', '.join(lineage['parents'])} into {info.ref}: {lineage['rows_in']} rows in = "
             f"{lineage['rows_out']} kept + {lineage['duplicates_dropped']} duplicates dropped"
             f" (first input wins; {lineage['label_conflicts']} dropped rows had another label"
             f", {lineage.get('annotation_conflicts', 0)} the same label with another margin, votes,"
             " weight or attribute)"]
    lines += [f"  {item['ref']}: {item['kept']} of {item['rows']} kept" for item in lineage["inputs"]]
    return CommandResult({**info.as_dict(), "unchanged": False}, "\n".join(lines))


def run_quarantine(args: argparse.Namespace) -> CommandResult:
    table = _catalog(args).quarantined(args.ref)
    rows = table.to_pylist()
    lines = [f"{len(rows)} quarantined rows in {args.ref}"]
    for row in rows[: args.limit]:
        where = f"{row['file']}:{row['line']}" + (f" field {row['field']!r}" if row["field"] else "")
        lines.append(f"  {where}: {row['reason']}")
    return CommandResult({"ref": args.ref, "rows": rows}, "\n".join(lines))


def run_failures(args: argparse.Namespace) -> CommandResult:
    catalog = _catalog(args)
    info = catalog.resolve(args.ref)
    rows = catalog.failures(info.ref).to_pylist()
    lines = [f"{len(rows)} failed rows in {info.ref}"]
    for row in rows[: max(args.limit, 0)]:
        pair = f" {row['pair_id'][:12]}" if row["pair_id"] else ""
        lines.append(f"  [{row['step'] or '?'}]{pair}: {row['reason']}")
    if len(rows) > args.limit:
        lines.append(f"  ... {len(rows) - args.limit} more (--limit, or --json for all)")
    return CommandResult({"ref": info.ref, "count": len(rows), "rows": rows}, "\n".join(lines))


def run_diff(args: argparse.Namespace) -> CommandResult:
    from factory.catalog import diff

    result = diff(_catalog(args), args.a, args.b, sample=args.sample)
    lines = [
        f"{result['a']} ({result['rows_a']} rows) -> {result['b']} ({result['rows_b']} rows)",
        f"  added {result['added']}, removed {result['removed']}, changed {result['changed']}"
        f" ({result['relabelled']} relabelled, {result['reannotated']} re-annotated,"
        f" {result['responses_changed']} with new responses), unchanged {result['unchanged']}"
        + (f", {result['repeats_changed']} judged another number of times" if result["repeats_changed"] else ""),
    ]
    for kind, ids in result["sample"].items():
        if ids:
            lines.append(f"  {kind}: {', '.join(ids)}")
    return CommandResult(result, "\n".join(lines))


def run_verify(args: argparse.Namespace) -> CommandResult:
    from factory.catalog import verify
    from schemas.errors import PrefabError

    result = verify(_catalog(args), repair=args.repair)
    if not result["ok"]:
        details = [f"{p['file']} {p['problem']} (breaks {', '.join(p['versions'] + p.get('models', []))})"
                   for p in result["problems"]]
        details += [f"table {p['table']}: {p['problem']} (repair: {p['repair']})" for p in result.get("tables", [])]
        counts = [f"{len(result['problems'])} bad file(s)"] if result["problems"] else []
        counts += [f"{len(result['tables'])} wrong table(s)"] if result.get("tables") else []
        raise PrefabError(f"verify failed: {', '.join(counts)}: {'; '.join(details)}")
    tables = f", {result['tables_checked']} tables checked" if "tables_checked" in result else ""
    repaired = f", {len(result['repaired'])} repaired" if result.get("repaired") else ""
    models = f", {result['model_files_checked']} model files" if result.get("model_files_checked") else ""
    return CommandResult(result, f"ok: {result['files_checked']} files verified{models}{tables}{repaired}")


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def run_gc(args: argparse.Namespace) -> CommandResult:
    from factory.catalog import gc

    result = gc(_catalog(args), dry_run=not args.yes, grace_seconds=args.grace,
                cache_grace_seconds=args.cache_grace, llm_cache_grace_seconds=args.llm_cache_grace)
    verb = "would delete" if result["dry_run"] else "deleted"
    lines = [f"{verb} {len(result['files'])} files ({result['bytes']} bytes)"]
    for area, report in result["areas"].items():
        if report["removed"] or report["kept"]:
            lines.append(f"  {area}: {verb} {len(report['removed'])} ({report['bytes']} bytes), "
                         f"kept {report['kept']} ({report['kept_bytes']} bytes)")
            lines += [f"    {f}" for f in report["removed"]]
        if report["restored"]:
            lines.append(f"  {area}: {'would restore' if result['dry_run'] else 'restored'} "
                         f"{len(report['restored'])} registered model folder(s) a killed registration left unrenamed")
            lines += [f"    {f}" for f in report["restored"]]
    if result["skipped_younger_than_grace"]:
        lines.append(f"  kept {result['skipped_younger_than_grace']} unreferenced files younger than {args.grace:.0f} s")
    lines += _llm_cache_lines(result["llm_cache"], verb, args.llm_cache_grace)
    restorable = any(report["restored"] for report in result["areas"].values())
    if result["dry_run"] and (result["files"] or result["llm_cache"]["removed_entries"] or restorable):
        lines.append("  run again with --yes to delete them" + (" (and restore those)" if restorable else ""))
    return CommandResult(result, "\n".join(lines))


def _llm_cache_lines(llm: dict[str, Any], verb: str, grace: float | None) -> list[str]:
    if not llm["exists"]:
        return []
    line = f"  llm cache: {llm['entries']} entries ({llm['bytes']} bytes)"
    if grace is None:
        return [line + "; kept (--llm-cache-grace SECONDS deletes entries made longer ago; "
                       f"or delete {llm['path']} to clear it)"]
    freed = "" if verb == "would delete" else f", {llm['bytes_freed']} bytes freed"
    return [line + f"; {verb} {llm['removed_entries']} made over {grace:.0f} s ago{freed}"]


def run_migrate(args: argparse.Namespace) -> CommandResult:
    from factory.catalog.migrate import migrate

    source = Catalog(home_from(args), create=False, catalog="")
    result = migrate(source, Catalog(home_from(args), catalog=args.to))
    lines = [f"migrated {result['versions']} versions ({result['files']} files) and {result['models']} "
             f"models from {result['from']} to {result['to']}"]
    lines += [f"  model {m['model']}: its folder {m['path']} is gone from the home; recorded as before "
              "(its home path, no manifest), so loading it fails until it is trained or registered again"
              for m in result["models_left_behind"]]
    return CommandResult(result, "\n".join(lines))
