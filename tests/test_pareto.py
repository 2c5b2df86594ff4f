"""Pareto front, hypervolume and the pick rules on hand-made fronts."""

from __future__ import annotations

import pytest

from dots_merge.tune.objectives import make_objectives, reference_point
from dots_merge.tune.pareto import dominates, front, hypervolume, pick


def test_front_and_domination():
    pts = [(0.5, 3.0), (0.9, 5.0), (0.4, 4.0), (0.9, 6.0), (0.7, 3.5), (0.5, 3.0)]
    assert dominates((0.5, 3.0), (0.4, 4.0)) and not dominates((0.5, 3.0), (0.5, 3.0))
    assert front(pts) == [1, 4, 0, 5]


def test_hypervolume_by_hand():
    assert hypervolume([(0.5, 3.0), (0.9, 5.0)], (0.0, 10.0)) == pytest.approx(0.5 * 7 + 0.4 * 5)
    assert hypervolume([(0.5, 3.0), (0.9, 5.0), (0.4, 4.0)], (0.0, 10.0)) == pytest.approx(5.5)
    assert hypervolume([(0.5, 12.0)], (0.0, 10.0)) == 0.0
    assert hypervolume([], (0.0, 10.0)) == 0.0
    assert reference_point([(0.5, 3.0), (0.2, 10.0)], make_objectives()) == (0.0, 11.0)


def test_knee_is_the_point_farthest_from_the_extremes_line():
    # extremes (1.0, 10) and (0.0, 1); the knee (0.9, 2) bulges out, (0.5, 5.5) lies on the line
    pts = [(1.0, 10.0), (0.0, 1.0), (0.9, 2.0), (0.5, 5.5)]
    assert pick(pts, "knee") == 2
    assert pick(pts, "max_consistency") == 0
    assert pick(pts, "min_perplexity") == 1
    assert pick(pts, "utopia") == 2


def test_pick_ignores_dominated_points_and_small_fronts():
    pts = [(0.2, 9.0), (0.8, 2.0), (0.1, 20.0)]
    for rule in ("knee", "utopia", "max_consistency", "min_perplexity"):
        assert pick(pts, rule) == 1
    with pytest.raises(ValueError):
        pick(pts, "best")


def test_a_consistency_wiggle_within_its_sampling_noise_does_not_decide_the_pick():
    from dots_merge.tune.objectives import resolutions

    # a front where consistency moves by 0.01 (within its sampling noise) and perplexity by 2 %: normalised by
    # range alone, the middle point is nearest the ideal; with consistency's resolution, perplexity decides
    points = [(0.930, 5.54), (0.935, 5.58), (0.940, 5.65)]
    assert pick(points) == pick(points, "utopia") == 1
    records = [{"consistency": c, "perplexity": p, "per_query_consistency": [1.0] * 12 + [0.86] * 4} for c, p in points]
    resolution = resolutions(records, ["consistency", "perplexity"], samples=7)
    assert 0.01 < resolution[0] < 0.06 and resolution[1] == 0.0  # twice the trials' sampling noise; perplexity exact
    assert pick(points, resolution=resolution) == 0
    # when both objectives move well beyond their resolutions, the resolutions change nothing
    wide = [(0.5, 10.0), (0.8, 12.0), (0.9, 30.0)]
    assert pick(wide, resolution=resolution) == pick(wide) == 1
    assert pick(wide, "knee", resolution=resolution) == pick(wide, "knee") == 1
    assert resolutions(records, ["self_certainty"], samples=7) == [0.0]
