"""A recipe: a mergekit config plus optional `tune:` and `hub_ids:` sections, as the user wrote it."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from mergekit.config import MergeConfiguration

TUNE_KEY = "tune"
HUB_IDS_KEY = "hub_ids"  # {model as written: Hub repo id} for the card of models given by local path
EXTENSION_KEYS = (TUNE_KEY, HUB_IDS_KEY)
DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class Recipe:
    """A validated recipe. `data` is the YAML mapping as written (merge keys and `tune`)."""

    data: dict[str, Any]
    source: str = "<recipe>"

    @property
    def merge_data(self) -> dict[str, Any]:
        """The mergekit part of the recipe (everything but `tune` and `hub_ids`)."""
        return {k: v for k, v in self.data.items() if k not in EXTENSION_KEYS}

    @property
    def tune(self) -> dict[str, Any] | None:
        return self.data.get(TUNE_KEY)

    @property
    def method(self) -> str:
        return self.data["merge_method"]

    def merge_config(self) -> MergeConfiguration:
        """A fresh mergekit configuration (mergekit's planner mutates the one it is given)."""
        return MergeConfiguration.model_validate(copy.deepcopy(self.merge_data))

    def to_yaml(self, *, include_tune: bool = True) -> str:
        data = self.data if include_tune else {k: v for k, v in self.data.items() if k != TUNE_KEY}
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)

    def copy(self) -> Recipe:
        return Recipe(copy.deepcopy(self.data), self.source)


def model_entries(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every `{model: …, parameters: …}` entry of a recipe mapping (models, slices, modules)."""
    entries: list[dict[str, Any]] = list(data.get("models") or [])
    for output_slice in data.get("slices") or []:
        entries += output_slice.get("sources") or []
    for module in (data.get("modules") or {}).values():
        entries += module.get("models") or []
        for output_slice in module.get("slices") or []:
            entries += output_slice.get("sources") or []
    return entries


def model_name(entry_model: Any) -> str:
    """The model reference of an entry as a string, the way mergekit prints it."""
    if isinstance(entry_model, str):
        return entry_model
    from mergekit.common import ModelReference

    return str(ModelReference.model_validate(entry_model))
