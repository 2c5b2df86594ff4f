"""Generation engines: the model a run samples from, built once from the base, its weights replaced each trial."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from dots_merge.recipe.tune_section import ENGINES, Generation
from dots_merge.tune.engines.base import Engine, Weights

__all__ = ["ENGINES", "Engine", "Weights", "make_engine"]


def make_engine(
    model_dir,
    tokenizer,
    generation: Generation,
    *,
    dtype: torch.dtype,
    device: torch.device,
    settings: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Engine:
    """The engine `generation.engine` names, holding the base; `settings` are the plan's (vLLM's memory)."""
    settings = settings or {}
    if generation.engine == "vllm":
        from dots_merge.merge.prepass import default_cache_dir
        from dots_merge.tune.engines.vllm_engine import VllmEngine

        return VllmEngine(
            model_dir,
            tokenizer,
            dtype=dtype,
            device=device,
            options=generation.vllm,
            max_model_len=int(settings.get("max_model_len") or 2048 + generation.max_new_tokens),
            max_num_seqs=int(settings.get("max_num_seqs") or 256),
            kv_cache_gib=int(settings.get("kv_cache_gib") or 1),
            max_num_batched_tokens=settings.get("max_num_batched_tokens"),
            gpu_memory_utilization=settings.get("gpu_memory_utilization"),
            cache_root=default_cache_dir() / "vllm",
            trust_remote_code=trust_remote_code,
        )
    from dots_merge.tune.engines.hf import TransformersEngine

    return TransformersEngine.load(model_dir, tokenizer, dtype=dtype, device=device,
                                   trust_remote_code=trust_remote_code)
