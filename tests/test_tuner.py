"""Tuner backends: initial points first, bounds respected, deterministic resume, better than chance."""

from __future__ import annotations

import math

import pytest

from dots_merge.tune.pareto import hypervolume
from dots_merge.tune.samplers import make_tuner
from dots_merge.tune.samplers.bayes import scalarise

BOUNDS = [(0.5, 2.0), (0.5, 2.0)]


def objective(x):
    """Consistency peaks at (1.4, 0.8); perplexity is lowest at (0.6, 1.5): a real trade-off."""
    return math.exp(-((x[0] - 1.4) ** 2 + (x[1] - 0.8) ** 2)), 2 + (x[0] - 0.6) ** 2 + (x[1] - 1.5) ** 2


def run(backend, n, seed=0):
    tuner = make_tuner(backend, BOUNDS, seed=seed, initial=[[1.0, 1.0], [2.0, 0.5]])
    for _ in range(n):
        x = tuner.ask()
        tuner.tell(x, objective(x))
    return tuner


@pytest.mark.parametrize("backend", ["bayes", "optuna", "random"])
def test_initial_points_bounds_and_resume(backend):
    tuner = run(backend, 12)
    points = [p for p, _ in tuner.history]
    assert points[:2] == [[1.0, 1.0], [2.0, 0.5]]
    assert all(lo <= v <= hi for p in points for v, (lo, hi) in zip(p, BOUNDS, strict=True))
    assert len({tuple(p) for p in points}) == len(points)
    resumed = make_tuner(backend, BOUNDS, seed=0, initial=[[1.0, 1.0], [2.0, 0.5]])
    resumed.load(tuner.history[:9])
    assert resumed.ask() == pytest.approx(points[9])
    assert len(resumed.history) == 9
    skipping = make_tuner(backend, BOUNDS, seed=0, initial=[[1.0, 1.0], [2.0, 0.5]])
    skipping.skip()  # the first initial point failed: the next ask moves on to the second
    assert skipping.ask() == [2.0, 0.5]


def test_bayes_beats_random_on_hypervolume():
    ref = (0.0, 6.0)
    hv = {
        b: sum(hypervolume([o for _, o in run(b, 20, s).history], ref) for s in range(2)) for b in ("bayes", "random")
    }
    assert hv["bayes"] > hv["random"]


def test_scalarisation_orders_by_weight():
    objs = [(0.9, 10.0), (0.1, 2.0)]
    only_consistency = scalarise(objs, __import__("numpy").array([1.0, 0.0]))
    only_perplexity = scalarise(objs, __import__("numpy").array([0.0, 1.0]))
    assert only_consistency[0] < only_consistency[1] and only_perplexity[1] < only_perplexity[0]
