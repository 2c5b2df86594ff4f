"""Tuning benchmarks (run by hand; numbers go into the README).

    python benchmarks/tune_bench.py trial   [--work benchmarks/_work]   # per-trial time split, ~95M model
    python benchmarks/tune_bench.py tuners  [--trials 40 --seeds 3]     # hypervolume of each backend
    python benchmarks/tune_bench.py study   [--trials 40] [--postgres URL]  # shared-study overhead per trial

`trial`: a ~95M-parameter bf16 Llama trio with a tokenizer; 16 queries × 7 samples × 64 new tokens. It times
trials of the resident candidate (update / generation / perplexity) — a first trial (task vectors computed),
then λ-only trials (cached vectors) — against the reference approach per trial: merge to disk, load the
merged model with transformers.

`tuners`: a synthetic two-objective problem (consistency = exp(−‖x − a‖²), perplexity = 2 + 4‖x − b‖² on the
unit box scaled to [0.5, 2.0]^d, a ≠ b), d = 2 and 8, hypervolume after N trials for bayes (ParEGO),
optuna GP, optuna TPE and random, averaged over seeds; reference point (0, 2 + 4d).

`study`: what a shared study costs per trial, without the model: 1 and 2 processes claim and complete trials
(d = 4, the GP sampler) on SQLite (and PostgreSQL when given) until the budget is done, each record the size
of a real one (64 queries × 7 answers, ~40 KB). Reports the median claim (which runs the sampler) over all
trials and over the last ten, the median complete, and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny-model builder lives in tests/toy_models.py

HERE = Path(__file__).resolve().parent


def bench_trial(work: Path, trials: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import dots_merge
    from dots_merge.merge.driver import inspect_models
    from dots_merge.recipe import Generation, parse_recipe
    from dots_merge.recipe.tune_section import Dimension, trial_recipe
    from dots_merge.tune.answers import answer_comparator, make_extractor
    from dots_merge.tune.candidate import ResidentCandidate
    from dots_merge.tune.objectives import make_objectives, score
    from tests.toy_models import build_trio

    root = work / "trio100m"
    if not (root / "rlvr" / "config.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        print("building the ~95M trio ...", flush=True)
        build_trio(root, arch="llama", hidden=640, layers=12, vocab=32000, intermediate=1728, heads=10,
                   dtype=torch.bfloat16)  # fmt: skip
    recipe = parse_recipe(
        {
            "merge_method": "dots",
            "base_model": str(root / "base"),
            "models": [
                {"model": str(root / "sft"), "parameters": {"density": 0.3}},
                {"model": str(root / "rlvr"), "parameters": {"density": 0.3}},
            ],
            "out_dtype": "bfloat16",
        }
    )
    checkpoints = inspect_models(recipe)
    params = sum(i.numel for i in next(iter(checkpoints.values())).tensors.values())
    cache = work / "tune-cache"
    shutil.rmtree(cache, ignore_errors=True)
    candidate = ResidentCandidate(recipe, checkpoints)
    space = [Dimension(str(root / "sft"), "weight", 0.5, 2.0), Dimension(str(root / "rlvr"), "weight", 0.5, 2.0)]
    queries = [f"{a} + {b} =" for a in range(4) for b in range(4)]
    extract, (_, equal) = make_extractor("auto"), answer_comparator("string")
    rows = []
    for t in range(trials):
        lam = [1.0 + 0.1 * t, 1.0 - 0.05 * t]
        started = time.perf_counter()
        _, update = candidate.apply(trial_recipe(recipe, space, lam))
        s = score(candidate.engine, queries, objectives=make_objectives(), suffix="", extract=extract, equal=equal,
                  generation=Generation(samples=7, temperature=0.6, max_new_tokens=64, batch_size=16), seed=0)  # fmt: skip
        total = time.perf_counter() - started
        rows.append(
            {"update": update, "generation": s.seconds_generation, "perplexity": s.seconds_perplexity, "total": total}
        )
        print(f"trial {t}: update {update:.2f} s, generation {s.seconds_generation:.2f} s, "
              f"perplexity {s.seconds_perplexity:.2f} s, total {total:.2f} s", flush=True)  # fmt: skip
    disk = []
    for t in range(2):
        started = time.perf_counter()
        out = work / "reference-merge"
        dots_merge.merge(trial_recipe(recipe, space, [1.0 + 0.1 * t, 1.0]), out, force=True, cache_dir=cache)
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        disk.append(time.perf_counter() - started)
        print(f"reference (merge to disk + load): {disk[-1]:.2f} s", flush=True)
    later = rows[1:]
    return {
        "parameters": params,
        "first_trial": rows[0],
        "later_trials_mean": {k: statistics.mean(r[k] for r in later) for k in rows[0]},
        "reference_merge_and_load_s": min(disk),
    }


def synthetic(d: int):
    a = [0.75] * d
    b = [0.2 if i % 2 else 0.35 for i in range(d)]

    def f(x):
        u = [(v - 0.5) / 1.5 for v in x]
        return math.exp(-sum((p - q) ** 2 for p, q in zip(u, a, strict=True))), 2 + 4 * sum(
            (p - q) ** 2 for p, q in zip(u, b, strict=True)
        )

    return f


def bench_tuners(n: int, seeds: int) -> dict:
    from dots_merge.tune.pareto import hypervolume
    from dots_merge.tune.samplers import make_tuner
    from dots_merge.tune.samplers.optuna import OptunaTuner

    out = {}
    for d in (2, 8):
        f, bounds = synthetic(d), [(0.5, 2.0)] * d
        initial = [[1.0] * d]
        makers = {
            "bayes": lambda s: make_tuner("bayes", bounds, seed=s, initial=initial),  # noqa: B023
            "optuna GP": lambda s: OptunaTuner(bounds, seed=s, initial=initial, sampler="gp"),  # noqa: B023
            "optuna TPE": lambda s: OptunaTuner(bounds, seed=s, initial=initial, sampler="tpe"),  # noqa: B023
            "random": lambda s: make_tuner("random", bounds, seed=s, initial=initial),  # noqa: B023
        }
        for name, make in makers.items():
            hvs, secs = [], []
            for seed in range(seeds):
                tuner, started = make(seed), time.perf_counter()
                for _ in range(n):
                    x = tuner.ask()
                    tuner.tell(x, f(x))
                secs.append(time.perf_counter() - started)
                hvs.append(hypervolume([o for _, o in tuner.history], (0.0, 2 + 4 * d)))
            out[f"d={d} {name}"] = {"hypervolume": statistics.mean(hvs), "sd": statistics.pstdev(hvs),
                                    "seconds": statistics.mean(secs)}  # fmt: skip
            r = out[f"d={d} {name}"]
            print(
                f"d={d} {name:11s} hypervolume {r['hypervolume']:.3f} ± {r['sd']:.3f}  ({r['seconds']:.1f} s)",
                flush=True,
            )
    return out


def _study_worker(url: str, name: str, out, mode: str) -> None:
    from dots_merge.tune.stores.optuna_rdb import OptunaStore

    shared = OptunaStore.open(url, name, identity={"bench": 1}, mode=mode, bounds=[(0.5, 2.0)] * 4, seed=0,
                              heartbeat=60, budget=None)  # fmt: skip
    answers = [[f"{i * 7 + j} is the answer" for j in range(7)] for i in range(64)]
    laps = []
    while not shared.done():
        t0 = time.perf_counter()
        claim = shared.ask()
        if claim is None:
            time.sleep(0.01)
            continue
        x = claim.point
        record = {"number": claim.number, "point": x, "consistency": math.exp(-sum((v - 1) ** 2 for v in x)),
                  "perplexity": 2 + sum((v - 1.5) ** 2 for v in x), "answers": answers,
                  "per_query_consistency": [0.5] * 64, "per_query_nll": [1.0] * 64}  # fmt: skip
        t1 = time.perf_counter()
        shared.tell(claim, record)
        laps.append((claim.number, t1 - t0, time.perf_counter() - t1))
    out.put(laps)


def bench_study(trials: int, postgres: str | None, work: Path) -> dict:
    import multiprocessing as mp
    import uuid

    from dots_merge.tune.stores.optuna_rdb import OptunaStore

    ctx = mp.get_context("spawn")
    stores = {"sqlite": f"sqlite:///{work / 'study_bench.db'}"}
    if postgres:
        stores["postgresql"] = postgres
    result = {}
    for kind, url in stores.items():
        for workers in (1, 2):
            name = f"bench-{uuid.uuid4().hex[:8]}"
            OptunaStore.open(url, name, identity={"bench": 1}, mode="create", bounds=[(0.5, 2.0)] * 4, seed=0,
                             heartbeat=60, budget=trials)  # fmt: skip
            queue = ctx.Queue()
            t0 = time.perf_counter()
            procs = [ctx.Process(target=_study_worker, args=(url, name, queue, "join")) for _ in range(workers)]
            for p in procs:
                p.start()
            laps = [lap for _ in procs for lap in queue.get()]
            for p in procs:
                p.join()
            wall = time.perf_counter() - t0
            late = [lap for lap in laps if lap[0] >= trials - 10]  # the last ten: the study is at its largest
            result[f"{kind}, {workers} process(es)"] = {
                "trials": len(laps),
                "claim_ms_median": round(1000 * statistics.median(lap[1] for lap in laps), 1),
                "claim_ms_last10": round(1000 * statistics.median(lap[1] for lap in late), 1),
                "complete_ms_median": round(1000 * statistics.median(lap[2] for lap in laps), 1),
                "wall_s": round(wall, 1),
            }
            print(kind, workers, result[f"{kind}, {workers} process(es)"], flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["trial", "tuners", "study"])
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--postgres", metavar="URL", help="study: also on this PostgreSQL database")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.what == "trial":
        result = bench_trial(args.work, 4)
    elif args.what == "tuners":
        result = bench_tuners(args.trials, args.seeds)
    else:
        result = bench_study(args.trials, args.postgres, args.work)
    (args.work / f"tune_{args.what}.json").write_text(json.dumps(result, indent=2))
    print(yaml.safe_dump(result, sort_keys=False))


if __name__ == "__main__":
    main()
