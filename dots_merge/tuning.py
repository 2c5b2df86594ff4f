"""`dots-merge tune`: the outer loop. Ask λ, rewrite the recipe, apply it in memory, score it, keep it.

Run folder:
    run.json          what the run is (recipe, seed, backend); `--resume` refuses a different recipe
    trials/NNNN.yml   the complete recipe of each trial, runnable with `dots-merge merge`
    trials.jsonl      one record per finished trial, fsynced before the next trial starts
    pareto.json, pareto.png, best.yml, model/   written when the budget is reached
A run killed at any point resumes with `--resume`: finished trials are kept, numbers are never reused, the
tuner is rebuilt from trials.jsonl, and only what is missing is redone.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tqdm

from dots_merge.errors import DotsMergeError, RecipeError
from dots_merge.fileio import write_atomic
from dots_merge.pareto import front, hypervolume, pick, reference_point
from dots_merge.recipe import Recipe

LOG = logging.getLogger(__name__)
RUN_FILE, TRIALS_FILE, TRIALS_DIR = "run.json", "trials.jsonl", "trials"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_RESUMABLE_KEYS = ("trials", "pick")  # may change between a run and its resume


@dataclass
class TuneResult:
    """What a tuning run produced."""

    run_dir: Path
    records: list[dict[str, Any]]
    front: list[int]  # trial numbers
    pick: int  # trial number
    rule: str
    model_dir: Path | None
    seconds: float
    push_url: str | None = None


def require_tokenizer(base) -> None:
    """Tuning generates text: the base model folder must hold a tokenizer."""
    if not any((base.path / f).is_file() for f in TOKENIZER_FILES):
        raise DotsMergeError(f"model {base.reference}: no tokenizer in {base.path} (tune generates text with it)")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Finished trials from trials.jsonl; a last line cut short by a crash is dropped (and cut from the file)."""
    path = run_dir / TRIALS_FILE
    if not path.exists():
        return []
    raw = path.read_bytes()
    records, good_end = [], 0
    lines = raw.split(b"\n")
    for i, line in enumerate(lines):
        if not line.strip():
            good_end += len(line) + 1
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1 :]):
                raise DotsMergeError(f"{path}: line {i + 1} is not JSON; the file is damaged") from None
            LOG.warning("%s: dropping an unfinished last line left by a crash", path)
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        good_end += len(line) + 1
    return records


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one trial record and make it durable before returning."""
    with open(run_dir / TRIALS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def next_number(run_dir: Path, records: list[dict[str, Any]]) -> int:
    """One past every number used so far, by a record or by a trial recipe a crash left without a record."""
    used = [r["number"] for r in records]
    used += [int(p.stem) for p in (run_dir / TRIALS_DIR).glob("[0-9][0-9][0-9][0-9].yml")]
    return max(used, default=-1) + 1


def _identity(recipe: Recipe, seed: int, backend: str) -> dict[str, Any]:
    data = json.loads(json.dumps(recipe.data))
    for key in _RESUMABLE_KEYS:
        (data.get("tune") or {}).pop(key, None)
    return {"recipe": data, "seed": seed, "backend": backend}


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return where or "(whole recipe)"


def _open_run(run_dir: Path, identity: dict[str, Any], resume: bool) -> None:
    run_file = run_dir / RUN_FILE
    if resume:
        if not run_file.exists():
            raise DotsMergeError(f"{run_dir}: no {RUN_FILE}; nothing to resume (drop --resume to start a run)")
        before = json.loads(run_file.read_text())
        if before.get("identity") != identity:
            where = _first_difference(before.get("identity"), identity)
            raise DotsMergeError(
                f"{run_dir}: this run was started from a different recipe or settings ({where} changed); "
                "start a new run with another --out"
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise DotsMergeError(f"{run_dir}: exists and is not empty (pass --resume to continue that run)")
    from dots_merge import __version__

    write_atomic(run_file, json.dumps({"identity": identity, "dots_merge": __version__}, indent=2) + "\n")


def _summary(records: list[dict[str, Any]], rule: str) -> dict[str, Any]:
    points = [(r["consistency"], r["perplexity"]) for r in records]
    numbers = [r["number"] for r in records]
    idx = front(points)
    chosen = pick(points, rule)
    ref = reference_point(points)
    return {
        "front": [numbers[i] for i in idx],
        "pick": numbers[chosen],
        "rule": rule,
        "hypervolume": hypervolume(points, ref),
        "reference_point": {"consistency": ref[0], "perplexity": ref[1]},
        "trials": len(records),
        "_indices": (idx, chosen),
    }


def tune(
    recipe: Recipe | str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    trials: int | None = None,
    seed: int | None = None,
    backend: str | None = None,
    pick_rule: str | None = None,
    device: str = "cpu",
    resume: bool = False,
    quiet: bool = False,
    merge_best: bool = True,
    out_shard_size: str = "5GB",
    push: str | None = None,
    private: bool = False,
    include_queries: bool = False,
) -> TuneResult:
    """Search the recipe's `tune.space` on its unlabeled queries, then merge the picked trial into RUN_DIR/model
    (with a card describing the search) and, with `push`, publish it as that Hub repo."""
    from dots_merge.merging import as_recipe, inspect_models, merge, resolve_device
    from dots_merge.plots import plot_pareto
    from dots_merge.tune_spec import BACKENDS, parse_tune

    started = time.perf_counter()
    recipe = as_recipe(recipe)
    spec = parse_tune(recipe)
    if trials is not None:
        if trials < 1:
            raise RecipeError(f"--trials: must be at least 1, got {trials}")
        spec.trials = trials
    spec.seed = spec.seed if seed is None else seed
    if backend is not None:
        if backend not in BACKENDS:
            raise RecipeError(f"--backend: must be one of {', '.join(BACKENDS)}")
        spec.backend = backend
    spec.pick = pick_rule or spec.pick
    device = resolve_device(device)
    checkpoints = inspect_models(recipe)
    require_tokenizer(next(iter(checkpoints.values())))
    if spec.backend == "optuna":
        from dots_merge.tuner.optuna_backend import OptunaTuner  # noqa: F401  (fails early without the extra)
    if push is not None:
        from dots_merge.hub import authenticate, check_repo_id

        if not merge_best:
            raise DotsMergeError("--push needs the merged model: drop --no-merge")
        check_repo_id(push)
        authenticate()  # fail fast, before the first trial

    run_dir = Path(run_dir)
    _open_run(run_dir, _identity(recipe, spec.seed, spec.backend), resume)
    records = read_records(run_dir)
    from dots_merge.tuner import make_tuner

    tuner = make_tuner(spec.backend, [(d.low, d.high) for d in spec.space], seed=spec.seed, initial=spec.initial)
    tuner.load([(r["point"], (r["consistency"], r["perplexity"])) for r in records])

    if len(records) < spec.trials:
        _run_trials(recipe, spec, checkpoints, run_dir, records, tuner, device=device, quiet=quiet)

    summary = _summary(records, spec.pick)
    idx, chosen = summary.pop("_indices")
    write_atomic(run_dir / "pareto.json", json.dumps(summary, indent=2) + "\n")
    points = [(r["consistency"], r["perplexity"]) for r in records]
    plot_pareto(points, [r["number"] for r in records], idx, chosen, run_dir / "pareto.png")
    best_text = (run_dir / TRIALS_DIR / f"{summary['pick']:04d}.yml").read_text()
    write_atomic(run_dir / "best.yml", best_text)
    model_dir = None
    if merge_best:
        model_dir = run_dir / "model"
        marker = run_dir / "model.json"
        wanted = {"trial": summary["pick"], "recipe": best_text}
        if not (model_dir.is_dir() and marker.exists() and json.loads(marker.read_text()) == wanted):
            merge(run_dir / "best.yml", model_dir, device=device, force=True, quiet=quiet,
                  cache_dir=run_dir / "cache", out_shard_size=out_shard_size)  # fmt: skip
            write_atomic(marker, json.dumps(wanted) + "\n")
        _write_card(model_dir, run_dir, records, summary, spec, checkpoints, include_queries)
    push_url = None
    if push is not None:
        from dots_merge.hub import push as publish

        published = publish(model_dir, push, private=private)
        push_url = published.commit_url
    return TuneResult(
        run_dir=run_dir,
        records=records,
        front=summary["front"],
        pick=summary["pick"],
        rule=spec.pick,
        model_dir=model_dir,
        seconds=time.perf_counter() - started,
        push_url=push_url,
    )


def _write_card(model_dir, run_dir, records, summary, spec, checkpoints, include_queries: bool) -> None:
    """Replace the merge's card with one that also describes the search, and put pareto.png beside it."""
    import shutil

    from dots_merge.card import TuningSummary, render_card
    from dots_merge.recipe import load_recipe

    by_number = {r["number"]: r for r in records}
    tuning = TuningSummary(
        front=[by_number[n] for n in summary["front"]],
        pick=by_number[summary["pick"]],
        rule=summary["rule"],
        hypervolume=summary["hypervolume"],
        trials=len(records),
        seconds=sum(r["seconds"]["total"] for r in records),
        queries=spec.queries,
        include_queries=include_queries,
        labels=spec.labels,
    )
    shutil.copy(run_dir / "pareto.png", model_dir / "pareto.png")
    used = load_recipe(model_dir / "mergekit_config.yml")
    write_atomic(model_dir / "README.md", render_card(used, list(checkpoints.values()), tuning=tuning))


