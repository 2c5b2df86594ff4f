"""Loading recipes strictly: a mergekit config plus an optional `tune:` section.

mergekit ignores keys it does not know (`densty: 0.3` silently becomes the default density); a recipe here
is checked key by key against mergekit's own schema and against the merge method's parameters, and every
problem is reported as one line that names the file and the key path (`models[1].parameters.densty`).
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic
import yaml
from mergekit import merge_methods
from mergekit.config import ConditionalParameter, MergeConfiguration
from mergekit.merge_methods.base import ParameterScope, ParameterSpec

from dots_merge.core import METHOD_NAME
from dots_merge.errors import RecipeError
from dots_merge.recipe.recipe import DTYPES, EXTENSION_KEYS, HUB_IDS_KEY, TUNE_KEY, Recipe, model_entries, model_name
from dots_merge.recipe.tune_section import parse_tune


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}: not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a text file") from None
    return parse_recipe(data, source=str(path))


def parse_recipe(data: Any, *, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a mapping (as loaded from YAML)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping of keys, got {type(data).__name__}")
    method_name = data.get("merge_method")
    if method_name is None:
        raise RecipeError(f"{source}: missing key 'merge_method' (e.g. merge_method: {METHOD_NAME})")
    names = sorted(m.spec.name for m in merge_methods.registered_methods())
    if method_name not in names:
        raise RecipeError(f"{source}: merge_method: unknown method {method_name!r}{_did_you_mean(method_name, names)}")
    spec = merge_methods.get(method_name).spec
    checker = _Checker(source, {p.name: p for p in spec.parameters}, method_name)
    merge_part = {k: v for k, v in data.items() if k not in EXTENSION_KEYS}
    checker.walk_model(MergeConfiguration, merge_part, "", extra=set(EXTENSION_KEYS))
    if TUNE_KEY in data and not isinstance(data[TUNE_KEY], dict):
        raise RecipeError(f"{source}: {TUNE_KEY}: must be a mapping")
    for key in ("dtype", "out_dtype"):
        if key in data and data[key] not in DTYPES:
            raise RecipeError(f"{source}: {key}: must be one of {', '.join(DTYPES)}, got {data[key]!r}")
    try:
        MergeConfiguration.model_validate(copy.deepcopy(merge_part))
    except (pydantic.ValidationError, RuntimeError, ValueError) as error:
        raise RecipeError(f"{source}: {_pydantic_message(error)}") from None
    if method_name == METHOD_NAME:
        _check_dots(data, source)
    _check_hub_ids(data, source)
    recipe = Recipe(data=data, source=source)
    if TUNE_KEY in data:
        parse_tune(recipe, load_queries=False)
    return recipe


def _check_dots(data: Mapping[str, Any], source: str) -> None:
    if not data.get("base_model"):
        raise RecipeError(f"{source}: base_model: the dots method needs a base_model (the task vectors are θ − θ_base)")
    rescale = (data.get("parameters") or {}).get("rescale", "global")
    if not isinstance(rescale, str):
        raise RecipeError(f"{source}: parameters.rescale: must be one plain value (global, tensor or none)")


def _check_hub_ids(data: Mapping[str, Any], source: str) -> None:
    hub_ids = data.get(HUB_IDS_KEY)
    if hub_ids is None:
        return
    if not isinstance(hub_ids, dict):
        raise RecipeError(f"{source}: {HUB_IDS_KEY}: a mapping of model (as written) to Hub repo id (org/name)")
    known = {model_name(e["model"]) for e in model_entries(data)}
    if data.get("base_model"):
        known.add(model_name(data["base_model"]))
    for model, repo in hub_ids.items():
        if model not in known:
            raise RecipeError(f"{source}: {HUB_IDS_KEY}.{model}: not a model of this recipe")
        if not isinstance(repo, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
            raise RecipeError(f"{source}: {HUB_IDS_KEY}.{model}: {repo!r} is not a Hub repo id (org/name)")


class _Checker:
    """Walks a recipe against mergekit's pydantic schema, reporting unknown keys and bad parameters."""

    def __init__(self, source: str, params: dict[str, ParameterSpec], method: str):
        self.source = source
        self.params = params
        self.method = method

    def fail(self, where: str, message: str) -> typing.NoReturn:
        raise RecipeError(f"{self.source}: {where}: {message}" if where else f"{self.source}: {message}")

    def walk_model(self, model: type[pydantic.BaseModel], value: Any, where: str, extra: set[str] = frozenset()):
        if not isinstance(value, dict):
            return  # strings for ModelReference and the like; pydantic reports real type errors
        fields = model.model_fields
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key in extra:
                continue
            if key not in fields:
                self.fail(path, f"unknown key{_did_you_mean(str(key), [*fields, *extra])}")
            if key == "parameters":
                self.check_parameters(item, path, model_level=model.__name__ in _MODEL_LEVEL)
            else:
                self.walk_annotation(fields[key].annotation, item, path)

    def walk_annotation(self, annotation: Any, value: Any, where: str) -> None:
        origin = typing.get_origin(annotation)
        args = typing.get_args(annotation)
        if origin in (typing.Union, types.UnionType):
            models = [a for a in args if isinstance(a, type) and issubclass(a, pydantic.BaseModel)]
            others = [a for a in args if a not in models]
            if isinstance(value, dict) and models:
                best = max(models, key=lambda m: len(set(value) & set(m.model_fields)))
                self.walk_model(best, value, where)
            for other in others:
                self.walk_annotation(other, value, where)
        elif origin in (list, typing.List) and isinstance(value, list):  # noqa: UP006
            for i, item in enumerate(value):
                self.walk_annotation(args[0], item, f"{where}[{i}]")
        elif origin in (dict, typing.Dict) and isinstance(value, dict):  # noqa: UP006
            for key, item in value.items():
                self.walk_annotation(args[1], item, f"{where}.{key}")
        elif isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            self.walk_model(annotation, value, where)

    def check_parameters(self, params: Any, where: str, *, model_level: bool) -> None:
        if params is None:
            return
        if not isinstance(params, dict):
            self.fail(where, "must be a mapping of parameter names to values")
        for name, setting in params.items():
            path = f"{where}.{name}"
            spec = self.params.get(name)
            if spec is None:
                known = sorted(self.params)
                self.fail(
                    path,
                    f"unknown parameter for merge_method {self.method}{_did_you_mean(str(name), known)}"
                    f" (known: {', '.join(known) or 'none'})",
                )
            if model_level and spec.scope == ParameterScope.SHARED:
                self.fail(path, f"{name} is shared by all models: set it under the top-level `parameters:`")
            self.check_setting(spec, setting, path)

    def check_setting(self, spec: ParameterSpec, setting: Any, where: str) -> None:
        if isinstance(setting, dict):
            unknown = set(setting) - set(ConditionalParameter.model_fields)
            if unknown:
                self.fail(f"{where}.{sorted(unknown)[0]}", "unknown key (a filtered value has `filter` and `value`)")
            if "value" not in setting:
                self.fail(where, "a filtered value needs `value:`")
            self.check_setting(spec, setting["value"], f"{where}.value")
        elif isinstance(setting, list):
            if not setting:
                self.fail(where, "empty list")
            for i, item in enumerate(setting):
                self.check_setting(spec, item, f"{where}[{i}]")
        else:
            self.check_scalar(spec, setting, where)

    def check_scalar(self, spec: ParameterSpec, value: Any, where: str) -> None:
        numeric = _accepts_number(spec.value_type)
        if numeric and isinstance(value, bool):
            self.fail(where, f"must be a number, got {value!r}")
        if value is None and "None" not in repr(spec.value_type):
            self.fail(where, "must not be empty")
        try:
            spec.validate(value)
        except pydantic.ValidationError as error:
            detail = error.errors()[0]
            if numeric and detail["type"] in ("float_parsing", "float_type", "int_parsing", "int_type"):
                self.fail(where, f"must be a number, got {value!r}")
            if spec.name == "density":
                self.fail(where, f"density must be in (0, 1], got {value!r}")
            self.fail(where, f"invalid value {value!r}: {detail['msg']}")


_MODEL_LEVEL = {"InputModelDefinition", "InputSliceDefinition"}


def _accepts_number(annotation: Any) -> bool:
    text = repr(annotation)
    return "float" in text or "int" in text


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=2, cutoff=0.75) or difflib.get_close_matches(
        word, choices, n=1, cutoff=0.6
    )
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _pydantic_message(error: Exception) -> str:
    if isinstance(error, pydantic.ValidationError):
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return f"{loc}: {first['msg']}" if loc else first["msg"]
    return str(error).splitlines()[0]


