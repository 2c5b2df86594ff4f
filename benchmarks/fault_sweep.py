"""Fault-injection sweep, longer than the CI test: `dots-merge tune` on a tiny trio killed (SIGKILL) and
interrupted (SIGINT) at random moments — loading, pre-pass, generation, record write, final merge — and resumed
after each, for several seeds and every trial store; prints what fired and how long it took.

    python benchmarks/fault_sweep.py [--seeds 3] [--kills 20] [--interrupts 5] [--budget 20] [--postgres URL]
                                     [--spawn] [--work DIR]

Each run must end with the budget of distinct finished trials, no trial lost, duplicated or rewritten, trials.jsonl
equal to the store, and a final model bit for bit the merge of best.yml (tests/fault_sweep.py checks all of it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny-model builder and the sweep live in tests/


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--interrupts", type=int, default=5)
    parser.add_argument("--budget", type=int, default=80)
    parser.add_argument("--postgres", metavar="URL", help="also sweep a study on this PostgreSQL server")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work" / "faults")
    parser.add_argument("--spawn", action="store_true",
                        help="each session a fresh interpreter (cold start, slower) instead of a forked child")  # fmt: skip
    args = parser.parse_args()

    import yaml

    from tests.fault_sweep import check_final_state, schedule, stored_records, sweep
    from tests.test_tune import QUERIES
    from tests.toy_models import build_trio

    shutil.rmtree(args.work, ignore_errors=True)
    trio = build_trio(args.work / "trio", arch="llama", hidden=32)
    (args.work / "q.jsonl").write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUERIES))
    stores = {"local": None, "sqlite": f"sqlite:///{args.work / 'study.db'}"}
    if args.postgres:
        stores["postgresql"] = args.postgres
    rows = []
    for kind, url in stores.items():
        for seed in range(args.seeds):
            run = args.work / f"{kind}-{seed}"
            recipe = args.work / f"{kind}-{seed}.yml"
            recipe.write_text(yaml.safe_dump(_recipe(trio, args.work / "q.jsonl", args.budget, seed)))
            extra = [] if url is None else ["--backend", "optuna", "--storage", url, "--study", uuid.uuid4().hex[:8]]
            started = time.perf_counter()
            result = sweep(recipe, run, schedule(args.kills, args.interrupts, seed), extra=extra, timeout=900,
                           max_sessions=10 * (args.kills + args.interrupts), fork=not args.spawn)  # fmt: skip
            check_final_state(run, args.budget, stored_records(extra), fork=not args.spawn)
            rows.append((kind, seed, len(result.fired), len(result.missed), result.sessions,
                         time.perf_counter() - started))  # fmt: skip
            print(f"{kind} seed {seed}: {len(result.fired)} faults fired, {len(result.missed)} missed, "
                  f"{result.sessions} sessions, {rows[-1][-1]:.0f} s — no trial lost", flush=True)
    print("\n| store | seed | faults fired | missed | sessions | seconds |\n|---|---:|---:|---:|---:|---:|")
    for kind, seed, fired, missed, sessions, seconds in rows:
        print(f"| {kind} | {seed} | {fired} | {missed} | {sessions} | {seconds:.0f} |")


def _recipe(trio: dict, queries: Path, budget: int, seed: int) -> dict:
    return {
        "merge_method": "dots",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(trio["sft"]), "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": str(trio["rlvr"]), "parameters": {"weight": 1.5, "density": 0.2}},
        ],
        "tune": {
            "queries": str(queries),
            "trials": budget,
            "seed": seed,
            "generation": {"samples": 2, "max_new_tokens": 4, "batch_size": 4},
            "space": [
                {"model": str(trio["sft"]), "param": "weight", "low": 0.5, "high": 2.0},
                {"model": str(trio["rlvr"]), "param": "weight", "low": 0.5, "high": 2.0},
                {"model": str(trio["rlvr"]), "param": "density", "low": 0.1, "high": 0.6},
            ],
        },
    }


if __name__ == "__main__":
    main()