def _run_trials(recipe, spec, checkpoints, run_dir, records, tuner, *, device, quiet) -> None:
    from dots_merge.candidate import ResidentCandidate
    from dots_merge.objectives import answer_comparator, make_extractor, score
    from dots_merge.tune_spec import trial_recipe

    candidate = ResidentCandidate(
        recipe, checkpoints, device=device, cache_dir=run_dir / "cache", spill_dir=run_dir / "cache" / "vectors"
    )
    extract = make_extractor(spec.answer)
    comparator, equal = answer_comparator(spec.compare)
    progress = tqdm.tqdm(total=spec.trials, initial=len(records), desc="Tuning", unit="trial", disable=quiet)
    while len(records) < spec.trials:
        t0 = time.perf_counter()
        number = next_number(run_dir, records)
        point = tuner.ask()
        trial = trial_recipe(recipe, spec.space, point)
        write_atomic(run_dir / TRIALS_DIR / f"{number:04d}.yml", trial.to_yaml())
        _, update_seconds = candidate.apply(trial)
        scores = score(
            candidate.model,
            candidate.tokenizer,
            spec.queries,
            suffix=spec.prompt_suffix,
            extract=extract,
            equal=equal,
            generation=spec.generation,
            seed=spec.seed,
        )
        record = {
            "number": number,
            "params": dict(zip(spec.labels, point, strict=True)),
            "point": point,
            "consistency": scores.consistency,
            "perplexity": scores.perplexity,
            "per_query_consistency": scores.per_query_consistency,
            "per_query_nll": scores.per_query_nll,
            "answers": scores.answers,
            "comparator": comparator,
            "seconds": {
                "update": update_seconds,
                "generation": scores.seconds_generation,
                "perplexity": scores.seconds_perplexity,
                "total": time.perf_counter() - t0,
            },
        }
        append_record(run_dir, record)
        records.append(record)
        tuner.tell(point, (scores.consistency, scores.perplexity))
        best = records[pick([(r["consistency"], r["perplexity"]) for r in records], spec.pick)]
        progress.set_postfix_str(
            f"{spec.pick} #{best['number']} c={best['consistency']:.3f} ppl={best['perplexity']:.3g}"
        )
        progress.update(1)
    progress.close()
