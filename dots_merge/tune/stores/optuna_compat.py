"""Every use of optuna's private or experimental API, in one place, checked against the supported releases.

optuna has no public accessor for a trial's storage id (`Trial._trial_id`) nor for whether a trial has a heartbeat
(the RDB storage's `TrialHeartbeatModel`), and its heartbeat tools (`fail_stale_trials`,
`RetryHeartbeatStaleTrialCallback`) are marked experimental. A release may change any of
them: `check()` says which one and which releases this module was written for (`tests/test_compat.py` runs it).
"""

from __future__ import annotations

import importlib.metadata
import warnings
from typing import Any

SUPPORTED = ">=4.9,<6"  # as pinned in pyproject.toml
_STORAGE_METHODS = ("record_heartbeat", "get_heartbeat_stale_trial_callback", "set_trial_state_values", "get_trial")


class OptunaChanged(RuntimeError):
    """The installed optuna lacks a name dots-merge relies on."""


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def installed_version() -> str:
    return importlib.metadata.version("optuna")


def check() -> None:
    """Raise `OptunaChanged`, naming the supported releases, when a name used here is missing."""
    optuna = _optuna()
    where = f"dots-merge needs optuna{SUPPORTED} (installed: {installed_version()})"
    major, minor = (int(x) for x in installed_version().split(".")[:2])
    if not (4, 9) <= (major, minor) < (6, 0):
        raise OptunaChanged(f"{where}: this release is not supported")
    for name in ("fail_stale_trials", "RetryHeartbeatStaleTrialCallback", "RDBStorage"):
        if not hasattr(optuna.storages, name):
            raise OptunaChanged(f"{where}: optuna.storages.{name} is gone")
    for name in _STORAGE_METHODS:
        if not callable(getattr(optuna.storages.RDBStorage, name, None)):
            raise OptunaChanged(f"{where}: RDBStorage.{name} is gone")
    study = optuna.create_study(directions=["maximize", "minimize"])
    trial = study.ask()
    if not isinstance(getattr(trial, "_trial_id", None), int):
        raise OptunaChanged(f"{where}: Trial._trial_id is gone")
    try:
        from optuna.storages._rdb.models import TrialHeartbeatModel

        storage = optuna.storages.RDBStorage("sqlite:///:memory:")
        has_heartbeat(storage, 0)
    except (ImportError, AttributeError) as error:
        raise OptunaChanged(f"{where}: the heartbeat table is not where it was ({error})") from None
    if not callable(getattr(TrialHeartbeatModel, "where_trial_id", None)):
        raise OptunaChanged(f"{where}: TrialHeartbeatModel.where_trial_id is gone")


def trial_id(trial: Any) -> int:
    """The storage id of a trial (a `Trial` or a `FrozenTrial`)."""
    return trial._trial_id


def retry_callback(max_retry: int) -> Any:
    """optuna's callback that queues a stale trial's parameters again (at most `max_retry` times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked experimental
        return _optuna().storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def fail_stale_trials(study: Any) -> None:
    """Fail the running trials whose heartbeat is older than the storage's grace period (and run the callback)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # marked experimental
        _optuna().storages.fail_stale_trials(study)


def ask(study: Any, distributions: dict[str, Any]) -> Any:
    """`study.ask` on a storage with a heartbeat, outside `Study.optimize` (optuna warns; it works)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "heartbeat is supposed to be used with Study.optimize"
        return study.ask(distributions)


def has_heartbeat(storage: Any, trial_id: int) -> bool:
    """Whether the RDB storage holds a heartbeat for the trial (optuna's stale check skips trials without one)."""
    from optuna.storages._rdb.models import TrialHeartbeatModel

    session = storage.scoped_session()
    try:
        return TrialHeartbeatModel.where_trial_id(trial_id, session) is not None
    finally:
        storage.scoped_session.remove()
