"""The generation engine setting (`tune.generation.engine`, `--engine`) without vLLM: validation at load, the plan's
vLLM settings, the environment vLLM is started with, one-line errors, and the transformers engine's records."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from dots_merge.cli.main import main
from dots_merge.errors import RecipeError
from dots_merge.merge.driver import as_recipe, inspect_models
from dots_merge.recipe import parse_recipe
from dots_merge.recipe.tune_section import VllmOptions, parse_tune
from dots_merge.tune.plan import plan_tune
from tests.conftest import dots_recipe, write_recipe
from tests.test_plan import GIB, shaped  # noqa: F401 - the module fixture of 7B-14B-shaped sparse trios

NO_VLLM = importlib.util.find_spec("vllm") is None


def tune_data(trio, tmp_path: Path, **generation) -> dict:
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["1 + 2", "3 * 4"]))
    data = dots_recipe(trio)
    data["tune"] = {
        "queries": str(tmp_path / "q.jsonl"),
        "trials": 2,
        "generation": {"samples": 2, "max_new_tokens": 4, "batch_size": 2, **generation},
        "space": [{"model": str(trio["sft"]), "param": "weight", "low": 0.5, "high": 2.0}],
    }
    return data


@pytest.mark.parametrize(
    ("generation", "key", "words"),
    [
        ({"engine": "tgi"}, "tune.generation.engine", "transformers, vllm"),
        ({"engine": "vllm", "vllm": {"gpu_util": 0.5}}, "tune.generation.vllm.gpu_util", "unknown key"),
        ({"engine": "vllm", "vllm": {"gpu_memory_utilization": 1.5}}, "gpu_memory_utilization", "(0, 1]"),
        ({"engine": "vllm", "vllm": {"max_model_len": 0}}, "max_model_len", "at least 1"),
        ({"engine": "vllm", "vllm": {"enforce_eager": "yes"}}, "enforce_eager", "true or false"),
        ({"engine": "vllm", "vllm": {"tensor_parallel_size": 0}}, "tensor_parallel_size", "at least 1"),
        ({"engine": "vllm", "vllm": [1]}, "tune.generation.vllm", "mapping"),
        ({"vllm": {"max_model_len": 512}}, "tune.generation.vllm", "engine: vllm"),
    ],
)
def test_engine_settings_are_checked_at_load(llama_trio, tmp_path, generation, key, words):
    with pytest.raises(RecipeError) as error:
        parse_tune(parse_recipe(tune_data(llama_trio, tmp_path, **generation), source="r.yml"))
    assert key in str(error.value) and words in str(error.value) and "r.yml" in str(error.value)


def test_vllm_options_are_parsed(llama_trio, tmp_path):
    options = {"gpu_memory_utilization": 0.8, "max_model_len": 4096, "enforce_eager": False, "cpu_kvcache_space": 2,
               "tensor_parallel_size": 2}
    spec = parse_tune(parse_recipe(tune_data(llama_trio, tmp_path, engine="vllm", vllm=options)))
    assert spec.generation.engine == "vllm"
    assert spec.generation.vllm == VllmOptions(**options)
    assert parse_tune(parse_recipe(tune_data(llama_trio, tmp_path))).generation.engine == "transformers"


def test_self_certainty_is_refused_with_vllm_before_any_weights_load(llama_trio, tmp_path, capsys):
    data = tune_data(llama_trio, tmp_path)
    data["tune"]["objectives"] = ["consistency", "self_certainty"]
    recipe = write_recipe(tmp_path / "r.yml", data)
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--engine", "vllm", "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "self_certainty" in err and "engine transformers" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "trials.jsonl").exists()


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here")
def test_vllm_missing_is_one_line_naming_the_extra(llama_trio, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yml", tune_data(llama_trio, tmp_path))
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--engine", "vllm", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "dots-merge[vllm]" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert main(["queries", "select", str(recipe), "--pool", str(tmp_path / "q.jsonl"), "--n", "1",
                 "--out", str(tmp_path / "chosen.jsonl"), "--engine", "vllm", "--quiet"]) != 0  # fmt: skip
    assert "dots-merge[vllm]" in capsys.readouterr().err
    assert not (tmp_path / "chosen.jsonl").exists()


def test_the_engine_option_is_part_of_the_run_identity(llama_trio, tmp_path):
    """`--engine vllm` is written into the run's recipe (trials from two engines are never mixed by --resume);
    naming the engine the recipe already uses changes nothing."""
    from dots_merge.tune.run import with_engine

    recipe = as_recipe(str(write_recipe(tmp_path / "r.yml", tune_data(llama_trio, tmp_path))))
    assert with_engine(recipe, None) is recipe and with_engine(recipe, "transformers") is recipe
    switched = with_engine(recipe, "vllm")
    assert switched.tune["generation"]["engine"] == "vllm" and "engine" not in recipe.tune["generation"]
    assert parse_tune(switched).generation.engine == "vllm"
    with pytest.raises(RecipeError, match="--engine"):
        with_engine(recipe, "tgi")


def test_transformers_trials_name_their_engine(llama_trio, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", tune_data(llama_trio, tmp_path))
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--no-merge", "--quiet"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    assert {r["engine"] for r in records} == {"transformers"}


def _vllm_plan(path, tmp_path, **sizes):
    recipe = as_recipe(str(path))
    recipe.data["tune"]["generation"]["engine"] = "vllm"
    return plan_tune(recipe, parse_tune(recipe), inspect_models(recipe), run_dir=tmp_path, **sizes)


def test_a_7b_pair_plans_the_vllm_engine_on_24_gib(shaped, tmp_path):  # noqa: F811
    plan = _vllm_plan(shaped["qwen2.5-7b"], tmp_path, device="cuda", gpu_memory=24 * GIB, host_memory=32 * GIB,
                      disk_free=200 * 10**9)  # fmt: skip
    data = plan.to_json()
    assert data["fits"], plan.table()
    settings = data["settings"]
    assert settings["engine"] == "vllm" and settings["max_model_len"] >= 1024
    assert 1 <= settings["max_num_seqs"] <= 16 * 7
    kv = next(p for p in data["parts"] if p["name"] == "vLLM KV cache")
    assert kv["where"] == "gpu" and kv["bytes"] > 0
    weights = settings["parameters"] * 2
    # vLLM's share of the card holds the weights, the KV cache and its overhead, and leaves the rest to ours
    assert weights + kv["bytes"] < settings["gpu_memory_utilization"] * 24 * GIB <= 0.95 * 24 * GIB
    assert not any(p["name"].startswith("generation") for p in data["parts"])


def test_tensor_parallelism_plans_a_shard_per_gpu_and_a_store_per_worker(shaped, tmp_path):  # noqa: F811
    """A 14B pair on two 24 GiB GPUs: each holds half the weights and of the KV cache; each worker process keeps
    its own vector store (twice one store's bytes in all) and reads the base from the mapped checkpoint."""
    sizes = {"device": "cuda", "gpu_memory": 24 * GIB, "host_memory": 256 * GIB, "disk_free": 10**12}
    one = _vllm_plan(shaped["qwen2.5-14b"], tmp_path, **sizes).to_json()
    recipe = as_recipe(str(shaped["qwen2.5-14b"]))
    recipe.data["tune"]["generation"].update(engine="vllm", vllm={"tensor_parallel_size": 2})
    two = plan_tune(recipe, parse_tune(recipe), inspect_models(recipe), run_dir=tmp_path, **sizes).to_json()

    def part(plan, name):
        return next(p for p in plan["parts"] if p["name"] == name)

    assert part(two, "resident model")["bytes"] * 2 == part(one, "resident model")["bytes"]
    assert "1/2 shard per GPU" in part(two, "resident model")["note"]
    store = sum(p["bytes"] for p in one["parts"] if p["name"].startswith("vector store"))
    assert sum(p["bytes"] for p in two["parts"] if p["name"].startswith("vector store")) == 2 * store
    assert two["settings"]["base"].startswith("host") and two["fits"], two
    assert two["settings"]["gpu_memory_utilization"] < 0.95
    assert any(p["name"].startswith("vLLM engine core and 2 worker") for p in two["parts"])


def test_a_cpu_plan_sets_the_vllm_kv_cache_in_whole_gib(llama_trio, tmp_path):
    data = tune_data(llama_trio, tmp_path, engine="vllm")
    plan = _vllm_plan(write_recipe(tmp_path / "r.yml", data), tmp_path, device="cpu", host_memory=16 * GIB,
                      disk_free=10**11)  # fmt: skip
    settings = plan.to_json()["settings"]
    assert settings["kv_cache_gib"] == 1 and settings["max_num_seqs"] == 2 * 2  # every sample of both queries
    # every prompt prefilled in one step (vLLM's CPU build cannot split a seeded request's prompt)
    assert settings["max_num_batched_tokens"] >= 2 * 2 * 4
    kv = next(p for p in plan.to_json()["parts"] if p["name"] == "vLLM KV cache")
    assert kv["where"] == "host" and GIB < kv["bytes"] < 1.01 * GIB  # the cache, and the prefill's activations
    data["tune"]["generation"]["vllm"] = {"cpu_kvcache_space": 3}
    plan = _vllm_plan(write_recipe(tmp_path / "r.yml", data), tmp_path, device="cpu", host_memory=16 * GIB,
                      disk_free=10**11)  # fmt: skip
    assert plan.to_json()["settings"]["kv_cache_gib"] == 3


def test_the_vllm_environment_keeps_the_users_settings_but_not_the_process_mode(monkeypatch, tmp_path):
    from dots_merge.tune.engines.vllm_engine import engine_environment

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "7")
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    env = engine_environment(VllmOptions(), cpu=True, kv_cache_gib=2, threads=2, cache_root=tmp_path)
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # the in-place update needs the worker in this process
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "7" and env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path) and env["VLLM_NO_USAGE_STATS"] == "1"
    env = engine_environment(VllmOptions(cpu_kvcache_space=3, cpu_threads=1), cpu=True, kv_cache_gib=2, threads=2,
                             cache_root=tmp_path)  # fmt: skip
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "3" and env["OMP_NUM_THREADS"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in engine_environment(VllmOptions(), cpu=False, kv_cache_gib=2, threads=2,
                                                              cache_root=tmp_path)  # fmt: skip
    # tensor parallelism: vLLM's own processes (each worker updates itself), the threads shared among workers
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # (pytest-xdist sets it for its workers)
    env = engine_environment(VllmOptions(tensor_parallel_size=2), cpu=True, kv_cache_gib=2, threads=4,
                             cache_root=tmp_path)  # fmt: skip
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1" and env["OMP_NUM_THREADS"] == "2"


@pytest.mark.parametrize(
    ("message", "words"),
    [
        ("Model architectures ['DotsToyForCausalLM'] are not supported for now.", "engine: transformers"),
        ("No available memory for the cache blocks. Try increasing `VLLM_CPU_KVCACHE_SPACE`", "gpu_memory_utilization"),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", "max_model_len"),
        ("something else broke\nwith details", "could not start"),
    ],
)
def test_engine_start_errors_are_one_line(message, words):
    from dots_merge.tune.engines.vllm_engine import start_error

    error = start_error(ValueError(message), "/models/base", {"VLLM_CPU_KVCACHE_SPACE": "1"})
    assert words in str(error) and "\n" not in str(error)


def test_the_vllm_reload_warning_is_dropped_only_for_a_rotary_embedding():
    """vLLM warns "<layer>: Failed to load weights" each trial for a rotary embedding (a cache, no weights): that
    one is dropped; the same warning for a layer with weights, and any other message, is kept."""
    import logging

    from dots_merge.tune.engines.vllm_engine import _buffer_only_layers

    def record(msg: str, *args) -> logging.LogRecord:
        return logging.LogRecord("vllm.x", logging.WARNING, __file__, 1, msg, args, None)

    assert not _buffer_only_layers(record("%s: Failed to load weights", "RotaryEmbedding"))
    assert not _buffer_only_layers(record("%s: Failed to load weights", "Llama3RotaryEmbedding"))
    assert _buffer_only_layers(record("%s: Failed to load weights", "QKVParallelLinear"))
    assert _buffer_only_layers(record("%s: Delayed processing", "RotaryEmbedding"))
    assert _buffer_only_layers(record("RotaryEmbedding: Failed to load weights"))


def test_a_vllm_workers_error_is_read_out_of_vllms_wrapping():
    from dots_merge.tune.engines.vllm_engine import worker_error

    wrapped = RuntimeError("Worker failed with error 'r.yml: model /m/sft not found\nmore', please check the stack "
                           "trace above for the root cause")  # fmt: skip
    assert worker_error(wrapped) == "r.yml: model /m/sft not found"
    assert worker_error(ValueError("plain\nsecond line")) == "plain"
    assert worker_error(TimeoutError()) == "TimeoutError"
