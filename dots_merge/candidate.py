"""The resident candidate: the base model loaded once; each trial writes its merged weights into it.

`apply(recipe)` runs, tensor by tensor, the very mergekit task the merge runs (same plan, same kernel,
same cached selections, same cast), and copies the result into the model's parameter: the weights a
trial evaluates are bit for bit those `dots-merge merge` writes for that recipe, computed from the
clean base every time (no add/subtract drift) and never written to disk.

For `dots`, each sparsified task vector S(τ) (and its per-tensor factor) is computed once per
(model, tensor, k) and kept on the device while it fits in `vector_budget` bytes; the ones that do not fit
are written to `spill_dir` (RUN_DIR/cache/vectors during a tune) and read back memory-mapped. A trial that
only changes λ is then one pass of additions. Without a `spill_dir` they are recomputed from the inputs,
which are read memory-mapped from their safetensors files (on a GPU, copied to the device once when they
fit in `device_budget` bytes). Either way the arithmetic is the kernel's, so the result does not change.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from mergekit.common import dtype_from_name
from mergekit.io.tasks import LoaderCache, LoadTensor
from mergekit.options import MergeOptions
from safetensors import safe_open
from safetensors.torch import save_file

from dots_merge.checkpoints import Checkpoint
from dots_merge.errors import DotsMergeError
from dots_merge.merging import (
    global_prepass,
    needs_prepass,
    output_dtype,
    plan_tasks,
    with_factors,
    with_output_dtype,
)
from dots_merge.method import METHOD_NAME, kernel_context, nonfinite_error, rescale_factor_for
from dots_merge.prepass import Prepass
from dots_merge.recipe import Recipe
from dots_merge.sparsify import NonFiniteTaskVector, keep_count, norm_ratio, sparse_task_vector

LOG = logging.getLogger(__name__)


class ResidentCandidate:
    """A transformers model holding the weights of the last applied recipe."""

    def __init__(
        self,
        recipe: Recipe,
        checkpoints: Mapping[str, Checkpoint],
        *,
        device: str = "cpu",
        cache_dir: Path | None = None,
        device_budget: int | None = None,
        vector_budget: int | None = None,
        spill_dir: Path | None = None,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if recipe.data.get("tokenizer") or recipe.data.get("tokenizer_source"):
            raise DotsMergeError(
                f"{recipe.source}: tune works on models sharing the base's tokenizer; remove `tokenizer`"
            )
        self.checkpoints = checkpoints
        self.options = MergeOptions(device=device, quiet=True, lazy_unpickle=False, trust_remote_code=trust_remote_code)
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        base = next(iter(checkpoints.values()))
        self.dtype = dtype_from_name(output_dtype(recipe, checkpoints))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(base.path), dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(base.path), trust_remote_code=trust_remote_code)
        self.state = self.model.state_dict(keep_vars=True)
        self._resident: dict[tuple[str, str], torch.Tensor] | None = None
        self._budget = device_budget
        self._vectors: OrderedDict[tuple[str, str, int], tuple[torch.Tensor, float]] = OrderedDict()
        self._vector_budget = _default_vector_budget(self.device) if vector_budget is None else vector_budget
        self._vector_bytes = 0
        self._spill_dir = spill_dir
        self._out: torch.Tensor | None = None
        self._in_use: set[tuple[str, str, int]] = set()  # cache keys the current trial uses (not evicted)
        self._spilled: dict[tuple[str, str, int], tuple[Path, float]] = {}
        if spill_dir is not None:  # vectors spilled by an earlier session may be stale
            shutil.rmtree(spill_dir, ignore_errors=True)
        LoaderCache.loaders.clear()
        LoaderCache().setup(options=self.options)

    def apply(self, recipe: Recipe) -> tuple[Recipe, float]:
        """Write `recipe`'s merged weights into the model; returns the recipe actually used and seconds."""
        started = time.perf_counter()
        used = with_output_dtype(recipe, self.checkpoints)
        config, _, _, targets = plan_tasks(used, self.options)
        prepass, factors = Prepass(), None
        if needs_prepass(used):  # the factors go to the arithmetic directly: no second plan
            prepass = global_prepass(targets, self.checkpoints, self.options, cache_dir=self.cache_dir)
            factors = prepass.factors
            used = with_factors(used, factors)
        missing = [w.name for w in targets.values() if w.name not in self.state]
        if missing:
            raise DotsMergeError(f"the model class loaded for the base has no parameter {missing[0]!r}")
        with (
            torch.no_grad(),
            kernel_context(selections=prepass.selections, inputs_checked=bool(prepass.selections)),
        ):
            self._in_use = set()
            for task, weight in targets.items():
                if used.method == METHOD_NAME:
                    result = self._dots_tensor(task, weight.name, config.dtype, prepass, factors)
                else:
                    inputs = {
                        model: self._input(model, info, config.dtype)
                        for model, info in task.gather_tensors.weight_info.items()
                    }
                    result = task.execute(tensors={m: t for m, t in inputs.items() if t is not None})
                if result is None:
                    continue
                out_dtype = dtype_from_name(weight.force_dtype or config.out_dtype)
                if out_dtype is not None and result.is_floating_point() and out_dtype != self.state[weight.name].dtype:
                    result = result.to(out_dtype)
                self.state[weight.name].data.copy_(result)  # the cast to the parameter's dtype happens here
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return used, time.perf_counter() - started

    def _dots_tensor(
        self, task, name: str, dtype: str | None, prepass: Prepass, factors: Mapping[str, float] | None
    ) -> torch.Tensor:
        """θ_base + Σ λ·f·S(τ) for one tensor, with the kernel's arithmetic and cached S(τ)."""
        infos = task.gather_tensors.weight_info
        base = self._input(task.base_model, infos[task.base_model], dtype)
        if not base.is_floating_point():
            return base
        base = base.to(self.device)
        rescale = task.parameters["rescale"]
        out = None
        for model in task.model_order:
            if model == task.base_model or model not in infos:
                continue
            params = task.input_parameters[model]
            k = keep_count(params["density"], base.numel())
            vector, tensor_factor = self._vector(
                (str(model), name, k),
                base,
                lambda model=model: self._input(model, infos[model], dtype),
                params["density"],
                prepass,
                norms=rescale == "tensor",
                base_model=task.base_model,
            )
            if rescale == "tensor":
                factor = tensor_factor
            elif rescale == "none":
                factor = 1.0
            elif factors is not None:
                factor = factors[str(model)]
            else:
                factor = rescale_factor_for(model, {model: params["rescale_factor"]})
            if out is None:  # base + first term in one pass, as the kernel's copy-then-add computes it
                out = torch.add(
                    self._base32(name, base), vector, alpha=params["weight"] * factor, out=self._scratch(base.numel())
                )
            else:
                out.add_(vector, alpha=params["weight"] * factor)
        if out is None:
            out = self._base32(name, base).clone()
        return out.view(base.shape)

    def _scratch(self, numel: int) -> torch.Tensor:
        """A reused float32 buffer for one tensor's result: fresh allocations would page-fault every trial."""
        if self._out is None or self._out.numel() < numel:
            self._out = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._out[:numel]

    def _base32(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The base tensor as flat float32, kept under the vector budget when it fits."""
        key = ("", name, -1)
        if key in self._vectors:
            self._in_use.add(key)
            return self._vectors[key][0]
        return self._keep(key, (base.reshape(-1).to(torch.float32), 1.0))[0]

    def _vector(
        self,
        key: tuple[str, str, int],
        base: torch.Tensor,
        load: Callable[[], torch.Tensor],
        density: float,
        prepass: Prepass,
        *,
        norms: bool,
        base_model: object,
    ) -> tuple[torch.Tensor, float]:
        """S(τ) (flat float32) and its per-tensor norm ratio, cached while the budget allows."""
        if key in self._vectors:
            self._in_use.add(key)
            self._vectors.move_to_end(key)
            return self._vectors[key]
        if key in self._spilled:
            path, factor = self._spilled[key]
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("values").to(self.device), factor  # memory-mapped on the CPU
        try:
            sparse = sparse_task_vector(
                base,
                load().to(self.device),
                density,
                selection=prepass.selections.get(key),
                check_finite=not prepass.selections,
                norms=norms,
            )
        except NonFiniteTaskVector:
            raise nonfinite_error(key[1], base, base_model, key[0]) from None
        return self._keep(
            key, (sparse.values, norm_ratio(sparse.squared_norm, sparse.squared_norm_kept) if norms else 1.0)
        )

    def _keep(self, key: tuple[str, str, int], value: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, float]:
        """Cache `value` if it fits the budget, evicting what this trial does not use; return it either way."""
        self._in_use.add(key)
        size = value[0].numel() * value[0].element_size()
        while self._vector_bytes + size > self._vector_budget:
            stale = next((k for k in self._vectors if k not in self._in_use), None)
            if stale is None:
                self._spill(key, value)
                return value
            evicted = self._vectors.pop(stale)[0]
            self._vector_bytes -= evicted.numel() * evicted.element_size()
        self._vectors[key] = value
        self._vector_bytes += size
        return value

    def _spill(self, key: tuple[str, str, int], value: tuple[torch.Tensor, float]) -> None:
        """Write a task vector that does not fit in memory to `spill_dir` (base tensors are not spilled)."""
        if self._spill_dir is None or key[2] < 0:
            return
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        path = self._spill_dir / f"{hashlib.sha256(repr(key).encode()).hexdigest()[:24]}.safetensors"
        save_file({"values": value[0].detach().to("cpu").contiguous()}, str(path))
        self._spilled[key] = (path, value[1])

    def _input(self, model, info, dtype: str | None) -> torch.Tensor | None:
        key = (str(model), info.name)
        if self._resident is not None and key in self._resident:
            return self._resident[key]
        tensor = LoadTensor(
            model=model,
            tensor=info.name,
            dtype=info.force_dtype or dtype,
            optional=info.optional,
            aliases=info.aliases,
            tied_names=info.tied_names,
        ).execute()
        if tensor is not None and self.device.type != "cpu" and self._keep_on_device(tensor):
            tensor = tensor.to(self.device)
            self._resident = self._resident or {}
            self._resident[key] = tensor
        return tensor

    def _keep_on_device(self, tensor: torch.Tensor) -> bool:
        if self._budget is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            self._budget = int(free * 0.6)
        size = tensor.numel() * tensor.element_size()
        if size > self._budget:
            return False
        self._budget -= size
        return True

    def weights(self) -> dict[str, torch.Tensor]:
        """The current weights (on the CPU), by parameter name."""
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}


def _default_vector_budget(device: torch.device) -> int:
    """Half the free memory of the device (of the machine's available RAM for the CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return 2 << 30
