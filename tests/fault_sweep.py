"""Fault injection for `dots-merge tune`: kill (SIGKILL) or interrupt (SIGINT) the process at random moments,
resume after each, and check that nothing was lost, duplicated or corrupted.

Used by `tests/test_fault_injection.py` (CI) and, longer, by `benchmarks/fault_sweep.py`. The moments are the
fault points of `dots_merge.faults`: loading, the pre-pass, generation, the record write and the final merge.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dots_merge import faults as fault_points

CLI = [sys.executable, "-c", "import sys; from dots_merge.cli.main import main; sys.exit(main(sys.argv[1:]))"]
POINTS = {"load": 1, "prepass": 20, "generate": 3, "record": 2, "merge": 20}  # point → largest hit drawn


@dataclass
class SweepResult:
    fired: list[str] = field(default_factory=list)  # the faults that stopped a session
    missed: list[str] = field(default_factory=list)  # sessions that finished before their fault point
    sessions: int = 0


def schedule(kills: int, interrupts: int, seed: int) -> list[str]:
    """`kills` SIGKILLs and `interrupts` SIGINTs and SIGTERMs (alternating, Ctrl-C first) at random hits: a kill
    while loading, one in the pre-pass and a Ctrl-C in it (the first trial's pre-pass always runs; a later trial's
    may be a cache hit when the sampler repeats a density), then kills and interrupts during generation, the
    record write or loading in random order, and two kills in the final merge last (a session only merges once
    every trial is done)."""
    rng = random.Random(seed)
    first = ["load:1:kill", f"prepass:{rng.randint(1, POINTS['prepass'])}:kill",
             f"prepass:{rng.randint(1, POINTS['prepass'])}:int"]  # fmt: skip
    during = ["load", "generate", "record", "generate", "record"]
    middle = [f"{p}:{rng.randint(1, POINTS[p])}:kill" for p in rng.choices(during, k=kills - 4)]
    points = rng.choices(during[1:], k=interrupts - 1)
    middle += [f"{p}:{rng.randint(1, POINTS[p])}:{('term', 'int')[i % 2]}" for i, p in enumerate(points)]
    rng.shuffle(middle)
    return [*first, *middle, *(f"merge:{rng.randint(1, POINTS['merge'])}:kill" for _ in range(2))]


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "trials.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]


def _forked(args: list[str], fault: str | None, timeout: float) -> tuple[int, str]:
    """One `dots-merge` session in a child forked from this process, which has imported everything already: a
    real process (a SIGKILL kills it alone) that starts in milliseconds instead of seconds."""
    import tqdm

    if tqdm.tqdm.monitor is not None:  # a thread may not hold tqdm's lock at the fork: stop the monitor thread
        tqdm.tqdm.monitor.exit()
        tqdm.tqdm.monitor = None
    tqdm.tqdm.monitor_interval = 0
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: its own stdout/stderr and fault plan; exits without the parent's atexit
            code = 1
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(err.fileno(), 2)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                os.environ["DOTS_MERGE_FAULTS"] = fault or ""
                fault_points.reset()
                tqdm.tqdm.set_lock(tqdm.std.TqdmDefaultWriteLock())
                from dots_merge.cli.main import main

                code = main(args)
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"session under {fault} did not end within {timeout} s")
            time.sleep(0.05)
        err.seek(0)
        text = err.read().decode(errors="replace")
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), text


def _spawned(args: list[str], fault: str | None, timeout: float) -> tuple[int, str]:
    """One `dots-merge` session as a fresh Python process (cold start: imports, everything)."""
    env = {**os.environ, "DOTS_MERGE_FAULTS": fault or ""}
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stderr


def sweep(recipe: Path, run_dir: Path, faults: list[str], *, extra: list[str] = (), timeout: float = 300,
          max_sessions: int = 60, fork: bool = False) -> SweepResult:  # fmt: skip
    """Run the tune under each fault in turn, then once more without faults; raise AssertionError on any trial
    lost, duplicated or rewritten. A session that finishes before its fault point is counted as missed. With
    `fork`, sessions are children forked from this process (see `_forked`), else fresh interpreters."""
    result = SweepResult()
    seen: dict[int, dict] = {}
    started = False
    pending = list(faults)
    while True:
        fault = pending[0] if pending else None
        args = ["tune", str(recipe), "--out", str(run_dir), "--quiet", *extra, *(["--resume"] if started else [])]
        returncode, stderr = (_forked if fork else _spawned)(args, fault, timeout)
        result.sessions += 1
        started = started or (run_dir / "run.json").exists()
        for r in _records(run_dir):  # a finished trial, once recorded, must never change or vanish
            assert seen.setdefault(r["number"], r) == r, f"trial #{r['number']} changed after {fault}"
        if fault is None:
            assert returncode == 0, stderr
            break
        expected = -signal.SIGKILL if fault.endswith(":kill") else 130
        if returncode == expected:
            result.fired.append(fault)
            if not fault.endswith(":kill"):
                assert "--resume" in stderr.strip().splitlines()[-1], stderr
        elif returncode == 0:  # the run finished first: the fault point was never reached this often
            result.missed.append(fault)
        else:
            raise AssertionError(f"session under {fault} exited {returncode}: {stderr[-2000:]}")
        pending.pop(0)
        assert result.sessions < max_sessions, "too many sessions"
    final = _records(run_dir)
    numbers = [r["number"] for r in final]
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers: {numbers}"
    assert all(seen[n] == r for n, r in zip(numbers, final, strict=True)), "a finished trial was rewritten"
    assert set(seen) == set(numbers), f"finished trials lost: {sorted(set(seen) - set(numbers))}"
    return result


def check_final_state(run_dir: Path, budget: int, storage_records: list[dict] | None = None, *,
                      fork: bool = False) -> None:  # fmt: skip
    """The budget of distinct finished trials, trials.jsonl equal to the store, best.yml's merge in model/."""
    import torch
    from safetensors.torch import load_file

    records = _records(run_dir)
    assert not list(run_dir.glob(".model.partial-*")), "a killed merge left its partial folder behind"
    assert len(records) == budget and len({r["number"] for r in records}) == budget
    for r in records:
        assert (run_dir / "trials" / f"{r['number']:04d}.yml").exists(), r["number"]
    if storage_records is not None:
        assert records == storage_records
    else:  # the local store: nothing left in flight
        claims = json.loads((run_dir / "claims.json").read_text())
        assert claims["running"] == [] and claims["queued"] == []
    again = run_dir.parent / f"{run_dir.name}-best-merged"
    code, stderr = (_forked if fork else _spawned)(["merge", str(run_dir / "best.yml"), str(again), "--quiet",
                                                    "--force"], None, 300)  # fmt: skip
    assert code == 0, stderr
    ours, theirs = load_file(run_dir / "model" / "model.safetensors"), load_file(again / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def stored_records(extra: list[str]) -> list[dict] | None:
    """The records of the finished trials in the optuna study that `--storage URL --study NAME` name (None for the
    local store), as the run folder mirrors them."""
    if "--storage" not in extra:
        return None
    import optuna

    from dots_merge.tune.stores.optuna_rdb import RECORD_ATTR, WORKER_ATTR, _driver_url

    url, name = extra[extra.index("--storage") + 1], extra[extra.index("--study") + 1]
    study = optuna.load_study(study_name=name, storage=_driver_url(url))
    done = sorted((t for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE),
                  key=lambda t: t.number)  # fmt: skip
    return [{**t.user_attrs[RECORD_ATTR], "worker": t.user_attrs[WORKER_ATTR]["name"]} for t in done]


def main() -> None:
    """`python -m tests.fault_sweep RECIPE RUN_DIR BUDGET FAULTS_JSON [EXTRA...]`: one sweep and its final checks in
    this fresh interpreter, whose forked sessions then inherit no thread pool that a test already started (a child
    forked after OpenMP ran in its parent can hang). Prints the result as JSON; storage records come from EXTRA's
    --storage/--study when given."""
    recipe, run_dir, budget, faults_json, *extra = sys.argv[1:]
    result = sweep(Path(recipe), Path(run_dir), json.loads(faults_json), extra=extra, fork=True)
    check_final_state(Path(run_dir), int(budget), stored_records(extra), fork=True)
    print(json.dumps({"fired": result.fired, "missed": result.missed, "sessions": result.sessions}))


if __name__ == "__main__":
    main()
