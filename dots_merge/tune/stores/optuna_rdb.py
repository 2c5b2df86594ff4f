"""The optuna trial store: a study on an optuna RDB storage (RUN_DIR/study.db, or PostgreSQL shared by machines).

Every process — the main one and each `--worker` — asks a trial from the study, evaluates it and stores its
full record in the study. The study holds the budget (`--trials` of the main process):

- a claim is kept only while the finished, running and queued trials numbered up to it are within the budget,
  so concurrent claims never overrun it (a claim past it is closed as skipped and never evaluated);
- each running trial sends a heartbeat; one whose worker stops beating for two intervals is marked failed by
  whoever notices, and its coefficients are queued again as a new trial (a trial number is never reused);
  a worker found dead on this very machine (its process is gone) is failed at once, without waiting;
- the sampler is reseeded from the trial number, so concurrent workers do not propose the same point and a
  single process asks what it would have asked without the storage.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from dots_merge.errors import DotsMergeError, RunMismatchError
from dots_merge.faults import fault_point
from dots_merge.tune.identity import first_difference
from dots_merge.tune.objectives import Objective, make_objectives
from dots_merge.tune.samplers.optuna import distributions, import_optuna, sampler_factory
from dots_merge.tune.stores import optuna_compat
from dots_merge.tune.stores.base import Trial, TrialStore, objective_values

optuna = import_optuna()
from optuna.trial import TrialState  # noqa: E402  (after the friendly import check)

LOG = logging.getLogger(__name__)
IDENTITY_ATTR = "dots_merge.tune.identity"
BUDGET_ATTR = "dots_merge.trials"
RECORD_ATTR = "dots_merge.record"
WORKER_ATTR = "dots_merge.worker"
SKIPPED_ATTR = "dots_merge.skipped"
ERROR_ATTR = "dots_merge.error"
INTERRUPTED_ATTR = "dots_merge.interrupted"
RETRY_ATTR = "dots_merge.retry_of"  # on a trial queued again after an interrupt (stale ones: "failed_trial")
MAX_RETRY = 2  # a trial whose workers keep dying is given up after two retries; a fresh point takes its slot
JOIN_TIMEOUT = 600.0
_LIVE = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)


def default_storage(run_dir: Path) -> str:
    """The embedded storage: a SQLite file in the run folder."""
    return f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"


def redact(url: str) -> str:
    """The storage URL with its password hidden, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


@dataclass(frozen=True)
class WorkerId:
    """Who evaluated a trial; `namespace` tells whether a pid on this host can be checked from here."""

    name: str
    host: str
    pid: int
    namespace: str

    @classmethod
    def here(cls) -> WorkerId:
        host, pid = socket.gethostname(), os.getpid()
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:
            namespace = ""
        return cls(name=f"{host}:{pid}", host=host, pid=pid, namespace=namespace)

    def is_dead_local(self, other: dict[str, Any]) -> bool:
        """`other` ran on this host, in this pid namespace, and its process is gone."""
        if not self.namespace or other.get("host") != self.host or other.get("namespace") != self.namespace:
            return False
        pid = other.get("pid")
        if not isinstance(pid, int) or pid == self.pid:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class _Heartbeat(threading.Thread):
    def __init__(self, storage, trial_id: int, interval: float):
        super().__init__(daemon=True, name=f"heartbeat-{trial_id}")
        self._storage, self.trial_id, self._interval = storage, trial_id, interval
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self._interval):
            try:
                self._storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a storage hiccup must not kill the trial; the next beat may get through
                LOG.warning("heartbeat of trial %d not recorded: %s", self.trial_id, exc)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class _Running:
    """This process's handle on a trial it evaluates: optuna's trial and its heartbeat thread."""

    trial: Any
    heartbeat: _Heartbeat


def _seeded_per_trial(make_sampler, seed: int):
    class SeedPerTrial(optuna.samplers.BaseSampler):
        """Builds the inner sampler anew for each trial, seeded with seed + trial number."""

        def __init__(self):
            self._inner = make_sampler(seed)

        def before_trial(self, study, trial):
            self._inner = make_sampler(seed + trial.number)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self._inner.after_trial(study, trial, state, values)

    return SeedPerTrial()


