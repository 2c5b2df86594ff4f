"""`dots-merge tune`: search the recipe's coefficients on unlabeled queries, pick from the Pareto front, merge it.

The run folder is described in `dots_merge.tune.run_folder`. Trials live in a trial store — the run folder itself
(bayes, random) or an optuna storage (RUN_DIR/study.db, or `--storage URL` shared by `--worker` processes on other
GPUs or machines) — and run through one loop (`dots_merge.tune.loop`). A run killed at any point resumes with
`--resume`: finished trials are kept, numbers are never reused, and only what is missing is redone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tqdm

from dots_merge.errors import DotsMergeError, Interrupted, RecipeError
from dots_merge.fileio import write_atomic
from dots_merge.recipe import Recipe
from dots_merge.tune.generation import require_tokenizer
from dots_merge.tune.identity import fingerprints, portable_identity, run_identity
from dots_merge.tune.pareto import front, hypervolume, pick, reference_point
from dots_merge.tune.run_folder import RunLog, open_run, recipe_numbers, trial_path, write_records
from dots_merge.tune.stores.base import TrialStore

LOG = logging.getLogger(__name__)


@dataclass
class TuneResult:
    """What a tuning run produced (a worker's: the records it saw, no front, pick or model)."""

    run_dir: Path
    records: list[dict[str, Any]]
    front: list[int] | None  # trial numbers
    pick: int | None  # trial number
    rule: str
    model_dir: Path | None
    seconds: float
    push_url: str | None = None
    evaluated: int = 0  # trials this process evaluated
    study: str | None = None  # "NAME in URL" (password hidden) for a shared study


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
    storage: str | None = None,
    study: str | None = None,
    worker: bool = False,
    heartbeat: int = 60,
    trust_remote_code: bool = False,
) -> TuneResult:
    """Search the recipe's `tune.space` on its unlabeled queries, then merge the picked trial into RUN_DIR/model
    (with a card describing the search) and, with `push`, publish it as that Hub repo.

    With backend optuna the trials live in `storage` (default RUN_DIR/study.db); processes started with
    `worker=True` on the same study only evaluate trials until it holds `trials` finished ones."""
    from dots_merge.merge.driver import as_recipe, inspect_models, resolve_device
    from dots_merge.recipe.tune_section import BACKENDS, parse_tune

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
    shared = spec.backend == "optuna"
    _check_shared_options(shared, storage=storage, study=study, worker=worker, heartbeat=heartbeat,
                          trials=trials, resume=resume, push=push)  # fmt: skip
    device = resolve_device(device)
    checkpoints = inspect_models(recipe)
    require_tokenizer(next(iter(checkpoints.values())))
    if push is not None:
        from dots_merge.hub import authenticate, check_repo_id

        if not merge_best:
            raise DotsMergeError("--push needs the merged model: drop --no-merge")
        check_repo_id(push)
        authenticate()  # fail fast, before the first trial

    run_dir = Path(run_dir)
    hint = _resume_command(recipe, run_dir, trials=trials, seed=seed, backend=backend, pick_rule=pick_rule,
                           storage=storage, study=study, worker=worker)  # fmt: skip
    with _sigterm_as_interrupt():
        try:
            store, where = _open_store(recipe, spec, checkpoints, run_dir, resume=resume, storage=storage,
                                       study=study, worker=worker, heartbeat=heartbeat)  # fmt: skip
            with RunLog(run_dir) as log:
                evaluated = _run(recipe, spec, checkpoints, run_dir, store, device=device, quiet=quiet, log=log,
                                 trust_remote_code=trust_remote_code)  # fmt: skip
                store.sync()
                records = store.records()
                if worker:
                    return TuneResult(run_dir=run_dir, records=records, front=None, pick=None, rule=spec.pick,
                                      model_dir=None, seconds=time.perf_counter() - started, evaluated=evaluated,
                                      study=where)  # fmt: skip
                log.phase(f"search done: {len(records)} trials")
                return _finish(recipe, spec, checkpoints, run_dir, records, started, evaluated=evaluated,
                               study=where, device=device, quiet=quiet, merge_best=merge_best, log=log,
                               out_shard_size=out_shard_size, push=push, private=private,
                               include_queries=include_queries)  # fmt: skip
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted: finished trials are kept and a running trial is put back; go on with: {hint}"
            ) from None


