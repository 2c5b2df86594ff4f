"""Two-objective Pareto tools: maximise consistency, minimise perplexity.

Pure functions on lists of (consistency, perplexity) pairs: the non-dominated set, the 2-D hypervolume,
and the rules that pick one point of the front automatically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dots_merge.recipe.tune_section import PICK_RULES

Point = tuple[float, float]  # (consistency ↑, perplexity ↓)


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good as b in both objectives and better in one."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


def front(points: Sequence[Point]) -> list[int]:
    """Indices of the non-dominated points (duplicates of a front point all stay), by consistency then perplexity."""
    idx = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(idx, key=lambda i: (-points[i][0], points[i][1], i))


def reference_point(points: Sequence[Point]) -> Point:
    """The hypervolume reference: consistency 0 and 10% above the worst perplexity seen."""
    return (0.0, 1.1 * max(p[1] for p in points))


def hypervolume(points: Sequence[Point], ref: Point) -> float:
    """Area dominated by `points` and bounded by `ref` (consistency ≥ ref[0], perplexity ≤ ref[1]).

    Sweep by perplexity, best first: each point adds the strip of consistency it improves on.
    """
    inside = sorted((p for p in points if p[0] > ref[0] and p[1] < ref[1]), key=lambda p: (p[1], -p[0]))
    area, best_c = 0.0, ref[0]
    for c, ppl in inside:
        if c > best_c:
            area += (c - best_c) * (ref[1] - ppl)
            best_c = c
    return area


def _normalised(points: Sequence[Point]) -> list[Point]:
    """Both objectives to [0, 1], larger is better."""
    cs, ps = [p[0] for p in points], [p[1] for p in points]
    c_lo, c_hi, p_lo, p_hi = min(cs), max(cs), min(ps), max(ps)
    c_span, p_span = (c_hi - c_lo) or 1.0, (p_hi - p_lo) or 1.0
    return [((c - c_lo) / c_span, (p_hi - p) / p_span) for c, p in points]


def pick(points: Sequence[Point], rule: str = "knee") -> int:
    """Index of the point chosen by `rule` among the non-dominated points of `points`.

    knee: the front point farthest from the line through the two extremes of the front (normalised);
    utopia: nearest to the ideal point (best consistency and best perplexity, normalised);
    max_consistency / min_perplexity: the extreme of the front. Ties go to the lower index.
    """
    if rule not in PICK_RULES:
        raise ValueError(f"unknown pick rule {rule!r} (use one of {', '.join(PICK_RULES)})")
    if not points:
        raise ValueError("no points to pick from")
    nd = sorted(front(points))
    if rule == "max_consistency":
        return min(nd, key=lambda i: (-points[i][0], points[i][1], i))
    if rule == "min_perplexity":
        return min(nd, key=lambda i: (points[i][1], -points[i][0], i))
    norm = _normalised([points[i] for i in nd])
    if rule == "utopia" or len(nd) < 3:
        return nd[min(range(len(nd)), key=lambda j: (math.dist(norm[j], (1.0, 1.0)), nd[j]))]
    a = max(range(len(nd)), key=lambda j: (norm[j][0], -j))  # best consistency
    b = max(range(len(nd)), key=lambda j: (norm[j][1], -j))  # best perplexity
    (x1, y1), (x2, y2) = norm[a], norm[b]
    length = math.hypot(x2 - x1, y2 - y1) or 1.0

    def distance(j: int) -> float:
        x0, y0 = norm[j]
        return abs((y2 - y1) * x0 - (x2 - x1) * y0 + x2 * y1 - y2 * x1) / length

    return nd[max(range(len(nd)), key=lambda j: (distance(j), -nd[j]))]
