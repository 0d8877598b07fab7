"""``prefab run RECIPE.yaml``: every source, step, tag, training run and evaluation of a
recipe, in order, each recorded in lineage and each reused when it already ran.

A step's identity is :class:`factory.steps.identity.StepIdentity` (step, version, pinned
parameters and models, exact input versions, seed, the backend as the request cache keys
it, template hashes) plus what the recipe adds (``with_input``). A version whose lineage carries that key is reused instead of recomputed, so a
second run of an unchanged recipe does no step work, a changed step reruns itself and what
follows it (their inputs change), and a run killed anywhere resumes: committed steps are
found again, a row-local step resumes after its kept batches, and LLM requests come from
the request cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from factory.catalog import Catalog
from factory.recipe.spec import Recipe, StepSpecRecipe, load_recipe
from factory.steps.identity import identify
from factory.steps.runner import backend_for, exact_inputs, pin_refs, prepare


def _say(text: str, quiet: bool) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _exact(ref: str, made: dict[str, str]) -> str:
    """A dataset named in the recipe -> the exact version this run made or found."""
    return ref if "@" in ref else made.get(ref, ref)


def run_recipe(path: str | Path, *, home: str | Path | None = None, dry_run: bool = False,
               quiet: bool = False, progress: bool | None = None, engine: str = "local",
               ray_address: str | None = None) -> dict[str, Any]:
    """Validate then run a recipe; with ``dry_run`` only validate and return the plan.

    ``engine="ray"`` runs row-local steps as Ray Data ``map_batches`` (workers write
    Parquet, this process makes each catalog commit); the result equals the local run's.
    """
    catalog = Catalog(home)
    recipe = load_recipe(path, catalog=catalog)
    if dry_run:
        return plan(recipe, catalog)
    started = time.monotonic()
    recipe_sha = hashlib.sha256(recipe.text.encode()).hexdigest()
    made: dict[str, str] = {}
    results: list[dict[str, Any]] = []
    total = len(recipe.sources) + len(recipe.steps) + bool(recipe.tag) + bool(recipe.train) + bool(recipe.audit)
    position = 0

    def record(entry: dict[str, Any]) -> None:
        nonlocal position
        position += 1
        results.append(entry)
        state = "reused" if entry.get("reused") else f"{entry.get('seconds', 0):.1f} s"
        _say(f"[{position}/{total}] {entry['what']} -> {entry.get('ref', '')} ({state})", quiet)

    for source in recipe.sources:
        t0 = time.monotonic()
        if source.path is None:
            info = catalog.resolve(source.ref or source.name)
            made[source.name] = info.ref
            record({"kind": "source", "what": f"source {source.ref}", "ref": info.ref, "reused": True})
            continue
        from factory.ingest import ingest

        result = ingest(source.path, source.name, format=source.format, home=catalog.home,
                        message=f"recipe {recipe.name}: ingest {source.path.name}", progress=bool(progress))
        made[source.name] = result["ref"]
        record({"kind": "ingest", "what": f"ingest {source.path.name}", "ref": result["ref"],
                "reused": bool(result.get("unchanged")), "rows": result.get("committed"),
                "seconds": time.monotonic() - t0})

    for step in recipe.steps:
        record(_run_step(step, recipe, catalog, made, recipe_sha, progress, engine, ray_address))

    if recipe.tag:
        target = _exact(str(recipe.tag["dataset"]), made)
        tagged = catalog.tag(target, str(recipe.tag["tag"]), force=True)
        record({"kind": "tag", "what": f"tag {recipe.tag['tag']}", "ref": f"{tagged['dataset']}@{tagged['version']}",
                "reused": tagged["moved_from"] == tagged["version"], "moved_from": tagged["moved_from"]})

    model = None
    if recipe.train:
        model = _train(recipe, catalog, made, progress)
        record(model)
    audit = None
    if recipe.audit:
        audit = _audit(recipe, catalog, made, model, progress)
        record(audit)
    return {"recipe": recipe.name, "file": str(recipe.path), "recipe_sha256": recipe_sha, "steps": results,
            "datasets": made, "model": model, "audit": audit, "seconds": round(time.monotonic() - started, 3)}


def _audit(recipe: Recipe, catalog: Catalog, made: dict[str, str], model: dict[str, Any] | None,
           progress: bool | None) -> dict[str, Any]:
    """The label-noise audit of one dataset: JSON next to an offline HTML report."""
    import factory

    t0 = time.monotonic()
    options = dict(recipe.audit or {})
    ref = catalog.resolve(_exact(str(options["dataset"]), made)).ref
    html = Path(str(options.get("html", f"{recipe.name}-audit.html")))
    use_model = options.get("model", True)
    model_ref = (model["ref"] if model and use_model is True else (str(use_model) if use_model else None))
    summary = factory.audit(ref, home=catalog.home, model=model_ref, html=html, top=int(options.get("top", 50)),
                            seed=recipe.seed, progress=progress)
    json_path = Path(str(options.get("json", html.with_suffix(".json"))))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2, default=str, ensure_ascii=False))
    noise = summary.get("noise") or {}
    return {"kind": "audit", "what": f"audit {ref}", "ref": str(html.resolve()), "reused": False,
            "html": str(html.resolve()), "json": str(json_path.resolve()), "noise_rate": noise.get("rate"),
            "noise_interval": noise.get("interval"), "noise_line": _noise_line(noise),
            "seconds": time.monotonic() - t0}


def _noise_line(noise: dict[str, Any]) -> str:
    """The audit's headline in one line: the rate with its interval, or why there is none."""
    if not noise.get("available") or noise.get("rate") is None:
        return f"noise not estimated ({noise.get('reason') or 'no scores'})"
    low, high = (noise.get("interval") or [None, None])[:2]
    interval = f" [{100 * low:.1f}%, {100 * high:.1f}%]" if low is not None and high is not None else ""
    flagged = f"; {noise['flagged']} pairs flagged" if noise.get("flagged") is not None else ""
    return f"estimated noise rate {100 * noise['rate']:.1f}%{interval}{flagged}"


