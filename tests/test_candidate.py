"""A trial's in-memory weights are bit for bit what `dots-merge merge` writes for the trial's recipe."""

from __future__ import annotations

import pytest
import torch

import dots_merge
from dots_merge.candidate import ResidentCandidate
from dots_merge.merging import inspect_models
from dots_merge.recipe import parse_recipe
from tests.conftest import dots_recipe
from tests.reference import load_state


@pytest.mark.parametrize("trio_name", ["llama_trio", "qwen_trio"])
def test_trial_weights_equal_the_merge_bitwise(request, tmp_path, trio_name):
    trio = request.getfixturevalue(trio_name)
    first = dots_recipe(trio)
    second = dots_recipe(trio)
    second["models"][0]["parameters"] = {
        "weight": [{"filter": "self_attn", "value": 1.7}, {"value": 0.6}],
        "density": 0.5,
    }
    recipes = [parse_recipe(first), parse_recipe(second)]
    candidate = ResidentCandidate(recipes[0], inspect_models(recipes[0]), cache_dir=tmp_path / "cache")
    for i, recipe in enumerate([*recipes, recipes[0]]):  # back to the first: no drift
        used, seconds = candidate.apply(recipe)
        assert seconds >= 0 and "rescale_factor" in used.to_yaml()
        out = tmp_path / f"merge{i}"
        dots_merge.merge(recipe, out)
        merged, weights = load_state(out), candidate.weights()
        for name, tensor in merged.items():
            assert weights[name].dtype == tensor.dtype, name
            assert torch.equal(weights[name], tensor), name
        if trio_name == "qwen_trio":
            assert candidate.model.lm_head.weight.data_ptr() == candidate.model.model.embed_tokens.weight.data_ptr()
