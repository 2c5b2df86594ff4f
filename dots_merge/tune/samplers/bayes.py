"""ParEGO on bayesian-optimization: a random augmented-Chebyshev scalarisation of the normalised
objectives per trial, maximised by a Gaussian-process Bayesian optimiser with expected improvement.

bayesian-optimization has no multi-objective mode; ParEGO (Knowles 2006) turns the two objectives into
one with a fresh random weight each trial, so successive trials cover the whole Pareto front.
Perplexity enters as its logarithm, so one broken candidate does not flatten the rest.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from dots_merge.tune.samplers.base import Tuner

RHO = 0.05  # augmentation of the Chebyshev scalarisation


def scalarise(objectives: list[tuple[float, float]], weights: np.ndarray) -> list[float]:
    """Augmented Chebyshev values (to minimise) of (consistency, perplexity) pairs, normalised to [0, 1]."""
    f = np.array([[-c, math.log(max(p, 1e-12))] for c, p in objectives], dtype=float)
    lo, hi = f.min(0), f.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    z = (f - lo) / span
    return list((z * weights).max(1) + RHO * (z * weights).sum(1))


class BayesTuner(Tuner):
    name = "bayes"

    def _guided(self, k: int) -> list[float]:
        from bayes_opt import BayesianOptimization, acquisition

        rng = self._rng(k)
        weights = rng.dirichlet([1.0, 1.0])
        values = scalarise([obj for _, obj in self.history], weights)
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
