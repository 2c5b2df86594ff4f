"""The run folder of a tune: what is in it, and reading and writing it so that a crash never corrupts it.

    run.json          what the run is (recipe identity, version; the study for an optuna store)
    trials/NNNN.yml   the complete recipe of each trial, runnable with `dots-merge merge`
    trials.jsonl      one record per finished trial (fsynced before the next trial starts)
    claims.json       the local store's trials in flight, put back and failed
    pareto.json, pareto.png, best.yml, model/   written when the budget is reached
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dots_merge.errors import DotsMergeError, RunMismatchError
from dots_merge.fileio import write_atomic
from dots_merge.tune.identity import first_difference
from dots_merge.version import __version__

LOG = logging.getLogger(__name__)
RUN_FILE, TRIALS_FILE, TRIALS_DIR, CLAIMS_FILE = "run.json", "trials.jsonl", "trials", "claims.json"


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
            LOG.warning("%s: dropping an unfinished last line left by a crash", path)
            with open(path, "r+b") as f:
                f.truncate(good_end)
            break
        good_end += len(line) + 1
    return records


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one trial record and make it durable before returning."""
    with open(Path(run_dir) / TRIALS_FILE, "a", encoding="utf-8") as f:
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
