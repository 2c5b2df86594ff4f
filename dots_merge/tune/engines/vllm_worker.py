"""Tensor parallelism for the vLLM engine: each vLLM worker computes the candidate itself and reloads it in place.

With `tensor_parallel_size` > 1, vLLM runs one worker process per shard; a tensor sent to them would be serialised
through its RPC. Instead this worker extension (`worker_extension_cls`) gives every worker its own
`ResidentCandidate` — the same plan, the same compact vector store, the same arithmetic as a single-process run —
whose engine is the worker's own model runner: a trial sends only the trial's recipe (a few hundred bytes of YAML),
each worker computes θ = θ_base + Σ λ·f·S(τ) tensor by tensor on its own device and hands the full tensors to
`model_runner.reload_weights`, whose loaders keep this worker's shard. The weights are the ones `dots-merge merge`
writes for that recipe, in every worker; each worker holds a store within the run's budget divided by the number
of workers, spilling (when it spills) to its own folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dots_merge.errors import DotsMergeError
from dots_merge.tune.engines.base import Engine, Weights
from dots_merge.tune.engines.vllm_engine import cast_copies, quiet_reload_log, recipe_from_yaml


class WorkerReload(Engine):
    """A vLLM worker's model as an engine that only takes weights (the main process generates)."""

    name = "vllm-worker"

    def __init__(self, worker, dtype: torch.dtype):
        super().__init__(None)
        self.worker, self.dtype = worker, dtype

    def write(self, weights: Weights) -> None:
        self.worker.model_runner.reload_weights(weights_iterator=cast_copies(weights, self.dtype))

    def generate(self, prompts: Sequence[str], **kwargs):
        raise DotsMergeError("a vLLM worker's candidate does not generate: the engine does")

    def query_nll(self, queries: Sequence[str], *, batch_size: int = 8, over: str = "query") -> list[float]:
        raise DotsMergeError("a vLLM worker's candidate does not score: the engine does")


class CandidateWorker:
    """Mixed into vLLM's worker class (`worker_extension_cls`); called through `LLM.collective_rpc` by name."""

    def dots_open(self, spec: dict[str, Any]) -> None:
        """Remember the run's recipe, its density range and store settings; the candidate is built at the first
        update (so a worker that never updates reads nothing)."""
        self._dots_spec = spec
        self._dots_candidate = None
        quiet_reload_log()  # this worker's process reloads the weights: the same spurious warning as in one

    def dots_apply(self, recipe_text: str) -> str:
        """Put the weights of the recipe (YAML) into this worker's model; returns the recipe actually used (with
        the global rescale factors written in), as YAML."""
        candidate = self._dots_candidate or self._dots_build()
        used, _ = candidate.apply(recipe_from_yaml(recipe_text, self._dots_spec["source"]))
        return used.to_yaml()

    def dots_close(self, keep_spill: bool = False) -> None:
        """Release this worker's store (and, unless `keep_spill`, its spill folder)."""
        candidate, self._dots_candidate = getattr(self, "_dots_candidate", None), None
        if candidate is not None:
            candidate.vectors.close(remove=not keep_spill)

    def _dots_build(self):
        from dots_merge.merge.driver import inspect_models
        from dots_merge.tune.candidate import ResidentCandidate
        from dots_merge.tune.vectors import VectorStore

        spec = self._dots_spec
        source = spec["source"]
        recipe = recipe_from_yaml(spec["recipe"], source)
        device = torch.device("cuda", torch.cuda.current_device()) if spec["device"] == "cuda" else torch.device("cpu")
        rank = int(getattr(self, "rank", 0))
        spill = Path(spec["spill_dir"]) / f"tp{rank}" if spec.get("spill_dir") else None
        vectors = VectorStore(device, budget=spec.get("budget"), spill_dir=spill, spill_budget=spec.get("spill_budget"),
                              salt=spec.get("salt", ""))  # fmt: skip
        self._dots_candidate = ResidentCandidate(
            recipe,
            inspect_models(recipe),
            device=str(device),
            vectors=vectors,
            ceiling=recipe_from_yaml(spec["ceiling"], source) if spec.get("ceiling") else None,
            floor=recipe_from_yaml(spec["floor"], source) if spec.get("floor") else None,
            base_on_device=bool(spec.get("base_on_device")),
            engine=WorkerReload(self, getattr(torch, spec["dtype"])),
            trust_remote_code=bool(spec.get("trust_remote_code")),
        )
        return self._dots_candidate
