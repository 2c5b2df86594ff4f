"""ParEGO on bayesian-optimization: a random augmented-Chebyshev scalarisation of the normalised
objectives per trial, maximised by a Gaussian-process Bayesian optimiser with expected improvement.

bayesian-optimization has no multi-objective mode; ParEGO (Knowles 2006) turns the two objectives into
one with fresh random weights each trial, so successive trials cover the whole Pareto front.
Each objective enters as its cost (perplexity as its logarithm, so one broken candidate does not flatten the
rest); with more than two objectives the weights are drawn from a flat Dirichlet over all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from dots_merge.tune.objectives import Objective, make_objectives
from dots_merge.tune.samplers.base import Tuner

RHO = 0.05  # augmentation of the Chebyshev scalarisation


def scalarise(values: list[tuple[float, ...]], weights: np.ndarray, objectives: Sequence[Objective] | None = None
              ) -> list[float]:  # fmt: skip
    """Augmented Chebyshev values (to minimise) of objective tuples (default: consistency, perplexity), each
    objective as its cost (`Objective.cost`) normalised to [0, 1]."""
    objectives = objectives or make_objectives()
    f = np.array([[o.cost(v) for o, v in zip(objectives, row, strict=True)] for row in values], dtype=float)
    lo, hi = f.min(0), f.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (f - lo) / span
    return list((z * weights).max(1) + RHO * (z * weights).sum(1))


class BayesTuner(Tuner):
    name = "bayes"

    def _guided(self, k: int) -> list[float]:
        from bayes_opt import BayesianOptimization, acquisition

        rng = self._rng(k)
        weights = rng.dirichlet([1.0] * len(self.objectives))
        values = scalarise([obj for _, obj in self.history], weights, self.objectives)
        state = int(rng.integers(2**31 - 1))
        optimizer = BayesianOptimization(
            f=None,
            pbounds={f"x{i}": b for i, b in enumerate(self.bounds)},
            acquisition_function=acquisition.ExpectedImprovement(xi=0.01, random_state=state),
            random_state=state,
            verbose=0,
            allow_duplicate_points=True,
        )
        for (point, _), value in zip(self.history, values, strict=True):
            optimizer.register(params={f"x{i}": v for i, v in enumerate(point)}, target=-value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            suggestion = optimizer.suggest()
        return [float(np.clip(suggestion[f"x{i}"], lo, hi)) for i, (lo, hi) in enumerate(self.bounds)]
