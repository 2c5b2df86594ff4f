"""The trial store interface: where a tune's trials live, and which point comes next.

A store hands out trials (`ask`), keeps their records (`tell`), and knows what became of every trial it handed
out: finished, failed (the evaluation raised: recorded with its error, not retried), or put back (interrupted:
the same point is handed out again, under a new number, before any new point). The trial loop
(`dots_merge.tune.loop`) knows nothing else about a store; the same loop runs over the local run folder and over
an optuna storage shared by many processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dots_merge.tune.objectives import Objective


def objective_values(record: dict[str, Any], objectives: Sequence[Objective]) -> tuple[float, ...]:
    """The record's value of each objective, in order (a record keeps each under the objective's name)."""
    return tuple(float(record[o.name]) for o in objectives)


@dataclass
class Trial:
    """A trial handed out by a store: its number (never reused), its point, and the trial it retries."""

    number: int
    point: list[float]
    retry_of: int | None = None
    handle: Any = None  # the store's own state of the trial


class TrialStore(ABC):
    """Where trials live. Records are dicts with at least number, point and a value per objective (by
    its name)."""

    @property
    @abstractmethod
    def budget(self) -> int:
        """How many finished trials the run wants."""

    @abstractmethod
    def records(self) -> list[dict[str, Any]]:
        """The record of every finished trial, by number."""

    @abstractmethod
    def failed(self) -> dict[int, str]:
        """The error of every trial whose evaluation raised, by number."""

    def done(self) -> bool:
        """True once the budget of finished trials is reached."""
        return len(self.records()) >= self.budget

    @abstractmethod
    def ask(self) -> Trial | None:
        """The next trial to evaluate: a put-back point first, else the sampler's. None while the whole budget is
        taken by trials that other processes are running (wait `poll_interval()` and ask again)."""

    @abstractmethod
    def tell(self, trial: Trial, record: dict[str, Any]) -> bool:
        """Keep the record of a finished trial; False when the trial was given up meanwhile (result dropped)."""

    @abstractmethod
    def fail(self, trial: Trial, error: str) -> None:
        """The evaluation raised: record the trial as failed with `error`; its point is not tried again."""

    @abstractmethod
    def release(self, trial: Trial) -> None:
        """The evaluation was interrupted (Ctrl-C, SIGTERM): put the point back, to be evaluated first next time."""

    def sync(self) -> None:  # noqa: B027  (most stores have nothing to bring up to date)
        """Bring any copy of the store's records (e.g. a run folder mirroring a shared study) up to date."""

    def poll_interval(self) -> float:
        """Seconds to wait when `ask` returns None."""
        return 1.0

    @property
    def worker(self) -> str:
        """A name for this process among those sharing the store."""
        return "local"
