"""One identity for one step run: everything that made its result, hashed once.

The resume folder of an interrupted run, the stored scores a filter reuses and the key a
recipe finds a finished step by are all this one identity, seen for a purpose:

* ``run``: the resume folder of a generator (all parameters);
* ``scores``: a filter's stored scores and its resume folder (scoring parameters only, so
  a new threshold re-decides from stored scores instead of recomputing them);
* ``recipe``: a recipe step (all parameters, plus what the recipe adds: ``with_input``).

Ingredients: step kind, name and version; the pinned parameters (dataset refs as
``name@N``, models as ``rm@3``, files by path, size and mtime); the exact input versions;
the seed; the backend as the LLM request cache keys it (model, kind, endpoint); and the
template hash when a backend is there to read the templates. Two runs that differ in any
of these never share a result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from factory.steps.params import as_dict

Purpose = Literal["run", "scores", "recipe"]

# Bumped when the recipe of a key changes, so no key of the old recipe is ever matched.
IDENTITY_VERSION = 2


def content_key(*parts: Any) -> str:
    """The one hash of the project's step keys: stable JSON of ``parts``, sha256, 24 hex."""
    text = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


@dataclass(frozen=True)
class StepIdentity:
    kind: str
    step: str
    version: str
    params: Mapping[str, Any]  # pinned values of every parameter
    scoring: frozenset[str]  # the parameters that change scores (not decision thresholds)
    inputs: tuple[str, ...]  # exact refs (name@N) or file pins
    seed: int
    pins: Mapping[str, str] = field(default_factory=dict)  # files and model folders a parameter names
    backend: Mapping[str, Any] | None = None  # factory.llm.backend_identity
    template_hash: str | None = None

    def key(self, purpose: Purpose, **extra: Any) -> str:
        params = dict(self.params)
        if purpose == "scores":
            params = {k: v for k, v in params.items() if k in self.scoring}
        return content_key(IDENTITY_VERSION, purpose, self.kind, self.step, self.version, params,
                           list(self.inputs), dict(self.pins), self.seed, self.backend, self.template_hash,
                           extra)

    def lineage(self) -> dict[str, Any]:
        """What the key was made of, for a version's lineage (``step_identity``)."""
        return {"kind": self.kind, "step": self.step, "version": self.version, "inputs": list(self.inputs),
                "seed": self.seed, "pins": dict(self.pins), "backend": self.backend,
                "template_hash": self.template_hash}


def identify(prepared: Any, inputs: Sequence[str], seed: int) -> StepIdentity:
    """The identity of running ``prepared`` (pinned: see :func:`factory.steps.runner.pin_refs`)
    on the exact ``inputs`` with ``seed``."""
    from factory.llm.base import backend_identity

    spec = prepared.spec
    backend = backend_identity(prepared.backend)
    scoring = frozenset(f.name for f in dataclasses.fields(prepared.params) if not f.metadata.get("decision"))
    return StepIdentity(
        kind=spec.kind, step=spec.name, version=spec.version, params=as_dict(prepared.params),
        scoring=scoring, inputs=tuple(inputs), seed=seed, pins=dict(getattr(prepared, "pins", {}) or {}),
        backend=backend,
        # Templates only shape results when a backend reads them (a rules mode uses none).
        template_hash=spec.template_hash if backend is not None else None,
    )
