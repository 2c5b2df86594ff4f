"""Score one candidate: sample answers to the queries, extract them, take the NLL of the queries if an objective
needs it, and compute every objective and the samples' health."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dots_merge.recipe.tune_section import Generation
from dots_merge.tune.objectives.base import Evidence, Objective
from dots_merge.tune.objectives.health import sample_health


@dataclass
class Scores:
    """Every objective of one candidate on a query set, with what they were computed from."""

    values: dict[str, float]
    per_query: dict[str, list[float]]  # by the objective's record key
    answers: list[list[str | None]]
    health: dict[str, Any]
    seconds_generation: float
    seconds_perplexity: float


def prompts_of(queries: Sequence[str], suffix: str) -> list[str]:
    """The prompts sampled: each query followed by the suffix on its own line."""
    return [f"{q}\n{suffix}" if suffix else q for q in queries]


def score(
    engine,
    queries: Sequence[str],
    *,
    objectives: Sequence[Objective],
    suffix: str,
    extract: Callable[[str], str | None],
    equal: Callable[[str, str], bool],
    generation: Generation,
    seed: int,
    perplexity_over: str = "query",
    quiet: bool = True,
) -> Scores:
    """The objectives of the model `engine` holds on `queries` (prompt = query + suffix; perplexity over the bare
    queries)."""
    started = time.perf_counter()
    g = generation
    completions = engine.generate(
        prompts_of(queries, suffix),
        samples=g.samples,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        seed=seed,
        batch_size=g.batch_size,
        self_certainty=any(o.needs_certainty for o in objectives),
        quiet=quiet,
    )
    answers = [[extract(c.text) if c.finished else None for c in group] for group in completions]
    generated = time.perf_counter()
    nll = (
        engine.query_nll(queries, batch_size=g.batch_size, over=perplexity_over)
        if any(o.needs_nll for o in objectives)
        else []
    )
    evidence = Evidence(completions=completions, answers=answers, equal=equal, nll=nll)
    per_query = {o.per_query_key: o.per_query(evidence) for o in objectives}
    return Scores(
        values={o.name: o.aggregate(per_query[o.per_query_key]) for o in objectives},
        per_query=per_query,
        answers=answers,
        health=sample_health(completions, answers),
        seconds_generation=generated - started,
        seconds_perplexity=time.perf_counter() - generated,
    )


def nonfinite_reason(values: dict[str, float], dtype: object) -> str | None:
    """Why a candidate's objectives cannot be used (NaN or infinite), or None when they are all finite."""
    bad = {name: v for name, v in values.items() if not math.isfinite(v)}
    if not bad:
        return None
    name, value = next(iter(bad.items()))
    if str(dtype).endswith("float16") and "bfloat16" not in str(dtype):
        return f"{name} overflowed in float16 ({value}): use out_dtype bfloat16 or float32"
    if name == "perplexity":
        return f"perplexity is {value}: the candidate's logits are not finite"
    return f"{name} is {value}"