def _run_step(step: StepSpecRecipe, recipe: Recipe, catalog: Catalog, made: dict[str, str], recipe_sha: str,
              progress: bool | None, engine: str, ray_address: str | None) -> dict[str, Any]:
    t0 = time.monotonic()
    inputs = [_exact(ref, made) for ref in step.inputs]
    if step.kind == "merge":
        info = catalog.merge([catalog.resolve(ref).ref for ref in inputs], step.name,
                             message=f"recipe {recipe.name}: merge")
        made[step.name] = info.ref
        return {"kind": "merge", "what": f"merge {', '.join(step.inputs)}", "ref": info.ref,
                "reused": bool(info.unchanged), "rows": info.rows, "seconds": time.monotonic() - t0}

    from factory.steps import api

    backend = _backend(step.backend, catalog) if step.backend else None
    key = step_key(step, recipe, catalog, made, backend)
    verb = "generate" if step.kind == "generator" else "filter"
    what = f"{verb} {step.step} from {', '.join(step.inputs)}"
    existing = catalog.find_by_lineage("recipe_step_key", key, step.name)
    if existing is not None:
        made[step.name] = existing.ref
        return {"kind": verb, "what": what, "ref": existing.ref, "reused": True, "rows": existing.rows}
    extra = {"recipe": recipe.name, "recipe_file": str(recipe.path), "recipe_sha256": recipe_sha,
             "recipe_step": step.index, "recipe_step_key": key}
    common = {"settings": step.settings, "backend": backend, "seed": recipe.seed, "home": catalog.home,
              "progress": progress, "lineage_extra": extra, "message": f"recipe {recipe.name}: {what}",
              "engine": engine, "ray_address": ray_address}
    if step.kind == "generator":
        result = api.generate(step.step, inputs, step.name, with_input=step.with_input, **common)
    else:
        result = api.filter(step.step, inputs, step.name, **common)
    made[step.name] = result["ref"]
    return {"kind": verb, "what": what, "ref": result["ref"], "reused": False, "rows": result["rows_out"],
            "report": result, "seconds": time.monotonic() - t0}


def step_key(step: StepSpecRecipe, recipe: Recipe, catalog: Catalog, made: dict[str, str],
             backend: Any = None) -> str:
    """The key a finished generate/filter step of a recipe is found again by: its
    :class:`~factory.steps.identity.StepIdentity` plus ``with_input``."""
    if backend is None and step.backend:
        backend = _backend(step.backend, catalog)
    prepared = prepare(step.kind, step.step, step.settings, backend, home=catalog.home)  # type: ignore[arg-type]
    pin_refs(prepared, catalog)
    inputs = [_exact(ref, made) for ref in step.inputs]
    identity = identify(prepared, exact_inputs(prepared, inputs, catalog), recipe.seed)
    return identity.key("recipe", with_input=step.with_input)


def _backend(spec: str, catalog: Catalog) -> Any:
    return backend_for(spec, catalog.home)


