"""`dots-merge tune` killed with SIGKILL at 7 random moments and interrupted with SIGINT at 2 and SIGTERM at 2, on
every trial store: after each, `--resume` finishes with no trial lost, duplicated or corrupted, trials.jsonl equal
to the store and the final model bit for bit the merge of best.yml (tests/fault_sweep.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import write_recipe
from tests.fault_sweep import schedule
from tests.test_tune import tune_recipe

BUDGET = 20
ROOT = Path(__file__).resolve().parent.parent


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
    faults = schedule(kills=7, interrupts=4, seed=sum(map(ord, kind)))  # 2 SIGINT, 2 SIGTERM
    assert sum(f.endswith(":kill") for f in faults) == 7 and sum(f.endswith(":int") for f in faults) == 2
    done = subprocess.run(
        [sys.executable, "-m", "tests.fault_sweep", str(recipe), str(tmp_path / "run"), str(BUDGET),
         json.dumps(faults), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["missed"] == [] and result["fired"] == faults  # every fault stopped a session mid-run
