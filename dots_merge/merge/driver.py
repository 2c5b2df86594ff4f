"""The merge driver: recipe → checks → (pre-pass) → mergekit plan → streamed shards → model folder.

mergekit plans and schedules the work (names, aliases, tied weights, tokenizers, slices, any method);
this module adds what it lacks: strict input checks before anything is written, the global-rescale
pre-pass, output streamed tensor by tensor, and an output folder that appears only when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mergekit.architecture import WeightInfo, get_architecture_info
from mergekit.common import dtype_from_name
from mergekit.graph import Executor, Task
from mergekit.options import MergeOptions
from mergekit.plan import MergePlanner
from mergekit.tokenizer import TokenizerInfo

from dots_merge.checkpoints import Checkpoint, check_compatible, open_checkpoint
from dots_merge.core import METHOD_NAME, is_finite
from dots_merge.errors import DotsMergeError, NonFiniteError, OutputExistsError
from dots_merge.faults import fault_point
from dots_merge.fileio import disk_full_is_an_error
from dots_merge.merge import mergekit_compat
from dots_merge.merge.method import kernel_context
from dots_merge.merge.prepass import Prepass, default_cache_dir, run_prepass
from dots_merge.merge.writer import StreamingShardWriter, parse_size
from dots_merge.recipe import Recipe, load_recipe, model_entries, model_name, parse_recipe
from dots_merge.report.card import render_card

LOG = logging.getLogger(__name__)
RECIPE_FILE = "mergekit_config.yml"


@dataclass
class MergeResult:
    """What a merge produced."""

    out_dir: Path
    recipe: Recipe
    rescale_factors: dict[str, float] = field(default_factory=dict)
    prepass_cached: bool = False
    seconds: float = 0.0


def as_recipe(recipe: Recipe | str | os.PathLike | Mapping[str, Any]) -> Recipe:
    """Accept a `Recipe`, a path to a YAML file, or a mapping."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe), source="<recipe>")
    return load_recipe(recipe)


def inspect_models(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, Checkpoint]:
    """Open every model of the recipe and check they can be merged; base model first."""
    config = recipe.merge_config()
    refs = config.referenced_models()
    base_ref = config.base_model or refs[0]
    ordered = [base_ref, *sorted((r for r in refs if r != base_ref), key=str)]
    checkpoints: dict[str, Checkpoint] = {}
    for ref in ordered:
        if ref.lora is not None:
            LOG.warning("%s: LoRA adapters are merged by mergekit and not checked beforehand", ref)
            continue
        checkpoints[str(ref)] = open_checkpoint(ref.model.path, revision=ref.model.revision, allow_pickle=allow_pickle)
    loaded = list(checkpoints.values())
    if loaded:
        check_compatible(
            loaded[0],
            loaded[1:],
            same_tensors=bool(config.models),
            vocab_may_differ=bool(config.tokenizer or config.tokenizer_source),
        )
    return checkpoints


def resolve_device(device: str) -> str:
    """`cpu`, `cuda` or `cuda:N`, checked against what this machine has; `auto`: the first GPU, else the CPU."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DotsMergeError(f"--device {device}: no CUDA device is available (torch {torch.__version__})")
        return device
    raise DotsMergeError(f"--device {device}: use auto, cpu, cuda or cuda:N")


def needs_prepass(recipe: Recipe) -> bool:
    """`dots` with `rescale: global` and no `rescale_factor` given: whole-model norms are needed first."""
    if recipe.method != METHOD_NAME:
        return False
    params = recipe.data.get("parameters") or {}
    if params.get("rescale", "global") != "global" or "rescale_factor" in params:
        return False
    return not any("rescale_factor" in (e.get("parameters") or {}) for e in model_entries(recipe.data))


def with_factors(recipe: Recipe, factors: Mapping[str, float]) -> Recipe:
    """The recipe with each fine-tune's global `rescale_factor` written in (the recipe actually used)."""
    used = recipe.copy()
    for entry in model_entries(used.data):
        name = model_name(entry["model"])
        if name in factors:
            entry.setdefault("parameters", {})
            entry["parameters"] = {**(entry["parameters"] or {}), "rescale_factor": float(factors[name])}
    return used


