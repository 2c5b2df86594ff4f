"""`dots-merge tune`: search the recipe's coefficients on unlabeled queries, pick from the Pareto front, merge it.

The run folder is described in `dots_merge.tune.run_folder`. Trials live in a trial store — the run folder itself
(bayes, random) or an optuna storage (RUN_DIR/study.db, or `--storage URL` shared by `--worker` processes on other
GPUs or machines) — and run through one loop (`dots_merge.tune.loop`). A run killed at any point resumes with
`--resume`: finished trials are kept, numbers are never reused, and only what is missing is redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tqdm

from dots_merge.errors import DotsMergeError, Interrupted, RecipeError
from dots_merge.fileio import write_atomic
from dots_merge.interrupts import interrupts_stop_the_run
from dots_merge.recipe import Recipe
from dots_merge.recipe.tune_section import DEFAULT_PICK
from dots_merge.tune.generation import require_tokenizer
from dots_merge.tune.identity import fingerprints, portable_identity, run_identity
from dots_merge.tune.objectives import (
    DEFAULT_OBJECTIVES,
    Objective,
    health_warnings,
    make_objectives,
    reference_point,
    resolutions,
    spread_warning,
)
from dots_merge.tune.pareto import front, hypervolume, pick, rule_order
from dots_merge.tune.run_folder import RunLog, open_run, recipe_numbers, trial_path, write_records
from dots_merge.tune.stores.base import TrialStore, objective_values

if TYPE_CHECKING:
    from dots_merge.tune.plan import Plan

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
    objectives: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    warnings: list[str] = dataclasses.field(default_factory=list)
    validation: dict[str, Any] | None = None  # what pareto.json says of the few-label validation


class SignalWarning(DotsMergeError):
    """A warning about the label-free signal, raised as an error under `--strict`."""


def check_objectives(spec, source: str) -> list[Objective]:
    """The objectives of `tune.objectives` from the registry, and a pick rule that fits them."""
    try:
        objectives = make_objectives(spec.objectives)
    except ValueError as error:
        raise RecipeError(f"{source}: tune.objectives: {error}") from None
    by_name = {o.name: o for o in objectives}
    if spec.generation.engine == "vllm":
        needs = [o.name for o in objectives if o.needs_certainty]
        if needs:
            raise RecipeError(f"{source}: tune.objectives: {needs[0]} needs the full next-token distribution, which "
                              "engine vllm does not return; use engine transformers")  # fmt: skip
    if spec.pick[:4] in ("max_", "min_") and spec.pick[4:] in by_name:
        wanted = "maximize" if spec.pick.startswith("max_") else "minimize"
        if by_name[spec.pick[4:]].direction != wanted:
            better = "max" if wanted == "minimize" else "min"
            raise RecipeError(f"{source}: pick {spec.pick}: {spec.pick[4:]} is better {'higher' if better == 'max' else 'lower'}; "
                              f"use {better}_{spec.pick[4:]}")  # fmt: skip
    return objectives


def _summary(records: list[dict[str, Any]], spec, objectives: list[Objective],
             scored: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The front, the pick and the hypervolume of the finished trials (pick: validation needs `scored`)."""
    names, directions = [o.name for o in objectives], [o.direction for o in objectives]
    points = [objective_values(r, objectives) for r in records]
    numbers = [r["number"] for r in records]
    idx = front(points, directions)
    if spec.pick == "validation":
        order = rule_order(points, _label_free_rule(spec), directions, names, _resolution(records, spec, names))
        best = max(scored[numbers[i]]["majority"] for i in order)
        chosen = next(i for i in order if scored[numbers[i]]["majority"] == best)  # ties: the label-free order
    else:
        chosen = _pick(records, spec, objectives, spec.pick)
    ref = reference_point(points, objectives)
    return {
        "objectives": [{"name": o.name, "direction": o.direction} for o in objectives],
        "front": [numbers[i] for i in idx],
        "pick": numbers[chosen],
        "rule": spec.pick,
        "hypervolume": hypervolume(points, ref, directions),
        "reference_point": dict(zip(names, ref, strict=True)),
        "trials": len(records),
        "_indices": (idx, chosen),
    }


def _resolution(records: list[dict[str, Any]], spec, names: list[str]) -> list[float]:
    return resolutions(records, names, spec.generation.samples)


