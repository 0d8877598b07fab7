"""Recipes: the whole factory from one YAML file (:mod:`factory.recipe.spec` for the
format and its validation, :mod:`factory.recipe.runner` for ``prefab run``)."""

from factory.recipe.runner import plan, run_recipe
from factory.recipe.spec import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "load_recipe", "plan", "run_recipe"]
