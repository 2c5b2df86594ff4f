"""Perplexity of the queries (↓, method.md §5): exp of the mean over queries of each query's mean token NLL."""

from __future__ import annotations

import math
from collections.abc import Sequence

from dots_merge.tune.objectives.base import MINIMIZE, Evidence, Objective, register


def perplexity(nlls: Sequence[float]) -> float:
    """exp of the mean over queries of the per-query mean token NLL."""
    return math.exp(sum(nlls) / len(nlls))


@register
class Perplexity(Objective):
    name = "perplexity"
    direction = MINIMIZE
    symbol = "↓"
    needs_nll = True

    @property
    def per_query_key(self) -> str:
        return "per_query_nll"  # per query it is the NLL; the perplexity is exp of their mean

    def per_query(self, evidence: Evidence) -> list[float]:
        return list(evidence.nll)

    def aggregate(self, per_query: Sequence[float]) -> float:
        return perplexity(per_query)

    def cost(self, value: float) -> float:
        return math.log(max(value, 1e-12))  # one broken candidate must not flatten the others

    def reference(self, values: Sequence[float]) -> float:
        return 1.1 * max(values)
