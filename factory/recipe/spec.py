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


# The plain-data tags a recipe may use (implicit or written as !!str, !!int...). Any other
# tag (!!python/object/apply:..., a custom !tag) is refused: a recipe is data, never code.
SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq")}


def _refuse_references(text: str, path: Path) -> None:
    """Anchors and aliases are refused before anything is built: a recipe never needs them,
    and nested aliases expand exponentially (the "billion laughs")."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                name = event.anchor
                raise RecipeError(f"{path}, line {event.start_mark.line + 1}: YAML anchors and aliases "
                                  f"(&{name} / *{name}) are not allowed in a recipe; write the value out")
    except yaml.YAMLError:
        return  # compose reports the syntax error with its line


def _plain(node: yaml.Node, path: Path) -> Any:
    """A node as plain Python with Located wrappers on mappings' values."""
    if node.tag not in SAFE_TAGS:
        raise RecipeError(f"{path}, line {node.start_mark.line + 1}: YAML tag {node.tag!r} is not allowed in a "
                          "recipe (only plain strings, numbers, booleans, lists and mappings)")
    if isinstance(node, yaml.MappingNode):
        return {key.value: Located(_plain(value, path), value.start_mark.line + 1) for key, value in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [Located(_plain(item, path), item.start_mark.line + 1) for item in node.value]
    try:
        return yaml.safe_load(yaml.serialize(node))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}, line {node.start_mark.line + 1}: not a valid value "
                          f"({getattr(exc, 'problem', None) or exc})") from None


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
              "augment_weight", "val_on", "residual_of", "trainable_layers"}


def load_recipe(path: str | Path, *, catalog: Any | None = None) -> Recipe:
    """Parse and validate ``path``; with ``catalog``, refs to existing versions are checked."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    text = path.read_text()

    def fail(line: int, key: str, message: str) -> RecipeError:
        return RecipeError(f"{path}, line {line}, key {key!r}: {message}")

    _refuse_references(text, path)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise RecipeError(f"{path}, line 1: a recipe is a mapping with sources and steps")
    top = _plain(root, path)
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
        if not reads_files and out_name in {ref.split("@", 1)[0] for ref in inputs}:
            raise fail(entry["name"].line, f"steps[{index}].name",
                       f"{out_name!r} is also this step's input: its latest version would become this step's "
                       f"output alone; choose another name (e.g. {out_name}-{verb})")
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
        for key, value in train.items():
            problem = _train_value_problem(key, value)
            if problem:
                raise fail(top["train"].value[key].line, f"train.{key}", problem)
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


# recipe train key -> the `prefab train` option that defines it, when the names differ
_TRAIN_DEST = {"center_coef": "center_rewards"}


def _train_actions() -> dict[str, Any]:
    """``prefab train``'s own option definitions (types, choices), by destination: the
    recipe's train block is checked against exactly what the command accepts."""
    import argparse

    from factory.cli.train import register

    root = argparse.ArgumentParser(add_help=False)
    register(root.add_subparsers(), [])
    train = root._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    return {action.dest: action for action in train._actions}


def _train_value_problem(key: str, value: Any) -> str | None:
    """Why ``value`` is not a valid ``train.<key>`` (None when it is), without importing torch."""
    if key in ("data", "name", "base", "residual_of"):
        return None if isinstance(value, str) else f"expects a string, got {value!r}"
    if key == "eval":
        items = value if isinstance(value, list) else [value]
        return None if all(isinstance(i, str) for i in items) else f"expects a ref or a list of refs, got {value!r}"
    if key == "augment_weight":
        number = (int, float)
        if isinstance(value, bool):
            return f"expects a number or a mapping generator: weight, got {value!r}"
        if isinstance(value, number) or (isinstance(value, dict) and all(
                isinstance(v, number) and not isinstance(v, bool) for v in value.values())):
            return None
        return f"expects a number or a mapping generator: weight (e.g. {{master_keys: 0.25}}), got {value!r}"
    action = _train_actions().get(_TRAIN_DEST.get(key, key))
    if action is None:
        return None
    if action.choices is not None:
        if value not in action.choices:
            return f"expects one of {', '.join(map(str, action.choices))}, got {value!r}"
        return None
    if action.type is int and (not isinstance(value, int) or isinstance(value, bool)):
        return f"expects an integer, got {value!r}"
    if action.type is float and (not isinstance(value, int | float) or isinstance(value, bool)):
        return f"expects a number, got {value!r}"
    return None


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
