"""`dots-merge tune`: the run folder, resume after kill -9, pick/merge, and every bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dots_merge.cli.main import main
from tests.conftest import dots_recipe, write_recipe
from tests.reference import load_state

QUERIES = ["1 + 2", "3 * 4", "9 - 5", "7 + 1"]


def tune_recipe(trio, tmp_path: Path, **tune) -> dict:
    (tmp_path / "q.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUERIES))
    data = dots_recipe(trio)
    data["tune"] = {
        "queries": "q.jsonl",
        "trials": 5,
        "seed": 3,
        "generation": {"samples": 3, "max_new_tokens": 6, "batch_size": 4},
        "space": [
            {"model": str(trio["sft"]), "param": "weight", "low": 0.5, "high": 2.0},
            {"model": str(trio["rlvr"]), "param": "weight", "low": 0.5, "high": 2.0},
            {"model": str(trio["rlvr"]), "param": "density", "low": 0.1, "high": 0.6},
            {"model": str(trio["sft"]), "param": "weight", "filter": "self_attn", "low": 0.5, "high": 2.0},
        ],
    }
    data["tune"].update(tune)
    return data


def run_tune(*args: str) -> int:
    return main(["tune", *args, "--quiet"])


def test_a_five_trial_run_writes_every_file(llama_trio, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path))
    run = tmp_path / "run"
    assert run_tune(str(recipe), "--out", str(run)) == 0
    assert "pick (utopia): trial #" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "trials").iterdir()) == [f"{i:04d}.yml" for i in range(5)]
    records = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert [r["number"] for r in records] == list(range(5))
    for r in records:
        assert set(r) >= {"number", "params", "consistency", "perplexity", "per_query_consistency", "seconds"}
        assert len(r["per_query_consistency"]) == len(QUERIES)
        assert set(r["seconds"]) >= {"update", "generation", "perplexity"}
        assert 0.0 <= r["consistency"] <= 1.0 and r["perplexity"] > 1.0
    assert records[0]["point"] == [1.0, 1.0, 0.2, 1.0]  # the default initial point: weights 1, densities as written
    trial = yaml.safe_load((run / "trials" / "0001.yml").read_text())
    assert "tune" not in trial
    sft = next(m for m in trial["models"] if m["model"] == str(llama_trio["sft"]))
    assert sft["parameters"]["weight"][0]["filter"] == "self_attn"
    assert sft["parameters"]["weight"][1] == {"value": records[1]["point"][0]}
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["pick"] in pareto["front"] and pareto["rule"] == "utopia"
    assert pareto["hypervolume"] > 0 and set(pareto["reference_point"]) == {"consistency", "perplexity"}
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "best.yml").read_text() == (run / "trials" / f"{pareto['pick']:04d}.yml").read_text()
    assert main(["merge", str(run / "best.yml"), str(tmp_path / "again"), "--quiet"]) == 0
    model, again = load_state(run / "model"), load_state(tmp_path / "again")
    assert all(torch.equal(model[k], again[k]) for k in again)


def test_kill_9_then_resume(llama_trio, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=7))
    run = tmp_path / "run"
    cmd = [sys.executable, "-c", "import sys; from dots_merge.cli.main import main; sys.exit(main(sys.argv[1:]))",
           "tune", str(recipe), "--out", str(run), "--quiet", "--no-merge"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        done = (run / "trials.jsonl").read_text().count("\n") if (run / "trials.jsonl").exists() else 0
        if done >= 2 or proc.poll() is not None:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = (run / "trials.jsonl").read_text()
    finished = before.count("\n")
    assert 2 <= finished < 7
    with open(run / "trials.jsonl", "a") as f:  # a record cut short by the crash
        f.write('{"number": 99, "params"')
    assert run_tune(str(recipe), "--out", str(run), "--resume") == 0
    after = (run / "trials.jsonl").read_text()
    assert after.startswith(before)
    numbers = [json.loads(line)["number"] for line in after.splitlines()]
    assert len(numbers) == 7 and len(set(numbers)) == 7 and numbers == sorted(numbers)
    assert (run / "model" / "model.safetensors").exists()


def test_resume_redoes_only_what_is_missing_and_refuses_a_changed_recipe(llama_trio, tmp_path, capsys):
    data = tune_recipe(llama_trio, tmp_path, trials=3)
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    run = tmp_path / "run"
    assert run_tune(str(recipe), "--out", str(run)) == 0
    trials_before = (run / "trials.jsonl").read_text()
    weights = run / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    (run / "pareto.png").unlink()
    assert run_tune(str(recipe), "--out", str(run), "--resume") == 0
    assert (run / "trials.jsonl").read_text() == trials_before and (run / "pareto.png").exists()
    assert weights.stat().st_mtime_ns == stamp  # the merged model was up to date
    assert run_tune(str(recipe), "--out", str(run), "--resume", "--trials", "4") == 0  # a bigger budget continues
    assert (run / "trials.jsonl").read_text().startswith(trials_before)
    assert (run / "trials.jsonl").read_text().count("\n") == 4
    capsys.readouterr()
    data["models"][1]["parameters"]["density"] = 0.25
    write_recipe(recipe, data)
    assert run_tune(str(recipe), "--out", str(run), "--resume") == 2
    err = capsys.readouterr().err
    assert "different recipe" in err and "models[1].parameters.density" in err
    assert run_tune(str(recipe), "--out", str(run)) == 2
    assert "--resume" in capsys.readouterr().err


def test_optuna_backend_runs(llama_trio, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=3, backend="optuna"))
    assert run_tune(str(recipe), "--out", str(tmp_path / "run"), "--no-merge") == 0
    assert (tmp_path / "run" / "trials.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda d, p: d["tune"].update(queries="missing.jsonl"), "missing.jsonl"),
        (lambda d, p: (p / "empty.jsonl").write_text("\n") and d["tune"].update(queries="empty.jsonl"), "empty"),
        (lambda d, p: (p / "bad.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n') and d["tune"].update(queries="bad.jsonl"), "bad.jsonl:2"),
        (lambda d, p: d["tune"]["space"][0].update(model="org/other"), "tune.space[0].model"),
        (lambda d, p: d["tune"]["space"][0].update(low=2.0), "tune.space[0]: low (2.0) must be below high"),
        (lambda d, p: d["tune"]["space"][0].update(param="lambda"), "tune.space[0].param"),
        (lambda d, p: d["tune"].update(trials=0), "tune.trials"),
        (lambda d, p: d["tune"].update(answer="regex:(unclosed"), "tune.answer"),
        (lambda d, p: d["tune"].update(sampels=3), "tune.sampels"),
        (lambda d, p: d["tune"]["generation"].update(tempreature=1.0), "tune.generation.tempreature"),
        (lambda d, p: d["tune"].update(backend="cma"), "tune.backend"),
        (lambda d, p: d["tune"].update(initial=[[1.0, 1.0]]), "tune.initial[0]"),
        (lambda d, p: d.pop("tune"), "no `tune:` section"),
    ],
)  # fmt: skip
def test_bad_tune_input(llama_trio, tmp_path, capsys, change, needle):
    data = tune_recipe(llama_trio, tmp_path)
    change(data, tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    assert run_tune(str(recipe), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_base_without_tokenizer(llama_trio, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(llama_trio["base"], base)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (base / name).unlink(missing_ok=True)
    data = tune_recipe({**llama_trio, "base": base}, tmp_path)
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    assert run_tune(str(recipe), "--out", str(tmp_path / "run")) == 2
    assert "no tokenizer" in capsys.readouterr().err
    assert run_tune(str(recipe), "--out", str(tmp_path / "run"), "--trials", "0") == 2


def test_resume_refuses_retrained_weights_at_the_same_paths(llama_trio, tmp_path, capsys):
    trio = {k: shutil.copytree(v, tmp_path / k) for k, v in llama_trio.items()}
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(trio, tmp_path, trials=2))
    run = tmp_path / "run"
    assert run_tune(str(recipe), "--out", str(run), "--no-merge") == 0
    state = load_state(trio["rlvr"])
    state = {k: v * 1.01 for k, v in state.items()}
    from safetensors.torch import save_file

    save_file(state, trio["rlvr"] / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert run_tune(str(recipe), "--out", str(run), "--resume", "--trials", "3") == 2
    assert "weights." in capsys.readouterr().err