def _resume_command(recipe, run_dir: Path, *, trials, seed, backend, pick_rule, storage, study, worker) -> str:
    """The command that continues this run with the options it was given (the storage URL without its password)."""
    from dots_merge.tune.stores.optuna_rdb import redact

    words = ["dots-merge", "tune", recipe.source, "--out", str(run_dir)]
    words += ["--trials", str(trials)] if trials is not None and not worker else []
    words += ["--seed", str(seed)] if seed is not None else []
    words += ["--backend", backend] if backend else []
    words += ["--pick", pick_rule] if pick_rule else []
    words += ["--storage", redact(storage)] if storage else []
    words += ["--study", study] if study else []
    words += ["--worker"] if worker else ["--resume"]
    return shlex.join(words)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt where the program is, as Ctrl-C does, so a trial is put back either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_store(recipe, spec, checkpoints, run_dir: Path, *, resume, storage, study, worker, heartbeat,
                ) -> tuple[TrialStore, str | None]:  # fmt: skip
    """The run's trial store (checking or writing run.json), and for an optuna store where its study lives."""
    prints = fingerprints(checkpoints, spec.queries)
    identity = run_identity(recipe, prints, spec.seed, spec.backend)
    bounds = [(d.low, d.high) for d in spec.space]
    if spec.backend != "optuna":
        from dots_merge.tune.samplers import make_tuner
        from dots_merge.tune.stores.local import LocalStore

        open_run(run_dir, identity, resume)
        sampler = make_tuner(spec.backend, bounds, seed=spec.seed, initial=spec.initial)
        return LocalStore(run_dir, sampler, spec.trials), None
    from dots_merge.tune.identity import digest
    from dots_merge.tune.stores.optuna_rdb import OptunaStore, default_storage, redact

    portable = portable_identity(recipe, prints, spec.seed, spec.backend)
    url = storage or default_storage(run_dir)
    name = study or f"dots-merge-{digest(portable)}"
    open_run(run_dir, identity, resume, shared={"storage": redact(url), "name": name})
    store = OptunaStore.open(
        url, name, identity=portable, mode="join" if worker else ("resume" if resume else "create"), bounds=bounds,
        seed=spec.seed, heartbeat=heartbeat, budget=None if worker else spec.trials, initial=spec.initial,
        mirror=lambda records: write_run_files(run_dir, recipe, spec, records),
    )  # fmt: skip
    store.sync()
    return store, f"{name} in {redact(url)}"


def _run(recipe, spec, checkpoints, run_dir: Path, store: TrialStore, *, device: str, quiet: bool, log: RunLog,
         trust_remote_code: bool) -> int:  # fmt: skip
    """Evaluate trials until the store holds its budget; returns how many this process evaluated."""
    from dots_merge.tune.evaluate import TrialEvaluator
    from dots_merge.tune.loop import run_trials

    if store.done():
        return 0
    spill = run_dir / "cache" / "vectors" / store.worker.replace(":", "-")
    log.phase(f"loading the base model on {device}")
    evaluator = TrialEvaluator(recipe, spec, checkpoints, run_dir, device=device, spill_dir=spill, quiet=quiet,
                               trust_remote_code=trust_remote_code)  # fmt: skip
    log.phase(f"trials: {len(store.records())} of {store.budget} finished")
    progress = tqdm.tqdm(total=store.budget, initial=len(store.records()), desc="Tuning", unit="trial", disable=quiet)

    def show(records: list[dict[str, Any]]) -> None:
        last = max(records, key=lambda r: r["number"])
        log.phase(f"trial #{last['number']} done: consistency {last['consistency']:.4f} perplexity "
                  f"{last['perplexity']:.4g} ({', '.join(f'{k} {v:.2f} s' for k, v in last['seconds'].items())})")
        best = records[pick([(r["consistency"], r["perplexity"]) for r in records], spec.pick)]
        progress.total, progress.n = store.budget, len(records)
        progress.set_postfix_str(
            f"{spec.pick} #{best['number']} c={best['consistency']:.3f} ppl={best['perplexity']:.3g}"
        )

    try:
        return run_trials(store, write_recipe=evaluator.write_recipe, evaluate=evaluator, on_record=show)
    finally:
        progress.close()
        evaluator.close()