def _label_free_rule(spec) -> str:
    """The rule that orders the front without labels: the recipe's, or the default where `pick: validation`."""
    return DEFAULT_PICK if spec.pick == "validation" else spec.pick


def _pick(records: list[dict[str, Any]], spec, objectives: list[Objective], rule: str) -> int:
    """Index in `records` of the trial `rule` picks, objectives normalised with their resolution."""
    names, directions = [o.name for o in objectives], [o.direction for o in objectives]
    points = [objective_values(r, objectives) for r in records]
    return pick(points, rule, directions, names, _resolution(records, spec, names))


def tune(
    recipe: Recipe | str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    trials: int | None = None,
    seed: int | None = None,
    backend: str | None = None,
    pick_rule: str | None = None,
    device: str = "auto",
    engine: str | None = None,
    resume: bool = False,
    cache_budget: int | None = None,
    keep_cache: bool = False,
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
    strict: bool = False,
) -> TuneResult:
    """Search the recipe's `tune.space` on its unlabeled queries, then merge the picked trial into RUN_DIR/model
    (with a card describing the search) and, with `push`, publish it as that Hub repo.

    With backend optuna the trials live in `storage` (default RUN_DIR/study.db); processes started with
    `worker=True` on the same study only evaluate trials until it holds `trials` finished ones. Warnings about the
    samples (truncation, missing answers, consistency that does not vary) become errors with `strict`."""
    from dots_merge.merge.driver import as_recipe, inspect_models, resolve_device
    from dots_merge.recipe.tune_section import BACKENDS, check_pick, parse_tune

    started = time.perf_counter()
    recipe = with_engine(as_recipe(recipe), engine)
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
    if pick_rule is not None:
        check_pick(pick_rule, spec.objectives, where="--pick")
        if pick_rule == "validation" and spec.validation is None:
            raise RecipeError("--pick validation: needs labeled problems in the recipe (tune.validation: FILE.jsonl)")
        spec.pick = pick_rule
    objectives = check_objectives(spec, recipe.source)
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
    spec, plan = _planned(recipe, spec, checkpoints, device=device, run_dir=run_dir, cache_budget=cache_budget,
                          trust_remote_code=trust_remote_code)  # fmt: skip
    hint = _resume_command(recipe, run_dir, trials=trials, seed=seed, backend=backend, pick_rule=pick_rule,
                           storage=storage, study=study, worker=worker, strict=strict, device=device,
                           cache_budget=cache_budget, keep_cache=keep_cache, engine=engine)  # fmt: skip
    with interrupts_stop_the_run():
        evaluator = _Evaluator(recipe, spec, checkpoints, run_dir, device=device, quiet=quiet, plan=plan,
                               keep_cache=keep_cache, trust_remote_code=trust_remote_code)  # fmt: skip
        try:
            store, where = _open_store(recipe, spec, objectives, checkpoints, run_dir, resume=resume,
                                       storage=storage, study=study, worker=worker, heartbeat=heartbeat)  # fmt: skip
            evaluator.worker = store.worker
            with RunLog(run_dir) as log:
                evaluated = _run(spec, objectives, store, evaluator, quiet=quiet, log=log, strict=strict)
                evaluator.finished = True
                store.sync()
                records = store.records()
                if worker:
                    return TuneResult(run_dir=run_dir, records=records, front=None, pick=None, rule=spec.pick,
                                      model_dir=None, seconds=time.perf_counter() - started, evaluated=evaluated,
                                      study=where, objectives=spec.objectives)  # fmt: skip
                log.phase(f"search done: {len(records)} trials")
                return _finish(recipe, spec, objectives, checkpoints, run_dir, records, started, evaluator,
                               evaluated=evaluated, study=where, device=device, quiet=quiet, merge_best=merge_best,
                               log=log, out_shard_size=out_shard_size, push=push, private=private,
                               include_queries=include_queries, strict=strict)  # fmt: skip
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted: finished trials are kept and a running trial is put back; go on with: {hint}"
            ) from None
        finally:
            evaluator.close()


