"""Optuna's native multi-objective samplers: GPSampler up to 10 dimensions, TPE above (the `optuna` extra).

`OptunaTuner` is the in-memory ask/tell form (benchmarks, the Python API); `dots-merge tune --backend optuna`
runs the same samplers on an optuna storage (`dots_merge.tune.stores.optuna_rdb`), where several processes share one study.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from dots_merge.errors import DotsMergeError
from dots_merge.tune.samplers.base import Tuner

SAMPLERS = ("auto", "gp", "tpe")


def import_optuna():
    """optuna, quiet, or one clear error naming the extra to install."""
    try:
        import optuna
    except ImportError:
        raise DotsMergeError("backend optuna needs the optuna extra: pip install 'dots-merge[optuna]'") from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def distributions(bounds: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """One float distribution per coefficient, named x0, x1, …"""
    optuna = import_optuna()
    return {f"x{i}": optuna.distributions.FloatDistribution(lo, hi) for i, (lo, hi) in enumerate(bounds)}


def sampler_factory(kind: str, dims: int, *, parallel: bool = False) -> Callable[[int], Any]:
    """seed → a fresh sampler: GP (with its own start-up trials) up to 10 dimensions, else multivariate TPE.
    With `parallel`, TPE imputes the trials other workers are still running (constant liar); the GP sampler
    always conditions on running trials."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown optuna sampler {kind!r}")
    samplers = import_optuna().samplers
    if kind == "gp" or (kind == "auto" and dims <= 10):
        return lambda seed: samplers.GPSampler(seed=seed, n_startup_trials=max(3, dims + 1))
    return lambda seed: samplers.TPESampler(seed=seed, multivariate=True, constant_liar=parallel)


class OptunaTuner(Tuner):
    name = "optuna"

    def __init__(self, bounds, *, seed: int, initial=(), objectives=None, sampler: str = "auto"):
        super().__init__(bounds, seed=seed, initial=initial, objectives=objectives)
        self.sampler = sampler
        self._optuna = import_optuna()
        self._make_sampler = sampler_factory(sampler, len(self.bounds))
        self._dists = distributions(self.bounds)
        self._study = self._optuna.create_study(directions=self.directions)

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def startup(self) -> int:
        return 0  # optuna's samplers do their own start-up sampling

    def _guided(self, k: int) -> list[float]:
        self._study.sampler = self._make_sampler(self.seed + k)
        trial = self._study.ask(self._dists)
        point = [trial.params[f"x{i}"] for i in range(len(self.bounds))]
        self._study.tell(trial, state=self._optuna.trial.TrialState.FAIL)  # told for real in `tell`
        return point

    def tell(self, point, objectives) -> None:
        super().tell(point, objectives)
        self._study.add_trial(
            self._optuna.trial.create_trial(
                params={f"x{i}": float(v) for i, v in enumerate(point)},
                distributions=self._dists,
                values=[float(v) for v in objectives],
            )
        )

    def load(self, trials) -> None:
        self._study = self._optuna.create_study(directions=self.directions)
        super().load(trials)