def plan_tasks(recipe: Recipe, options: MergeOptions) -> tuple[Any, Any, MergePlanner, dict[Task, WeightInfo]]:
    """mergekit's plan of `recipe`: its config, architecture, planner and one merge task per output tensor."""
    config = recipe.merge_config()
    arch_info = get_architecture_info(config, options)
    cfg_out = mergekit_compat.out_model_config(config, arch_info, trust_remote_code=options.trust_remote_code)
    planner, targets = mergekit_compat.plan(config, arch_info, options, cfg_out)
    return config, arch_info, planner, targets


def output_dtype(recipe: Recipe, checkpoints: Mapping[str, Checkpoint]) -> str:
    """`out_dtype`, else `dtype`, else the dtype most of the base's parameters are stored in."""
    base = next(iter(checkpoints.values()), None)
    return (
        recipe.data.get("out_dtype")
        or recipe.data.get("dtype")
        or (base.dominant_dtype() if base else None)
        or "float32"
    )


def with_output_dtype(recipe: Recipe, checkpoints: Mapping[str, Checkpoint]) -> Recipe:
    """For `dots`, the recipe with an explicit `out_dtype` (the kernel returns float32)."""
    used = recipe.copy()
    if used.method == METHOD_NAME and not used.data.get("out_dtype"):
        used.data["out_dtype"] = output_dtype(used, checkpoints)
    return used


def global_prepass(
    targets: Mapping[Task, WeightInfo],
    checkpoints: Mapping[str, Checkpoint],
    options: MergeOptions,
    *,
    cache_dir: Path | None,
    check_finite: bool = True,
) -> Prepass:
    """The whole-model norms and selections of `rescale: global` for a planned merge (cached)."""
    return run_prepass(
        list(targets),
        fingerprints={
            name: {"files": c.fingerprint(), "digest": c.content_digest()} for name, c in checkpoints.items()
        },
        cache_dir=cache_dir,
        device=options.device,
        check_finite=check_finite,
        quiet=options.quiet,
    )


def prepare(
    recipe: Recipe,
    checkpoints: Mapping[str, Checkpoint],
    options: MergeOptions,
    *,
    cache_dir: Path | None,
    check_finite: bool = True,
) -> tuple[Recipe, Prepass]:
    """The recipe actually merged: explicit `out_dtype`, and for `rescale: global` the factors of the pre-pass.

    The dots kernel returns float32; without `out_dtype` the output takes `dtype`, else the base's dtype.
    """
    used = with_output_dtype(recipe, checkpoints)
    if not needs_prepass(used):
        return used, Prepass()
    _, _, _, targets = plan_tasks(used, options)
    prepass = global_prepass(targets, checkpoints, options, cache_dir=cache_dir, check_finite=check_finite)
    return with_factors(used, prepass.factors), prepass


