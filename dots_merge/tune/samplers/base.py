"""The sampler interface: ask for a point, tell its two objectives; state is the history of told trials.

Every sampler is a function of (seed, history, skipped): `load` re-tells finished trials, so a resumed run asks
the same next point an uninterrupted run would have asked (the optuna sampler reseeds per ask); `skip` moves on
past a point whose evaluation failed.
Objective values are told as they are (e.g. consistency ↑, perplexity ↓); each sampler learns which way is better
from the `Objective`s it was made with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from scipy.stats import qmc

from dots_merge.tune.objectives import Objective, make_objectives

Objectives = tuple[float, ...]


class Tuner(ABC):
    """Ask/tell over a box of coefficients. The first asks return `initial`, then space-filling points."""

    name = "base"

    def __init__(
        self,
        bounds: Sequence[tuple[float, float]],
        *,
        seed: int,
        initial: Sequence[Sequence[float]] = (),
        objectives: Sequence[Objective] | None = None,
    ):
        self.bounds = [(float(lo), float(hi)) for lo, hi in bounds]
        self.objectives = list(objectives) if objectives is not None else make_objectives()
        self.seed = seed
        self.initial = [list(map(float, p)) for p in initial]
        self.history: list[tuple[list[float], Objectives]] = []
        self.skipped = 0  # points given out whose evaluation failed: the next ask moves past them

    @property
    def startup(self) -> int:
        """Space-filling trials after the initial points, before the model guides the search."""
        return max(3, len(self.bounds) + 1)

    def ask(self) -> list[float]:
        """The next point to evaluate."""
        k = len(self.history) + self.skipped
        if k < len(self.initial):
            return list(self.initial[k])
        if k < len(self.initial) + self.startup or len(self.history) < 2:  # a model needs points to fit
            return self._space_filling(k - len(self.initial))
        return self._guided(k)

    def tell(self, point: Sequence[float], objectives: Objectives) -> None:
        """Record a finished evaluation."""
        if len(objectives) != len(self.objectives):
            raise ValueError(f"told {len(objectives)} objective values, the sampler has {len(self.objectives)}")
        self.history.append((list(map(float, point)), tuple(float(v) for v in objectives)))

    def load(self, trials: Sequence[tuple[Sequence[float], Objectives]]) -> None:
        """Rebuild the state from finished trials (e.g. read back from trials.jsonl)."""
        self.history = []
        for point, objectives in trials:
            self.tell(point, objectives)

    def skip(self) -> None:
        """The last point asked was not evaluated (its evaluation failed): ask another one next."""
        self.skipped += 1

    def _space_filling(self, i: int) -> list[float]:
        sobol = qmc.Sobol(d=len(self.bounds), scramble=True, seed=self.seed)
        unit = sobol.random(1 << max(1, (i + 1).bit_length()))[i]
        return self._scale(unit)

    def _scale(self, unit: Sequence[float]) -> list[float]:
        return [lo + float(u) * (hi - lo) for u, (lo, hi) in zip(unit, self.bounds, strict=True)]

    def _rng(self, k: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, k])

    @abstractmethod
    def _guided(self, k: int) -> list[float]:
        """The model-guided point for the k-th trial."""
