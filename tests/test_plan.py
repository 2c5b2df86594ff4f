"""`dots-merge plan`: memory and disk per part from headers only, on the real layouts of 7B–70B models (sparse
files: real headers and index, data as holes), and `tune` refusing a run that does not fit before loading weights."""

from __future__ import annotations

import json

import pytest
import yaml

from dots_merge.cli.main import main
from dots_merge.merge.driver import as_recipe, inspect_models
from dots_merge.recipe.tune_section import parse_tune
from dots_merge.tune.plan import parse_size, plan_tune
from tests.conftest import dots_recipe, write_recipe
from tests.shaped_checkpoints import write_shaped_trio

GIB = 1 << 30
WORDS = " ".join(f"w{i % 200}" for i in range(180))  # a query of ~180 tokens, with the suffix ~190


@pytest.fixture(scope="module")
def shaped(tmp_path_factory):
    """Qwen2.5-7B-, Llama-3.1-8B- and Qwen2.5-14B-shaped bf16 trios as sparse files, and the paper's tune setup."""
    root = tmp_path_factory.mktemp("shaped")
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps({"prompt": f"{WORDS} q{i}"}) + "\n" for i in range(16)))
    recipes = {}
    for preset in ("qwen2.5-7b", "llama-3.1-8b", "qwen2.5-14b"):
        trio = write_shaped_trio(root / preset, preset)
        data = dots_recipe(trio, parameters={"rescale": "global"}, out_dtype="bfloat16")
        data["tune"] = {
            "queries": str(queries),
            "trials": 40,
            "generation": {"samples": 7, "max_new_tokens": 1024, "batch_size": "auto"},
            "space": [
                {"model": str(trio[m]), "param": p, "low": lo, "high": hi}
                for m in ("sft", "rlvr")
                for p, lo, hi in (("weight", 0.5, 2.0), ("density", 0.1, 0.6))
            ],
        }
        recipes[preset] = write_recipe(root / f"{preset}.yml", data)
    return recipes


def _plan(path, **sizes):
    recipe = as_recipe(str(path))
    return plan_tune(recipe, parse_tune(recipe), inspect_models(recipe), **sizes)


def _no_tensor_data(monkeypatch):
    """Make every way of reading tensor data fail: the plan must not need any."""

    def refuse(*args, **kwargs):
        raise AssertionError("the plan read tensor data")

    monkeypatch.setattr("safetensors.safe_open", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)
    monkeypatch.setattr("safetensors.torch.safe_open", refuse)


@pytest.mark.parametrize("preset", ["qwen2.5-7b", "llama-3.1-8b"])
def test_a_7b_pair_fits_one_24_gib_gpu(shaped, preset, tmp_path, monkeypatch):
    _no_tensor_data(monkeypatch)
    plan = _plan(shaped[preset], device="cuda", run_dir=tmp_path, gpu_memory=24 * GIB, host_memory=32 * GIB,
                 disk_free=200 * 10**9)  # fmt: skip
    data = plan.to_json()
    assert data["fits"] and data["reason"] is None, plan.table()
    assert data["gpu"]["needed"] <= 24 * GIB and data["host"]["needed"] <= 32 * GIB
    assert data["disk"]["needed"] <= 40 * 10**9, plan.table()
    settings = data["settings"]
    assert 1 <= settings["batch_size"] < 16  # auto: the paper's 16 × 7 × 1024 does not fit beside the model
    generation = next(p for p in data["parts"] if p["name"].startswith("generation"))
    assert generation["bytes"] <= settings["generation_share_bytes"]
    # the compact store: two tiers (split at 0.35, the middle of [0.1, 0.6]) of 1/8 byte of bitmask each + 0.6 × 2
    # bytes per parameter and fine-tune, not float32 per density
    assert settings["store_bytes"] == pytest.approx(2 * 1.45 * settings["parameters"], rel=0.02)
    assert settings["base"].startswith("host")  # no room for a second copy of the weights on the GPU


def test_a_14b_pair_is_refused_on_24_gib_with_the_reason(shaped, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", str(shaped["qwen2.5-14b"]), "--device", "cuda", "--gpu-memory", "24GiB",
                 "--host-memory", "32GiB", "--disk-free", "200GB", "--json", str(out)])  # fmt: skip
    assert code != 0
    err = capsys.readouterr().err
    assert "GPU" in err and "weights alone take" in err and "short by" in err and "Traceback" not in err
    data = json.loads(out.read_text())
    assert data["fits"] is False and data["reason"] in err
    assert data["gpu"]["needed"] > data["gpu"]["available"] == 24 * GIB
    assert set(data) >= {"fits", "reason", "gpu", "host", "disk", "parts", "settings"}
    # the same pair on an 80 GB card fits
    assert main(["plan", str(shaped["qwen2.5-14b"]), "--device", "cuda", "--gpu-memory", "80GB",
                 "--host-memory", "64GiB", "--disk-free", "200GB"]) == 0  # fmt: skip


def test_a_cpu_plan_has_no_gpu_and_a_short_disk_names_the_fix(shaped, tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", str(shaped["qwen2.5-7b"]), "--device", "cpu", "--host-memory", "64GiB",
                 "--disk-free", "10GB", "--json", str(out)])  # fmt: skip
    data = json.loads(out.read_text())
    assert code != 0 and data["gpu"] is None and not data["fits"]
    assert data["reason"].startswith("disk:") and "--out" in data["reason"]