def merge(
    recipe: Recipe | str | os.PathLike | Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    out_shard_size: str | int = "5GB",
    force: bool = False,
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    cache_dir: str | os.PathLike | None = "default",
    trust_remote_code: bool = False,
    quiet: bool = True,
) -> MergeResult:
    """Merge a recipe into `out_dir` (safetensors shards, config, tokenizer, recipe used, model card).

    The folder is built beside `out_dir` and renamed into place only when complete; an existing
    non-empty `out_dir` is refused unless `force`. `cache_dir=None` disables the pre-pass cache.
    """
    started = time.perf_counter()
    recipe = as_recipe(recipe)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise OutputExistsError(f"{out_dir}: exists and is not empty (pass --force to replace it)")
    device = resolve_device(device)
    try:
        shard_size = parse_size(out_shard_size)
    except ValueError as error:
        raise DotsMergeError(f"--out-shard-size: {error}") from None
    checkpoints = inspect_models(recipe, allow_pickle=allow_pickle)
    options = MergeOptions(
        device=device,
        out_shard_size=shard_size,
        lazy_unpickle=False,
        trust_remote_code=trust_remote_code,
        quiet=quiet,
    )
    cache = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)

    mergekit_compat.reset_loaders(options)
    try:
        used, prepass = prepare(recipe, checkpoints, options, cache_dir=cache, check_finite=not allow_nonfinite)
        _remove_orphans(out_dir)
        tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        try:
            with (
                kernel_context(
                    selections=prepass.selections,
                    check_finite=not allow_nonfinite,
                    inputs_checked=bool(prepass.selections),
                ),
                disk_full_is_an_error(out_dir, "writing the merged model (nothing was kept)"),
            ):
                _write_model(used, tmp, options, checkpoints, check_finite=not allow_nonfinite)
            (tmp / "README.md").write_text(
                render_card(used, list(checkpoints.values()), rescale_factors=prepass.factors),
                encoding="utf-8",
            )
            _move_into_place(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        mergekit_compat.reset_loaders()
    return MergeResult(
        out_dir=out_dir,
        recipe=used,
        rescale_factors=prepass.factors,
        prepass_cached=prepass.from_cache,
        seconds=time.perf_counter() - started,
    )


def _write_model(
    recipe: Recipe,
    tmp: Path,
    options: MergeOptions,
    checkpoints: Mapping[str, Checkpoint],
    *,
    check_finite: bool,
) -> None:
    config, arch_info, planner, targets = plan_tasks(recipe, options)
    tasks: list[Any] = list(targets)
    tokenizer_task = mergekit_compat.tokenizer_task(planner)
    if tokenizer_task is not None:
        tasks.append(tokenizer_task)
    writer = StreamingShardWriter(tmp, [w.name for w in targets.values()], options.out_shard_size)
    executor = Executor(tasks, math_device=torch.device(options.device), storage_device=torch.device("cpu"))
    tokenizer = None
    check_output = check_finite and recipe.method != METHOD_NAME  # the dots kernel checks its inputs itself
    try:
        for task, value in executor.run(quiet=options.quiet):
            if isinstance(value, TokenizerInfo):
                tokenizer = value.tokenizer
            elif task in targets and value is not None:
                fault_point("merge")
                weight = targets[task]
                name = weight.name
                out_dtype = dtype_from_name(weight.force_dtype or config.out_dtype)
                if out_dtype is not None and value.is_floating_point():
                    value = value.to(out_dtype)
                if check_output and value.is_floating_point() and not is_finite(value):
                    raise NonFiniteError(
                        f"merged tensor {name!r} holds NaN or Inf: an input holds non-finite values "
                        "(pass --allow-nonfinite to keep it)"
                    )
                writer.write(name, value)
        writer.finish()
    except BaseException:
        writer.abort()
        raise

    cfg_out = planner.out_model_config
    if tokenizer is not None:
        pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
        mergekit_compat.update_config_vocab(cfg_out, arch_info, tokenizer, pad_to_multiple_of=pad)
    cfg_out.save_pretrained(str(tmp))
    donor = _donor(config, checkpoints)
    if tokenizer is not None:
        mergekit_compat.set_chat_template(tokenizer, config)
        tokenizer.save_pretrained(str(tmp))
    elif donor is not None and donor.has_tokenizer:
        mergekit_compat.copy_tokenizer(config, str(tmp), options)
    if donor is not None and (donor.path / "generation_config.json").is_file():
        shutil.copy(donor.path / "generation_config.json", tmp / "generation_config.json")
    mergekit_compat.copy_tagalong_files(config, str(tmp), arch_info.tagalong_files or [], options)
    (tmp / RECIPE_FILE).write_text(recipe.to_yaml(include_tune=False), encoding="utf-8")


def _donor(config: Any, checkpoints: Mapping[str, Checkpoint]) -> Checkpoint | None:
    ref = config.base_model or config.referenced_models()[0]
    return checkpoints.get(str(ref))


def _remove_orphans(out_dir: Path) -> None:
    """Delete the partial folders that merges killed before they finished (their process is gone) left beside
    `out_dir`."""
    for partial in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder to `out_dir`, replacing what was there (already allowed by the caller)."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
