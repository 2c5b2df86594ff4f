"""One trial loop over every trial store: resume, the budget, a trial that raises, Ctrl-C and a dead process
behave the same whether trials live in the run folder or in an optuna storage (SQLite, or a PostgreSQL server)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from dots_merge.errors import DotsMergeError
from dots_merge.tune.loop import MAX_FAILED_IN_A_ROW, TrialFailed, run_trials
from dots_merge.tune.run_folder import TRIALS_FILE, write_records
from dots_merge.tune.samplers import make_tuner
from dots_merge.tune.stores.base import Trial, TrialStore
from dots_merge.tune.stores.local import LocalStore
from dots_merge.tune.stores.optuna_rdb import OptunaStore

BOUNDS = [(0.5, 2.0), (0.5, 2.0)]
INITIAL = [[1.0, 1.0]]
IDENTITY = {"recipe": {"merge_method": "dots"}, "seed": 0, "backend": "optuna"}


def objectives(point: list[float]) -> tuple[float, float]:
    return math.exp(-sum((v - 1.0) ** 2 for v in point)), 2.0 + sum((v - 1.5) ** 2 for v in point)


class Opener:
    """Opens the store of one kind on one run folder, as `dots-merge tune` (and `--resume`) would."""

    def __init__(self, kind: str, root: Path, url: str | None = None):
        self.kind, self.run_dir = kind, root / "run"
        self.run_dir.mkdir()
        self.url = url or f"sqlite:///{root / 'study.db'}"
        self.study = f"s-{uuid.uuid4().hex[:8]}"  # a PostgreSQL server is shared by the session's tests

    def __call__(self, budget: int, *, resume: bool = False) -> TrialStore:
        if self.kind == "local":
            return LocalStore(self.run_dir, make_tuner("bayes", BOUNDS, seed=0, initial=INITIAL), budget)
        return OptunaStore.open(
            self.url, self.study, identity=IDENTITY, mode="resume" if resume else "create", bounds=BOUNDS, seed=0,
            heartbeat=1, budget=budget, initial=INITIAL, mirror=lambda records: write_records(self.run_dir, records),
        )  # fmt: skip

    def jsonl(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / TRIALS_FILE).read_text().splitlines()]


@pytest.fixture(params=["local", "optuna-sqlite", "optuna-postgresql"])
def opener(request, tmp_path) -> Opener:
    url = request.getfixturevalue("postgres_url") if request.param == "optuna-postgresql" else None
    return Opener(request.param, tmp_path, url)


def run(store: TrialStore, opener: Opener, *, raise_at: dict[int, BaseException] | None = None) -> list[Trial]:
    """The loop with a recipe file per trial and objectives computed from the point; returns what was evaluated."""
    evaluated: list[Trial] = []

    def write_recipe(trial: Trial) -> Path:
        path = opener.run_dir / "trials" / f"{trial.number:04d}.yml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(trial.point))
        return path

    def evaluate(trial: Trial, recipe: Path) -> dict:
        evaluated.append(trial)
        if raise_at and trial.number in raise_at:
            raise raise_at[trial.number]
        assert json.loads(recipe.read_text()) == trial.point  # the recipe is written before the evaluation
        c, p = objectives(trial.point)
        return {"number": trial.number, "point": trial.point, "consistency": c, "perplexity": p}

    run_trials(store, write_recipe=write_recipe, evaluate=evaluate, sleep=lambda s: None)
    return evaluated


def numbers(records: list[dict]) -> list[int]:
    return [r["number"] for r in records]


def test_the_budget_and_resume(opener):
    store = opener(3)
    run(store, opener)
    first = store.records()
    assert numbers(first) == [0, 1, 2] and first[0]["point"] == INITIAL[0]
    assert opener.jsonl() == first
    resumed = opener(5, resume=True)
    assert resumed.records() == first
    run(resumed, opener)
    records = resumed.records()
    assert numbers(records) == [0, 1, 2, 3, 4] and records[:3] == first and opener.jsonl() == records
    assert len({tuple(r["point"]) for r in records}) == 5
    assert resumed.done() and run(resumed, opener) == []  # nothing left to do


def test_a_trial_that_raises_is_recorded_as_failed_and_not_tried_again(opener):
    store = opener(3)
    with pytest.raises(RuntimeError, match="boom"):
        run(store, opener, raise_at={1: RuntimeError("boom")})
    assert numbers(store.records()) == [0] and store.failed() == {1: "RuntimeError: boom"}
    failed_point = json.loads((opener.run_dir / "trials" / "0001.yml").read_text())
    resumed = opener(3, resume=True)
    assert resumed.failed() == {1: "RuntimeError: boom"}
    evaluated = run(resumed, opener)
    records = resumed.records()
    assert len(records) == 3 and 1 not in numbers(records) and len(set(numbers(records))) == 3
    assert failed_point not in [t.point for t in evaluated]  # a fresh point took the failed one's place
    assert all(t.retry_of is None for t in evaluated) and opener.jsonl() == records


def test_ctrl_c_puts_the_point_back_and_resume_evaluates_it_first(opener):
    store = opener(3)
    with pytest.raises(KeyboardInterrupt):
        run(store, opener, raise_at={0: KeyboardInterrupt()})  # the initial point, interrupted
    assert store.records() == [] and store.failed() == {}
    resumed = opener(3, resume=True)
    evaluated = run(resumed, opener)
    assert evaluated[0].point == INITIAL[0] and evaluated[0].retry_of == 0 and evaluated[0].number > 0
    records = resumed.records()
    assert len(records) == 3 and 0 not in numbers(records) and records[0]["retry_of"] == 0
    assert resumed.failed() == {} and opener.jsonl() == records


def test_a_process_that_died_mid_trial_has_its_point_retried(opener):
    store = opener(2)
    if isinstance(store, OptunaStore):  # a dead process on this machine: its trial is reclaimed at once
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        store.identity = replace(store.identity, pid=int(dead.stdout))
    lost = store.ask()  # ... and the process is killed here, mid-trial
    if isinstance(store, OptunaStore):
        lost.handle.heartbeat.stop()
    resumed = opener(2, resume=True)
    evaluated = run(resumed, opener)
    assert evaluated[0].point == lost.point and evaluated[0].retry_of == lost.number
    records = resumed.records()
    assert len(records) == 2 and lost.number not in numbers(records) and len(set(numbers(records))) == 2


def test_a_trial_with_a_nonfinite_objective_is_failed_and_the_run_goes_on(opener, caplog):
    store = opener(3)
    evaluated = run(store, opener, raise_at={1: TrialFailed("perplexity is inf (overflowed in float16): use ...")})
    records = store.records()
    assert len(records) == 3 and 1 not in numbers(records)  # the budget is met by finite trials only
    assert store.failed() == {1: "perplexity is inf (overflowed in float16): use ..."}
    assert all(math.isfinite(r["perplexity"]) for r in records) and len(evaluated) == 4
    assert "trial #1 failed and is not used" in caplog.text
    if isinstance(store, LocalStore):  # the sampler was told the finished trials only
        assert [p for p, _ in store.sampler.history] == [r["point"] for r in records]
    resumed = opener(3, resume=True)
    assert resumed.done() and resumed.failed() == store.failed()


def test_every_trial_failing_stops_the_run_with_the_reason(opener):
    store = opener(20)
    with pytest.raises(DotsMergeError, match=r"5 trials in a row failed; the last: perplexity is nan"):
        run(store, opener, raise_at={n: TrialFailed("perplexity is nan") for n in range(20)})
    assert len(store.failed()) == MAX_FAILED_IN_A_ROW and store.records() == []


def test_a_trial_left_running_without_any_heartbeat_is_reclaimed(opener):
    store = opener(2)
    if isinstance(store, OptunaStore):  # a process that never sent a heartbeat (or whose storage lost it)
        raw = store.study.ask({f"x{i}": d for i, d in enumerate(store._dists.values())})
        lost = Trial(raw.number, [raw.params["x0"], raw.params["x1"]])
        time.sleep(2 * store.heartbeat + 1.5)  # the grace period after its start (SQLite's clock has seconds)
    else:
        lost = store.ask()
    resumed = opener(2, resume=True)
    evaluated = run(resumed, opener)
    assert evaluated[0].point == lost.point and evaluated[0].retry_of == lost.number
    assert len(resumed.records()) == 2 and lost.number not in numbers(resumed.records())


def test_partial_writes_in_the_run_folder_redo_only_their_trial(tmp_path, caplog):
    opener = Opener("local", tmp_path)
    store = opener(4)
    run(store, opener)
    records = store.records()
    # a crash while recording trial #3: its line is cut, and claims.json still lists it as running
    text = (opener.run_dir / TRIALS_FILE).read_text()
    (opener.run_dir / TRIALS_FILE).write_text(text[: text.rindex("{") + 20])
    claims = json.loads((opener.run_dir / "claims.json").read_text())
    claims["running"] = [{"number": 3, "point": records[3]["point"], "retry_of": None}]
    (opener.run_dir / "claims.json").write_text(json.dumps(claims))
    (opener.run_dir / "trials" / "0001.yml").unlink()  # and a trial recipe lost
    resumed = opener(4, resume=True)
    assert "last line was cut short" in caplog.text and "1 trial recipe(s) missing (#1)" in caplog.text
    assert resumed.records() == [records[0], records[2]]  # no other trial touched
    evaluated = run(resumed, opener)
    assert [(t.point, t.retry_of) for t in evaluated] == [(records[3]["point"], 3), (records[1]["point"], 1)]
    assert numbers(resumed.records()) == [0, 2, 4, 5] and opener.jsonl() == resumed.records()
