"""The resident candidate: the base model loaded once; each trial writes its merged weights into it.

`apply(recipe)` runs, tensor by tensor, the very mergekit task the merge runs (same plan, same kernel,
same cached selections, same cast), and copies the result into the model's parameter: the weights a
trial evaluates are bit for bit those `dots-merge merge` writes for that recipe, computed from the
clean base every time (no add/subtract drift) and never written to disk.

Inputs (base and fine-tune tensors) are read memory-mapped from their safetensors files; on a GPU they
are copied to the device once when they fit in `device_budget` bytes, else streamed from the page cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from mergekit.common import dtype_from_name
from mergekit.io.tasks import LoaderCache, LoadTensor
from mergekit.options import MergeOptions

from dots_merge.checkpoints import Checkpoint
from dots_merge.errors import DotsMergeError
from dots_merge.merging import _plan, output_dtype, prepare
from dots_merge.method import kernel_context
from dots_merge.recipe import Recipe

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
        LoaderCache.loaders.clear()
        LoaderCache().setup(options=self.options)

    def apply(self, recipe: Recipe) -> tuple[Recipe, float]:
        """Write `recipe`'s merged weights into the model; returns the recipe actually used and seconds."""
        started = time.perf_counter()
        used, prepass = prepare(recipe, self.checkpoints, self.options, cache_dir=self.cache_dir)
        config, _, _, targets = _plan(used, self.options)
        missing = [w.name for w in targets.values() if w.name not in self.state]
        if missing:
            raise DotsMergeError(f"the model class loaded for the base has no parameter {missing[0]!r}")
        with (
            torch.no_grad(),
            kernel_context(selections=prepass.selections, inputs_checked=bool(prepass.selections)),
        ):
            for task, weight in targets.items():
                inputs = {
                    model: self._input(model, info, config.dtype)
                    for model, info in task.gather_tensors.weight_info.items()
                }
                result = task.execute(tensors={m: t for m, t in inputs.items() if t is not None})
                if result is None:
                    continue
                out_dtype = dtype_from_name(weight.force_dtype or config.out_dtype)
                if out_dtype is not None and result.is_floating_point():
                    result = result.to(out_dtype)
                self.state[weight.name].data.copy_(result)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return used, time.perf_counter() - started

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
