"""`dots-merge tune`: the outer loop. Ask λ, rewrite the recipe, apply it in memory, score it, keep it.

Run folder:
    run.json          what the run is (recipe, seed, backend); `--resume` refuses a different recipe
    trials/NNNN.yml   the complete recipe of each trial, runnable with `dots-merge merge`
    trials.jsonl      one record per finished trial, fsynced before the next trial starts
    pareto.json, pareto.png, best.yml, model/   written when the budget is reached
A run killed at any point resumes with `--resume`: finished trials are kept, numbers are never reused, the
tuner is rebuilt from trials.jsonl, and only what is missing is redone.

With `--backend optuna` the trials live in an optuna storage (RUN_DIR/study.db, or `--storage URL`), which
`--worker` processes on other GPUs or machines share (`dots_merge.study`); trials.jsonl and trials/ are then
written from the storage, so the run folder looks the same.
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

from dots_merge.errors import DotsMergeError, RecipeError, RunMismatchError
from dots_merge.fileio import write_atomic
from dots_merge.identity import fingerprints, first_difference, portable_identity, run_identity
from dots_merge.pareto import front, hypervolume, pick, reference_point
from dots_merge.recipe import Recipe

LOG = logging.getLogger(__name__)
RUN_FILE, TRIALS_FILE, TRIALS_DIR = "run.json", "trials.jsonl", "trials"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


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


def _open_run(run_dir: Path, identity: dict[str, Any], resume: bool, shared: dict[str, str] | None = None) -> None:
    """Check or write run.json. A run on a shared study (`shared`: its storage and name) may find the folder
    already set up by a worker on this machine; whether the study may be continued is then the study's call."""
    run_file = run_dir / RUN_FILE
    if run_file.exists() and (resume or shared is not None):
        before = json.loads(run_file.read_text())
        if before.get("identity") != identity:
            where = first_difference(before.get("identity"), identity)
            raise RunMismatchError(
                f"{run_dir}: this run was started from a different recipe or settings ({where} changed); "
                "start a new run with another --out"
            )
        return
    if resume and shared is None:
        raise DotsMergeError(f"{run_dir}: no {RUN_FILE}; nothing to resume (drop --resume to start a run)")
    if shared is None and run_dir.exists() and any(run_dir.iterdir()):
        raise DotsMergeError(f"{run_dir}: exists and is not empty (pass --resume to continue that run)")
    from dots_merge import __version__

    info = {"identity": identity, "dots_merge": __version__, **({"study": shared} if shared else {})}
    write_atomic(run_file, json.dumps(info, indent=2) + "\n")


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
) -> TuneResult:
    """Search the recipe's `tune.space` on its unlabeled queries, then merge the picked trial into RUN_DIR/model
    (with a card describing the search) and, with `push`, publish it as that Hub repo.

    With backend optuna the trials live in `storage` (default RUN_DIR/study.db); processes started with
    `worker=True` on the same study only evaluate trials until it holds `trials` finished ones."""
    from dots_merge.merging import as_recipe, inspect_models, resolve_device
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
    prints = fingerprints(checkpoints, spec.queries)
    identity = run_identity(recipe, prints, spec.seed, spec.backend)
    if not shared:
        _open_run(run_dir, identity, resume)
        records = read_records(run_dir)
        from dots_merge.tuner import make_tuner

        tuner = make_tuner(spec.backend, [(d.low, d.high) for d in spec.space], seed=spec.seed, initial=spec.initial)
        tuner.load([(r["point"], (r["consistency"], r["perplexity"])) for r in records])
        before = len(records)
        if len(records) < spec.trials:
            _run_local(recipe, spec, checkpoints, run_dir, records, tuner, device=device, quiet=quiet)
        evaluated, where = len(records) - before, None
    else:
        from dots_merge.identity import digest
        from dots_merge.study import SharedStudy, default_storage, redact

        portable = portable_identity(recipe, prints, spec.seed, spec.backend)
        url = storage or default_storage(run_dir)
        name = study or f"dots-merge-{digest(portable)}"
        _open_run(run_dir, identity, resume, shared={"storage": redact(url), "name": name})
        mode = "join" if worker else ("resume" if resume else "create")
        where = f"{name} in {redact(url)}"
        shared_study = SharedStudy.open(
            url, name, identity=portable, mode=mode, bounds=[(d.low, d.high) for d in spec.space], seed=spec.seed,
            heartbeat=heartbeat, budget=None if worker else spec.trials, initial=spec.initial,
        )  # fmt: skip
        evaluated = _run_shared(recipe, spec, checkpoints, run_dir, shared_study, device=device, quiet=quiet)
        records = shared_study.records()
        _write_run_files(run_dir, recipe, spec, records)
        if worker:
            return TuneResult(run_dir=run_dir, records=records, front=None, pick=None, rule=spec.pick, model_dir=None,
                              seconds=time.perf_counter() - started, evaluated=evaluated, study=where)  # fmt: skip
    return _finish(recipe, spec, checkpoints, run_dir, records, started, evaluated=evaluated, study=where,
                   device=device, quiet=quiet, merge_best=merge_best, out_shard_size=out_shard_size, push=push,
                   private=private, include_queries=include_queries)  # fmt: skip


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
            out_shard_size, push, private, include_queries) -> TuneResult:  # fmt: skip
    """The Pareto front, the pick, best.yml, the merged model with its card, and the push."""
    from dots_merge.merging import merge
    from dots_merge.plots import plot_pareto

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
        evaluated=evaluated,
        study=study,
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