def test_bad_sizes_and_devices_are_one_line_errors(shaped, capsys):
    assert main(["plan", str(shaped["qwen2.5-7b"]), "--gpu-memory", "lots"]) != 0
    assert "--gpu-memory: not a size: 'lots'" in capsys.readouterr().err
    assert main(["plan", str(shaped["qwen2.5-7b"]), "--device", "tpu"]) != 0
    assert "--device tpu" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("24GiB", where="x") == 24 * GIB
    assert parse_size("24GB", where="x") == 24 * 10**9
    assert parse_size("512M", where="x") == 512 * 10**6
    assert parse_size("1.5TiB", where="x") == int(1.5 * (1 << 40))
    assert parse_size("4096", where="x") == 4096


def test_tune_refuses_a_run_that_does_not_fit_before_loading_weights(llama_trio, tmp_path, monkeypatch, capsys):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_weights)
    monkeypatch.setattr("dots_merge.tune.plan.host_available", lambda: 64 << 20)  # a 64 MiB machine
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"prompt": "1 + 1 ="}\n{"prompt": "2 + 2 ="}\n')
    data = dots_recipe(llama_trio)
    data["tune"] = {"queries": str(queries), "trials": 2, "generation": {"samples": 2, "max_new_tokens": 4},
                    "space": [{"model": str(llama_trio["sft"]), "param": "weight", "low": 0.0, "high": 1.0}]}  # fmt: skip
    path = write_recipe(tmp_path / "r.yml", data)
    code = main(["tune", str(path), "--out", str(tmp_path / "run"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "does not fit: host RAM" in err and "dots-merge plan" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "trials").exists()
    assert yaml.safe_load(path.read_text())["tune"]["trials"] == 2  # the recipe is untouched


def _short_of_ram_for_half_the_store(monkeypatch, recipe_path, run):
    """Make the plan find room in RAM for about half the vector store: the rest is spilled to disk."""
    from dots_merge.tune import plan as plan_module

    full = _plan(recipe_path, device="cpu", run_dir=run, host_memory=64 * GIB)
    settings = full.settings
    fixed = full.needed("host") - settings["store_ram_bytes"]
    host = int((fixed + settings["store_bytes"] // 2) / (1 - plan_module.HOST_MARGIN))
    monkeypatch.setattr(plan_module, "host_available", lambda: host)
    half = _plan(recipe_path, device="cpu", run_dir=run)
    assert 0 < half.settings["store_ram_bytes"] < settings["store_bytes"] and half.fits
    return half


@pytest.mark.parametrize("keep", [False, True])
def test_a_tune_short_of_ram_spills_within_budget_and_cleans_up(llama_trio, tmp_path, monkeypatch, keep):
    from tests.test_tune import tune_recipe

    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=3))
    run = tmp_path / "run"
    half = _short_of_ram_for_half_the_store(monkeypatch, recipe, run)
    spilled: list[int] = []
    real_spill = __import__("dots_merge.tune.vectors", fromlist=["VectorStore"]).VectorStore._spill

    def watch(store, key, compact):
        real_spill(store, key, compact)
        spilled.append(store._disk)
        assert store._disk <= half.settings["cache_budget_bytes"]

    monkeypatch.setattr("dots_merge.tune.vectors.VectorStore._spill", watch)
    args = ["tune", str(recipe), "--out", str(run), "--device", "cpu", "--quiet"] + (["--keep-cache"] if keep else [])
    assert main(args) == 0
    assert spilled and max(spilled) > 0  # the store did spill
    left = list((run / "cache" / "vectors").rglob("*.safetensors")) if (run / "cache" / "vectors").exists() else []
    assert bool(left) == keep  # removed at the end unless --keep-cache


def test_device_auto_takes_the_cpu_without_a_gpu_and_batch_size_is_auto_or_a_count(llama_trio, tmp_path, capsys):
    from dots_merge.merge.driver import resolve_device
    from tests.test_tune import tune_recipe

    assert resolve_device("auto") == "cpu"  # no GPU on the test machines
    data = tune_recipe(llama_trio, tmp_path)
    data["tune"]["generation"]["batch_size"] = "many"
    path = write_recipe(tmp_path / "bad.yml", data)
    assert main(["plan", str(path)]) != 0
    assert "tune.generation.batch_size" in capsys.readouterr().err
    data["tune"]["generation"]["batch_size"] = "auto"
    path = write_recipe(tmp_path / "auto.yml", data)
    out = tmp_path / "plan.json"
    assert main(["plan", str(path), "--json", str(out)]) == 0  # device auto: the CPU here, detected sizes
    plan = json.loads(out.read_text())
    assert plan["device"] == "cpu" and plan["gpu"] is None and plan["settings"]["batch_size"] == 4  # all 4 queries


def test_the_base_is_loaded_straight_onto_a_gpu(llama_trio, monkeypatch):
    """On a GPU the resident model is loaded tensor by tensor onto the device (`device_map`), never whole into
    host RAM first (no GPU here: the loader call is checked, not run)."""
    from dots_merge.recipe import parse_recipe
    from dots_merge.tune.candidate import ResidentCandidate

    seen = {}

    class Loaded(Exception):
        pass

    def record(path, **kwargs):
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", record)
    recipe = parse_recipe(dots_recipe(llama_trio))
    with pytest.raises(Loaded):
        ResidentCandidate(recipe, inspect_models(recipe), device="cuda:0")
    assert seen["device_map"] == "cuda:0"
    seen.clear()
    with pytest.raises(Loaded):
        ResidentCandidate(recipe, inspect_models(recipe), device="cpu")
    assert "device_map" not in seen
