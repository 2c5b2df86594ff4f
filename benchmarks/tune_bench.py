"""Tuning benchmarks (run by hand; numbers go into the README).

    python benchmarks/tune_bench.py trial   [--work benchmarks/_work]   # per-trial time split, ~95M model
    python benchmarks/tune_bench.py tuners  [--trials 40 --seeds 3]     # hypervolume of each backend

`trial`: a ~95M-parameter bf16 Llama trio with a tokenizer; 16 queries × 7 samples × 64 new tokens. It times
trials of the resident candidate (update / generation / perplexity) — a first trial (task vectors computed),
then λ-only trials (cached vectors) — against the reference approach per trial: merge to disk, load the
merged model with transformers.

`tuners`: a synthetic two-objective problem (consistency = exp(−‖x − a‖²), perplexity = 2 + 4‖x − b‖² on the
unit box scaled to [0.5, 2.0]^d, a ≠ b), d = 2 and 8, hypervolume after N trials for bayes (ParEGO),
optuna GP, optuna TPE and random, averaged over seeds; reference point (0, 2 + 4d).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def bench_trial(work: Path, trials: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import dots_merge
    from dots_merge.candidate import ResidentCandidate
    from dots_merge.merging import inspect_models
    from dots_merge.objectives import Generation, answer_comparator, make_extractor, score
    from dots_merge.recipe import parse_recipe
    from dots_merge.toy import build_trio
    from dots_merge.tune_spec import Dimension, trial_recipe

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
    candidate = ResidentCandidate(recipe, checkpoints, cache_dir=cache)
    space = [Dimension(str(root / "sft"), "weight", 0.5, 2.0), Dimension(str(root / "rlvr"), "weight", 0.5, 2.0)]
    queries = [f"{a} + {b} =" for a in range(4) for b in range(4)]
    extract, (_, equal) = make_extractor("auto"), answer_comparator("string")
    rows = []
    for t in range(trials):
        lam = [1.0 + 0.1 * t, 1.0 - 0.05 * t]
        started = time.perf_counter()
        _, update = candidate.apply(trial_recipe(recipe, space, lam))
        s = score(candidate.model, candidate.tokenizer, queries, suffix="", extract=extract, equal=equal,
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
    from dots_merge.pareto import hypervolume
    from dots_merge.tuner import make_tuner
    from dots_merge.tuner.optuna_backend import OptunaTuner

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["trial", "tuners"])
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    result = bench_trial(args.work, 4) if args.what == "trial" else bench_tuners(args.trials, args.seeds)
    (args.work / f"tune_{args.what}.json").write_text(json.dumps(result, indent=2))
    print(yaml.safe_dump(result, sort_keys=False))


if __name__ == "__main__":
    main()
