"""The streamed pre-pass of `rescale: global`: whole-model norms ‖τ_i‖ and ‖S(τ_i)‖ before the merge.

It walks the tensors exactly as mergekit's plan will feed them to the kernel (same names, aliases, tied
weights and densities after filters), one tensor at a time, and never holds a task vector beyond the
tensor in hand. What it learns — per-tensor top-k selections and squared norms — is cached on disk,
keyed by the weights (files and content digests), the densities and load dtypes (`cache_key`), so a second
merge of the same models skips the pass entirely and its kernel skips selection too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import tqdm
from mergekit.graph import Executor
from mergekit.merge_methods.task_adapter import ExecuteMergeMethodTask

from dots_merge.core import NonFiniteTaskVector, TopK, norm_ratio, sparse_task_vector
from dots_merge.faults import fault_point
from dots_merge.fileio import write_atomic
from dots_merge.merge.method import SelectionKey, nonfinite_error

LOG = logging.getLogger(__name__)
CACHE_VERSION = 4  # 2: the key holds weight digests, load dtypes and the rescale mode; 3: sums by math.fsum; 4: ‖S(τ)‖² exact


@dataclass
class Prepass:
    """Global rescale factors f_i = ‖τ_i‖/‖S(τ_i)‖ and the selections found on the way."""

    squared_norms: dict[str, float] = field(default_factory=dict)
    squared_norms_kept: dict[str, float] = field(default_factory=dict)
    selections: dict[SelectionKey, TopK] = field(default_factory=dict)
    from_cache: bool = False

    @property
    def factors(self) -> dict[str, float]:
        return {m: norm_ratio(self.squared_norms[m], self.squared_norms_kept[m]) for m in self.squared_norms}

    def to_json(self) -> dict:
        entries = defaultdict(dict)
        for (model, tensor, _k), sel in self.selections.items():
            entries[model][tensor] = [sel.k, sel.numel, sel.threshold_bits, sel.ties]
        return {
            "version": CACHE_VERSION,
            "squared_norms": self.squared_norms,
            "squared_norms_kept": self.squared_norms_kept,
            "selections": entries,
        }

    @classmethod
    def from_json(cls, data: dict) -> Prepass:
        selections = {}
        for model, tensors in data["selections"].items():
            for tensor, (k, numel, bits, ties) in tensors.items():
                selections[(model, tensor, k)] = TopK(k=k, numel=numel, threshold_bits=bits, ties=ties)
        return cls(data["squared_norms"], data["squared_norms_kept"], selections, from_cache=True)


def default_cache_dir() -> Path:
    """`$DOTS_MERGE_CACHE`, else `$XDG_CACHE_HOME/dots-merge`, else `~/.cache/dots-merge`."""
    if os.environ.get("DOTS_MERGE_CACHE"):
        return Path(os.environ["DOTS_MERGE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dots-merge"


def cache_key(tasks: Sequence[ExecuteMergeMethodTask], fingerprints: dict[str, Any], check_finite: bool) -> str:
    """Hash of everything the cached numbers depend on: the cache format version, each model's weights (files and
    a content digest), each (tensor, model, density, rescale, load dtype) the merge uses, and whether inputs were
    checked for NaN/Inf (a hit then means the inputs passed that check)."""
    plan = sorted(
        (
            task.output_weight.name,
            str(model),
            repr(float(task.input_parameters[model]["density"])),
            str(task.parameters.get("rescale")),
            str(task.gather_tensors.dtype),
            str(task.gather_tensors.weight_info[model].force_dtype),
        )
        for task in tasks
        for model in task.model_order
        if model != task.base_model
    )
    blob = json.dumps(
        {"version": CACHE_VERSION, "files": fingerprints, "plan": plan, "check_finite": check_finite}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def run_prepass(
    tasks: Sequence[ExecuteMergeMethodTask],
    *,
    fingerprints: dict[str, Any],
    cache_dir: Path | None,
    device: str = "cpu",
    check_finite: bool = True,
    quiet: bool = True,
) -> Prepass:
    """Load the pre-pass from the cache or compute it by streaming every planned tensor once."""
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / "prepass" / f"{cache_key(tasks, fingerprints, check_finite)}.json"
        if cache_file.is_file():
            try:
                result = Prepass.from_json(json.loads(cache_file.read_text()))
                LOG.info("pre-pass loaded from cache %s", cache_file)
                return result
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                LOG.warning("ignoring unreadable pre-pass cache %s", cache_file)
    result = _compute(tasks, device=device, check_finite=check_finite, quiet=quiet)
    if cache_file is not None:
        write_atomic(cache_file, json.dumps(result.to_json()))
    return result


def _compute(tasks: Sequence[ExecuteMergeMethodTask], *, device: str, check_finite: bool, quiet: bool) -> Prepass:
    by_gather = defaultdict(list)
    for task in tasks:
        by_gather[task.gather_tensors].append(task)
    result = Prepass()
    models = {str(m) for t in tasks for m in t.model_order if m != t.base_model}
    parts: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in sorted(models)}
    executor = Executor(list(by_gather), math_device=torch.device(device), storage_device=torch.device("cpu"))
    progress = tqdm.tqdm(total=len(by_gather), desc="Pre-pass (norms)", unit="tensor", disable=True if quiet else None)
    for gather, tensors in executor.run(quiet=True):
        fault_point("prepass")
        for task in by_gather[gather]:
            _accumulate(task, tensors, result, parts, device=device, check_finite=check_finite)
        progress.update(1)
    progress.close()
    for m, (totals, kept) in parts.items():  # exact sums: the same float in whatever order the tensors came
        result.squared_norms[m] = math.fsum(totals)
        result.squared_norms_kept[m] = math.fsum(kept)
    return result


def _accumulate(task: ExecuteMergeMethodTask, tensors: dict, result: Prepass, parts: dict, *, device: str,
                check_finite: bool):  # fmt: skip
    base = tensors.get(task.base_model)
    if base is None or not base.is_floating_point():
        return
    base = base.to(device)
    name = task.output_weight.name
    scratch = torch.empty(base.numel(), dtype=torch.float32, device=device)
    for model in task.model_order:
        tuned = tensors.get(model)
        if model == task.base_model or tuned is None:
            continue
        try:
            sparse = sparse_task_vector(
                base,
                tuned.to(device),
                task.input_parameters[model]["density"],
                out=scratch,
                check_finite=check_finite,
            )
        except NonFiniteTaskVector:
            raise nonfinite_error(name, base, task.base_model, model) from None
        key = str(model)
        parts[key][0].append(sparse.squared_norm)
        parts[key][1].append(sparse.squared_norm_kept)
        result.selections[(key, name, sparse.selection.k)] = sparse.selection
