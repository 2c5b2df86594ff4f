"""Answer self-consistency (↑, method.md §5): the share of a query's samples that give its most common answer."""

from __future__ import annotations

from collections.abc import Sequence

from dots_merge.tune.answers import consistency
from dots_merge.tune.objectives.base import MAXIMIZE, Evidence, Objective, register


@register
class Consistency(Objective):
    name = "consistency"
    direction = MAXIMIZE
    symbol = "↑"

    def per_query(self, evidence: Evidence) -> list[float]:
        return [consistency(answers, evidence.equal) for answers in evidence.answers]

    def reference(self, values: Sequence[float]) -> float:
        return 0.0  # no agreement at all
