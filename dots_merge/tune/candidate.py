"""The resident candidate: the base model loaded once; each trial writes its merged weights into it.

`apply(recipe)` runs, tensor by tensor, the very mergekit plan the merge runs (same plan, same cached selections,
same cast) and, for `dots`, the merge's own λ-sum (`dots_merge.core.combine`) over S(τ) from the sparse vector
store; it copies the result into the model's parameter. The weights a trial evaluates are bit for bit those
`dots-merge merge` writes for that recipe, computed from the clean base every time (no add/subtract drift) and
never written to disk. Other mergekit methods run their own task per tensor.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from mergekit.common import dtype_from_name
from mergekit.io.tasks import LoadTensor
from mergekit.options import MergeOptions

from dots_merge.checkpoints import Checkpoint
from dots_merge.core import (
    METHOD_NAME,
    NonFiniteTaskVector,
    Term,
    combine,
    keep_count,
    rescale_factor,
)
from dots_merge.errors import DotsMergeError
from dots_merge.faults import fault_point
from dots_merge.merge import mergekit_compat
from dots_merge.merge.driver import (
    global_prepass,
    needs_prepass,
    output_dtype,
    plan_tasks,
    with_factors,
    with_output_dtype,
)
from dots_merge.merge.method import kernel_context, nonfinite_error, rescale_factor_for
from dots_merge.merge.prepass import Prepass
from dots_merge.recipe import Recipe
from dots_merge.tune.vectors import VectorStore


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
        vectors: VectorStore | None = None,
        quiet: bool = True,
        trust_remote_code: bool = False,
    ):
        from transformers import AutoModelForCausalLM

        if recipe.data.get("tokenizer") or recipe.data.get("tokenizer_source"):
            raise DotsMergeError(
                f"{recipe.source}: tune works on models sharing the base's tokenizer; remove `tokenizer`"
            )
        self.checkpoints = checkpoints
        self.options = MergeOptions(device=device, quiet=quiet, lazy_unpickle=False, trust_remote_code=trust_remote_code)
        self.cache_dir = cache_dir
        self.device = torch.device(device)
        base = next(iter(checkpoints.values()))
        self.dtype = dtype_from_name(output_dtype(recipe, checkpoints))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(base.path), dtype=self.dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        fault_point("load")
        self.state = self.model.state_dict(keep_vars=True)
        self.vectors = VectorStore(self.device) if vectors is None else vectors
        self._resident: dict[tuple[str, str], torch.Tensor] = {}
        self._budget = device_budget
        self._out: torch.Tensor | None = None
        mergekit_compat.reset_loaders(self.options)

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
        self.vectors.begin_trial()
        with (
            torch.no_grad(),
            kernel_context(selections=prepass.selections, inputs_checked=bool(prepass.selections)),
        ):
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
        """θ_base + Σ λ·f·S(τ) for one tensor: the merge's λ-sum over S(τ) from the vector store."""
        infos = task.gather_tensors.weight_info
        base = self._input(task.base_model, infos[task.base_model], dtype)
        if not base.is_floating_point():
            return base
        base = base.to(self.device)
        base32 = self.vectors.base(name, base)
        out = self._scratch(base.numel())
        try:
            combine(base32, self._terms(task, name, base, dtype, prepass, factors), out=out)
        except NonFiniteTaskVector as error:
            raise nonfinite_error(name, base, task.base_model, error.model) from None
        return out.view(base.shape)

    def _terms(self, task, name, base, dtype, prepass, factors) -> Iterator[Term]:
        """λ·f·S(τ) of each fine-tune, in the order the kernel adds them."""
        infos = task.gather_tensors.weight_info
        rescale = task.parameters["rescale"]
        for model in task.model_order:
            if model == task.base_model or model not in infos:
                continue
            params = task.input_parameters[model]
            key = (str(model), name, keep_count(params["density"], base.numel()))
            try:
                vector, tensor_ratio = self.vectors.vector(
                    key,
                    base,
                    lambda model=model: self._input(model, infos[model], dtype),
                    params["density"],
                    selection=prepass.selections.get(key),
                    check_finite=not prepass.selections,
                    norms=rescale == "tensor",
                )
            except NonFiniteTaskVector:
                raise NonFiniteTaskVector(model) from None
            global_factor = None
            if rescale == "global":
                global_factor = factors[str(model)] if factors is not None else rescale_factor_for(
                    model, {model: params["rescale_factor"]}
                )
            factor = rescale_factor(rescale, tensor_ratio=tensor_ratio, global_factor=global_factor)
            yield Term(params["weight"] * factor, values=vector)

    def _scratch(self, numel: int) -> torch.Tensor:
        """A reused float32 buffer for one tensor's result: fresh allocations would page-fault every trial."""
        if self._out is None or self._out.numel() < numel:
            self._out = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._out[:numel]

    def _input(self, model, info, dtype: str | None) -> torch.Tensor | None:
        key = (str(model), info.name)
        if key in self._resident:
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

    def close(self) -> None:
        """Release the vector store (and its spill folder)."""
        self.vectors.close()
