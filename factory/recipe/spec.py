"""Recipe files: parsed with their line numbers and validated before anything runs.

A recipe (YAML) names sources to ingest, an ordered list of steps (generate, filter,
merge), an optional tag, an optional training run and an optional evaluation::

    recipe: quickstart
    seed: 0
    sources:
      - name: demo
        path: seeds/demo_pairs.jsonl      # relative to the recipe file
    steps:
      - generate: causal
        from: demo
        name: demo-causal
        set: {attributes: [correctness, completeness]}
      - merge: [demo, demo-causal]
        name: demo-aug
      - filter: dedup
        from: demo-aug
        name: demo-train
    tag: {dataset: demo-train, tag: quickstart}
    train: {data: demo-train, name: demo-rm, mode: head, eval: [demo]}

Every error names the recipe file, the line and the key, and comes before any work or
any LLM request: unknown steps, keys or types (from the steps' own declarations), refs
that neither an earlier step makes nor the catalog holds, and missing backends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from factory.steps import ParamError, build_params, get_step
from schemas.errors import PrefabError


class RecipeError(PrefabError):
    """A recipe that cannot run, located by file, line and key."""


@dataclass
class Located:
    value: Any
    line: int  # 1-based


@dataclass
class SourceSpec:
    name: str
    path: Path | None  # a file to ingest, or None for an existing catalog ref
    ref: str | None
    format: str
    line: int


@dataclass
class StepSpecRecipe:
    index: int
    kind: str  # "generator" | "filter" | "merge"
    step: str  # step name ("merge" for merges)
    inputs: list[str]
    name: str
    settings: dict[str, Any]
    backend: str | None
    line: int
    with_input: bool = False


@dataclass
class Recipe:
    path: Path
    name: str
    seed: int
    sources: list[SourceSpec]
    steps: list[StepSpecRecipe]
    tag: dict[str, Any] | None
    train: dict[str, Any] | None
    audit: dict[str, Any] | None = None
    backend: str | None = None
    text: str = ""


def _plain(node: yaml.Node) -> Any:
    """A node as plain Python with Located wrappers on mappings' values."""
    if isinstance(node, yaml.MappingNode):
        return {key.value: Located(_plain(value), value.start_mark.line + 1) for key, value in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [Located(_plain(item), item.start_mark.line + 1) for item in node.value]
    return yaml.safe_load(yaml.serialize(node))


def _unwrap(value: Any) -> Any:
    if isinstance(value, Located):
        return _unwrap(value.value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


STEP_KEYS = {"generate", "filter", "merge", "from", "name", "set", "backend", "with_input"}
TOP_KEYS = {"recipe", "seed", "sources", "steps", "tag", "train", "audit", "backend"}
AUDIT_KEYS = {"dataset", "html", "json", "model", "top"}
TRAIN_KEYS = {"data", "name", "mode", "base", "eval", "epochs", "lr", "batch_size", "max_length", "seed",
              "val_fraction", "patience", "max_pairs", "center_coef", "features", "head_hidden",
              "augment_weight", "val_on", "residual_of"}


def load_recipe(path: str | Path, *, catalog: Any | None = None) -> Recipe:
    """Parse and validate ``path``; with ``catalog``, refs to existing versions are checked."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    text = path.read_text()

    def fail(line: int, key: str, message: str) -> RecipeError:
        return RecipeError(f"{path}, line {line}, key {key!r}: {message}")

    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{path}, line 1: a recipe is a mapping with sources and steps")
    top = _plain(root)
    for key, value in top.items():
        if key not in TOP_KEYS:
            raise fail(value.line, key, f"unknown key (known: {', '.join(sorted(TOP_KEYS))})")
    name = str(_unwrap(top.get("recipe", Located(path.stem, 1))))
    seed_value = _unwrap(top.get("seed", Located(0, 1)))
    if not isinstance(seed_value, int) or isinstance(seed_value, bool):
        raise fail(top["seed"].line, "seed", f"expects an integer, got {seed_value!r}")
    default_backend = _unwrap(top["backend"]) if "backend" in top else None

    known: dict[str, int] = {}  # dataset name -> line that makes it
    sources = []
    for item in _located_list(top.get("sources"), "sources", fail):
        entry = _mapping(item, "sources", fail)
        for key, value in entry.items():
            if key not in {"name", "path", "ref", "format"}:
                raise fail(value.line, f"sources.{key}", "unknown key (known: name, path, ref, format)")
        if "name" not in entry:
            raise fail(item.line, "sources.name", "every source needs a name")
        source_name = str(_unwrap(entry["name"]))
        if ("path" in entry) == ("ref" in entry):
            raise fail(item.line, f"sources.{source_name}", "give exactly one of path (a file to ingest) or ref")
        file = None
        if "path" in entry:
            file = (path.parent / str(_unwrap(entry["path"]))).resolve()
            if not file.exists():
                raise fail(entry["path"].line, "sources.path", f"no such file {file}")
        ref = str(_unwrap(entry["ref"])) if "ref" in entry else None
        if ref is not None and catalog is not None:
            try:
                catalog.resolve(ref)
            except PrefabError as exc:
                raise fail(entry["ref"].line, "sources.ref", str(exc)) from None
        sources.append(SourceSpec(source_name, file, ref, str(_unwrap(entry.get("format", Located("auto", 0)))),
                                  item.line))
        known[source_name] = item.line

    steps = []
    for index, item in enumerate(_located_list(top.get("steps"), "steps", fail)):
        entry = _mapping(item, "steps", fail)
        for key, value in entry.items():
            if key not in STEP_KEYS:
                raise fail(value.line, f"steps[{index}].{key}", f"unknown key (known: {', '.join(sorted(STEP_KEYS))})")
        kinds = [k for k in ("generate", "filter", "merge") if k in entry]
        if len(kinds) != 1:
            raise fail(item.line, f"steps[{index}]", "each step is exactly one of generate, filter or merge")
        verb = kinds[0]
        if "name" not in entry:
            raise fail(item.line, f"steps[{index}].name", "every step names the dataset it commits")
        out_name = str(_unwrap(entry["name"]))
        reads_files = False
        if verb == "merge":
            inputs = [str(x) for x in _as_list(_unwrap(entry["merge"]))]
            kind, step_name, settings, backend = "merge", "merge", {}, None
            if len(inputs) < 2:
                raise fail(entry["merge"].line, f"steps[{index}].merge", "merge needs at least two datasets")
        else:
            kind = "generator" if verb == "generate" else "filter"
            step_name = str(_unwrap(entry[verb]))
            try:
                spec = get_step(step_name, kind)  # type: ignore[arg-type]
            except ParamError as exc:
                raise fail(entry[verb].line, f"steps[{index}].{verb}", str(exc)) from None
            if "from" not in entry:
                raise fail(item.line, f"steps[{index}].from", "every generate/filter step needs from")
            inputs = [str(x) for x in _as_list(_unwrap(entry["from"]))]
            settings = _unwrap(entry.get("set", Located({}, item.line)))
            if not isinstance(settings, dict):
                raise fail(entry["set"].line, f"steps[{index}].set", "expects a mapping of parameter: value")
            set_lines = entry["set"].value if "set" in entry else {}
            try:
                build_params(spec.params, settings, step=step_name)
            except ParamError as exc:
                bad = next((k for k in settings if f"'{k}'" in str(exc)), None)
                line = set_lines[bad].line if bad in set_lines else (entry["set"].line if "set" in entry else item.line)
                raise fail(line, f"steps[{index}].set" + (f".{bad}" if bad else ""), str(exc)) from None
            backend = _unwrap(entry["backend"]) if "backend" in entry else default_backend
            if spec.backend == "required" and backend is None:
                raise fail(entry[verb].line, f"steps[{index}].backend",
                           f"{kind} {step_name} needs an LLM backend (backend: openai:MODEL?base_url=…)")
            reads_files = spec.input_kind == "trajectories"
            if reads_files:  # trajectory steps read files, relative to the recipe
                inputs = [str((path.parent / i).resolve()) for i in inputs]
        if not reads_files:
            for ref in inputs:
                line = entry["from" if verb != "merge" else "merge"].line
                _check_ref(ref, known, catalog, fail, line, f"steps[{index}].{'merge' if verb == 'merge' else 'from'}")
        steps.append(StepSpecRecipe(index, kind, step_name, inputs, out_name, settings, backend, item.line,
                                    bool(_unwrap(entry.get("with_input", Located(False, 0))))))
        known[out_name] = item.line

    tag = None
    if "tag" in top:
        tag = _unwrap(top["tag"])
        if not isinstance(tag, dict) or set(tag) - {"dataset", "tag"} or not {"dataset", "tag"} <= set(tag):
            raise fail(top["tag"].line, "tag", "expects {dataset: NAME, tag: TAG}")
        _check_ref(str(tag["dataset"]), known, catalog, fail, top["tag"].line, "tag.dataset")
    train = None
    if "train" in top:
        train = _unwrap(top["train"])
        if not isinstance(train, dict):
            raise fail(top["train"].line, "train", "expects a mapping with data and name")
        for key in train:
            if key not in TRAIN_KEYS:
                raise fail(top["train"].value[key].line, f"train.{key}",
                           f"unknown key (known: {', '.join(sorted(TRAIN_KEYS))})")
        for required in ("data", "name"):
            if required not in train:
                raise fail(top["train"].line, f"train.{required}", "required")
        _check_ref(str(train["data"]), known, catalog, fail, top["train"].value["data"].line, "train.data")
        for ref in _as_list(train.get("eval", [])):
            _check_ref(str(ref), known, catalog, fail, top["train"].value["eval"].line, "train.eval")
    audit = None
    if "audit" in top:
        audit = _unwrap(top["audit"])
        if not isinstance(audit, dict) or "dataset" not in audit:
            raise fail(top["audit"].line, "audit", "expects a mapping with dataset (and html, json, model, top)")
        for key in audit:
            if key not in AUDIT_KEYS:
                raise fail(top["audit"].value[key].line, f"audit.{key}",
                           f"unknown key (known: {', '.join(sorted(AUDIT_KEYS))})")
        _check_ref(str(audit["dataset"]), known, catalog, fail, top["audit"].value["dataset"].line, "audit.dataset")
    return Recipe(path, name, seed_value, sources, steps, tag, train, audit, backend=default_backend, text=text)


def _check_ref(ref: str, known: dict[str, int], catalog: Any, fail: Any, line: int, key: str) -> None:
    base = ref.split("@", 1)[0]
    if base in known:
        return
    if catalog is None:
        raise fail(line, key, f"{ref!r} is not made by an earlier source or step")
    try:
        catalog.resolve(ref)
    except PrefabError:
        raise fail(line, key, f"{ref!r} is neither made by an earlier source or step nor in the catalog") from None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _located_list(value: Located | None, key: str, fail: Any) -> list[Located]:
    if value is None:
        return []
    if not isinstance(value.value, list):
        raise fail(value.line, key, "expects a list")
    return value.value


def _mapping(item: Located, key: str, fail: Any) -> dict[str, Located]:
    if not isinstance(item.value, dict):
        raise fail(item.line, key, "each entry is a mapping")
    return item.value