def _driver_url(url: str) -> str:
    """`postgresql://` means psycopg 3 (the `distributed` extra), whichever default the installed SQLAlchemy has."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return url
    if parsed.drivername == "postgresql":
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return url


def _reason(exc) -> str:
    return str(exc.orig or exc).strip().splitlines()[0]


def _connect(url: str, heartbeat: int):
    import sqlalchemy

    shown, url = redact(url), _driver_url(url)
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        folder = Path(url[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DotsMergeError(f"--storage {shown}: cannot create {folder} ({exc.strerror})") from None
    retry = optuna_compat.retry_callback(MAX_RETRY)
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=2 * heartbeat,
                heartbeat_stale_trial_callback=retry,
            )
        except ImportError as exc:
            driver = f" {exc.name!r}" if getattr(exc, "name", None) else ""
            raise DotsMergeError(
                f"--storage {shown}: the database driver{driver} for this URL is not installed "
                "(for PostgreSQL: pip install 'dots-merge[distributed]')"
            ) from None
        except sqlalchemy.exc.ArgumentError as exc:
            raise DotsMergeError(f"--storage {shown}: not a database URL ({exc})") from None
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            if attempt == 4:  # another process is creating the tables at the same moment: try again
                raise DotsMergeError(f"--storage {shown}: cannot set the database up ({_reason(exc)})") from None
            time.sleep(0.5 * (attempt + 1))
        except sqlalchemy.exc.OperationalError as exc:
            if attempt == 4 or not url.startswith("sqlite"):  # SQLite: "database is locked" while set up
                raise DotsMergeError(f"--storage {shown}: cannot open the database ({_reason(exc)})") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


class OptunaStore(TrialStore):
    """Trials in an optuna RDB storage: one process (RUN_DIR/study.db) or all processes of a shared study."""

    def __init__(self, study, storage, *, bounds, seed: int, heartbeat: int, worker: WorkerId, mirror=None,
                 objectives: Sequence[Objective] | None = None):  # fmt: skip
        self.study, self.storage = study, storage
        self.objectives = list(objectives) if objectives is not None else make_objectives()
        self.heartbeat, self.identity = heartbeat, worker
        self.dims = len(bounds)
        self._dists = distributions(bounds)
        self._mirror = mirror
        study.sampler = _seeded_per_trial(sampler_factory("auto", len(bounds), parallel=True), seed)

    @classmethod
    def open(
        cls,
        url: str,
        name: str,
        *,
        identity: dict[str, Any],
        mode: str,
        bounds: list[tuple[float, float]],
        seed: int,
        heartbeat: int,
        budget: int | None = None,
        initial: list[list[float]] = (),
        join_timeout: float = JOIN_TIMEOUT,
        mirror: Callable[[list[dict[str, Any]]], None] | None = None,
        objectives: Sequence[Objective] | None = None,
    ) -> OptunaStore:
        """`mode` "create" starts a new study (refusing one that exists), "resume" continues one (starting it if
        the storage has none), "join" waits for the main process to start it. Every mode checks `identity`.
        `mirror` is called with every record after each finished trial (to write the run folder from them)."""
        if mode not in ("create", "resume", "join"):
            raise ValueError(mode)
        objectives = list(objectives) if objectives is not None else make_objectives()
        storage = _connect(url, heartbeat)
        where = f"study {name!r} in {redact(url)}"
        study = _load(storage, name)
        if study is not None and mode == "create":
            n = len(study.get_trials(deepcopy=False))
            raise DotsMergeError(
                f"{where} already exists ({n} trials): pass --resume to continue it, or --study NAME for a new one"
            )
        if mode == "join" and not _started(study):
            LOG.warning("waiting for %s: start `dots-merge tune` without --worker", where)
            deadline = time.monotonic() + join_timeout
            while not _started(study) and time.monotonic() < deadline:
                time.sleep(0.5)
                study = _load(storage, name)
            if not _started(study):
                raise DotsMergeError(f"{where}: not started within {join_timeout:.0f} s; start the main process")
        if study is None:
            try:
                study = optuna.create_study(
                    storage=storage, study_name=name, directions=[o.direction for o in objectives]
                )
            except optuna.exceptions.DuplicatedStudyError:
                raise DotsMergeError(f"{where} was just started by another process; pass --resume") from None
            for point in initial:
                study.enqueue_trial({f"x{i}": float(v) for i, v in enumerate(point)}, skip_if_exists=True)
            study.set_user_attr(BUDGET_ATTR, int(budget))
            study.set_user_attr(IDENTITY_ATTR, identity)  # last: a joining worker waits for it
        else:
            before = study.user_attrs.get(IDENTITY_ATTR)
            if before != identity:
                if before is None:
                    raise DotsMergeError(f"{where} was not made by dots-merge; use another --study")
                changed = first_difference(before, identity)
                raise RunMismatchError(
                    f"{where} was started from a different recipe, models, queries or settings ({changed} differs)"
                )
            if budget is not None:  # the main process resuming: its --trials is the budget from now on
                study.set_user_attr(BUDGET_ATTR, int(budget))
        return cls(
            study, storage, bounds=bounds, seed=seed, heartbeat=heartbeat, worker=WorkerId.here(), mirror=mirror,
            objectives=objectives,
        )  # fmt: skip

    @property
    def budget(self) -> int:
        return int(self.study.user_attrs[BUDGET_ATTR])

    @property
    def worker(self) -> str:
        return self.identity.name

    def finished(self) -> list[Any]:
        """The completed trials, by number."""
        return sorted(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)

    def records(self) -> list[dict[str, Any]]:
        """The record of every completed trial, with the worker that ran it."""
        out = []
        for t in self.finished():
            record = dict(t.user_attrs[RECORD_ATTR])
            record["worker"] = t.user_attrs.get(WORKER_ATTR, {}).get("name")
            out.append(record)
        return out

    def failed(self) -> dict[int, str]:
        return {
            t.number: t.user_attrs[ERROR_ATTR]
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            if ERROR_ATTR in t.user_attrs
        }

    def done(self) -> bool:
        return len(self.finished()) >= self.budget

    def poll_interval(self) -> float:
        return min(5.0, max(0.2, self.heartbeat / 2))

    def reap(self) -> list[int]:
        """Fail the trials whose worker is gone (stale heartbeat; no heartbeat at all once the grace period after
        the trial's start has passed; a dead process on this host) and queue them again; returns their numbers."""
        before = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        optuna_compat.fail_stale_trials(self.study)
        retry = self.storage.get_heartbeat_stale_trial_callback()
        now = datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = optuna_compat.trial_id(t)
            never_beat = (
                t.datetime_start is not None
                and (now - t.datetime_start).total_seconds() > 2 * self.heartbeat
                and not optuna_compat.has_heartbeat(self.storage, trial_id)
            )
            if never_beat or self.identity.is_dead_local(t.user_attrs.get(WORKER_ATTR) or {}):
                try:
                    if self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                        retry(self.study, self.storage.get_trial(trial_id))
                except optuna.exceptions.UpdateFinishedTrialError:
                    pass  # another process got there first
        after = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        gone = sorted(before - after - {t.number for t in self.finished()})
        for number in gone:
            LOG.warning("trial #%d: its worker stopped; its coefficients are queued again as a new trial", number)
        return gone

    def _live(self) -> list[Any]:
        return self.study.get_trials(deepcopy=False, states=_LIVE)

    def ask(self) -> Trial | None:
        """The next trial to evaluate, or None while the budget is fully taken by other trials."""
        self.reap()
        live = self._live()
        if len(live) >= self.budget and not any(t.state == TrialState.WAITING for t in live):
            return None
        trial = optuna_compat.ask(self.study, self._dists)
        trial_id = optuna_compat.trial_id(trial)
        self.storage.record_heartbeat(trial_id)
        heartbeat = _Heartbeat(self.storage, trial_id, self.heartbeat)
        heartbeat.start()
        trial.set_user_attr(WORKER_ATTR, asdict(self.identity))
        rank = sum(1 for t in self._live() if t.number <= trial.number)
        if rank > self.budget:
            heartbeat.stop()
            trial.set_user_attr(SKIPPED_ATTR, "over the budget")
            self.study.tell(trial, state=TrialState.FAIL)
            return None
        frozen = self.storage.get_trial(trial_id)
        point = [float(frozen.params[f"x{i}"]) for i in range(self.dims)]
        retry_of = frozen.system_attrs.get("failed_trial", frozen.user_attrs.get(RETRY_ATTR))
        return Trial(trial.number, point, retry_of, _Running(trial, heartbeat))

    def tell(self, trial: Trial, record: dict[str, Any]) -> bool:
        """Store the record and the objectives; False when another process gave the trial up meanwhile."""
        running = trial.handle
        try:
            running.trial.set_user_attr(RECORD_ATTR, record)
            fault_point("record")
            self.study.tell(running.trial, list(objective_values(record, self.objectives)))
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError, RuntimeError) as exc:
            LOG.warning("trial #%d was given up as stale by another worker; its result is dropped (%s)",
                        trial.number, exc)  # fmt: skip
            return False
        finally:
            running.heartbeat.stop()
        self.sync()
        return True

    def sync(self) -> None:
        """Write the run folder from the study (other processes may have finished trials since)."""
        if self._mirror is not None:
            self._mirror(self.records())

    def fail(self, trial: Trial, error: str) -> None:
        """Close a trial whose evaluation raised (not retried: the same coefficients would raise again)."""
        self._close(trial, ERROR_ATTR, error[:2000])

    def release(self, trial: Trial) -> None:
        """Close an interrupted trial and queue its point again, to be evaluated before any new point."""
        if self._close(trial, INTERRUPTED_ATTR, True):
            params = {f"x{i}": float(v) for i, v in enumerate(trial.point)}
            self.study.enqueue_trial(params, user_attrs={RETRY_ATTR: trial.number})

    def _close(self, trial: Trial, attr: str, value: Any) -> bool:
        running = trial.handle
        try:
            running.trial.set_user_attr(attr, value)
            self.study.tell(running.trial, state=TrialState.FAIL)
            return True
        except Exception as exc:
            LOG.warning("trial #%d could not be closed: %s", trial.number, exc)
            return False
        finally:
            running.heartbeat.stop()


def _started(study) -> bool:
    return study is not None and IDENTITY_ATTR in study.user_attrs


def _load(storage, name: str):
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
