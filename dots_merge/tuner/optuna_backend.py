"""Optuna's native multi-objective samplers: GPSampler up to 10 dimensions, TPE above (the `optuna` extra)."""

from __future__ import annotations

from dots_merge.errors import DotsMergeError
from dots_merge.tuner.base import Tuner


class OptunaTuner(Tuner):
    name = "optuna"

    def __init__(self, bounds, *, seed: int, initial=(), sampler: str = "auto"):
        super().__init__(bounds, seed=seed, initial=initial)
        if sampler not in ("auto", "gp", "tpe"):
            raise ValueError(f"unknown optuna sampler {sampler!r}")
        self.sampler = sampler
        try:
            import optuna
        except ImportError:
            raise DotsMergeError("backend optuna needs the optuna extra: pip install 'dots-merge[optuna]'") from None
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        self._optuna = optuna
        self._dists = {
            f"x{i}": optuna.distributions.FloatDistribution(lo, hi) for i, (lo, hi) in enumerate(self.bounds)
        }
        self._study = optuna.create_study(directions=["maximize", "minimize"])

    @property
    def startup(self) -> int:
        return 0  # optuna's samplers do their own start-up sampling

    def _sampler(self, k: int):
        samplers = self._optuna.samplers
        if self.sampler == "gp" or (self.sampler == "auto" and len(self.bounds) <= 10):
            return samplers.GPSampler(seed=self.seed + k, n_startup_trials=max(3, len(self.bounds) + 1))
        return samplers.TPESampler(seed=self.seed + k, multivariate=True)

    def _guided(self, k: int) -> list[float]:
        self._study.sampler = self._sampler(k)
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
                values=[float(objectives[0]), float(objectives[1])],
            )
        )

    def load(self, trials) -> None:
        self._study = self._optuna.create_study(directions=["maximize", "minimize"])
        super().load(trials)
