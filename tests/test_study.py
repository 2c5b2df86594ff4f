"""Tuning on a shared optuna storage: the budget across workers, dead workers retried, real SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import yaml

from dots_merge.cli.main import main
from dots_merge.errors import DotsMergeError
from dots_merge.tune.stores.optuna_rdb import RECORD_ATTR, WORKER_ATTR, OptunaStore, redact
from tests.conftest import write_recipe
from tests.test_tune import tune_recipe

BOUNDS = [(0.5, 2.0), (0.5, 2.0)]
IDENTITY = {"recipe": {"merge_method": "dots"}, "seed": 0, "backend": "optuna"}
CLI = [sys.executable, "-c", "import sys; from dots_merge.cli.main import main; sys.exit(main(sys.argv[1:]))"]


def open_study(url: str, name: str, mode: str, **kw) -> OptunaStore:
    kw = {"identity": IDENTITY, "bounds": BOUNDS, "seed": 0, "heartbeat": 1, "budget": 3, **kw}
    if mode == "join":
        kw["budget"] = None
    return OptunaStore.open(url, name, mode=mode, **kw)


def record(claim, c: float = 0.5, p: float = 2.0) -> dict:
    return {"number": claim.number, "point": claim.point, "consistency": c, "perplexity": p}


def test_concurrent_claims_never_overrun_the_budget(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a = open_study(url, "s", "create", budget=3, initial=[[1.0, 1.0]])
    b = open_study(url, "s", "join")
    claims = [a.ask(), b.ask(), a.ask()]
    assert [c.number for c in claims] == [0, 1, 2] and claims[0].point == [1.0, 1.0]  # the initial point first
    assert b.ask() is None and a.ask() is None  # all three slots are taken
    for c in claims:
        assert a.tell(c, record(c))
    assert a.done() and b.done()
    assert [r["number"] for r in b.records()] == [0, 1, 2]
    assert {r["worker"] for r in b.records()} == {f"{os.uname().nodename}:{os.getpid()}"}
    points = [tuple(c.point) for c in claims]
    assert len(set(points)) == 3  # reseeded per trial number: no two workers get the same point


def test_a_claim_past_the_budget_is_closed_unevaluated(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a = open_study(url, "s", "create", budget=2)
    first, second = a.ask(), a.ask()
    real, calls = a._live, []

    def stale_view():  # the check before asking saw the study before another worker's claim landed
        calls.append(1)
        return [] if len(calls) == 1 else real()

    monkeypatch.setattr(a, "_live", stale_view)
    assert a.ask() is None  # asked, then ranked 3rd of 2: closed as skipped, never evaluated
    monkeypatch.undo()
    skipped = [t for t in a.study.get_trials() if t.state == optuna.trial.TrialState.FAIL]
    assert len(skipped) == 1 and skipped[0].user_attrs["dots_merge.skipped"]
    for c in (first, second):
        a.tell(c, record(c))
    assert a.done() and [r["number"] for r in a.records()] == [0, 1]


def test_a_silent_worker_is_failed_after_the_heartbeat_and_its_point_retried(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a = open_study(url, "s", "create", budget=2)
    elsewhere = replace(a.identity, name="gpu7:1", host="gpu7")  # another machine: only the heartbeat tells
    a.identity = elsewhere
    lost = a.ask()
    lost.handle.heartbeat.stop()  # the machine goes silent mid-trial
    b = open_study(url, "s", "join")
    assert b.reap() == []  # still within the grace period
    time.sleep(3.5)  # > 2 intervals; SQLite's clock has whole seconds
    assert b.reap() == [lost.number]
    retry = b.ask()
    assert retry.number != lost.number and retry.point == lost.point and retry.retry_of == lost.number
    assert not a.tell(lost, record(lost))  # the silent worker comes back: its result is dropped
    b.tell(retry, record(retry))
    other = b.ask()
    b.tell(other, record(other))
    assert [r["number"] for r in b.records()] == sorted({retry.number, other.number})


def test_a_dead_process_on_this_machine_is_failed_at_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a = open_study(url, "s", "create", budget=1, heartbeat=60)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    a.identity = replace(a.identity, pid=int(dead.stdout))
    lost = a.ask()
    b = open_study(url, "s", "join", heartbeat=60)
    assert b.reap() == [lost.number]  # no waiting for two minutes of heartbeats
    retry = b.ask()
    assert retry.retry_of == lost.number and retry.point == lost.point
    lost.handle.heartbeat.stop()


def test_opening_a_study_wrongly_is_one_clear_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(url, "s", "create")
    with pytest.raises(DotsMergeError, match=r"already exists.*--resume"):
        open_study(url, "s", "create")
    with pytest.raises(DotsMergeError, match=r"different recipe.*seed differs"):
        open_study(url, "s", "join", identity={**IDENTITY, "seed": 1})
    with pytest.raises(DotsMergeError, match="not started within"):
        open_study(url, "other", "join", join_timeout=0.5)
    with pytest.raises(DotsMergeError, match="cannot open the database"):
        open_study("postgresql://me:hunter2@127.0.0.1:1/db", "s", "create")
    with pytest.raises(DotsMergeError) as err:
        open_study("postgresql://me:hunter2@127.0.0.1:1/db", "s", "create")
    assert "hunter2" not in str(err.value)
    with pytest.raises(DotsMergeError, match=r"driver.*not installed"):
        open_study("mysql://me@127.0.0.1/db", "s", "create")
    with pytest.raises(DotsMergeError, match="not a database URL"):
        open_study("nonsense", "s", "create")
    with pytest.raises(DotsMergeError, match="cannot create /proc/nope"):
        open_study("sqlite:////proc/nope/study.db", "s", "create")
    assert "hunter2" not in redact("postgresql://me:hunter2@db.example/x")


def test_storage_flags_need_the_optuna_backend(llama_trio, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=2))
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--worker"]) == 2
    assert "--worker: needs --backend optuna" in capsys.readouterr().err
    args = ["tune", str(recipe), "--out", str(tmp_path / "run"), "--backend", "optuna", "--worker"]
    assert main([*args, "--trials", "3"]) == 2
    assert "--trials: not for a --worker" in capsys.readouterr().err


# ---- whole processes: `dots-merge tune` main + `--worker`, on SQLite and on a real PostgreSQL server -------------


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared' / 'study.db'}"
    return request.getfixturevalue("postgres_url")


def slow_recipe(trio, tmp_path: Path, trials: int) -> Path:
    """Trials of a second or more on the tiny model, so that two processes overlap: the toy answers in a few tokens,
    so the time is in many small batches (one query each) of many samples."""
    data = tune_recipe(trio, tmp_path, trials=trials, backend="optuna")
    data["tune"]["generation"] = {"samples": 24, "max_new_tokens": 24, "batch_size": 1}
    return write_recipe(tmp_path / "recipe.yml", data)


def start(recipe: Path, run: Path, storage: str, study: str, *extra: str, stderr=subprocess.PIPE,
          faults: str = "") -> subprocess.Popen:  # fmt: skip
    cmd = [*CLI, "tune", str(recipe), "--out", str(run), "--storage", storage, "--study", study, "--quiet",
           "--heartbeat", "1", *extra]  # fmt: skip
    env = {**os.environ, "DOTS_MERGE_FAULTS": faults} if faults else None
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def trials_of(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    from dots_merge.tune.stores.optuna_rdb import _driver_url

    return optuna.load_study(study_name=study, storage=_driver_url(storage)).get_trials()


def test_two_processes_share_one_study(llama_trio, tmp_path, storage):
    recipe = slow_recipe(llama_trio, tmp_path, trials=6)
    study = f"t-{uuid.uuid4().hex[:8]}"
    main_run, worker_run = tmp_path / "main", tmp_path / "worker"  # as on two machines: separate run folders
    worker = start(recipe, worker_run, storage, study, "--worker")
    boss = start(recipe, main_run, storage, study)
    out = finish(boss)
    worker_out = finish(worker)
    assert "6 trials" in out and "worker: evaluated" in worker_out
    trials = trials_of(storage, study)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 6 and len({t.number for t in done}) == 6
    ran_by = {t.user_attrs[WORKER_ATTR]["pid"] for t in done}
    assert ran_by == {boss.pid, worker.pid}  # both contributed
    records = [json.loads(line) for line in (main_run / "trials.jsonl").read_text().splitlines()]
    assert [r["number"] for r in records] == sorted(t.number for t in done)
    assert {r["worker"].split(":")[1] for r in records} == {str(boss.pid), str(worker.pid)}
    for r, t in zip(records, sorted(done, key=lambda t: t.number), strict=True):
        assert r["consistency"] == t.values[0] and r["point"] == t.user_attrs[RECORD_ATTR]["point"]
        trial = yaml.safe_load((main_run / "trials" / f"{r['number']:04d}.yml").read_text())
        assert trial["models"][1]["parameters"]["weight"] == r["point"][1]
    assert (main_run / "model" / "model.safetensors").exists() and not (worker_run / "model").exists()
    assert (worker_run / "trials.jsonl").read_text().count("\n") >= 1  # the worker's folder is written too
    pareto = json.loads((main_run / "pareto.json").read_text())
    assert pareto["trials"] == 6 and pareto["pick"] in pareto["front"]


def test_a_worker_killed_mid_trial_is_retried(llama_trio, tmp_path, storage):
    recipe = slow_recipe(llama_trio, tmp_path, trials=4)
    study = f"k-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "worker.err"
    with open(log, "w") as err:
        worker = start(recipe, tmp_path / "worker", storage, study, "--worker", stderr=err)
    deadline = time.time() + 120  # the main process starts once the worker waits for the study (imports done)
    while time.time() < deadline and "waiting for" not in log.read_text() and worker.poll() is None:
        time.sleep(0.05)
    # the main process starts the study, then waits 15 s before asking for its first trial, so the worker (its
    # imports done, waiting) takes one first: else the main process may run all four before the worker asks
    boss = start(recipe, tmp_path / "main", storage, study, "--no-merge", faults="ask:1:sleep15")
    deadline, victim = time.time() + 120, None
    while time.time() < deadline and victim is None and boss.poll() is None:
        try:
            running = [t for t in trials_of(storage, study) if t.state == optuna.trial.TrialState.RUNNING]
        except Exception:  # the database or the study is not created yet
            running = []
        victim = next((t for t in running if t.user_attrs.get(WORKER_ATTR, {}).get("pid") == worker.pid), None)
        time.sleep(0.02)
    assert victim is not None, "the worker never started a trial"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    finish(boss)
    trials = {t.number: t for t in trials_of(storage, study)}
    assert trials[victim.number].state == optuna.trial.TrialState.FAIL
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state == optuna.trial.TrialState.COMPLETE
    assert retries[0].params == victim.params and retries[0].user_attrs[WORKER_ATTR]["pid"] == boss.pid
    records = [json.loads(line) for line in (tmp_path / "main" / "trials.jsonl").read_text().splitlines()]
    numbers = [r["number"] for r in records]
    assert len(numbers) == 4 and len(set(numbers)) == 4 and victim.number not in numbers
    assert next(r for r in records if r["number"] == retries[0].number)["retry_of"] == victim.number


def test_resume_on_a_storage_continues_the_study(llama_trio, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=2, backend="optuna"))
    run = tmp_path / "run"
    assert main(["tune", str(recipe), "--out", str(run), "--quiet", "--no-merge"]) == 0
    assert (run / "study.db").exists()
    before = (run / "trials.jsonl").read_text()
    assert main(["tune", str(recipe), "--out", str(run), "--quiet", "--no-merge"]) == 2  # not without --resume
    assert main(["tune", str(recipe), "--out", str(run), "--quiet", "--resume", "--trials", "3"]) == 0
    after = (run / "trials.jsonl").read_text()
    assert after.startswith(before) and after.count("\n") == 3
    assert (run / "model" / "model.safetensors").exists()
