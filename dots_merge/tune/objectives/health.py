"""Sample health: whether the samples behind the objectives mean anything, and the warnings that say when not.

Per query and overall: the share of samples that finished (stopped at an end-of-sequence token) and that were
truncated at `max_new_tokens`, the share with no extractable answer (a truncated sample has none), and the mean
completion length in tokens.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from dots_merge.tune.generation import Completion

TRUNCATED_LIMIT = 0.2  # warn above this share of samples cut at max_new_tokens
NO_ANSWER_LIMIT = 0.3  # warn above this share of samples without an answer


def _shares(completions: Sequence[Completion], answers: Sequence[str | None]) -> dict[str, float]:
    n = len(completions)
    finished = sum(c.finished for c in completions)
    return {
        "finished": finished / n,
        "truncated": (n - finished) / n,
        "no_answer": sum(a is None for a in answers) / n,
        "mean_tokens": sum(c.tokens for c in completions) / n,
    }


def sample_health(completions: list[list[Completion]], answers: list[list[str | None]]) -> dict[str, Any]:
    """Health overall (over every sample) and per query."""
    flat = [c for group in completions for c in group]
    flat_answers = [a for group in answers for a in group]
    return {
        **_shares(flat, flat_answers),
        "per_query": [_shares(c, a) for c, a in zip(completions, answers, strict=True)],
    }


def health_warnings(health: dict[str, Any], max_new_tokens: int) -> list[str]:
    """What is wrong with these samples, with the numbers, and what to change."""
    out = []
    if health["truncated"] > TRUNCATED_LIMIT:
        out.append(
            f"{health['truncated']:.0%} of samples hit max_new_tokens ({max_new_tokens} tokens) before an "
            "end-of-sequence token: raise `tune.generation.max_new_tokens` (a truncated sample has no answer)"
        )
    if health["no_answer"] > NO_ANSWER_LIMIT:
        out.append(
            f"{health['no_answer']:.0%} of samples have no extractable answer: check `tune.answer` and "
            "`tune.prompt_suffix` against a few completions (trials.jsonl holds them)"
        )
    return out


def consistency_noise(per_query: Sequence[float], samples: int) -> float:
    """Sampling noise (standard error) of a trial's mean consistency: each query's majority share c from
    `samples` draws varies by about √(c(1−c)/samples)."""
    if not per_query:
        return math.nan
    return math.sqrt(sum(c * (1 - c) / samples for c in per_query)) / len(per_query)


def resolutions(records: Sequence[dict[str, Any]], names: Sequence[str], samples: int) -> list[float]:
    """The smallest difference in each objective a pick should act on: consistency, twice its median sampling
    noise (the trials' own); every other objective 0 — perplexity and self-certainty are computed exactly for a
    candidate, so their range over the front decides, however small."""
    noise = [consistency_noise(r["per_query_consistency"], samples) for r in records if "per_query_consistency" in r]
    floor = 2 * statistics.median(noise) if noise else 0.0
    return [floor if name == "consistency" else 0.0 for name in names]


def spread_warning(records: Sequence[dict[str, Any]], samples: int) -> str | None:
    """A warning when consistency varies across trials by less than its own sampling noise (≥ 3 trials)."""
    usable = [r for r in records if "per_query_consistency" in r]
    if len(usable) < 3:
        return None
    values = [r["consistency"] for r in usable]
    spread = max(values) - min(values)
    noise = statistics.median(consistency_noise(r["per_query_consistency"], samples) for r in usable)
    if spread >= 2 * noise:
        return None
    hint = "too easy" if statistics.mean(values) > 0.5 else "too hard"
    return (
        f"consistency varies by {spread:.3f} across {len(usable)} trials, less than twice its sampling noise "
        f"(±{noise:.3f} per trial): the queries look {hint} to tell these candidates apart (mean consistency "
        f"{statistics.mean(values):.2f}); pick others (`dots-merge queries select`) or raise `samples`"
    )
