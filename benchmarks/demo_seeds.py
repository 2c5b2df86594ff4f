"""The demo on several seeds: a fresh trio per seed, the default label-free pipeline, held-out accuracy of every
model, the pick against the oracle, wall time and peak RSS of each run.

Each seed runs as its own `dots-merge demo --seed S --rebuild` process under `/usr/bin/time -v` (on an idle
machine: the time is part of the result). Prints the README's table (each seed and the mean), then what each
label-free pick rule would have chosen on the same trials (the search does not depend on the rule), and writes
`benchmarks/_work/demo_seeds/results.json`.

    python benchmarks/demo_seeds.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

WORK = Path(__file__).resolve().parent / "_work" / "demo_seeds"
MODELS = ("base", "sft", "rlvr", "task_arithmetic", "ties", "dare", "dots_untuned", "dots_tuned")
NAMES = {"task_arithmetic": "TA (1,1)", "dots_untuned": "DoTS (1,1)", "dots_tuned": "DoTS tuned", "sft": "SFT",
         "rlvr": "RLVR", "ties": "TIES", "dare": "DARE"}  # fmt: skip


def run_seed(seed: int, work: Path, quick: bool) -> dict:
    """One demo run in a fresh folder; its report plus wall seconds and peak RSS."""
    out = work / f"{'quick' if quick else 'full'}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "dots_merge.cli.main", "demo", "--seed", str(seed),
           "--out", str(out), "--quiet", *(["--quick"] if quick else [])]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", done.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    rss_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    report = json.loads((out / "report.json").read_text())
    return {"seed": seed, "wall_seconds": seconds, "peak_rss_gib": rss_kib / 2**20, "report": report,
            "picks": rule_picks(out, report)}  # fmt: skip


def table(rows: list[dict]) -> str:
    """Markdown: held-out accuracy (%) of every model per seed, then the mean; pick, oracle and time."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    head = "| seed | " + " | ".join(NAMES.get(m, m) for m in MODELS) + " | pick / oracle | time |"
    lines = [head, "|---:" * (len(MODELS) + 3) + "|"]
    for r in rows:
        acc = r["report"]["accuracy"]
        lines.append(f"| {r['seed']} | " + " | ".join(pct(acc[m]["all"]) for m in MODELS)
                     + f" | #{r['report']['picked']['trial']} / #{r['report']['oracle']['trial']} "
                     f"({pct(r['report']['oracle']['accuracy'])}) | {r['wall_seconds'] / 60:.1f} min |")  # fmt: skip
    means = [sum(r["report"]["accuracy"][m]["all"] for r in rows) / len(rows) for m in MODELS]
    lines.append("| mean | " + " | ".join(pct(v) for v in means) + " | | |")
    return "\n".join(lines)


RULES = {  # label-free rules, each as (rule, perplexity's resolution relative to the lowest perplexity)
    "utopia (default)": ("utopia", 0.0),
    "knee": ("knee", 0.0),
    "max_consistency": ("max_consistency", 0.0),
    "knee, perplexity floor 5 % (before 2026-12-02)": ("knee", 0.05),
}


def rule_picks(out: Path, report: dict) -> dict[str, dict]:
    """Each rule's pick among the run's trials (consistency normalised with its sampling noise, as the tune
    does) and its held-out accuracy."""
    from dots_merge.tune.objectives import resolutions
    from dots_merge.tune.pareto import pick

    records = [json.loads(line) for line in (out / "run" / "trials.jsonl").read_text().splitlines() if line.strip()]
    records = [r for r in records if "consistency" in r and "perplexity" in r]
    accuracy = {t["number"]: t["accuracy"]["all"] for t in report["trials"]}
    points = [(r["consistency"], r["perplexity"]) for r in records]
    samples = yaml.safe_load((out / "demo.yml").read_text())["tune"]["generation"]["samples"]
    floor = resolutions(records, ["consistency"], samples)[0]
    lowest = min(p for _, p in points)
    picks = {}
    for label, (rule, relative) in RULES.items():
        number = records[pick(points, rule, resolution=[floor, relative * lowest])]["number"]
        picks[label] = {"trial": number, "accuracy": accuracy[number]}
    return picks


def rules_table(rows: list[dict]) -> str:
    """Markdown: each rule's pick (held-out accuracy, %) per seed, whether it meets the demo's target (≥ best
    parent + 2 and ≥ every baseline), and the oracle."""
    lines = ["| seed | target | " + " | ".join(RULES) + " | oracle |", "|---:" * (len(RULES) + 3) + "|"]
    for r in rows:
        acc = r["report"]["accuracy"]
        target = max(max(acc[m]["all"] for m in ("sft", "rlvr")) + 0.02,
                     max(acc[m]["all"] for m in ("task_arithmetic", "ties", "dare")))  # fmt: skip
        cells = [f"{100 * p['accuracy']:.1f}{' ✓' if p['accuracy'] >= target - 1e-9 else ''} (#{p['trial']})"
                 for p in r["picks"].values()]  # fmt: skip
        lines.append(f"| {r['seed']} | ≥ {100 * target:.1f} | " + " | ".join(cells)
                     + f" | {100 * r['report']['oracle']['accuracy']:.1f} (#{r['report']['oracle']['trial']}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.work, args.quick))
        r = rows[-1]
        m = r["report"]["margins"]
        print(f"seed {seed}: {r['wall_seconds']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB; tuned − best parent "
              f"{100 * m['tuned_minus_best_parent']:+.1f}, − best baseline {100 * m['tuned_minus_best_baseline']:+.1f}",
              flush=True)  # fmt: skip
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    print()
    print(rules_table(rows))


if __name__ == "__main__":
    main()
