"""Every use of mergekit's private API, in one place, checked against the pinned release.

mergekit 0.1.5's `plan_in_memory` fails (pydantic generic `Task[Tensor]`), so the plan comes from
`MergePlanner._plan()` and its `_tensors`/`_tokenizer_task`; the output folder is completed with the private
helpers of `mergekit.merge` that `run_merge` itself uses. A mergekit release may rename any of them: `check()`
says which one is gone and which release this module was written for (`tests/test_compat.py` runs it).
"""

from __future__ import annotations

import importlib.metadata
import inspect
from typing import Any

import mergekit.merge as _merge
import transformers
from mergekit.architecture import WeightInfo
from mergekit.graph import Task
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner

PINNED = "0.1.5"

# name in mergekit.merge -> its parameters, as in the pinned release
_MERGE_HELPERS = {
    "_model_out_config": ("config", "arch_info", "trust_remote_code"),
    "_copy_tokenizer": ("merge_config", "out_path", "options"),
    "_set_chat_template": ("tokenizer", "merge_config", "trust_remote_code"),
    "_update_config_vocab": ("config", "arch_info", "tokenizer", "pad_to_multiple_of"),
    "_copy_tagalong_files": ("merge_config", "out_path", "files", "options"),
}
_PLANNER_MEMBERS = ("_plan", "_tensors", "_tokenizer_task", "out_model_config")


class MergekitChanged(RuntimeError):
    """The installed mergekit lacks a private name dots-merge relies on."""


def installed_version() -> str:
    return importlib.metadata.version("mergekit")


def check() -> None:
    """Raise `MergekitChanged`, naming the pinned release, when a private name used here is missing or changed."""
    where = f"dots-merge needs mergekit=={PINNED} (installed: {installed_version()})"
    for name, params in _MERGE_HELPERS.items():
        helper = getattr(_merge, name, None)
        if helper is None:
            raise MergekitChanged(f"{where}: mergekit.merge.{name} is gone")
        found = tuple(inspect.signature(helper).parameters)
        if found != params:
            raise MergekitChanged(f"{where}: mergekit.merge.{name}{found} no longer takes {params}")
    members = set(dir(MergePlanner)) | set(inspect.signature(MergePlanner.__init__).parameters)
    source = inspect.getsource(MergePlanner)
    for name in _PLANNER_MEMBERS:
        if name not in members and f"self.{name}" not in source:
            raise MergekitChanged(f"{where}: MergePlanner.{name} is gone")
    if not hasattr(LoaderCache, "loaders"):
        raise MergekitChanged(f"{where}: LoaderCache.loaders is gone")


def out_model_config(config: Any, arch_info: Any, *, trust_remote_code: bool) -> Any:
    """The output model's transformers config, as `run_merge` makes it."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # mergekit sets the deprecated `torch_dtype`; not the user's concern
    try:
        return _merge._model_out_config(config, arch_info, trust_remote_code=trust_remote_code)
    finally:
        transformers.logging.set_verbosity(verbosity)


def plan(config: Any, arch_info: Any, options: MergeOptions, cfg_out: Any) -> tuple[MergePlanner, dict[Task, WeightInfo]]:
    """mergekit's plan: the planner and one merge task per output tensor."""
    planner = MergePlanner(config, arch_info, options=options, out_model_config=cfg_out)
    planner._plan()
    targets = {task: weight for weight, task in planner._tensors}
    if len(targets) != len(planner._tensors):
        raise RuntimeError("mergekit planned one task for two output tensors")
    return planner, targets


def tokenizer_task(planner: MergePlanner) -> Task | None:
    """The task that builds a merged tokenizer (`tokenizer:` in the recipe), if any."""
    return planner._tokenizer_task


def update_config_vocab(cfg_out: Any, arch_info: Any, tokenizer: Any, *, pad_to_multiple_of: int | None) -> None:
    _merge._update_config_vocab(cfg_out, arch_info, tokenizer, pad_to_multiple_of=pad_to_multiple_of)


def set_chat_template(tokenizer: Any, config: Any) -> None:
    _merge._set_chat_template(tokenizer, config)


def copy_tokenizer(config: Any, out_path: str, options: MergeOptions) -> None:
    _merge._copy_tokenizer(config, out_path, options=options)


def copy_tagalong_files(config: Any, out_path: str, files: list[str], options: MergeOptions) -> None:
    _merge._copy_tagalong_files(config, out_path, files=files, options=options)


def unmap(model) -> None:
    """Close the shard `model`'s loader holds open: its pages leave this process's RSS (the page cache may keep
    them); the loader opens it again when next read."""
    loader = LoaderCache.loaders.get(model)
    if loader is not None:
        loader.flush()


def reset_loaders(options: MergeOptions | None = None) -> None:
    """Forget mergekit's open checkpoint loaders (process-wide) and, with `options`, set them up anew."""
    LoaderCache.loaders.clear()
    if options is not None:
        LoaderCache().setup(options=options)