def write_run_files(run_dir: Path, recipe, spec, records: list[dict[str, Any]]) -> None:
    """trials/NNNN.yml and trials.jsonl from the records of a store that lives elsewhere (an optuna storage)."""
    from dots_merge.recipe import trial_recipe

    written = set(recipe_numbers(run_dir))
    for r in records:
        if r["number"] not in written:
            write_atomic(trial_path(run_dir, r["number"]), trial_recipe(recipe, spec.space, r["point"]).to_yaml())
    write_records(run_dir, records)


def _check_shared_options(shared: bool, *, storage, study, worker, heartbeat, trials, resume, push) -> None:
    if not shared:
        for flag, value in (("--storage", storage), ("--study", study), ("--worker", worker)):
            if value:
                raise RecipeError(f"{flag}: needs --backend optuna (the bayes and random backends run in one process)")
        return
    if heartbeat < 1:
        raise RecipeError(f"--heartbeat: must be at least 1 second, got {heartbeat}")
    if worker:
        for flag, value in (("--trials", trials), ("--resume", resume), ("--push", push)):
            if value:
                raise RecipeError(
                    f"{flag}: not for a --worker (the main process sets the budget, resumes, merges and pushes)"
                )


def _finish(recipe, spec, checkpoints, run_dir, records, started, *, evaluated, study, device, quiet, merge_best,
            log, out_shard_size, push, private, include_queries) -> TuneResult:  # fmt: skip
    """The Pareto front, the pick, best.yml, the merged model with its card, and the push."""
    from dots_merge.merge.driver import merge
    from dots_merge.report.plots import plot_pareto

    summary = _summary(records, spec.pick)
    idx, chosen = summary.pop("_indices")
    write_atomic(run_dir / "pareto.json", json.dumps(summary, indent=2) + "\n")
    points = [(r["consistency"], r["perplexity"]) for r in records]
    plot_pareto(points, [r["number"] for r in records], idx, chosen, run_dir / "pareto.png")
    best_text = trial_path(run_dir, summary["pick"]).read_text()
    write_atomic(run_dir / "best.yml", best_text)
    model_dir = None
    if merge_best:
        model_dir = run_dir / "model"
        marker = run_dir / "model.json"
        wanted = {"trial": summary["pick"], "recipe": best_text}
        if not (model_dir.is_dir() and marker.exists() and json.loads(marker.read_text()) == wanted):
            log.phase(f"merging trial #{summary['pick']} into {model_dir}")
            merge(run_dir / "best.yml", model_dir, device=device, force=True, quiet=quiet,
                  cache_dir=run_dir / "cache", out_shard_size=out_shard_size)  # fmt: skip
            write_atomic(marker, json.dumps(wanted) + "\n")
            log.phase("merged")
        _write_card(model_dir, run_dir, records, summary, spec, checkpoints, include_queries)
    push_url = None
    if push is not None:
        from dots_merge.hub import push as publish

        log.phase(f"publishing {model_dir} as {push}")
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
        evaluated=evaluated,
        study=study,
    )


def _write_card(model_dir, run_dir, records, summary, spec, checkpoints, include_queries: bool) -> None:
    """Replace the merge's card with one that also describes the search, and put pareto.png beside it."""
    import shutil

    from dots_merge.recipe import load_recipe
    from dots_merge.report.card import TuningSummary, render_card

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
