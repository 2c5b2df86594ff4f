"""`dots-merge tune` killed with SIGKILL at 10 random moments and interrupted with SIGINT at 3 and SIGTERM at 2, on
every trial store: after each, `--resume` finishes with no trial lost, duplicated or corrupted
(tests/fault_sweep.py)."""

from __future__ import annotations

import uuid

import optuna
import pytest

from tests.conftest import write_recipe
from tests.fault_sweep import check_final_state, schedule, sweep
from tests.test_tune import tune_recipe

BUDGET = 20


@pytest.fixture(params=["local", "sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "local":
        return "local", []
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    url = url or f"sqlite:///{tmp_path / 'study.db'}"
    return request.param, ["--backend", "optuna", "--storage", url, "--study", f"f-{uuid.uuid4().hex[:8]}"]


@pytest.mark.slow
def test_kills_and_interrupts_lose_nothing(llama_trio, tmp_path, store):
    kind, extra = store
    data = tune_recipe(llama_trio, tmp_path, trials=BUDGET)
    data["tune"]["generation"] = {"samples": 2, "max_new_tokens": 4, "batch_size": 4}
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    run = tmp_path / "run"
    faults = schedule(kills=10, interrupts=5, seed=sum(map(ord, kind)))  # 3 SIGINT, 2 SIGTERM
    result = sweep(recipe, run, faults, extra=extra, timeout=300, fork=True)
    assert result.missed == [] and len(result.fired) == 15  # every fault stopped a session mid-run
    storage_records = None
    if kind != "local":
        from dots_merge.tune.stores.optuna_rdb import RECORD_ATTR, WORKER_ATTR, _driver_url

        url, name = extra[extra.index("--storage") + 1], extra[extra.index("--study") + 1]
        study = optuna.load_study(study_name=name, storage=_driver_url(url))
        done = sorted((t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE),
                      key=lambda t: t.number)  # fmt: skip
        storage_records = [{**t.user_attrs[RECORD_ATTR], "worker": t.user_attrs[WORKER_ATTR]["name"]} for t in done]
    check_final_state(run, BUDGET, storage_records, fork=True)
