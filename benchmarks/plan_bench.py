"""The memory/disk plan against measurement, and the cost of searching densities (run by hand; README table).

    python benchmarks/plan_bench.py measure [--sizes 0.1,0.5,1.5] [--trials 10] [--work benchmarks/_work]
    python benchmarks/plan_bench.py planned      # the plan's figures for 7B/8B/14B/70B on 24/48/80 GB GPUs
    python benchmarks/plan_bench.py growth --sizes 0.1   # peak RSS after 5, 10 and 20 trials

`measure`: per size, a bfloat16 Llama trio with random weights (SFT dense noise, RLVR sparse noise; built once
into WORK/plan/SIZE), then on the CPU:
1. `dots-merge plan --device cpu --json`: the planned host RAM and disk;
2. `dots-merge tune` under `/usr/bin/time -v` with both densities and both weights searched in
   [0.1, 0.6] × [0.5, 1.5] (random backend, TRIALS trials, 2 queries × 2 samples × 8 new tokens: the model's
   memory, not generation, is what is measured) while a thread samples the run folder's size on disk;
3. at the --ratio-sizes, the same with the densities fixed (λ-only trials) — the weight update's seconds of
   both runs, median over trials 2..N (trial 1 builds the vector store).
It prints planned vs measured peak RSS and run-folder size, checks that no spill is left, and writes
WORK/plan/results.json. `planned` prints the plan for sparse-file checkpoints of real 7B–70B layouts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model builders live in tests/

SIZES = {  # hidden, layers, intermediate, heads, vocab: ≈ parameters
    "0.1": (640, 12, 1728, 10, 32000),
    "0.5": (1024, 24, 4864, 16, 32000),
    "1.5": (1536, 28, 8960, 12, 32000),
}
GIB = 1 << 30


def _trio(work: Path, size: str) -> dict[str, Path]:
    import torch

    from tests.toy_models import build_trio

    root = work / "plan" / size
    paths = {role: root / role for role in ("base", "sft", "rlvr")}
    if not (paths["rlvr"] / "config.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        hidden, layers, inter, heads, vocab = SIZES[size]
        print(f"building the {size}B trio ...", flush=True)
        build_trio(root, arch="llama", hidden=hidden, layers=layers, intermediate=inter, heads=heads, vocab=vocab,
                   dtype=torch.bfloat16, shard_size="2GB")  # fmt: skip
    return paths


def _recipe(work: Path, size: str, trio: dict[str, Path], *, densities: bool, trials: int) -> Path:
    queries = work / "plan" / "queries.jsonl"
    queries.write_text('{"prompt": "3 + 4 = ?"}\n{"prompt": "the answer is 5 + 2"}\n')
    space = [{"model": str(trio[m]), "param": "weight", "low": 0.5, "high": 1.5} for m in ("sft", "rlvr")]
    if densities:
        space += [{"model": str(trio[m]), "param": "density", "low": 0.1, "high": 0.6} for m in ("sft", "rlvr")]
    data = {
        "merge_method": "dots",
        "base_model": str(trio["base"]),
        "models": [{"model": str(trio[m]), "parameters": {"weight": 1.0, "density": 0.35}} for m in ("sft", "rlvr")],
        "parameters": {"rescale": "global"},
        "out_dtype": "bfloat16",
        "tune": {"queries": str(queries), "trials": trials, "backend": "random", "seed": 0,
                 "generation": {"samples": 2, "max_new_tokens": 8, "batch_size": "auto"}, "space": space},
    }  # fmt: skip
    path = work / "plan" / f"{size}-{'densities' if densities else 'weights'}.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _disk_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def _timed_tune(recipe: Path, run: Path) -> dict:
    """Peak RSS (/usr/bin/time -v) and peak run-folder size of one `dots-merge tune`."""
    shutil.rmtree(run, ignore_errors=True)
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            if run.exists():
                peak[0] = max(peak[0], _disk_bytes(run))
            time.sleep(0.25)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "dots_merge.cli.main", "tune", str(recipe), "--out", str(run),
           "--device", "cpu", "--quiet"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"tune failed:\n{proc.stdout}\n{proc.stderr}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024
    records = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines() if line.strip()]
    updates = [r["seconds"]["update"] for r in sorted(records, key=lambda r: r["number"])]
    return {"peak_rss": rss, "peak_disk": peak[0], "seconds": seconds, "updates": updates,
            "spill_left": (run / "cache" / "vectors").exists()}  # fmt: skip


def _plan(recipe: Path, run: Path) -> dict:
    out = run.parent / f"{run.name}.plan.json"
    cmd = [sys.executable, "-m", "dots_merge.cli.main", "plan", str(recipe), "--device", "cpu", "--out", str(run),
           "--json", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    return json.loads(out.read_text())


def measure(work: Path, sizes: list[str], trials: int, ratio_sizes: list[str]) -> None:
    results = []
    for size in sizes:
        trio = _trio(work, size)
        row = {"size": size}
        for densities in (True, False) if size in ratio_sizes else (True,):
            recipe = _recipe(work, size, trio, densities=densities, trials=trials)
            run = work / "plan" / f"run-{size}-{'d' if densities else 'w'}"
            plan = _plan(recipe, run)
            got = _timed_tune(recipe, run)
            key = "densities" if densities else "weights"
            row[key] = {"planned_host": plan["host"]["expected_peak_rss"], "planned_disk": plan["disk"]["needed"],
                        "parameters": plan["settings"]["parameters"], **got}  # fmt: skip
            print(json.dumps({size: {key: row[key]}}), flush=True)
            shutil.rmtree(run, ignore_errors=True)
        results.append(row)
    (work / "plan" / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| model | parameters | planned host RAM | peak RSS | planned disk | peak run folder | spill left | "
          "update, densities searched | update, λ only | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in results:
        d, w = row["densities"], row.get("weights")
        ud = statistics.median(d["updates"][1:])
        uw = statistics.median(w["updates"][1:]) if w else float("nan")
        print(f"| {row['size']}B | {d['parameters'] / 1e9:.2f}B | {d['planned_host'] / GIB:.2f} GiB | "
              f"{d['peak_rss'] / GIB:.2f} GiB ({d['peak_rss'] / d['planned_host'] - 1:+.0%}) | "
              f"{d['planned_disk'] / GIB:.2f} GiB | {d['peak_disk'] / GIB:.2f} GiB "
              f"({d['peak_disk'] / d['planned_disk'] - 1:+.0%}) | {'yes' if d['spill_left'] else 'no'} | "
              f"{ud:.1f} s | {uw:.1f} s | {ud / uw:.2f}× |")  # fmt: skip


def growth(work: Path, size: str, trials: list[int]) -> None:
    """Peak RSS of the density-searching tune at several trial counts: it must not grow with them."""
    trio = _trio(work, size)
    print("| trials | peak RSS | peak run folder |\n|---:|---:|---:|")
    for n in trials:
        recipe = _recipe(work, size, trio, densities=True, trials=n)
        run = work / "plan" / f"run-{size}-growth"
        got = _timed_tune(recipe, run)
        print(f"| {n} | {got['peak_rss'] / GIB:.2f} GiB | {got['peak_disk'] / GIB:.2f} GiB |", flush=True)
        shutil.rmtree(run, ignore_errors=True)


def planned(work: Path) -> None:
    from tests.shaped_checkpoints import write_shaped_trio

    root = work / "shaped"
    queries = root / "queries.jsonl"
    root.mkdir(parents=True, exist_ok=True)
    words = " ".join(f"w{i % 200}" for i in range(180))
    queries.write_text("".join(json.dumps({"prompt": f"{words} q{i}"}) + "\n" for i in range(16)))
    print("| model | GPU | fits | GPU needed | host needed | disk needed | batch | base | vectors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset in ("qwen2.5-7b", "llama-3.1-8b", "qwen2.5-14b", "llama-3.1-70b"):
        trio = write_shaped_trio(root / preset, preset) if not (root / preset / "rlvr").exists() else {
            r: root / preset / r for r in ("base", "sft", "rlvr")}  # fmt: skip
        data = {
            "merge_method": "dots", "base_model": str(trio["base"]), "out_dtype": "bfloat16",
            "models": [{"model": str(trio[m]), "parameters": {"density": 0.3}} for m in ("sft", "rlvr")],
            "tune": {"queries": str(queries), "trials": 40,
                     "generation": {"samples": 7, "max_new_tokens": 1024, "batch_size": "auto"},
                     "space": [{"model": str(trio[m]), "param": p, "low": lo, "high": hi} for m in ("sft", "rlvr")
                               for p, lo, hi in (("weight", 0.5, 2.0), ("density", 0.1, 0.6))]},
        }  # fmt: skip
        recipe = root / f"{preset}.yml"
        recipe.write_text(yaml.safe_dump(data, sort_keys=False))
        for gpu, host in (("24GiB", "32GiB"), ("48GiB", "64GiB"), ("80GB", "128GiB")):
            out = root / "plan.json"
            subprocess.run([sys.executable, "-m", "dots_merge.cli.main", "plan", str(recipe), "--device", "cuda",
                            "--gpu-memory", gpu, "--host-memory", host, "--disk-free", "2TB", "--json", str(out)],
                           capture_output=True)  # fmt: skip
            p = json.loads(out.read_text())
            s = p["settings"]
            print(f"| {preset} | {gpu} (host {host}) | {'yes' if p['fits'] else 'no'} | "
                  f"{p['gpu']['needed'] / GIB:.1f} GiB | {p['host']['needed'] / GIB:.1f} GiB | "
                  f"{p['disk']['needed'] / 1e9:.1f} GB | {s['batch_size']} | {s['base'].split(' ')[0]} | "
                  f"{s['vectors']} |", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["measure", "planned", "growth"])
    parser.add_argument("--sizes", default="0.1,0.5,1.5")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--ratio-sizes", default="0.1,0.5", help="sizes that also run the λ-only tune")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "_work")
    args = parser.parse_args()
    if args.what == "measure":
        measure(args.work, args.sizes.split(","), args.trials, args.ratio_sizes.split(","))
    elif args.what == "growth":
        growth(args.work, args.sizes.split(",")[0], [5, 10, 20])
    else:
        planned(args.work)


if __name__ == "__main__":
    main()
