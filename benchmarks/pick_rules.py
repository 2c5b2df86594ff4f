"""Which pick to trust on the demo trio: each rule's pick against the oracle front point, by held-out accuracy.

For each seed: the full demo (`dots-merge demo --seed S`: its trio, label-free queries, 24-trial tune on
consistency and perplexity), then, on the same trials, the picks of `knee` and `utopia`; `validation` with 20
labeled problems (drawn from the training distribution, never from the pool or the test set; the run is resumed
with `tune.validation` and `pick: validation`, which scores the front points only); and a second tune that
replaces consistency by self-certainty (`objectives: [self_certainty, perplexity]`, the default pick). Every front point
of both runs is merged and scored on the demo's held-out test set (greedy, 800 problems); the oracle is the best
front point. Labels of the test set are read for this table only.

Run by hand (about 3 minutes a seed on 2 CPU cores, most of it the trio's training):

    python benchmarks/pick_rules.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORK = Path(__file__).resolve().parent / "_work" / "pick_rules"
LABELS = 20


def _labeled(path: Path, seed: int, held_out) -> Path:
    from dots_merge.demo.data import FAMILIES, training_stream

    stream = training_stream(FAMILIES, set(held_out), seed=10_000 + seed)
    per_family: dict[str, list] = {f: [] for f in FAMILIES}
    while any(len(v) < LABELS // len(FAMILIES) for v in per_family.values()):
        p = next(stream)
        if len(per_family[p.family]) < LABELS // len(FAMILIES):
            per_family[p.family].append(p)
    rows = [{"prompt": p.query, "answer": str(p.answer)} for fam in FAMILIES for p in per_family[fam]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]


def _held_out(root: Path, run: Path, number: int, test, cache: dict) -> float:
    import dots_merge
    from dots_merge.demo.report import model_accuracy

    key = (run.name, number)
    if key not in cache:
        out = root / "eval" / f"{run.name}-{number:04d}"
        if not (out / "config.json").exists():
            dots_merge.merge(run / "trials" / f"{number:04d}.yml", out, force=True, quiet=True,
                             cache_dir=run / "cache")  # fmt: skip
        cache[key] = model_accuracy(out, test)["all"]
    return cache[key]


def bench_seed(seed: int, work: Path) -> dict:
    from dots_merge.demo.data import splits
    from dots_merge.demo.pipeline import _settings, run_demo
    from dots_merge.tune.objectives import resolutions
    from dots_merge.tune.pareto import pick
    from dots_merge.tune.run import tune
    from dots_merge.tune.validation import spearman

    root = work / f"seed{seed}"
    report = run_demo(root, seed=seed, quiet=True, log=lambda m: print(f"[seed {seed}] {m}", flush=True))
    settings = _settings(False)
    data = splits(seed, pool=settings["pool"], test=settings["test"])
    recipe = yaml.safe_load((root / "demo.yml").read_text())
    run = root / "run"
    records = _records(run)
    by_number = {r["number"]: r for r in records}
    points = [(r["consistency"], r["perplexity"]) for r in records]
    front = json.loads((run / "pareto.json").read_text())["front"]

    labeled = _labeled(root / "labeled.jsonl", seed, data["_held_out"])
    with_labels = json.loads(json.dumps(recipe))
    with_labels["tune"].update({"validation": str(labeled), "pick": "validation"})
    (root / "demo-validation.yml").write_text(yaml.safe_dump(with_labels, sort_keys=False))
    validated = tune(root / "demo-validation.yml", run, resume=True, merge_best=False, quiet=True)

    certainty = json.loads(json.dumps(recipe))
    certainty["tune"]["objectives"] = ["self_certainty", "perplexity"]
    (root / "demo-certainty.yml").write_text(yaml.safe_dump(certainty, sort_keys=False))
    sc_run = root / "run-certainty"
    sc = tune(root / "demo-certainty.yml", sc_run, resume=(sc_run / "run.json").exists(), merge_best=False,
              quiet=True)  # fmt: skip

    cache: dict = {}
    test = data["test"]
    front_acc = {n: _held_out(root, run, n, test, cache) for n in front}
    sc_front_acc = {n: _held_out(root, sc_run, n, test, cache) for n in sc.front}
    resolution = resolutions(records, ["consistency", "perplexity"], recipe["tune"]["generation"]["samples"])
    knee = records[pick(points, "knee", resolution=resolution)]["number"]
    utopia = records[pick(points, "utopia", resolution=resolution)]["number"]
    oracle = max(front_acc, key=lambda n: (front_acc[n], -n))
    sc_oracle = max(sc_front_acc, key=lambda n: (sc_front_acc[n], -n))
    row = {
        "seed": seed,
        "front": {str(n): front_acc[n] for n in front},
        "oracle": {"trial": oracle, "accuracy": front_acc[oracle]},
        "knee": {"trial": knee, "accuracy": front_acc[knee]},
        "utopia": {"trial": utopia, "accuracy": front_acc[utopia]},
        "validation": {"trial": validated.pick, "accuracy": front_acc[validated.pick]},  # a front point
        "self_certainty": {"trial": sc.pick, "accuracy": sc_front_acc[sc.pick]},
        "self_certainty_oracle": {"trial": sc_oracle, "accuracy": sc_front_acc[sc_oracle]},
        "validation_spearman": validated.validation["spearman"],
        "held_out_spearman": {
            name: spearman([by_number[n][name] for n in front], [front_acc[n] for n in front])
            for name in ("consistency", "perplexity")
        },
        "baselines": {k: report["accuracy"][k]["all"] for k in ("base", "sft", "rlvr", "task_arithmetic")},
    }
    print(json.dumps(row, indent=2), flush=True)
    return row


def table(rows: list[dict]) -> str:
    def pct(v):
        return f"{100 * v:.1f}"

    cols = ["oracle", "knee", "utopia", "validation", "self_certainty"]
    head = "| seed | oracle (front) | knee | utopia (default) | validation (20 labels) | self-certainty + perplexity |"
    lines = [head, "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{pct(r[c]['accuracy'])} (#{r[c]['trial']})" for c in cols) + " |")
    means = [sum(r[c]["accuracy"] for r in rows) / len(rows) for c in cols]
    lines.append("| mean | " + " | ".join(pct(m) for m in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=WORK)
    args = parser.parse_args()
    rows = [bench_seed(seed, args.work) for seed in args.seeds]
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
