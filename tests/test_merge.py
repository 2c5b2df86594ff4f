"""`dots-merge merge` against an independent float64 computation, and the output folder it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import dots_merge
from dots_merge.checkpoints import read_safetensors_header
from tests.conftest import dots_recipe
from tests.reference import load_state, reference_merge


def assert_matches(out: Path, expected: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    merged = load_state(out)
    assert set(merged) == set(expected)
    for name, ref in expected.items():
        got = merged[name]
        assert got.dtype == dtype, name
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6, msg=name)
        else:  # within one bf16 ulp of the exact value
            torch.testing.assert_close(got.double(), ref, rtol=2**-7, atol=1e-6, msg=name)


def const(value: float):
    return lambda _name: value


@pytest.mark.parametrize("rescale", ["global", "tensor", "none"])
def test_two_finetunes_match_the_formula_in_every_rescale_mode(llama_trio, tmp_path, rescale):
    recipe = dots_recipe(llama_trio, parameters={"rescale": rescale})
    dots_merge.merge(recipe, tmp_path / "out")
    expected = reference_merge(
        llama_trio["base"],
        [(llama_trio["sft"], const(1.0), const(0.3)), (llama_trio["rlvr"], const(1.5), const(0.2))],
        rescale,
    )
    assert_matches(tmp_path / "out", expected, torch.float32)


def test_qwen2_tied_bf16_sharded(qwen_trio, tmp_path):
    assert (qwen_trio["base"] / "model.safetensors.index.json").exists()
    result = dots_merge.merge(dots_recipe(qwen_trio), tmp_path / "out", out_shard_size="30KB")
    expected = reference_merge(
        qwen_trio["base"], [(qwen_trio["sft"], const(1.0), const(0.3)), (qwen_trio["rlvr"], const(1.5), const(0.2))]
    )
    assert "lm_head.weight" not in expected
    assert_matches(tmp_path / "out", expected, torch.bfloat16)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        size = sum(i.numel * 2 for i in read_safetensors_header(tmp_path / "out" / shard).values())
        assert size <= 30_000 or len(read_safetensors_header(tmp_path / "out" / shard)) == 1
    assert set(result.rescale_factors) == {str(qwen_trio["sft"]), str(qwen_trio["rlvr"])}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_one_finetune(llama_trio, tmp_path):
    recipe = dots_recipe(llama_trio)
    recipe["models"] = recipe["models"][:1]
    dots_merge.merge(recipe, tmp_path / "out")
    expected = reference_merge(llama_trio["base"], [(llama_trio["sft"], const(1.0), const(0.3))])
    assert_matches(tmp_path / "out", expected, torch.float32)


def test_three_finetunes_with_per_module_filters(llama_trio, llama_third, tmp_path):
    recipe = dots_recipe(llama_trio)
    recipe["models"][0]["parameters"]["weight"] = [{"filter": "self_attn", "value": 0.8}, {"value": 1.2}]
    recipe["models"][1]["parameters"]["density"] = [{"filter": "mlp", "value": 0.5}, {"value": 0.1}]
    recipe["models"].append({"model": str(llama_third), "parameters": {"weight": 0.5}})
    dots_merge.merge(recipe, tmp_path / "out")
    expected = reference_merge(
        llama_trio["base"],
        [
            (llama_trio["sft"], lambda n: 0.8 if "self_attn" in n else 1.2, const(0.3)),
            (llama_trio["rlvr"], const(1.5), lambda n: 0.5 if "mlp" in n else 0.1),
            (llama_third, const(0.5), const(0.3)),
        ],
    )
    assert_matches(tmp_path / "out", expected, torch.float32)


def test_out_dtype_is_applied_once(llama_trio, tmp_path):
    dots_merge.merge(dots_recipe(llama_trio, out_dtype="bfloat16"), tmp_path / "bf16")
    dots_merge.merge(dots_recipe(llama_trio, out_dtype="float32"), tmp_path / "fp32")
    expected = reference_merge(
        llama_trio["base"], [(llama_trio["sft"], const(1.0), const(0.3)), (llama_trio["rlvr"], const(1.5), const(0.2))]
    )
    assert_matches(tmp_path / "fp32", expected, torch.float32)
    assert_matches(tmp_path / "bf16", expected, torch.bfloat16)
    bf16, fp32 = load_state(tmp_path / "bf16"), load_state(tmp_path / "fp32")
    for name in expected:  # the float32 sum rounded once: a sum accumulated in bfloat16, or rounded twice, differs
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name


def test_output_folder_contents_and_reproducibility(llama_trio, tmp_path):
    a = dots_merge.merge(dots_recipe(llama_trio), tmp_path / "a")
    b = dots_merge.merge(dots_recipe(llama_trio), tmp_path / "b", cache_dir=None)
    assert a.prepass_cached != b.prepass_cached or not a.prepass_cached
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    for required in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                     "tokenizer_config.json", "mergekit_config.yml", "README.md"):  # fmt: skip
        assert required in names
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    card = (tmp_path / "a" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model_relation"] == "merge"
    assert {"merge", "mergekit", "dots-merge"} <= set(meta["tags"])


def test_recipe_actually_used_reproduces_the_merge_without_a_prepass(llama_trio, tmp_path):
    first = dots_merge.merge(dots_recipe(llama_trio), tmp_path / "a", cache_dir=None)
    used = tmp_path / "a" / "mergekit_config.yml"
    data = yaml.safe_load(used.read_text())
    factors = {m["model"]: m["parameters"]["rescale_factor"] for m in data["models"]}
    assert factors == first.rescale_factors
    assert all(1.0 <= f < 1.5 for f in factors.values())
    again = dots_merge.merge(used, tmp_path / "b", cache_dir=None)
    assert again.rescale_factors == {}  # factors came from the recipe
    for shard in ("model.safetensors",):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_prepass_cache_is_reused_and_keyed_by_density(llama_trio, tmp_path):
    cache = tmp_path / "cache"
    first = dots_merge.merge(dots_recipe(llama_trio), tmp_path / "a", cache_dir=cache)
    second = dots_merge.merge(dots_recipe(llama_trio), tmp_path / "b", cache_dir=cache)
    assert not first.prepass_cached and second.prepass_cached
    assert first.rescale_factors == second.rescale_factors
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    other = dots_recipe(llama_trio)
    other["models"][0]["parameters"]["density"] = 0.5
    third = dots_merge.merge(other, tmp_path / "c", cache_dir=cache)
    assert not third.prepass_cached
    assert third.rescale_factors[str(llama_trio["sft"])] != first.rescale_factors[str(llama_trio["sft"])]


def test_force_replaces_and_missing_force_refuses(llama_trio, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(dots_merge.errors.OutputExistsError):
        dots_merge.merge(dots_recipe(llama_trio), out)
    assert (out / "keep.txt").read_text() == "precious"
    dots_merge.merge(dots_recipe(llama_trio), out, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