def _planned(recipe, spec, checkpoints, *, device: str, run_dir: Path, cache_budget: int | None,
             trust_remote_code: bool) -> tuple[Any, Plan]:  # fmt: skip
    """The run's memory/disk plan (as `dots-merge plan` prints it), made before any weights load; refuses a run
    that does not fit. Returns the spec with `batch_size: auto` resolved, and the plan."""
    from dots_merge.tune.plan import plan_tune

    plan = plan_tune(recipe, spec, checkpoints, device=device, run_dir=run_dir, cache_budget=cache_budget,
                     trust_remote_code=trust_remote_code)  # fmt: skip
    if not plan.fits:
        raise DotsMergeError(f"{recipe.source}: this run does not fit: {plan.reason} "
                             f"(`dots-merge plan {recipe.source} --device {device}` shows every part)")  # fmt: skip
    if spec.generation.batch_size == "auto":
        generation = dataclasses.replace(spec.generation, batch_size=plan.settings["batch_size"])
        spec = dataclasses.replace(spec, generation=generation)
    return spec, plan


class _Evaluator:
    """The run's `TrialEvaluator` (resident candidate, tokenizer), loaded on first use: a resumed run whose search
    is complete loads no weights unless validation needs them."""

    def __init__(self, recipe, spec, checkpoints, run_dir: Path, *, device: str, quiet: bool, plan: Plan,
                 keep_cache: bool, trust_remote_code: bool):  # fmt: skip
        self._args = (recipe, spec, checkpoints, run_dir)
        self._options = {"device": device, "quiet": quiet, "trust_remote_code": trust_remote_code, "plan": plan}
        self.worker = "local"
        self.keep_cache = keep_cache
        self.finished = False  # the run ended: its spill goes (unless keep_cache); an interrupted run keeps it
        self._value = None

    def get(self, log: RunLog):
        """The evaluator, loading the base model the first time."""
        from dots_merge.tune.evaluate import TrialEvaluator

        if self._value is None:
            log.phase(f"loading the base model on {self._options['device']}")
            self._value = TrialEvaluator(*self._args, spill_dir=self.spill_dir, **self._options)
        return self._value

    def close(self) -> None:
        """Free the resident candidate; its spill is deleted once the run has finished (a later `get` loads it
        again; an interrupted or failed run keeps the spill for --resume)."""
        if self._value is not None:
            self._value.close(keep_spill=True)
            self._value = None
        if self.finished and not self.keep_cache:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the folder of every worker's spill, once the last one is gone
                self.spill_dir.parent.rmdir()

    @property
    def spill_dir(self) -> Path:
        """This process's spill of task vectors: RUN_DIR/cache/vectors/WORKER."""
        return self._args[3] / "cache" / "vectors" / self.worker.replace(":", "-")


def _resume_command(recipe, run_dir: Path, *, trials, seed, backend, pick_rule, storage, study, worker,
                    strict=False, device=None, cache_budget=None, keep_cache=False, engine=None) -> str:  # fmt: skip
    """The command that continues this run with the options it was given (the storage URL without its password)."""
    from dots_merge.tune.stores.optuna_rdb import redact

    words = ["dots-merge", "tune", recipe.source, "--out", str(run_dir)]
    words += ["--trials", str(trials)] if trials is not None and not worker else []
    words += ["--seed", str(seed)] if seed is not None else []
    words += ["--backend", backend] if backend else []
    words += ["--pick", pick_rule] if pick_rule else []
    words += ["--storage", redact(storage)] if storage else []
    words += ["--study", study] if study else []
    words += ["--strict"] if strict else []
    words += ["--device", device] if device and device != "cpu" else []
    words += ["--engine", engine] if engine else []
    words += ["--cache-budget", str(cache_budget)] if cache_budget is not None else []
    words += ["--keep-cache"] if keep_cache else []
    words += ["--worker"] if worker else ["--resume"]
    return shlex.join(words)


