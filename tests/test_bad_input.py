"""Every user mistake: one line naming the file, key or tensor; exit code 2; no traceback; nothing written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dots_merge.cli.main import main
from tests.conftest import dots_recipe, write_recipe


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["merge", "--quiet", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, tmp_path: Path, recipe: Path | str, *needles: str, extra=()) -> str:
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, str(recipe), str(out), *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out")]
    return lines[0]


def altered_copy(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    change(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def recipe_with(tmp_path: Path, trio, **replace_models) -> Path:
    data = dots_recipe(trio)
    for i, path in replace_models.items():
        data["models"][int(i[1:])]["model"] = str(path)
    return write_recipe(tmp_path / "recipe.yml", data)


def test_missing_recipe(capsys, tmp_path):
    assert_user_error(capsys, tmp_path, tmp_path / "nope.yml", "nope.yml", "not found")


def test_not_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("merge_method: dots\nmodels: [unclosed\n")
    assert_user_error(capsys, tmp_path, bad, "bad.yml", "not valid YAML", "line")


def test_yaml_that_is_not_a_mapping(capsys, tmp_path):
    bad = write_recipe(tmp_path / "list.yml", [1, 2])
    assert_user_error(capsys, tmp_path, bad, "list.yml", "mapping")


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (lambda d: d.update(modles=d.pop("models")), ["modles", "unknown key", "models"]),
        (lambda d: d["models"][1]["parameters"].update(densty=0.3), ["models[1].parameters.densty", "'density'"]),
        (lambda d: d["models"][0].update(paramters={}), ["models[0].paramters", "unknown key"]),
        (lambda d: d["models"][0]["parameters"].update(density=1.5), ["models[0].parameters.density", "(0, 1]"]),
        (lambda d: d["models"][0]["parameters"].update(density=0), ["models[0].parameters.density", "(0, 1]"]),
        (lambda d: d["models"][0]["parameters"].update(weight="abc"), ["models[0].parameters.weight", "number"]),
        (lambda d: d["models"][0]["parameters"].update(weight=True), ["models[0].parameters.weight", "number"]),
        (lambda d: d.pop("base_model"), ["base_model", "dots"]),
        (lambda d: d.update(parameters={"rescale": "globl"}), ["parameters.rescale", "globl"]),
        (lambda d: d["models"][0]["parameters"].update(rescale="none"), ["models[0].parameters.rescale", "top-level"]),
        (lambda d: d.update(merge_method="dotz"), ["merge_method", "'dots'"]),
        (lambda d: d.update(out_dtype="float8"), ["out_dtype", "bfloat16"]),
        (
            lambda d: d["models"][0]["parameters"].update(weight=[{"filtr": "mlp", "value": 1.0}]),
            ["models[0].parameters.weight[0].filtr", "unknown key"],
        ),
        (lambda d: d.update(tokenizer={"sorce": "base"}), ["tokenizer.sorce", "unknown key"]),
    ],
    ids=[
        "top-level-typo", "param-typo", "entry-typo", "density-high", "density-zero", "weight-text",
        "weight-bool", "no-base", "rescale-value", "shared-at-model-level", "method-typo", "dtype",
        "filter-typo", "nested-typo",
    ],
)  # fmt: skip
def test_recipe_mistakes(capsys, tmp_path, llama_trio, change, needles):
    data = dots_recipe(llama_trio)
    change(data)
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    assert_user_error(capsys, tmp_path, recipe, "recipe.yml", *needles)


def test_models_of_different_architectures(capsys, tmp_path, llama_trio, qwen_trio):
    recipe = recipe_with(tmp_path, llama_trio, m1=qwen_trio["rlvr"])
    assert_user_error(capsys, tmp_path, recipe, "different architectures", "LlamaForCausalLM", "Qwen2ForCausalLM")


def test_tensor_with_a_different_shape(capsys, tmp_path, llama_trio):
    bad = altered_copy(llama_trio["rlvr"], tmp_path / "bad", lambda s: s.update({"model.norm.weight": torch.ones(31)}))
    recipe = recipe_with(tmp_path, llama_trio, m1=bad)
    assert_user_error(capsys, tmp_path, recipe, "'model.norm.weight'", "[31]", "[32]", str(bad))


def test_tensor_missing_from_a_finetune(capsys, tmp_path, llama_trio):
    name = "model.layers.1.mlp.up_proj.weight"
    bad = altered_copy(llama_trio["sft"], tmp_path / "bad", lambda s: s.pop(name))
    recipe = recipe_with(tmp_path, llama_trio, m0=bad)
    assert_user_error(capsys, tmp_path, recipe, name, "missing from", str(bad))


@pytest.mark.parametrize("rescale", ["global", "tensor"])
def test_nonfinite_input_is_named_and_can_be_allowed(capsys, tmp_path, llama_trio, rescale):
    name = "model.layers.0.self_attn.q_proj.weight"

    def poison(state):
        state[name][3, 5] = float("nan")

    bad = altered_copy(llama_trio["rlvr"], tmp_path / "bad", poison)
    data = dots_recipe(llama_trio, parameters={"rescale": rescale})
    data["models"][1]["model"] = str(bad)
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    assert_user_error(capsys, tmp_path, recipe, name, str(bad), "NaN or Inf", "--allow-nonfinite")
    code, _, err = run_cli(capsys, str(recipe), str(tmp_path / "out"), "--allow-nonfinite", "--no-cache")
    assert code == 0, err


def test_nonfinite_input_with_another_mergekit_method(capsys, tmp_path, llama_trio):
    def poison(state):
        state["model.norm.weight"][0] = float("inf")

    bad = altered_copy(llama_trio["sft"], tmp_path / "bad", poison)
    data = dots_recipe(llama_trio)
    data["merge_method"] = "ties"
    data["models"][0]["model"] = str(bad)
    assert_user_error(capsys, tmp_path, write_recipe(tmp_path / "r.yml", data), "'model.norm.weight'", "NaN or Inf")


@pytest.mark.parametrize("damage", ["truncated", "garbage-header", "empty"])
def test_corrupt_safetensors(capsys, tmp_path, llama_trio, damage):
    bad = tmp_path / "bad"
    shutil.copytree(llama_trio["sft"], bad)
    weights = bad / "model.safetensors"
    blob = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(blob[:-100])
    elif damage == "garbage-header":
        weights.write_bytes(blob[:8] + b"\xff" * 20 + blob[28:])
    else:
        weights.write_bytes(b"")
    recipe = recipe_with(tmp_path, llama_trio, m0=bad)
    assert_user_error(capsys, tmp_path, recipe, str(weights))


def test_missing_shard_of_a_sharded_model(capsys, tmp_path, qwen_trio):
    bad = tmp_path / "bad"
    shutil.copytree(qwen_trio["sft"], bad)
    shard = sorted(bad.glob("model-*.safetensors"))[-1]
    shard.unlink()
    recipe = recipe_with(tmp_path, qwen_trio, m0=bad)
    assert_user_error(capsys, tmp_path, recipe, shard.name, "missing")


def test_pickle_checkpoints_are_refused_unless_allowed(capsys, tmp_path, llama_trio):
    bad = tmp_path / "pickled"
    bad.mkdir()
    shutil.copy(llama_trio["sft"] / "config.json", bad / "config.json")
    torch.save(load_file(llama_trio["sft"] / "model.safetensors"), bad / "pytorch_model.bin")
    recipe = recipe_with(tmp_path, llama_trio, m0=bad)
    assert_user_error(capsys, tmp_path, recipe, "pytorch_model.bin", "--allow-pickle")
    code, _, err = run_cli(capsys, str(recipe), str(tmp_path / "out"), "--allow-pickle", "--no-cache")
    assert code == 0, err


@pytest.mark.parametrize("path", ["./no/such/model", "/definitely/not/here", "no-such-dir/with/three"])
def test_local_looking_path_that_does_not_exist(capsys, tmp_path, llama_trio, monkeypatch, path):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("network attempted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    recipe = recipe_with(tmp_path, llama_trio, m0=path)
    assert_user_error(capsys, tmp_path, recipe, path, "does not exist")


def test_hub_id_that_cannot_be_fetched_offline(capsys, tmp_path, llama_trio):
    recipe = recipe_with(tmp_path, llama_trio, m0="no-such-org/no-such-model")
    assert_user_error(capsys, tmp_path, recipe, "no-such-org/no-such-model", "Hub")


def test_existing_output_folder(capsys, tmp_path, llama_trio):
    recipe = write_recipe(tmp_path / "recipe.yml", dots_recipe(llama_trio))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    code, _, err = run_cli(capsys, str(recipe), str(tmp_path / "out"))
    assert code == 2 and "--force" in err and (tmp_path / "out" / "x").exists()


@pytest.mark.parametrize(("flag", "value", "needle"), [("--out-shard-size", "lots", "--out-shard-size"),
                                                       ("--device", "tpu", "--device")])  # fmt: skip
def test_bad_options(capsys, tmp_path, llama_trio, flag, value, needle):
    recipe = write_recipe(tmp_path / "recipe.yml", dots_recipe(llama_trio))
    assert_user_error(capsys, tmp_path, recipe, needle, extra=(flag, value))


def test_cuda_without_a_gpu_is_a_clear_error(capsys, tmp_path, llama_trio):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    recipe = write_recipe(tmp_path / "recipe.yml", dots_recipe(llama_trio))
    assert_user_error(capsys, tmp_path, recipe, "--device cuda", "CUDA", extra=("--device", "cuda"))
