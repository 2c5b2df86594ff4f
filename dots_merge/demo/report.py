"""The demo's report: held-out accuracy of the parents, the baselines and every trial; the front coloured by it,
the pick against the oracle; report.md, report.json and the figures.

Only this module (and the trio's training) reads the problems' answers: the tune never sees them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dots_merge.demo.data import FAMILIES, NEW, Problem
from dots_merge.report.plots import AXIS_LABELS, pyplot, save_figure

NAMES = {
    "base": "base",
    "sft": "SFT",
    "rlvr": "RLVR",
    "task_arithmetic": "task arithmetic λ = (1, 1)",
    "ties": "TIES (density 0.3)",
    "dare": "DARE (density 0.3)",
    "dots_untuned": "DoTS λ = (1, 1), untuned",
    "dots_tuned": "DoTS tuned",
}
SMOKE = (
    "**Smoke test (`--quick`)**: a trio too small and too briefly trained to show anything; these numbers only "
    "show that every stage runs. Run `dots-merge demo` without `--quick` for the real demo."
)


def score(model, tokenizer, problems: Sequence[Problem]) -> dict[str, float]:
    """Greedy exact-answer accuracy of a loaded model: {"all": …, family: …}."""
    from dots_merge.demo.trio import correct
    from dots_merge.tune.generation import generate_answers

    outputs = generate_answers(model, tokenizer, [p.query for p in problems], samples=1, temperature=0.0, top_p=1.0,
                               max_new_tokens=12, seed=0, batch_size=256)  # fmt: skip
    hits = [correct(o[0], p) for o, p in zip(outputs, problems, strict=True)]
    out = {"all": sum(hits) / len(hits)}
    for family in FAMILIES:
        fam = [h for h, p in zip(hits, problems, strict=True) if p.family == family]
        out[family] = sum(fam) / len(fam) if fam else 0.0
    return out


def model_accuracy(model_dir: Path, problems: Sequence[Problem]) -> dict[str, float]:
    """`score` of a model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return score(model, AutoTokenizer.from_pretrained(str(model_dir)), problems)


def trial_accuracy(recipe_path: Path, run_dir: Path, records: Sequence[dict], problems: Sequence[Problem]) -> dict:
    """Held-out accuracy of every finished trial: its recipe (trials/NNNN.yml) applied in place to one resident
    model, as the tune applied it."""
    from dots_merge.merge.driver import inspect_models
    from dots_merge.recipe import load_recipe, parse_tune
    from dots_merge.tune.candidate import ResidentCandidate
    from dots_merge.tune.generation import load_tokenizer
    from dots_merge.tune.plan import ceiling_recipe, floor_recipe
    from dots_merge.tune.run_folder import trial_path

    recipe = load_recipe(recipe_path)
    checkpoints = inspect_models(recipe)
    spec = parse_tune(recipe)
    candidate = ResidentCandidate(recipe, checkpoints, ceiling=ceiling_recipe(recipe, spec),
                                  floor=floor_recipe(recipe, spec))  # fmt: skip
    tokenizer = load_tokenizer(next(iter(checkpoints.values())).path)
    out = {}
    try:
        for record in records:
            candidate.apply(load_recipe(trial_path(run_dir, record["number"])))
            out[record["number"]] = score(candidate.model, tokenizer, problems)
    finally:
        candidate.close()
    return out


def task_vector_summary(analysis: dict[str, Any], sft: str, rlvr: str) -> dict[str, Any]:
    """The paper's diagnostics of the pair: ‖τ_SFT‖/‖τ_RLVR‖ and the sign-conflict rates, dense and sparsified."""
    pair = analysis["pairs"][0]
    flip = pair["a"] != sft
    ratio = pair["magnitude_ratio"]
    return {
        "norm_ratio_sft_over_rlvr": 1 / ratio if flip and ratio else ratio,
        "norms": {"sft": analysis["models"][sft]["l2_norm"], "rlvr": analysis["models"][rlvr]["l2_norm"]},
        "sign_conflict": pair["sign_conflict_all"],  # share of coordinates where both changed, with opposite signs
        "sign_conflict_both_changed": pair["sign_conflict_both"],
    }