def with_engine(recipe, engine: str | None):
    """The recipe with `--engine` written into tune.generation.engine (so that the run's identity names it);
    unchanged when the option is not given or says what the recipe already uses."""
    from dots_merge.recipe.tune_section import check_engine

    if engine is None:
        return recipe
    check_engine(engine, where="--engine")
    tune_data = recipe.tune if isinstance(recipe.tune, dict) else None
    generation = (tune_data or {}).get("generation") or {}
    if tune_data is None or generation.get("engine", "transformers") == engine:
        return recipe
    recipe = recipe.copy()
    recipe.data["tune"]["generation"] = {**generation, "engine": engine}
    return recipe


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc keeps freed blocks in its arenas)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _open_store(recipe, spec, objectives, checkpoints, run_dir: Path, *, resume, storage, study, worker, heartbeat,
                ) -> tuple[TrialStore, str | None]:  # fmt: skip
    """The run's trial store (checking or writing run.json), and for an optuna store where its study lives."""
    prints = fingerprints(checkpoints, spec.queries)
    identity = run_identity(recipe, prints, spec.seed, spec.backend)
    bounds = [(d.low, d.high) for d in spec.space]
    if spec.backend != "optuna":
        from dots_merge.tune.samplers import make_tuner
        from dots_merge.tune.stores.local import LocalStore

        open_run(run_dir, identity, resume)
        sampler = make_tuner(spec.backend, bounds, seed=spec.seed, initial=spec.initial, objectives=objectives)
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
        mirror=lambda records: write_run_files(run_dir, recipe, spec, records), objectives=objectives,
    )  # fmt: skip
    store.sync()
    return store, f"{name} in {redact(url)}"


def _run(spec, objectives: list[Objective], store: TrialStore, evaluator: _Evaluator, *, quiet: bool, log: RunLog,
         strict: bool) -> int:  # fmt: skip
    """Evaluate trials until the store holds its budget; returns how many this process evaluated. The samples of
    the first trial this process evaluates are checked (`health_warnings`); under `strict` a warning stops the run."""
    from dots_merge.tune.loop import run_trials

    if store.done():
        return 0
    trial_evaluator = evaluator.get(log)
    log.phase(f"trials: {len(store.records())} of {store.budget} finished")
    progress = tqdm.tqdm(total=store.budget, initial=len(store.records()), desc="Tuning", unit="trial", disable=quiet)
    names = [o.name for o in objectives]
    rule = _label_free_rule(spec)
    checked = False

    def show(records: list[dict[str, Any]], last: dict[str, Any]) -> None:
        nonlocal checked
        values = " ".join(f"{n} {last[n]:.4g}" for n in names)
        log.phase(f"trial #{last['number']} done: {values} "
                  f"({', '.join(f'{k} {v:.2f} s' for k, v in last['seconds'].items())})")  # fmt: skip
        if not checked and "health" in last:
            checked = True
            _warn(health_warnings(last["health"], spec.generation.max_new_tokens), strict,
                  where=f"trial #{last['number']}")  # fmt: skip
        best = records[_pick(records, spec, objectives, rule)]
        progress.total, progress.n = store.budget, len(records)
        progress.set_postfix_str(f"{rule} #{best['number']} " + " ".join(f"{n[:4]}={best[n]:.3g}" for n in names))

    try:
        return run_trials(store, write_recipe=trial_evaluator.write_recipe, evaluate=trial_evaluator,
                          on_record=show)  # fmt: skip
    finally:
        progress.close()


def _warn(warnings: list[str], strict: bool, *, where: str) -> None:
    """Log each warning (and keep it in tune.log); under `strict`, stop with the first as an error."""
    for text in warnings:
        LOG.warning("%s: %s", where, text)  # tune.log keeps warnings too
    if strict and warnings:
        raise SignalWarning(f"{where}: {warnings[0]} (--strict)")


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