class _Evaluator:
    """Applies a trial's coefficients to the resident candidate and scores it: one record per trial."""

    def __init__(self, recipe, spec, checkpoints, run_dir: Path, *, device: str, spill_dir: Path):
        from dots_merge.candidate import ResidentCandidate
        from dots_merge.objectives import answer_comparator, make_extractor

        self.recipe, self.spec, self.run_dir = recipe, spec, run_dir
        self.candidate = ResidentCandidate(
            recipe, checkpoints, device=device, cache_dir=run_dir / "cache", spill_dir=spill_dir
        )
        self.extract = make_extractor(spec.answer)
        self.comparator, self.equal = answer_comparator(spec.compare)

    def __call__(self, number: int, point: list[float]) -> dict[str, Any]:
        from dots_merge.objectives import score
        from dots_merge.tune_spec import trial_recipe

        t0 = time.perf_counter()
        spec = self.spec
        trial = trial_recipe(self.recipe, spec.space, point)
        write_atomic(self.run_dir / TRIALS_DIR / f"{number:04d}.yml", trial.to_yaml())
        _, update_seconds = self.candidate.apply(trial)
        scores = score(
            self.candidate.model,
            self.candidate.tokenizer,
            spec.queries,
            suffix=spec.prompt_suffix,
            extract=self.extract,
            equal=self.equal,
            generation=spec.generation,
            seed=spec.seed,
        )
        return {
            "number": number,
            "params": dict(zip(spec.labels, point, strict=True)),
            "point": point,
            "consistency": scores.consistency,
            "perplexity": scores.perplexity,
            "per_query_consistency": scores.per_query_consistency,
            "per_query_nll": scores.per_query_nll,
            "answers": scores.answers,
            "comparator": self.comparator,
            "seconds": {
                "update": update_seconds,
                "generation": scores.seconds_generation,
                "perplexity": scores.seconds_perplexity,
                "total": time.perf_counter() - t0,
            },
        }


def _progress(spec, done: int, quiet: bool):
    return tqdm.tqdm(total=spec.trials, initial=done, desc="Tuning", unit="trial", disable=quiet)


def _show_best(progress, records, rule: str) -> None:
    best = records[pick([(r["consistency"], r["perplexity"]) for r in records], rule)]
    progress.set_postfix_str(f"{rule} #{best['number']} c={best['consistency']:.3f} ppl={best['perplexity']:.3g}")


def _run_local(recipe, spec, checkpoints, run_dir, records, tuner, *, device, quiet) -> None:
    evaluate = _Evaluator(recipe, spec, checkpoints, run_dir, device=device, spill_dir=run_dir / "cache" / "vectors")
    progress = _progress(spec, len(records), quiet)
    while len(records) < spec.trials:
        number = next_number(run_dir, records)
        point = tuner.ask()
        record = evaluate(number, point)
        append_record(run_dir, record)
        records.append(record)
        tuner.tell(point, (record["consistency"], record["perplexity"]))
        _show_best(progress, records, spec.pick)
        progress.update(1)
    progress.close()


def _run_shared(recipe, spec, checkpoints, run_dir, study, *, device, quiet) -> int:
    """Claim and evaluate trials until the study holds its budget of finished trials; returns how many this
    process evaluated. Waits (without evaluating) while other workers run the last trials, and takes over a
    trial whose worker died."""
    import shutil

    if study.done():
        return 0
    spill = run_dir / "cache" / "vectors" / f"{study.worker.host}-{study.worker.pid}"
    evaluate = _Evaluator(recipe, spec, checkpoints, run_dir, device=device, spill_dir=spill)
    progress = _progress(spec, len(study.finished()), quiet)
    evaluated = 0
    try:
        while not study.done():
            claim = study.claim()
            if claim is None:
                progress.n = len(study.finished())
                progress.refresh()
                time.sleep(study.poll_interval())
                continue
            try:
                record = evaluate(claim.number, claim.point)
            except BaseException as exc:
                study.fail(claim, f"{type(exc).__name__}: {exc}")
                raise
            record["retry_of"] = claim.retry_of
            if study.complete(claim, record):
                evaluated += 1
                records = study.records()
                _write_run_files(run_dir, recipe, spec, records)
                progress.total = study.budget
                progress.n = len(records)
                _show_best(progress, records, spec.pick)
                progress.refresh()
    finally:
        progress.close()
        shutil.rmtree(spill, ignore_errors=True)
    return evaluated


def _write_run_files(run_dir: Path, recipe, spec, records: list[dict[str, Any]]) -> None:
    """trials/NNNN.yml and trials.jsonl from a shared study's records, as a single process writes them."""
    from dots_merge.tune_spec import trial_recipe

    for r in records:
        path = run_dir / TRIALS_DIR / f"{r['number']:04d}.yml"
        if not path.exists():
            write_atomic(path, trial_recipe(recipe, spec.space, r["point"]).to_yaml())
    write_atomic(run_dir / TRIALS_FILE, "".join(json.dumps(r) + "\n" for r in records))
