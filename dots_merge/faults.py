"""Fault injection for the tests: `DOTS_MERGE_FAULTS` makes the process kill or interrupt itself at a named point.

    DOTS_MERGE_FAULTS="generate:3:kill,record:1:int"

kills the process (SIGKILL) the 3rd time it reaches `fault_point("generate")`, or sends it SIGINT the 1st time it
reaches `fault_point("record")`; `term` sends SIGTERM, `lost` sends SIGTERM and swallows the KeyboardInterrupt
it raises, as some C extensions do, and `sleepS` pauses the process for S seconds (to order two processes).
Points: load, prepass, ask (before each trial is asked for), generate, record, merge. Without the variable, a
point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time

_SIGNALS = {"kill": signal.SIGKILL, "int": signal.SIGINT, "term": signal.SIGTERM, "lost": signal.SIGTERM}
_plan: dict[str, tuple[int, str]] | None = None
_hits: dict[str, int] = {}


def _parse(text: str) -> dict[str, tuple[int, str]]:
    plan = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, hit, action = item.split(":")
        if action not in _SIGNALS and not _seconds(action):
            raise ValueError(f"DOTS_MERGE_FAULTS: unknown action {action!r} (use {', '.join(_SIGNALS)} or sleepS)")
        plan[name] = (int(hit), action)
    return plan


def fault_point(name: str) -> None:
    """Where a test may stop this process: does nothing unless `DOTS_MERGE_FAULTS` names this point."""
    global _plan
    if _plan is None:
        _plan = _parse(os.environ.get("DOTS_MERGE_FAULTS", ""))
    if name not in _plan:
        return
    _hits[name] = _hits.get(name, 0) + 1
    hit, action = _plan[name]
    if _hits[name] != hit:
        return
    if _seconds(action):
        time.sleep(_seconds(action))
        return
    if action != "lost":
        os.kill(os.getpid(), _SIGNALS[action])
        return
    try:  # SIGTERM whose KeyboardInterrupt is swallowed, as some C extensions do (scipy's Sobol set-up)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    except KeyboardInterrupt:
        pass


def _seconds(action: str) -> float:
    """S of a `sleepS` action, else 0."""
    try:
        return float(action.removeprefix("sleep")) if action.startswith("sleep") else 0.0
    except ValueError:
        return 0.0


def reset() -> None:
    """Read `DOTS_MERGE_FAULTS` again at the next point, with no hits counted (a forked child starting afresh)."""
    global _plan
    _plan = None
    _hits.clear()