def build(
    accuracy: dict[str, dict[str, float]],
    trials: list[dict[str, Any]],
    pareto: dict[str, Any],
    *,
    quick: bool,
    test_problems: int,
    task_vectors: dict[str, Any],
    stage_seconds: dict[str, float],
    seconds: float,
    seed: int,
) -> dict[str, Any]:
    """report.json's content. `trials`: number, params, objectives and held-out accuracy of each finished trial."""
    pick = next(t for t in trials if t["number"] == pareto["pick"])
    oracle = max(trials, key=lambda t: (t["accuracy"]["all"], -t["number"]))
    front = set(pareto["front"])
    parents = max(accuracy["sft"]["all"], accuracy["rlvr"]["all"])
    baselines = max(accuracy[m]["all"] for m in ("task_arithmetic", "ties", "dare"))
    tuned = accuracy["dots_tuned"]["all"]
    return {
        "seed": seed,
        "quick": quick,
        "note": SMOKE if quick else None,
        "test_problems": test_problems,
        "accuracy": accuracy,
        "picked": {"trial": pick["number"], "rule": pareto.get("rule"), "params": pick["params"],
                   "accuracy": pick["accuracy"]["all"]},
        "oracle": {"trial": oracle["number"], "params": oracle["params"], "accuracy": oracle["accuracy"]["all"],
                   "on_front": oracle["number"] in front},
        "pick_below_oracle": oracle["accuracy"]["all"] - pick["accuracy"]["all"],
        "margins": {
            "tuned_minus_best_parent": tuned - parents,
            "tuned_minus_best_baseline": tuned - baselines,
            "sft_minus_base": accuracy["sft"]["all"] - accuracy["base"]["all"],
            "rlvr_minus_base": accuracy["rlvr"]["all"] - accuracy["base"]["all"],
        },
        "task_vectors": task_vectors,
        "trials": [dict(t, on_front=t["number"] in front) for t in trials],
        "stage_seconds": stage_seconds,
        "seconds": seconds,
    }


def plot_front(report: dict[str, Any], path: Path, objectives: Sequence[str] = ("consistency", "perplexity")) -> Path:
    """Every trial by its two objectives, coloured by held-out accuracy; the front joined, pick and oracle marked."""
    plt = pyplot()
    trials = report["trials"]
    y_name, x_name = objectives[0], objectives[1]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs, ys = [t["objectives"][x_name] for t in trials], [t["objectives"][y_name] for t in trials]
    acc = [100 * t["accuracy"]["all"] for t in trials]
    front = sorted((t for t in trials if t["on_front"]), key=lambda t: t["objectives"][x_name])
    ax.plot([t["objectives"][x_name] for t in front], [t["objectives"][y_name] for t in front], "-", color="0.5",
            zorder=1, label="Pareto front")  # fmt: skip
    points = ax.scatter(xs, ys, c=acc, cmap="viridis", s=40, zorder=2, edgecolors="none")
    fig.colorbar(points, ax=ax, label="held-out accuracy (%)")
    by_number = {t["number"]: t for t in trials}
    for key, marker, color in (("picked", "*", "tab:red"), ("oracle", "D", "none")):
        t = by_number[report[key]["trial"]]
        ax.scatter([t["objectives"][x_name]], [t["objectives"][y_name]], marker=marker, s=260 if marker == "*" else 130,
                   facecolors=color, edgecolors="tab:red" if key == "oracle" else "black", linewidths=1.5, zorder=3,
                   label=f"{'pick' if key == 'picked' else 'oracle'} #{t['number']}: {100 * t['accuracy']['all']:.1f} %")  # fmt: skip
    ax.set_xlabel(AXIS_LABELS.get(x_name, x_name))
    ax.set_ylabel(AXIS_LABELS.get(y_name, y_name))
    ax.set_title("Trials of the label-free search, coloured by held-out accuracy")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def plot_families(report: dict[str, Any], path: Path) -> Path:
    """Per-family held-out accuracy bars for every model."""
    plt = pyplot()
    models = list(report["accuracy"])
    groups = [*FAMILIES, "all"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, name in enumerate(models):
        ax.bar([g + i * width for g in range(len(groups))], [100 * report["accuracy"][name][f] for f in groups],
               width, label=NAMES.get(name, name))  # fmt: skip
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{f}\n(SFT's)" if f in NEW else f"{f}\n(RLVR's)" if f != "all" else "all" for f in groups])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Accuracy by family")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


