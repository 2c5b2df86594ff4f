"""The trial loop: ask → write the trial's recipe → apply and score → tell. It knows nothing of where trials live.

What happens to a trial is the same for every store: a finished one is told; one that cannot be used (a
non-finite objective: `TrialFailed`) is recorded as failed and the run goes on; one whose evaluation raises
anything else is recorded as failed and the run stops with the error; one interrupted by Ctrl-C is put back, so that
`--resume` evaluates the same point first; one whose process died (kill -9) is put back by the store when it
notices. While the whole budget is taken by trials other processes run, the loop waits.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from dots_merge.errors import DotsMergeError
from dots_merge.faults import fault_point
from dots_merge.interrupts import raise_if_interrupted
from dots_merge.tune.stores.base import Trial, TrialStore

LOG = logging.getLogger(__name__)
Record = dict[str, Any]
MAX_FAILED_IN_A_ROW = 5


class TrialFailed(Exception):
    """The trial was evaluated but cannot be used (e.g. a non-finite objective): it is recorded as failed with this
    reason, and the run goes on with another point."""


def run_trials(
    store: TrialStore,
    *,
    write_recipe: Callable[[Trial], Any],
    evaluate: Callable[[Trial, Any], Record],
    on_record: Callable[[list[Record], Record], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Evaluate trials until the store holds its budget of finished ones; returns how many this process told."""
    told, failed_in_a_row = 0, 0
    while not store.done():
        fault_point("ask")
        trial = store.ask()
        if trial is None:  # other processes are running the last trials
            sleep(store.poll_interval())
            continue
        try:
            raise_if_interrupted()  # a signal whose KeyboardInterrupt a C extension swallowed
            recipe = write_recipe(trial)
            record = evaluate(trial, recipe)
            raise_if_interrupted()
        except KeyboardInterrupt:
            store.release(trial)
            raise
        except TrialFailed as exc:
            store.fail(trial, str(exc))
            LOG.warning("trial #%d failed and is not used: %s", trial.number, exc)
            failed_in_a_row += 1
            if failed_in_a_row >= MAX_FAILED_IN_A_ROW:
                raise DotsMergeError(f"{failed_in_a_row} trials in a row failed; the last: {exc}") from None
            continue
        except BaseException as exc:
            store.fail(trial, f"{type(exc).__name__}: {exc}")
            raise
        failed_in_a_row = 0
        record["retry_of"] = trial.retry_of
        if store.tell(trial, record):
            told += 1
            if on_record is not None:
                on_record(store.records(), record)
    return told
