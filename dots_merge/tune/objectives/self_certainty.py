"""Self-certainty (↑; Kang et al. 2025, arXiv 2502.18581): how far the model's next-token distribution p is
from uniform, KL(U ‖ p) = −(1/V)·Σ_j log(V·p_j), averaged over every generated token of a query's samples.

It needs the full distribution at each generated token, which the transformers engine has; an engine that
returns only the top logprobs cannot compute it exactly and must refuse it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dots_merge.tune.objectives.base import MAXIMIZE, Evidence, Objective, register


@register
class SelfCertainty(Objective):
    name = "self_certainty"
    direction = MAXIMIZE
    symbol = "↑"
    needs_certainty = True

    def per_query(self, evidence: Evidence) -> list[float]:
        out = []
        for group in evidence.completions:
            tokens = sum(c.tokens for c in group)
            total = sum(c.self_certainty * c.tokens for c in group if c.tokens)
            out.append(total / tokens if tokens else math.nan)
        return out

    def reference(self, values: Sequence[float]) -> float:
        return min(0.0, min(values))  # KL ≥ 0
