"""A trial's in-memory weights are bit for bit what `dots-merge merge` writes for the trial's recipe."""

from __future__ import annotations

import pytest
import torch

import dots_merge
from dots_merge.merge.driver import inspect_models
from dots_merge.recipe import parse_recipe
from dots_merge.tune.candidate import ResidentCandidate
from dots_merge.tune.vectors import VectorStore
from tests.conftest import dots_recipe
from tests.reference import load_state


@pytest.mark.parametrize(
    ("trio_name", "rescale", "vector_budget"),
    [("llama_trio", "global", None), ("qwen_trio", "global", None), ("llama_trio", "tensor", None),
     ("llama_trio", "none", None), ("qwen_trio", "global", 0)],
    ids=["llama-global", "qwen-bf16-global", "tensor", "none", "spilled-to-disk"],
)  # fmt: skip
def test_trial_weights_equal_the_merge_bitwise(request, tmp_path, trio_name, rescale, vector_budget):
    trio = request.getfixturevalue(trio_name)
    first = dots_recipe(trio, parameters={"rescale": rescale})
    second = dots_recipe(trio, parameters={"rescale": rescale})
    second["models"][0]["parameters"] = {
        "weight": [{"filter": "self_attn", "value": 1.7}, {"value": 0.6}],
        "density": 0.5,
    }
    recipes = [parse_recipe(first), parse_recipe(second)]
    spill = tmp_path / "vectors" if vector_budget == 0 else None
    vectors = VectorStore(torch.device("cpu"), budget=vector_budget, spill_dir=spill)
    candidate = ResidentCandidate(
        recipes[0], inspect_models(recipes[0]), cache_dir=tmp_path / "cache", vectors=vectors
    )
    for i, recipe in enumerate([*recipes, recipes[0]]):  # back to the first: no drift
        used, seconds = candidate.apply(recipe)
        assert seconds >= 0 and ("rescale_factor" in used.to_yaml()) == (rescale == "global")
        out = tmp_path / f"merge{i}"
        dots_merge.merge(recipe, out)
        merged, weights = load_state(out), candidate.model.state_dict()
        for name, tensor in merged.items():
            assert weights[name].dtype == tensor.dtype, name
            assert torch.equal(weights[name], tensor), name
        if spill is not None:  # nothing fits in memory: every task vector went to disk and is read back
            assert sorted(spill.glob("*.safetensors")) == sorted(vectors.spilled) != []
        if trio_name == "qwen_trio":
            assert candidate.model.lm_head.weight.data_ptr() == candidate.model.model.embed_tokens.weight.data_ptr()
