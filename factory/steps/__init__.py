"""Steps: generators and filters as pure batch functions, and the runner around them.

A step is ``fn(table, ctx) -> StepResult`` registered with :func:`generator` or
:func:`filter_step` and a typed parameter dataclass (:func:`param` fields). The runner
validates parameters, stamps provenance, stores filter scores, reconciles counts and
commits with lineage; see :mod:`factory.steps.runner` and :mod:`factory.steps.api`.
"""

from factory.steps.context import (
    ACTIONS,
    GENERATED_SCHEMA,
    Decision,
    MissingBackendError,
    StepContext,
    StepResult,
    failed_rows,
)
from factory.steps.params import ParamError, build_params, describe, param, parse_settings
from factory.steps.registry import StepSpec, filter_step, generator, get_step, load_steps, steps

__all__ = [
    "ACTIONS",
    "Decision",
    "GENERATED_SCHEMA",
    "MissingBackendError",
    "ParamError",
    "StepContext",
    "StepResult",
    "StepSpec",
    "build_params",
    "describe",
    "failed_rows",
    "filter_step",
    "generator",
    "get_step",
    "load_steps",
    "param",
    "parse_settings",
    "steps",
]
