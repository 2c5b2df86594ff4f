"""The demo pipeline: trio → analyze → query selection → tune → merge → card → push --dry-run → report.

Everything runs offline on the CPU. The held-out test labels are used for the accuracy table only.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from dots_merge.demo import report as report_mod
from dots_merge.demo import trio as trio_mod
from dots_merge.demo.data import Problem, splits
from dots_merge.errors import RunMismatchError

BASELINES = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear"}  # report name → mergekit


def default_dir(quick: bool, seed: int = 0) -> Path:
    """`$DOTS_MERGE_CACHE/demo/<full|quick>-seed<S>`, else under `~/.cache/dots-merge/demo/`: one trio per seed."""
    from dots_merge.merge.prepass import default_cache_dir

    return default_cache_dir() / "demo" / f"{'quick' if quick else 'full'}-seed{seed}"


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"trio": trio_mod.QUICK, "pool": 12, "test": 25, "queries": 8, "trials": 8, "samples": 4}
    return {"trio": trio_mod.FULL, "pool": 32, "test": 200, "queries": 16, "trials": 24, "samples": 7}


def recipe_data(root: Path, *, trials: int, samples: int, seed: int) -> dict[str, Any]:
    """The demo recipe (recipes/demo.yml, with the trio's paths)."""
    sft, rlvr = str(root / "trio" / "sft"), str(root / "trio" / "rlvr")
    return {
        "merge_method": "dots",
        "base_model": str(root / "trio" / "base"),
        "models": [
            {"model": sft, "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": rlvr, "parameters": {"weight": 1.0, "density": 0.3}},
        ],
        "parameters": {"rescale": "global"},
        "out_dtype": "float32",
        "tune": {
            "queries": "queries.jsonl",
            "trials": trials,
            "seed": seed,
            "pick": "utopia",
            "generation": {
                "samples": samples,
                "temperature": 0.6,
                "top_p": 1.0,
                "max_new_tokens": 24,
                "batch_size": 32,
            },
            "prompt_suffix": "",
            "answer": "auto",
            "space": [
                {"model": sft, "param": "weight", "low": 0.5, "high": 2.0},
                {"model": rlvr, "param": "weight", "low": 0.5, "high": 2.0},
                {"model": sft, "param": "density", "low": 0.1, "high": 0.6},
                {"model": rlvr, "param": "density", "low": 0.1, "high": 0.6},
            ],
        },
    }


def _write_pool(path: Path, problems: list[Problem]) -> None:
    """The unlabeled pool: prompts only (no answer, no family)."""
    path.write_text("".join(json.dumps({"prompt": p.query}) + "\n" for p in problems))


def run_demo(
    out: Path | None = None,
    *,
    quick: bool = False,
    trials: int | None = None,
    seed: int = 0,
    rebuild: bool = False,
    quiet: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole pipeline into `out`; return the report (also written to report.json / report.md)."""
    import dots_merge
    from dots_merge.analyze import analyze, write_json, write_plots
    from dots_merge.hub import plan_push
    from dots_merge.tune.queries import select_queries
    from dots_merge.tune.run import tune

    started = time.perf_counter()
    settings = _settings(quick)
    trials = trials or settings["trials"]
    root = Path(out) if out else default_dir(quick, seed)
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] {seconds[name]} s")

    if quick:
        log(report_mod.SMOKE.replace("**", "").replace("`", ""))
    t0 = time.perf_counter()
    data = splits(seed, pool=settings["pool"], test=settings["test"])
    _write_pool(root / "pool.jsonl", data["pool"])
    key = trio_mod.config_key(settings["trio"]) | {"seed": seed}
    marker = root / "trio" / "trio.json"
    if rebuild or not marker.exists() or json.loads(marker.read_text()) != key:
        log("building the toy trio (trained on this CPU) ...")
        shutil.rmtree(root / "run", ignore_errors=True)  # a tune of the previous trio
        trio_mod.build(root / "trio", dataclasses.replace(settings["trio"], seed=seed), set(data["_held_out"]),
                       log=log)  # fmt: skip
        marker.write_text(json.dumps(key))
    else:
        log(f"reusing the toy trio in {root / 'trio'}")
    stage("trio", t0)

    recipe_path = root / "demo.yml"
    recipe_path.write_text(yaml.safe_dump(recipe_data(root, trials=trials, samples=settings["samples"], seed=seed),
                                          sort_keys=False))  # fmt: skip

    t0 = time.perf_counter()
    report_analysis = analyze(recipe_path, densities=(0.1, 0.3, 0.5))
    write_json(report_analysis, root / "analysis" / "analysis.json")
    write_plots(report_analysis, root / "analysis")
    stage("analyze", t0)

    # Label-free from here to the merge of the pick: the pool's prompts and the recipe are all the tune sees.
    t0 = time.perf_counter()
    select_queries(recipe_path, root / "pool.jsonl", settings["queries"], root / "queries.jsonl",
                   samples=5, seed=seed, max_difficulty=0.8)  # fmt: skip
    stage("queries", t0)

    t0 = time.perf_counter()
    try:
        result = tune(recipe_path, root / "run", resume=(root / "run" / "run.json").exists(), quiet=quiet)
    except RunMismatchError:  # the demo's own run folder, from other settings or an older version: start anew
        shutil.rmtree(root / "run")
        result = tune(recipe_path, root / "run", quiet=quiet)
    stage("tune", t0)

    t0 = time.perf_counter()
    merges = root / "merges"
    base_recipe = recipe_data(root, trials=trials, samples=settings["samples"], seed=seed)
    base_recipe.pop("tune")
    for method in (*BASELINES, "dots_untuned"):
        recipe = json.loads(json.dumps(base_recipe))
        if method != "dots_untuned":
            recipe["merge_method"] = BASELINES[method]
            recipe.pop("parameters")
            for entry in recipe["models"]:
                if method == "task_arithmetic":
                    entry["parameters"].pop("density")
        torch.manual_seed(seed)  # DARE drops at random
        dots_merge.merge(recipe, merges / method, force=True, quiet=True, cache_dir=root / "run" / "cache")
    stage("baselines", t0)

    # The report: the only place the test set's answers are read.
    t0 = time.perf_counter()
    models = {
        "base": root / "trio" / "base",
        "sft": root / "trio" / "sft",
        "rlvr": root / "trio" / "rlvr",
        **{m: merges / m for m in (*BASELINES, "dots_untuned")},
        "dots_tuned": result.model_dir,
    }
    accuracy = {name: report_mod.model_accuracy(path, data["test"]) for name, path in models.items()}
    per_trial = report_mod.trial_accuracy(recipe_path, root / "run", result.records, data["test"])
    stage("evaluate", t0)

    pareto = json.loads((root / "run" / "pareto.json").read_text())
    trial_rows = [
        {"number": r["number"], "params": r["params"],
         "objectives": {o["name"]: r[o["name"]] for o in pareto["objectives"]}, "accuracy": per_trial[r["number"]]}
        for r in result.records
    ]  # fmt: skip
    report = report_mod.build(
        accuracy,
        trial_rows,
        pareto,
        quick=quick,
        test_problems=len(data["test"]),
        task_vectors=report_mod.task_vector_summary(report_analysis, *_parents(root)),
        stage_seconds=seconds,
        seconds=round(time.perf_counter() - started, 1),
        seed=seed,
    )
    report_mod.write(root, report, plan_push(result.model_dir, "your-name/dots-demo").describe())
    log(report_mod.table(report))
    log(f"report: {root / 'report.md'}")
    return report


def _parents(root: Path) -> tuple[str, str]:
    return str(root / "trio" / "sft"), str(root / "trio" / "rlvr")
