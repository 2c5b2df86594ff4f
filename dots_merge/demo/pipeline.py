"""The demo pipeline: trio → analyze → query selection → tune → merge → card → push --dry-run → report.

Everything runs offline on the CPU. The held-out test labels are used for the accuracy table only.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from dots_merge.demo import trio as trio_mod
from dots_merge.demo.data import FAMILIES, Problem, splits
from dots_merge.errors import RunMismatchError

BASELINES = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear"}  # report name → mergekit


def default_dir(quick: bool) -> Path:
    """`$DOTS_MERGE_CACHE/demo/…`, else `~/.cache/dots-merge/demo/…`."""
    from dots_merge.merge.prepass import default_cache_dir

    return default_cache_dir() / "demo" / ("quick" if quick else "full")


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"trio": trio_mod.QUICK, "pool": 12, "test": 40, "queries": 8, "trials": 8, "samples": 4}
    return {"trio": trio_mod.FULL, "pool": 32, "test": 100, "queries": 16, "trials": 24, "samples": 7}


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
            "pick": "knee",
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
            ],
        },
    }


def accuracy(model_dir: Path, problems: list[Problem]) -> tuple[float, dict[str, float]]:
    """Greedy-decoding exact-answer accuracy, overall and per family."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dots_merge.tune.generation import generate_answers

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    outputs = generate_answers(model, tok, [p.query for p in problems], samples=1, temperature=0.0, top_p=1.0,
                               max_new_tokens=24, seed=0, batch_size=128)  # fmt: skip
    hits = [trio_mod.correct(o[0], p) for o, p in zip(outputs, problems, strict=True)]
    by_family = {}
    for family in FAMILIES:
        fam = [h for h, p in zip(hits, problems, strict=True) if p.family == family]
        by_family[family] = sum(fam) / len(fam) if fam else 0.0
    return sum(hits) / len(hits), by_family


def _write_jsonl(path: Path, problems: list[Problem]) -> None:
    path.write_text("".join(json.dumps({"prompt": p.query, "family": p.family}) + "\n" for p in problems))


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
    root = Path(out) if out else default_dir(quick)
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        log(f"[{name}] {seconds[name]} s")

    t0 = time.perf_counter()
    data = splits(seed, pool=settings["pool"], test=settings["test"])
    _write_jsonl(root / "pool.jsonl", data["pool"])
    _write_jsonl(root / "test.jsonl", data["test"])
    key = trio_mod.config_key(settings["trio"]) | {"seed": seed}
    marker = root / "trio" / "trio.json"
    if rebuild or not marker.exists() or json.loads(marker.read_text()) != key:
        log("building the toy trio (trained on this CPU) ...")
        shutil.rmtree(root / "run", ignore_errors=True)  # a tune of the previous trio
        trio_mod.build(root / "trio", settings["trio"], set(data["_held_out"]), log=log)
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

    t0 = time.perf_counter()
    models = {
        "base": root / "trio" / "base",
        "sft": root / "trio" / "sft",
        "rlvr": root / "trio" / "rlvr",
        **{m: merges / m for m in (*BASELINES, "dots_untuned")},
        "dots_tuned": result.model_dir,
    }
    acc, by_family = {}, {}
    for name, path in models.items():
        acc[name], by_family[name] = accuracy(path, data["test"])
    stage("evaluate", t0)

    plan = plan_push(result.model_dir, "your-name/dots-demo")
    report = {
        "accuracy": acc,
        "accuracy_by_family": by_family,
        "picked": {
            "trial": result.pick,
            "rule": result.rule,
            "params": next(r["params"] for r in result.records if r["number"] == result.pick),
        },
        "test_problems": len(data["test"]),
        "trials": len(result.records),
        "stage_seconds": seconds,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (root / "report.md").write_text(_markdown(report, plan.describe()))
    log(_table(report))
    log(f"report: {root / 'report.md'}")
    return report


def _table(report: dict[str, Any]) -> str:
    lines = ["model              accuracy  " + "  ".join(f"{f:>6}" for f in FAMILIES)]
    for name, value in report["accuracy"].items():
        fams = "  ".join(f"{100 * report['accuracy_by_family'][name][f]:5.1f}%" for f in FAMILIES)
        lines.append(f"{name:18} {100 * value:7.1f}%  {fams}")
    return "\n".join(lines)


def _markdown(report: dict[str, Any], plan: str) -> str:
    rows = [
        f"| {name} | {100 * v:.1f} | "
        + " | ".join(f"{100 * report['accuracy_by_family'][name][f]:.1f}" for f in FAMILIES)
        + " |"
        for name, v in report["accuracy"].items()
    ]
    picked = report["picked"]
    return "\n".join(
        [
            "# dots-merge demo",
            "",
            f"Held-out accuracy (%) on {report['test_problems']} problems, greedy decoding, exact final answer. "
            "Labels were used only for this table, never for tuning.",
            "",
            "| model | all | " + " | ".join(FAMILIES) + " |",
            "|---" * (len(FAMILIES) + 2) + "|",
            *rows,
            "",
            f"Tuned DoTS: trial #{picked['trial']} of {report['trials']} by the `{picked['rule']}` rule, "
            f"coefficients {picked['params']}.",
            "",
            "![Pareto front](run/pareto.png)",
            "",
            "![Task-vector shares by module](analysis/module_share.png) ![Sign conflict](analysis/sign_conflict.png)",
            "",
            "`dots-merge push run/model your-name/dots-demo --dry-run` would upload:",
            "",
            "```",
            plan,
            "```",
            "",
            f"Total time {report['seconds']} s; by stage: {report['stage_seconds']}.",
            "",
        ]
    )