def _train(recipe: Recipe, catalog: Catalog, made: dict[str, str], progress: bool | None) -> dict[str, Any]:
    import factory

    t0 = time.monotonic()
    options = dict(recipe.train or {})
    name = str(options.pop("name"))
    data = catalog.resolve(_exact(str(options.pop("data")), made)).ref
    evals = [catalog.resolve(_exact(str(r), made)).ref for r in _listify(options.pop("eval", []))]
    options.setdefault("seed", recipe.seed)
    previous = _matching_model(catalog, name, data, options, evals)
    what = f"train {name} on {data}"
    if previous is not None:
        return {"kind": "train", "what": what, "ref": f"{name}@{previous['version']}", "reused": True,
                "path": previous["path"], "metrics": _key_metrics(previous["metrics"])}
    result = factory.train(data, name, home=catalog.home, eval=evals or None,
                           progress=bool(progress), **options)
    registered = result.registered or {}
    return {"kind": "train", "what": what, "ref": f"{name}@{registered.get('version')}", "reused": False,
            "path": str(result.path), "metrics": _key_metrics(result.metrics), "seconds": time.monotonic() - t0}


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _matching_model(catalog: Catalog, name: str, data: str, options: dict[str, Any],
                    evals: list[str]) -> dict[str, Any] | None:
    """A registered version of ``name`` trained on ``data`` with these options and evals."""
    try:
        latest = catalog.get_model(name)
    except Exception:  # noqa: BLE001 - no such model yet
        return None
    for version in range(latest["version"], 0, -1):
        entry = catalog.get_model(f"{name}@{version}")
        same_options = all(entry["params"].get(k) == v for k, v in options.items())
        same_evals = sorted(entry["metrics"].get("eval") or {}) == sorted(evals)
        if entry["dataset"] == data and same_options and same_evals and not entry["params"].get("resume"):
            return entry
    return None


def _key_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = ("train_pairs", "val_accuracy", "val_loss", "best_epoch", "truncated_share")
    out = {k: metrics.get(k) for k in keep if k in metrics}
    for ref, result in (metrics.get("eval") or {}).items():
        summary = {k: result.get(k) for k in ("accuracy", "pairs", "tie_pairs") if k in result}
        if isinstance(result.get("master_key"), dict):
            summary["master_key_fpr"] = result["master_key"].get("fpr")
        if isinstance(result.get("contrast_instructions"), dict):
            summary["contrast_consistency"] = result["contrast_instructions"].get("consistency")
        out[f"eval {ref}"] = summary
    return out


def plan(recipe: Recipe, catalog: Catalog) -> dict[str, Any]:
    """What a run would do: validated, nothing run, sent or committed."""
    steps = []
    for source in recipe.sources:
        steps.append({"kind": "ingest" if source.path else "source", "name": source.name,
                      "input": str(source.path or source.ref)})
    for step in recipe.steps:
        entry: dict[str, Any] = {"kind": step.kind, "step": step.step, "inputs": step.inputs, "name": step.name,
                                 "settings": step.settings}
        if step.backend:
            entry["backend"] = step.backend
            entry["estimate"] = _estimate(step, recipe, catalog)
        steps.append(entry)
    return {"recipe": recipe.name, "file": str(recipe.path), "dry_run": True, "steps": steps,
            "tag": recipe.tag, "train": recipe.train, "audit": recipe.audit}


# The keys of every step estimate in a dry run's JSON, present whether or not it was made.
ESTIMATE_KEYS = ("requests", "cached", "to_send", "estimated_prompt_tokens", "max_completion_tokens",
                 "estimated_cost_usd", "price_known", "model", "max_cost")


def _estimate(step: StepSpecRecipe, recipe: Recipe, catalog: Catalog) -> dict[str, Any]:
    """An LLM step's request and cost estimate: ``estimated`` says whether one was made,
    ``reason`` why not, ``text`` one line for people; the numbers are None when not made."""
    empty: dict[str, Any] = dict.fromkeys(ESTIMATE_KEYS)
    tables = []
    for ref in step.inputs:
        table, why = _input_for_estimate(ref, recipe, catalog)
        if table is None:
            return {"estimated": False, "reason": why, **empty, "text": f"not estimated: {why}"}
        tables.append(table)
    from factory.steps.llm import estimate_line, preview_table

    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    backend = _backend(step.backend, catalog) if step.backend else None
    found = preview_table(step.kind, step.step, table, settings=step.settings, backend=backend, home=catalog.home,
                          seed=recipe.seed, show=0)
    if not found["llm"]:
        why = "these parameters need no LLM"
        return {"estimated": False, "reason": why, **empty, "text": why}
    return {"estimated": True, "reason": None, **{k: found.get(k) for k in ESTIMATE_KEYS},
            "text": estimate_line(found)}


def _input_for_estimate(ref: str, recipe: Recipe, catalog: Catalog) -> tuple[pa.Table | None, str]:
    """The rows a step will read, when they exist before the run: a source file is read as
    it will be ingested, a catalog version as it is; an earlier step's output cannot be."""
    name = ref.split("@", 1)[0]
    for source in recipe.sources:
        if source.name == name and source.path is not None:
            from schemas.readers import read_path

            return read_path(source.path, source.format).table, ""
    if any(step.name == name for step in recipe.steps):
        return None, (f"its input {ref} is made by an earlier step of this recipe (run the recipe, then "
                      "--dry-run again for an exact estimate)")
    return catalog.read_table(catalog.resolve(ref)), ""
