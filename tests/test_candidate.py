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
    candidate = ResidentCandidate(recipes[0], inspect_models(recipes[0]), vectors=vectors)
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


@pytest.mark.parametrize(
    ("rescale", "threads", "spill"),
    [("global", 1, False), ("tensor", 1, False), ("global", 2, False), ("global", 1, True)],
)
def test_searched_densities_come_from_one_compact_store_bit_for_bit(qwen_trio, tmp_path, rescale, threads, spill):
    """Densities below the run's ceiling are taken from the vectors stored once at the ceiling, in two tiers split
    at the middle of the range: no entry is computed again, and each trial's weights are still exactly those of
    the merge of its recipe, whichever tier its densities fall in (also when the global factors' selections run
    one tensor per thread)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _densities_from_one_store(qwen_trio, tmp_path, rescale, spill)
    finally:
        torch.set_num_threads(previous)


def _densities_from_one_store(qwen_trio, tmp_path, rescale, spill):

    def at(sft: float, rlvr: float):
        data = dots_recipe(qwen_trio, parameters={"rescale": rescale})
        data["models"][0]["parameters"] = {"weight": 1.3, "density": sft}
        data["models"][1]["parameters"] = {"weight": 0.8, "density": rlvr}
        return parse_recipe(data)

    vectors = VectorStore(torch.device("cpu"), budget=0 if spill else None, spill_dir=tmp_path / "vectors")
    first = at(0.2, 0.45)
    candidate = ResidentCandidate(first, inspect_models(first), vectors=vectors, ceiling=at(0.7, 0.7),
                                  floor=at(0.1, 0.1))  # fmt: skip
    builds = None
    for i, recipe in enumerate([first, at(0.7, 0.1), at(0.33, 0.61), first]):
        candidate.apply(recipe)
        builds = vectors.builds if builds is None else builds
        assert vectors.builds == builds > 0, "a new density recomputed vectors from the checkpoints"
        entries = [VectorStore._read(path, 0) for path in vectors.spilled] if spill else list(vectors._kept.values())
        assert any(len(entry.tiers) == 2 for entry in entries)  # split at 0.4, the range's middle
        out = tmp_path / f"merge{i}"
        dots_merge.merge(recipe, out, cache_dir=None)
        weights = candidate.model.state_dict()
        for name, tensor in load_state(out).items():
            assert torch.equal(weights[name], tensor), (i, name)


def test_building_the_store_keeps_no_fine_tunes_checkpoint_mapped(llama_trio, monkeypatch):
    """A fine-tune's shard is closed once its tensor is in the store: while the first trial builds the store, the
    mapped pages of at most the one being read count in the RSS (at 0.5B all three checkpoints stayed mapped
    through the first trial: 2.9 GB of file pages, 33 % above the plan)."""
    from mergekit.io.tasks import LoaderCache

    from dots_merge.tune import vectors as vectors_module

    recipe = parse_recipe(dots_recipe(llama_trio))
    fine_tunes = {str(llama_trio["sft"]), str(llama_trio["rlvr"])}
    mapped_at_build: list[list[str]] = []
    real = vectors_module.compress

    def spy(*args, **kwargs):
        mapped_at_build.append([str(m) for m, loader in LoaderCache.loaders.items()
                                if loader.current_shard is not None and str(m) in fine_tunes])  # fmt: skip
        return real(*args, **kwargs)

    monkeypatch.setattr(vectors_module, "compress", spy)
    candidate = ResidentCandidate(recipe, inspect_models(recipe))
    try:
        candidate.apply(recipe)
    finally:
        candidate.close()
    assert len(mapped_at_build) > 4
    assert all(len(mapped) == 1 for mapped in mapped_at_build), mapped_at_build  # the one being read, no other
