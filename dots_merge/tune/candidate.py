"""The resident candidate: the base model loaded once in a generation engine; each trial writes its merged weights
into it.

`apply(recipe)` runs, tensor by tensor, the very mergekit plan the merge runs (same plan, same cast) and, for
`dots`, the merge's own λ-sum (`dots_merge.core.combine`) over S(τ) from the compact vector store; it hands the
results, one tensor at a time, to the engine (`Engine.write`: a transformers model's parameters, or vLLM's weights
in place). The weights a trial evaluates are bit for bit those `dots-merge merge` writes for that recipe — the
global rescale factors included, summed from the store's per-tensor norms as the merge's pre-pass sums them —
computed from the clean base every time (no add/subtract drift) and never written to disk.
Other mergekit methods run their own task per tensor.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from mergekit.common import dtype_from_name
from mergekit.io.tasks import LoadTensor
from mergekit.options import MergeOptions

from dots_merge.checkpoints import Checkpoint
from dots_merge.core import METHOD_NAME, NonFiniteTaskVector, Term, combine, norm_ratio, rescale_factor
from dots_merge.errors import DotsMergeError
from dots_merge.merge import mergekit_compat
from dots_merge.merge.driver import needs_prepass, output_dtype, plan_tasks, with_factors, with_output_dtype
from dots_merge.merge.method import nonfinite_error, rescale_factor_for
from dots_merge.recipe import Recipe
from dots_merge.recipe.tune_section import Generation
from dots_merge.tune.engines.base import Engine
from dots_merge.tune.vectors import StoredVector, VectorStore

LOG = logging.getLogger(__name__)


class ResidentCandidate:
    """A generation engine (`tune.generation.engine`) holding the weights of the last applied recipe.

    `ceiling` is the recipe at the largest densities the run can ask (the top of each searched range): the
    store keeps each S(τ) at that density once and takes every lower one from it; `floor`, the recipe at the
    bottom of each range, sets where the store splits each entry in two tiers (the middle of the range), so a
    new density reads one tier. With `base_on_device`, the
    base's tensors stay on the device between trials (else they are read from the memory-mapped checkpoint).
    `engine` replaces the one `generation` names (a vLLM worker's own model runner, `engines/vllm_worker.py`); an
    engine that `computes_candidate` (vLLM under tensor parallelism) gets the recipes and builds this same
    candidate in each of its workers.
    """

    def __init__(
        self,
        recipe: Recipe,
        checkpoints: Mapping[str, Checkpoint],
        *,
        device: str = "cpu",
        vectors: VectorStore | None = None,
        ceiling: Recipe | None = None,
        floor: Recipe | None = None,
        base_on_device: bool = False,
        generation: Generation | None = None,
        tokenizer=None,
        settings: Mapping[str, Any] | None = None,
        quiet: bool = True,
        trust_remote_code: bool = False,
        engine: Engine | None = None,
    ):
        from dots_merge.tune.engines import make_engine
        from dots_merge.tune.generation import load_tokenizer

        if recipe.data.get("tokenizer") or recipe.data.get("tokenizer_source"):
            raise DotsMergeError(
                f"{recipe.source}: tune works on models sharing the base's tokenizer; remove `tokenizer`"
            )
        self.checkpoints = checkpoints
        self.options = MergeOptions(
            device=device, quiet=quiet, lazy_unpickle=False, trust_remote_code=trust_remote_code
        )
        self.device = torch.device(device)
        base = next(iter(checkpoints.values()))
        self.dtype = dtype_from_name(output_dtype(recipe, checkpoints))
        if engine is None and tokenizer is None and base.has_tokenizer:
            tokenizer = load_tokenizer(base.path, trust_remote_code=trust_remote_code)
        self.engine = engine or make_engine(base.path, tokenizer, generation or Generation(), dtype=self.dtype,
                                            device=self.device, settings=settings,
                                            trust_remote_code=trust_remote_code)  # fmt: skip
        self.vectors = VectorStore(self.device) if vectors is None else vectors
        if self.engine.computes_candidate:  # vLLM's workers build this same candidate each (tensor parallelism)
            self.engine.open_candidate({
                "source": recipe.source, "recipe": recipe.to_yaml(),
                "ceiling": ceiling.to_yaml() if ceiling is not None else None,
                "floor": floor.to_yaml() if floor is not None else None,
                "device": self.device.type, "dtype": str(self.dtype).removeprefix("torch."),
                "budget": self.vectors.budget, "spill_dir": str(self.vectors.spill_dir or "") or None,
                "spill_budget": self.vectors.spill_budget, "salt": self.vectors.salt,
                "base_on_device": base_on_device, "trust_remote_code": trust_remote_code,
            })  # fmt: skip
        local = not self.engine.computes_candidate  # else the workers plan the density ranges, not this process
        self._ceilings = self._densities(ceiling) if ceiling is not None and local else {}
        self._floors = self._densities(floor) if floor is not None and local else {}
        self._base_on_device = base_on_device and self.device.type != "cpu"
        self._resident: dict[str, torch.Tensor] = {}
        self._out: torch.Tensor | None = None
        self._applied = self._warned = False
        self._load_lock = threading.Lock()
        mergekit_compat.reset_loaders(self.options)

    @property
    def model(self):
        """The transformers model holding the candidate (engine transformers only)."""
        model = getattr(self.engine, "model", None)
        if model is None:
            raise DotsMergeError(f"engine {self.engine.name} holds no transformers model")
        return model

    def apply(self, recipe: Recipe) -> tuple[Recipe, float]:
        """Write `recipe`'s merged weights into the model; returns the recipe actually used and seconds."""
        started = time.perf_counter()
        if self.engine.computes_candidate:
            return self.engine.apply_recipe(recipe), time.perf_counter() - started
        used = with_output_dtype(recipe, self.checkpoints)
        config, _, _, targets = plan_tasks(used, self.options)
        self.engine.check_names([w.name for w in targets.values()])
        self.vectors.begin_trial()
        builds = self.vectors.builds
        with torch.no_grad():
            factors = None
            if needs_prepass(used):  # the factors go to the arithmetic directly: no second plan
                factors = self._global_factors(targets, config.dtype)
                used = with_factors(used, factors)
            self.engine.write(self._merged(used, config, targets, factors))
        if self.vectors.builds != builds and self._applied and not self._warned:
            self._warned = True
            LOG.warning("the vector store recomputed %d task vectors from the checkpoints in this trial: they fit "
                        "neither its RAM budget nor its spill budget (see `dots-merge plan`; raise --cache-budget)",
                        self.vectors.builds - builds)  # fmt: skip
        self._applied = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._out = None  # the allocator keeps the block for generation to reuse
        return used, time.perf_counter() - started

    def _merged(self, used: Recipe, config, targets, factors) -> Iterator[tuple[str, torch.Tensor, torch.dtype | None]]:
        """Each target tensor of `used`, tensor by tensor: (name, merged tensor, the dtype the merge writes it in).
        The tensor may be a reused buffer, valid until the next one is asked for."""
        for task, weight in targets.items():
            if used.method == METHOD_NAME:
                result = self._dots_tensor(task, weight.name, config.dtype, factors)
            else:
                inputs = {
                    model: self._input(model, info, config.dtype)
                    for model, info in task.gather_tensors.weight_info.items()
                }
                result = task.execute(tensors={m: t for m, t in inputs.items() if t is not None})
            if result is not None:
                yield weight.name, result, dtype_from_name(weight.force_dtype or config.out_dtype)

    def _global_factors(self, targets, dtype: str | None) -> dict[str, float]:
        """f_i = ‖τ_i‖/‖S(τ_i)‖ over the whole model, from the store's per-tensor squared norms, summed exactly
        (math.fsum) as the merge's pre-pass sums them, so both give the same float."""
        totals: dict[str, list[float]] = {}
        kept: dict[str, list[float]] = {}
        for task in targets:
            for model in task.model_order:
                if model != task.base_model:  # every fine-tune gets a factor, 1.0 when it has no tensor
                    totals.setdefault(str(model), [])
                    kept.setdefault(str(model), [])

        def norms(item) -> list[tuple[str, float, float]]:
            task, weight = item
            base = self._base(task, dtype)
            if base is None:
                return []
            vectors = self._vectors(task, weight.name, base, dtype, norms=True)
            return [(str(model), *self.vectors.squared_norms(vector)) for model, vector in vectors]

        # A new density means a selection per tensor: on the CPU these run one tensor per core (each on one
        # thread: the selection's numpy steps are single-threaded); the sums are exact, so order does not matter.
        # The first trial builds the store instead, tensor by tensor with every thread.
        parallel = self.device.type == "cpu" and self._applied and not self.engine.threads_fixed
        threads = torch.get_num_threads() if parallel else 1
        if threads > 1:
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(threads) as pool:
                    results = list(pool.map(norms, targets.items()))
            finally:
                torch.set_num_threads(threads)
        else:
            results = [norms(item) for item in targets.items()]
        for model, total, part in (row for rows in results for row in rows):
            totals[model].append(total)
            kept[model].append(part)
        return {m: norm_ratio(math.fsum(totals[m]), math.fsum(kept[m])) for m in totals}

    def _dots_tensor(self, task, name: str, dtype: str | None, factors: Mapping[str, float] | None) -> torch.Tensor:
        """θ_base + Σ λ·f·S(τ) for one tensor: the merge's λ-sum over S(τ) from the vector store."""
        base = self._base(task, dtype)
        if base is None:
            return self._input(task.base_model, task.gather_tensors.weight_info[task.base_model], dtype)
        out = self._scratch(base.numel())
        try:
            combine(base, self._terms(task, name, base, dtype, factors), out=out)
        except NonFiniteTaskVector as error:
            raise nonfinite_error(name, base, task.base_model, error.model) from None
        return out.view(base.shape)

    def _terms(self, task, name, base, dtype, factors) -> Iterator[Term]:
        """λ·f·S(τ) of each fine-tune, in the order the kernel adds them."""
        rescale = task.parameters["rescale"]
        for model, vector in self._vectors(task, name, base, dtype, norms=rescale != "none"):
            params = task.input_parameters[model]
            tensor_ratio = global_factor = None
            if rescale == "tensor":
                tensor_ratio = norm_ratio(*self.vectors.squared_norms(vector))
            elif rescale == "global":
                global_factor = (
                    factors[str(model)]
                    if factors is not None
                    else rescale_factor_for(model, {model: params["rescale_factor"]})
                )
            factor = rescale_factor(rescale, tensor_ratio=tensor_ratio, global_factor=global_factor)
            yield Term(params["weight"] * factor, stream=vector.chunks)

    def _vectors(
        self, task, name: str, base: torch.Tensor, dtype, *, norms: bool
    ) -> Iterator[tuple[object, StoredVector]]:
        """(fine-tune, its S(τ) from the store) for one tensor, in the kernel's order."""
        infos = task.gather_tensors.weight_info
        for model in task.model_order:
            if model == task.base_model or model not in infos:
                continue
            density = task.input_parameters[model]["density"]
            builds = self.vectors.builds
            try:
                vector = self.vectors.vector(
                    str(model),
                    name,
                    base,
                    lambda model=model: self._input(model, infos[model], dtype),
                    density,
                    ceiling=self._ceilings.get((str(model), name), density),
                    floor=self._floors.get((str(model), name)),
                    check_finite=True,
                    norms=norms,
                )
            except NonFiniteTaskVector:
                raise nonfinite_error(name, base, task.base_model, model) from None
            if self.vectors.builds != builds:  # read once for the store: its shard need not stay in the RSS
                with self._load_lock:
                    mergekit_compat.unmap(model)
            yield model, vector

    def _densities(self, recipe: Recipe) -> dict[tuple[str, str], float]:
        """The density each (fine-tune, tensor) gets in `recipe`'s plan."""
        _, _, _, targets = plan_tasks(with_output_dtype(recipe, self.checkpoints), self.options)
        return {
            (str(model), weight.name): float(task.input_parameters[model]["density"])
            for task, weight in targets.items()
            if getattr(task, "input_parameters", None)
            for model in task.model_order
            if model != task.base_model and "density" in task.input_parameters.get(model, {})
        }

    def _base(self, task, dtype: str | None) -> torch.Tensor | None:
        """The base's tensor for a task on the device, or None when it is not floating point (copied as is)."""
        info = task.gather_tensors.weight_info[task.base_model]
        if info.name in self._resident:
            return self._resident[info.name]
        base = self._input(task.base_model, info, dtype)
        if base is None or not base.is_floating_point():
            return None
        base = base.to(self.device)
        if self._base_on_device:
            self._resident[info.name] = base
        return base

    def _scratch(self, numel: int) -> torch.Tensor:
        """A reused float32 buffer for one tensor's result: fresh allocations would page-fault every trial."""
        if self._out is None or self._out.numel() < numel:
            self._out = torch.empty(numel, dtype=torch.float32, device=self.device)
        return self._out[:numel]

    def _input(self, model, info, dtype: str | None) -> torch.Tensor | None:
        with self._load_lock:  # mergekit's loaders keep one open shard per model: not for two threads at once
            return self._load(model, info, dtype)

    @staticmethod
    def _load(model, info, dtype: str | None) -> torch.Tensor | None:
        return LoadTensor(
            model=model,
            tensor=info.name,
            dtype=info.force_dtype or dtype,
            optional=info.optional,
            aliases=info.aliases,
            tied_names=info.tied_names,
        ).execute()

    def close(self, *, keep_spill: bool = False) -> None:
        """Release the engine and the vector store (and, unless `keep_spill`, its spill folder)."""
        try:
            if self.engine.computes_candidate:
                self.engine.close_candidate(keep_spill=keep_spill)
            self.engine.close()
        finally:
            self.vectors.close(remove=not keep_spill)
