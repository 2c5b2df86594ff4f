"""The label-free objectives of a tune (method.md §5) and the health of the samples behind them.

`consistency` (↑) and `perplexity` (↓) are the paper's pair and the default; `self_certainty` (↑) may replace
or join them (`tune.objectives`). Adding one is a small class registered in `base.REGISTRY`.
"""

from dots_merge.tune.objectives import consistency as _consistency  # noqa: F401 (registers)
from dots_merge.tune.objectives import perplexity as _perplexity  # noqa: F401 (registers)
from dots_merge.tune.objectives import self_certainty as _self_certainty  # noqa: F401 (registers)
from dots_merge.tune.objectives.base import (
    DEFAULT_OBJECTIVES,
    MAXIMIZE,
    MINIMIZE,
    REGISTRY,
    Evidence,
    Objective,
    make_objectives,
    reference_point,
    register,
)
from dots_merge.tune.objectives.health import health_warnings, resolutions, sample_health, spread_warning
from dots_merge.tune.objectives.perplexity import perplexity
from dots_merge.tune.objectives.scoring import Scores, nonfinite_reason, prompts_of, score

__all__ = [
    "DEFAULT_OBJECTIVES",
    "MAXIMIZE",
    "MINIMIZE",
    "REGISTRY",
    "Evidence",
    "Objective",
    "Scores",
    "health_warnings",
    "make_objectives",
    "nonfinite_reason",
    "perplexity",
    "prompts_of",
    "reference_point",
    "register",
    "resolutions",
    "sample_health",
    "score",
    "spread_warning",
]
