"""The two label-free objectives of DoTS (method.md §5): answer self-consistency and query perplexity."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dots_merge.recipe.tune_section import Generation
from dots_merge.tune.answers import consistency
from dots_merge.tune.generation import generate_answers, query_nll


def perplexity(nlls: Sequence[float]) -> float:
    """exp of the mean over queries of the per-query mean token NLL."""
    return math.exp(sum(nlls) / len(nlls))


def nonfinite_reason(consistency: float, perplexity: float, dtype: object) -> str | None:
    """Why a candidate's objectives cannot be used (NaN or infinite), or None when they are finite."""
    if math.isfinite(consistency) and math.isfinite(perplexity):
        return None
    if str(dtype).endswith("float16") and "bfloat16" not in str(dtype):
        return f"perplexity overflowed in float16 ({perplexity}): use out_dtype bfloat16 or float32"
    if not math.isfinite(perplexity):
        return f"perplexity is {perplexity}: the candidate's logits are not finite"
    return f"consistency is {consistency}"


@dataclass
class Scores:
    """Both objectives of one candidate on a query set, with what they were computed from."""

    consistency: float
    perplexity: float
    per_query_consistency: list[float]
    per_query_nll: list[float]
    answers: list[list[str | None]]
    seconds_generation: float
    seconds_perplexity: float


def score(
    model,
    tokenizer,
    queries: Sequence[str],
    *,
    suffix: str,
    extract: Callable[[str], str | None],
    equal: Callable[[str, str], bool],
    generation: Generation,
    seed: int,
    with_perplexity: bool = True,
    quiet: bool = True,
) -> Scores:
    """Consistency of `samples` answers per query (prompt = query + suffix) and perplexity of the bare queries."""
    started = time.perf_counter()
    prompts = [f"{q}\n{suffix}" if suffix else q for q in queries]
    g = generation
    completions = generate_answers(
        model,
        tokenizer,
        prompts,
        samples=g.samples,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        seed=seed,
        batch_size=g.batch_size,
        quiet=quiet,
    )
    answers = [[extract(text) for text in texts] for texts in completions]
    per_query = [consistency(a, equal) for a in answers]
    generated = time.perf_counter()
    nlls = query_nll(model, tokenizer, queries, batch_size=g.batch_size) if with_perplexity else []
    return Scores(
        consistency=sum(per_query) / len(per_query),
        perplexity=perplexity(nlls) if nlls else math.nan,
        per_query_consistency=per_query,
        per_query_nll=nlls,
        answers=answers,
        seconds_generation=generated - started,
        seconds_perplexity=time.perf_counter() - generated,
    )