def _finish(recipe, spec, objectives, checkpoints, run_dir, records, started, evaluator, *, evaluated, study, device,
            quiet, merge_best, log, out_shard_size, push, private, include_queries, strict) -> TuneResult:  # fmt: skip
    """Validation (when asked), the Pareto front, the pick, warnings, best.yml, the merged model with its card, and
    the push."""
    from dots_merge.merge.driver import merge
    from dots_merge.report.plots import plot_pareto

    scored = _validate(spec, objectives, records, run_dir, evaluator, log=log, quiet=quiet) if spec.validation else None
    evaluator.close()
    release_memory()  # the merge below must not sit on top of the search's freed-but-kept memory
    summary = _summary(records, spec, objectives, scored)
    idx, chosen = summary.pop("_indices")
    by_number = {r["number"]: r for r in records}
    picked = by_number[summary["pick"]]
    if "health" in picked:
        summary["pick_health"] = {k: v for k, v in picked["health"].items() if k != "per_query"}
    warnings = health_warnings(picked["health"], spec.generation.max_new_tokens) if "health" in picked else []
    if "consistency" in spec.objectives:
        spread = spread_warning(records, spec.generation.samples)
        warnings += [spread] if spread else []
    summary["warnings"] = warnings
    if scored is not None:
        summary["validation"] = _validation_summary(spec, objectives, records, scored)
    write_atomic(run_dir / "pareto.json", json.dumps(summary, indent=2) + "\n")
    points = [objective_values(r, objectives)[:2] for r in records]
    plot_pareto(points, [r["number"] for r in records], idx, chosen, run_dir / "pareto.png",
                names=[o.name for o in objectives[:2]])  # fmt: skip
    _warn(warnings, strict, where="the search")
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
        objectives=spec.objectives,
        warnings=warnings,
        validation=summary.get("validation"),
    )


def _validate(spec, objectives, records, run_dir: Path, evaluator: _Evaluator, *, log: RunLog, quiet: bool
              ) -> dict[int, dict[str, float]]:  # fmt: skip
    """Validation accuracy of the front points and the label-free pick (or of every trial), computed once per
    trial and labeled set and kept in RUN_DIR/validation.json."""
    from dots_merge.recipe import load_recipe
    from dots_merge.tune.validation import accuracy, load_scored, save_scored

    directions = [o.direction for o in objectives]
    points = [objective_values(r, objectives) for r in records]
    numbers = [r["number"] for r in records]
    label_free = _label_free_rule(spec)
    wanted = set(numbers) if spec.validation.points == "all" else {numbers[i] for i in front(points, directions)}
    wanted.add(numbers[_pick(records, spec, objectives, label_free)])
    scored = load_scored(run_dir, spec.validation)
    missing = sorted(wanted - set(scored))
    if missing:
        log.phase(f"validation: scoring {len(missing)} trials on {len(spec.validation.labels)} labeled problems")
        trial_evaluator = evaluator.get(log)
        for number in missing:
            trial_evaluator.candidate.apply(load_recipe(trial_path(run_dir, number)))
            scored[number] = accuracy(trial_evaluator.candidate.engine, spec.validation, spec,
                                      extract=trial_evaluator.extract, equal=trial_evaluator.equal, quiet=quiet)  # fmt: skip
            save_scored(run_dir, spec.validation, scored)
            log.phase(f"validation: trial #{number} majority {scored[number]['majority']:.3f} "
                      f"greedy {scored[number]['greedy']:.3f}")  # fmt: skip
    return {n: scored[n] for n in sorted(wanted)}


def _validation_summary(spec, objectives, records, scored: dict[int, dict[str, float]]) -> dict[str, Any]:
    """What pareto.json, the card and the summary say of the validation: accuracies and how far each label-free
    objective agrees with them (Spearman's ρ, sign-adjusted so that positive means the objective can be trusted)."""
    from dots_merge.tune.validation import correlations

    rho = correlations(records, scored, [o.name for o in objectives])
    trust = {o.name: (None if rho[o.name] is None else rho[o.name] * (1 if o.direction == "maximize" else -1))
             for o in objectives}  # fmt: skip
    note = None
    if spec.validation.points == "front" and len(objectives) == 2:
        note = ("only front points were scored: along a front of two objectives both rank the points alike, so "
                "their ρ mirror each other; score every trial (validation: {file: …, points: all}) to judge each "
                "objective on its own")  # fmt: skip
    return {
        "file": str(spec.validation.path),
        "items": len(spec.validation.labels),
        "points": spec.validation.points,
        "accuracy": {str(n): v for n, v in scored.items()},
        "spearman": rho,
        "agreement": trust,
        "note": note,
    }


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
        objectives=list(spec.objectives),
        health=summary.get("pick_health"),
        warnings=summary.get("warnings", []),
        validation=summary.get("validation"),
    )
    shutil.copy(run_dir / "pareto.png", model_dir / "pareto.png")
    used = load_recipe(model_dir / "mergekit_config.yml")
    write_atomic(model_dir / "README.md", render_card(used, list(checkpoints.values()), tuning=tuning))
