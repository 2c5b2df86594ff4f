"""Recipes: a mergekit config (validated strictly) plus the `tune:` section that says what is searched."""

from dots_merge.recipe.load import load_recipe, parse_recipe
from dots_merge.recipe.recipe import Recipe, model_entries, model_name
from dots_merge.recipe.tune_section import Dimension, Generation, TuneSpec, parse_tune, trial_recipe

__all__ = [
    "Dimension",
    "Generation",
    "Recipe",
    "TuneSpec",
    "load_recipe",
    "model_entries",
    "model_name",
    "parse_recipe",
    "parse_tune",
    "trial_recipe",
]