def markdown(report: dict[str, Any], push_plan: str) -> str:
    """report.md."""
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    rows = [f"| {NAMES.get(n, n)} | {pct(a['all'])} | " + " | ".join(pct(a[f]) for f in FAMILIES) + " |"
            for n, a in report["accuracy"].items()]  # fmt: skip
    tv, picked, oracle, m = report["task_vectors"], report["picked"], report["oracle"], report["margins"]
    lines = ["# dots-merge demo", ""]
    if report["quick"]:
        lines += [SMOKE, ""]
    lines += [
        f"Seed {report['seed']}. Held-out accuracy (%) on {report['test_problems']} problems, greedy decoding, exact "
        "final answer. SFT's families (demonstrations only): " + ", ".join(NEW) + "; RLVR's (a verifier only): "
        + ", ".join(f for f in FAMILIES if f not in NEW) + ". Labels were read for this report only, never by the tune.",
        "",
        "| model | all | " + " | ".join(FAMILIES) + " |",
        "|---" * (len(FAMILIES) + 2) + "|",
        *rows,
        "",
        f"- Tuned DoTS − best parent: {100 * m['tuned_minus_best_parent']:+.1f} points; − best baseline (task "
        f"arithmetic, TIES, DARE): {100 * m['tuned_minus_best_baseline']:+.1f}.",
        f"- The pick: trial #{picked['trial']} of {len(report['trials'])} by the `{picked['rule']}` rule, "
        f"coefficients {_rounded(picked['params'])}, {pct(picked['accuracy'])} % held out.",
        f"- The oracle (the trial best on held-out accuracy, which a label-free pick cannot know): trial "
        f"#{oracle['trial']}, {pct(oracle['accuracy'])} % ({'on' if oracle['on_front'] else 'off'} the front); the "
        f"pick is {100 * report['pick_below_oracle']:.1f} points below it.",
        f"- Task vectors: ‖τ_SFT‖ / ‖τ_RLVR‖ = {tv['norm_ratio_sft_over_rlvr']:.1f}; sign conflict (coordinates "
        "where the two move in opposite directions, of those both change): "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in tv["sign_conflict_both_changed"].items())
        + " (the paper: ≈30× and ≈45 %).",
        "",
        "![Trials coloured by held-out accuracy](front.png)",
        "",
        "![Accuracy by family](families.png)",
        "",
        "![Task-vector shares by module](analysis/module_share.png) ![Sign conflict](analysis/sign_conflict.png)",
        "",
        "`dots-merge push run/model your-name/dots-demo --dry-run` would upload:",
        "",
        "```",
        push_plan,
        "```",
        "",
        f"Total time {report['seconds']} s; by stage: {report['stage_seconds']}.",
        "",
    ]
    return "\n".join(lines)


def _rounded(params: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.3g}" for name, value in params.items())


def table(report: dict[str, Any]) -> str:
    """The terminal's summary."""
    lines = []
    if report["quick"]:
        lines.append("smoke test (--quick): these numbers only show that every stage runs")
    lines.append("model              accuracy  " + "  ".join(f"{f:>6}" for f in FAMILIES))
    for name, acc in report["accuracy"].items():
        fams = "  ".join(f"{100 * acc[f]:5.1f}%" for f in FAMILIES)
        lines.append(f"{name:18} {100 * acc['all']:7.1f}%  {fams}")
    lines.append(f"pick: trial #{report['picked']['trial']} ({100 * report['picked']['accuracy']:.1f}%), oracle: "
                 f"trial #{report['oracle']['trial']} ({100 * report['oracle']['accuracy']:.1f}%)")  # fmt: skip
    return "\n".join(lines)


def write(root: Path, report: dict[str, Any], push_plan: str) -> None:
    """report.json, report.md, front.png and families.png in `root`."""
    from dots_merge.fileio import write_atomic

    write_atomic(root / "report.json", json.dumps(report, indent=2) + "\n")
    plot_front(report, root / "front.png")
    plot_families(report, root / "families.png")
    write_atomic(root / "report.md", markdown(report, push_plan))
