"""Tuner backends behind one ask/tell interface; `make_tuner` picks one by name."""

from __future__ import annotations

from collections.abc import Sequence

from dots_merge.tune.objectives import Objective
from dots_merge.tune.samplers.base import Tuner


def make_tuner(
    backend: str,
    bounds: list[tuple[float, float]],
    *,
    seed: int,
    initial: list[list[float]],
    objectives: Sequence[Objective] | None = None,
) -> Tuner:
    """A fresh tuner of the named backend: bayes (default), optuna (extra) or random, for these objectives
    (default: consistency ↑, perplexity ↓)."""
    if backend == "bayes":
        from dots_merge.tune.samplers.bayes import BayesTuner

        return BayesTuner(bounds, seed=seed, initial=initial, objectives=objectives)
    if backend == "optuna":
        from dots_merge.tune.samplers.optuna import OptunaTuner

        return OptunaTuner(bounds, seed=seed, initial=initial, objectives=objectives)
    if backend == "random":
        from dots_merge.tune.samplers.random import RandomTuner

        return RandomTuner(bounds, seed=seed, initial=initial, objectives=objectives)
    raise ValueError(f"unknown tuner backend {backend!r}")


__all__ = ["Tuner", "make_tuner"]
