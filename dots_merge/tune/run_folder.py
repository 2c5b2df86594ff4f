"""The run folder of a tune: what is in it, and reading and writing it so that a crash never corrupts it.

    run.json          what the run is (recipe identity, version; the study for an optuna store)
    trials/NNNN.yml   the complete recipe of each trial, runnable with `dots-merge merge`
    trials.jsonl      one record per finished trial (fsynced before the next trial starts)
    claims.json       the local store's trials in flight, put back and failed
    tune.log          when each phase began and ended, with every warning (appended by each session)
    pareto.json, pareto.png, best.yml, model/   written when the budget is reached
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dots_merge.errors import DotsMergeError, RunMismatchError
from dots_merge.fileio import disk_full_is_an_error, write_atomic
from dots_merge.tune.identity import first_difference
from dots_merge.version import __version__

LOG = logging.getLogger(__name__)
RUN_FILE, TRIALS_FILE, TRIALS_DIR, CLAIMS_FILE = "run.json", "trials.jsonl", "trials", "claims.json"
LOG_FILE = "tune.log"


class RunLog:
    """RUN_DIR/tune.log: a timestamped line per phase, and every warning dots-merge logs meanwhile."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOG_FILE
        self._handler = logging.FileHandler(self.path, encoding="utf-8")
        self._handler.setLevel(logging.WARNING)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))

    def __enter__(self) -> RunLog:
        logging.getLogger("dots_merge").addHandler(self._handler)
        self.phase(f"dots-merge {__version__}: session started (pid {os.getpid()})")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.phase("session interrupted (Ctrl-C or SIGTERM); the running trial was put back")
        elif kind is not None:
            self.phase(f"session failed: {kind.__name__}: {error}")
        logging.getLogger("dots_merge").removeHandler(self._handler)
        self._handler.close()

    def phase(self, message: str) -> None:
        """Append one timestamped line."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stamp} {message}\n")


def trial_path(run_dir: Path, number: int) -> Path:
    """trials/NNNN.yml: the recipe of trial `number`."""
    return Path(run_dir) / TRIALS_DIR / f"{number:04d}.yml"


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Finished trials from trials.jsonl; a last line cut short by a crash is dropped (and cut from the file)."""
    path = Path(run_dir) / TRIALS_FILE
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
            LOG.warning("%s: its last line was cut short by a crash; that trial is evaluated again", path)
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        good_end += len(line) + 1
    return records


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one trial record and make it durable before returning (a line cut by a crash or a full disk is
    dropped by `read_records`, and its trial redone)."""
    path = Path(run_dir) / TRIALS_FILE
    with disk_full_is_an_error(path, "recording a trial"), open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_records(run_dir: Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace trials.jsonl with `records` (atomically): the run folder of a store that lives elsewhere."""
    write_atomic(Path(run_dir) / TRIALS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def recipe_numbers(run_dir: Path) -> list[int]:
    """The numbers of the trial recipes in trials/ (a crash may have left one without a record)."""
    return [int(p.stem) for p in (Path(run_dir) / TRIALS_DIR).glob("[0-9][0-9][0-9][0-9].yml")]


def open_run(run_dir: Path, identity: dict[str, Any], resume: bool, shared: dict[str, str] | None = None) -> None:
    """Check or write run.json. A run on a shared study (`shared`: its storage and name) may find the folder
    already set up by a worker on this machine; whether the study may be continued is then the study's call."""
    run_file = Path(run_dir) / RUN_FILE
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
    if shared is None and Path(run_dir).exists() and any(Path(run_dir).iterdir()):
        raise DotsMergeError(f"{run_dir}: exists and is not empty (pass --resume to continue that run)")
    info = {"identity": identity, "dots_merge": __version__, **({"study": shared} if shared else {})}
    write_atomic(run_file, json.dumps(info, indent=2) + "\n")
