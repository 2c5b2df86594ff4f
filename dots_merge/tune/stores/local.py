"""The local trial store: trials in the run folder (trials.jsonl, claims.json), points from an in-process sampler.

A crash leaves at most one trial in flight; on the next open its point is put back, like an interrupted one, so
`--resume` evaluates it first. Samplers are functions of (seed, finished trials, failed count): a resumed run
asks what an uninterrupted one would have asked.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dots_merge.errors import DotsMergeError
from dots_merge.faults import fault_point
from dots_merge.fileio import write_atomic
from dots_merge.tune.run_folder import (
    CLAIMS_FILE,
    TRIALS_DIR,
    append_record,
    read_records,
    recipe_numbers,
    trial_path,
    write_records,
)
from dots_merge.tune.samplers.base import Tuner
from dots_merge.tune.stores.base import Trial, TrialStore, objective_values

LOG = logging.getLogger(__name__)


class LocalStore(TrialStore):
    """Trials of one process, kept in `run_dir`."""

    def __init__(self, run_dir: Path, sampler: Tuner, budget: int):
        self.run_dir, self.sampler, self._budget = Path(run_dir), sampler, budget
        self._records = read_records(self.run_dir)
        claims = self._read_claims()
        unrecorded = self._drop_records_without_recipe()
        finished = {r["number"] for r in self._records}
        self._failed: list[dict[str, Any]] = claims.get("failed", [])
        failed = {f["number"] for f in self._failed}
        redo = finished | failed | {r["number"] for r in unrecorded}
        lost = [c for c in claims.get("running", []) if c["number"] not in redo]  # left running by a crash
        self._queued: list[dict[str, Any]] = [
            *({"point": c["point"], "retry_of": c["number"]} for c in [*lost, *unrecorded]),
            *claims.get("queued", []),
        ]
        self._running: dict[int, dict[str, Any]] = {}
        self._used = finished | failed | {c["number"] for c in [*claims.get("running", []), *unrecorded]}
        sampler.load([(r["point"], objective_values(r, sampler.objectives)) for r in self._records])
        sampler.skipped = len(self._failed)
        self._save()

    @property
    def budget(self) -> int:
        return self._budget

    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def failed(self) -> dict[int, str]:
        return {f["number"]: f["error"] for f in self._failed}

    def ask(self) -> Trial:
        number = max([*self._used, *recipe_numbers(self.run_dir)], default=-1) + 1
        if self._queued:
            put_back = self._queued.pop(0)
            trial = Trial(number, list(put_back["point"]), put_back["retry_of"])
        else:
            trial = Trial(number, self.sampler.ask())
        self._used.add(number)
        self._running[number] = {"number": number, "point": trial.point, "retry_of": trial.retry_of}
        self._save()
        return trial

    def tell(self, trial: Trial, record: dict[str, Any]) -> bool:
        append_record(self.run_dir, record)
        fault_point("record")
        self._records.append(record)
        self.sampler.tell(trial.point, objective_values(record, self.sampler.objectives))
        self._running.pop(trial.number, None)
        self._save()
        return True

    def fail(self, trial: Trial, error: str) -> None:
        self._running.pop(trial.number, None)
        self._failed.append({"number": trial.number, "point": trial.point, "error": error[:2000]})
        self.sampler.skip()
        self._save()

    def release(self, trial: Trial) -> None:
        self._running.pop(trial.number, None)
        self._queued.insert(0, {"point": trial.point, "retry_of": trial.number})
        self._save()

    def _drop_records_without_recipe(self) -> list[dict[str, Any]]:
        """Records whose trials/NNNN.yml is gone (a partial copy, a crash): their trials are redone, as one warning
        says; trials.jsonl keeps every other record as it was."""
        missing = [r for r in self._records if not trial_path(self.run_dir, r["number"]).exists()]
        if missing:
            LOG.warning("%s: %d trial recipe(s) missing (%s); those trials are evaluated again", self.run_dir / TRIALS_DIR,
                        len(missing), ", ".join(f"#{r['number']}" for r in missing))  # fmt: skip
            self._records = [r for r in self._records if r not in missing]
            write_records(self.run_dir, self._records)
        return missing

    def _read_claims(self) -> dict[str, Any]:
        path = self.run_dir / CLAIMS_FILE
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DotsMergeError(f"{path}: not JSON; the file is damaged") from None

    def _save(self) -> None:
        claims = {"running": list(self._running.values()), "queued": self._queued, "failed": self._failed}
        write_atomic(self.run_dir / CLAIMS_FILE, json.dumps(claims) + "\n")
