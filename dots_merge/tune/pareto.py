"""Pareto tools for any number of objectives, each maximised or minimised.

Pure functions on lists of objective tuples (the defaults: (consistency ↑, perplexity ↓)): the non-dominated set,
the hypervolume, and the rules that pick one point of the front automatically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from dots_merge.recipe.tune_section import DEFAULT_PICK, EXTREME_RULE

Point = Sequence[float]
MAX_MIN = ("maximize", "minimize")  # consistency ↑, perplexity ↓
DEFAULT_NAMES = ("consistency", "perplexity")


def _oriented(p: Point, directions: Sequence[str]) -> tuple[float, ...]:
    """The point with every objective turned into one to maximise."""
    return tuple(v if d == "maximize" else -v for v, d in zip(p, directions, strict=True))


def dominates(a: Point, b: Point, directions: Sequence[str] = MAX_MIN) -> bool:
    """a is at least as good as b in every objective and better in one."""
    x, y = _oriented(a, directions), _oriented(b, directions)
    return all(u >= v for u, v in zip(x, y, strict=True)) and any(u > v for u, v in zip(x, y, strict=True))


def front(points: Sequence[Point], directions: Sequence[str] = MAX_MIN) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point all stay), best first by the first
    objective, then the next."""
    idx = [i for i, p in enumerate(points) if not any(dominates(q, p, directions) for q in points)]
    return sorted(idx, key=lambda i: (tuple(-v for v in _oriented(points[i], directions)), i))


def _volume(points: list[tuple[float, ...]], ref: tuple[float, ...]) -> float:
    """Volume dominated by `points` (maximised, all better than `ref` in every coordinate) above `ref`:
    slices along the last coordinate, each the (d−1)-volume of the points reaching that high."""
    if not points:
        return 0.0
    if len(ref) == 1:
        return max(p[0] for p in points) - ref[0]
    ordered = sorted(points, key=lambda p: -p[-1])
    total = 0.0
    for i, p in enumerate(ordered):
        low = ordered[i + 1][-1] if i + 1 < len(ordered) else ref[-1]
        if p[-1] > low:
            total += (p[-1] - low) * _volume([q[:-1] for q in ordered[: i + 1]], ref[:-1])
    return total


def hypervolume(points: Sequence[Point], ref: Point, directions: Sequence[str] = MAX_MIN) -> float:
    """Volume of objective space dominated by `points` and bounded by the reference point `ref`."""
    r = _oriented(ref, directions)
    inside = [o for o in (_oriented(p, directions) for p in points) if all(u > v for u, v in zip(o, r, strict=True))]
    return _volume(inside, r)


KNEE_MIN = 0.05  # a bulge toward the ideal smaller than this (normalised) is no knee


def _normalised(points: Sequence[Point], directions: Sequence[str], resolution: Sequence[float] | None = None
                ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Every objective turned larger-is-better and scaled by its range over `points` — or by its `resolution`
    (the smallest difference worth acting on) when the range is smaller, so that differences within noise
    weigh little; and the ideal point in the same units."""
    x = np.array([_oriented(p, directions) for p in points], dtype=float)
    lo, hi = x.min(0), x.max(0)
    span = hi - lo if resolution is None else np.maximum(hi - lo, np.asarray(resolution, dtype=float))
    span = np.where(span > 0, span, 1.0)
    return (x - lo) / span, (hi - lo) / span


def knee_scores(
    points: Sequence[Point], directions: Sequence[str] = MAX_MIN, resolution: Sequence[float] | None = None
) -> list[float] | None:
    """Each point's signed distance from the hyperplane through the extremes (the best point in each objective),
    normalised, positive on the side of the ideal point; None when the extremes do not span a hyperplane (fewer
    distinct extremes than objectives) or no point bulges out toward the ideal by KNEE_MIN (a front with no
    knee)."""
    norm, ideal = _normalised(points, directions, resolution)
    dims = norm.shape[1]
    extremes = sorted({max(range(len(points)), key=lambda i: (norm[i, j], -i)) for j in range(dims)})
    if len(extremes) < dims or len(points) < dims + 1:
        return None
    anchor = norm[extremes[0]]
    edges = norm[extremes[1:]] - anchor
    _, singular, vt = np.linalg.svd(edges if len(edges) else np.zeros((1, dims)))
    if len(edges) and singular[-1] < 1e-12 * max(singular[0], 1.0):
        return None
    normal = vt[-1]
    if (ideal - anchor) @ normal < 0:  # point the normal toward the ideal point
        normal = -normal
    scores = [float((norm[i] - anchor) @ normal) for i in range(len(points))]
    return scores if max(scores) >= KNEE_MIN else None


def utopia_distances(
    points: Sequence[Point], directions: Sequence[str] = MAX_MIN, resolution: Sequence[float] | None = None
) -> list[float]:
    """Each point's distance from the ideal point (best in every objective), normalised."""
    norm, ideal = _normalised(points, directions, resolution)
    return [math.dist(row, ideal) for row in norm]


def rule_order(
    points: Sequence[Point],
    rule: str = DEFAULT_PICK,
    directions: Sequence[str] = MAX_MIN,
    names: Sequence[str] = DEFAULT_NAMES,
    resolution: Sequence[float] | None = None,
) -> list[int]:
    """The non-dominated points of `points`, best first by `rule` (see `pick`)."""
    if not points:
        raise ValueError("no points to pick from")
    nd = sorted(front(points, directions))
    extreme = EXTREME_RULE.fullmatch(rule)
    if extreme:
        if extreme.group(2) not in names:
            raise ValueError(f"pick rule {rule!r}: no objective {extreme.group(2)!r} (have {', '.join(names)})")
        j = list(names).index(extreme.group(2))
        sign = 1.0 if extreme.group(1) == "max" else -1.0
        return sorted(nd, key=lambda i: (-sign * points[i][j], tuple(-v for v in _oriented(points[i], directions)), i))
    if rule not in ("knee", "utopia"):
        raise ValueError(f"unknown pick rule {rule!r} (use knee, utopia, or max_/min_ an objective)")
    chosen = [points[i] for i in nd]
    if rule == "knee":
        scores = knee_scores(chosen, directions, resolution)
        if scores is not None:
            return [nd[j] for j in sorted(range(len(nd)), key=lambda j: (-scores[j], nd[j]))]
    distances = utopia_distances(chosen, directions, resolution)
    return [nd[j] for j in sorted(range(len(nd)), key=lambda j: (distances[j], nd[j]))]


def pick(
    points: Sequence[Point],
    rule: str = DEFAULT_PICK,
    directions: Sequence[str] = MAX_MIN,
    names: Sequence[str] = DEFAULT_NAMES,
    resolution: Sequence[float] | None = None,
) -> int:
    """Index of the point chosen by `rule` among the non-dominated points of `points`.

    Objectives are normalised by their range over the front, or by their `resolution` (the smallest difference
    worth acting on, per objective) where that is larger. utopia (the default): nearest to the ideal point.
    knee: the front point farthest from the hyperplane through the front's extremes (with two objectives, the
    line through the two ends); when the front has fewer points than objectives + 1, its extremes do not span a
    hyperplane or no point bulges out by KNEE_MIN, utopia. max_NAME / min_NAME: the best front point by that
    objective. Ties go to the lower index.
    """
    return rule_order(points, rule, directions, names, resolution)[0]
