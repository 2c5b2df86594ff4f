"""Label-free, difficulty-aware choice of the tuning queries (method.md §6).

Each sparsified task vector is applied alone (its λ = 1, the others 0) and answers every prompt of a pool
`samples` times; a prompt's difficulty is 1 − the mean consistency over the fine-tunes. Prompts harder than
`max_difficulty` are dropped (nobody answers them consistently), the rest are split at the median and the
same number is drawn from the easy and the hard half.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tqdm

from dots_merge.errors import DotsMergeError

LOG = logging.getLogger(__name__)


def choose(
    difficulties: Sequence[float], n: int, *, seed: int = 0, max_difficulty: float = 0.8
) -> list[tuple[int, str]]:
    """(index, "easy"|"hard") of the chosen prompts: drop the too hard, split at the median, draw evenly."""
    kept = sorted((d, i) for i, d in enumerate(difficulties) if d <= max_difficulty)
    if len(kept) < n:
        raise DotsMergeError(
            f"only {len(kept)} prompts of the pool have difficulty ≤ {max_difficulty}; need {n} "
            "(give a larger pool or a smaller --n)"
        )
    half = len(kept) // 2
    easy, hard = [i for _, i in kept[:half]], [i for _, i in kept[half:]]
    rng = random.Random(seed)
    want_easy = min(n // 2, len(easy))
    want_hard = min(n - want_easy, len(hard))
    want_easy = n - want_hard
    chosen = [(i, "easy") for i in rng.sample(easy, want_easy)] + [(i, "hard") for i in rng.sample(hard, want_hard)]
    return sorted(chosen)


def select_queries(
    recipe,
    pool: str | os.PathLike,
    n: int,
    out: str | os.PathLike,
    *,
    samples: int = 5,
    seed: int = 0,
    max_difficulty: float = 0.8,
    device: str = "auto",
    engine: str | None = None,
    quiet: bool = True,
    trust_remote_code: bool = False,
) -> list[dict[str, Any]]:
    """Score every pool prompt with each fine-tune alone, choose `n`, write them as JSONL to `out`."""
    from dots_merge.fileio import write_atomic
    from dots_merge.merge.driver import as_recipe, inspect_models, resolve_device
    from dots_merge.recipe import model_entries, model_name
    from dots_merge.recipe.tune_section import (
        DEFAULT_SUFFIX,
        Dimension,
        Generation,
        check_engine,
        parse_tune,
        read_queries,
        trial_recipe,
    )
    from dots_merge.tune.answers import answer_comparator, make_extractor
    from dots_merge.tune.candidate import ResidentCandidate
    from dots_merge.tune.generation import load_tokenizer, require_tokenizer
    from dots_merge.tune.objectives import health_warnings, make_objectives, prompts_of, score
    from dots_merge.tune.plan import batch_for, longest_prompt, vllm_step_tokens

    if n < 1:
        raise DotsMergeError(f"--n: must be at least 1, got {n}")
    if samples < 2:
        raise DotsMergeError(f"--samples: must be at least 2 (one sample always agrees with itself), got {samples}")
    recipe = as_recipe(recipe)
    prompts = read_queries(str(Path(pool).resolve()), f"--pool {pool}", Path.cwd())
    if len(prompts) < n:
        raise DotsMergeError(f"{pool}: {len(prompts)} prompts, fewer than --n {n}")
    spec = parse_tune(recipe, load_queries=False) if recipe.tune else None
    generation = spec.generation if spec else Generation()
    if engine is not None:
        check_engine(engine, where="--engine")
        generation = dataclasses.replace(generation, engine=engine)
    device = resolve_device(device)
    checkpoints = inspect_models(recipe)
    require_tokenizer(next(iter(checkpoints.values())))
    base = model_name(recipe.data["base_model"])
    finetunes = [m for m in dict.fromkeys(model_name(e["model"]) for e in model_entries(recipe.data)) if m != base]
    tokenizer = load_tokenizer(next(iter(checkpoints.values())).path, trust_remote_code=trust_remote_code)
    suffix = spec.prompt_suffix if spec else DEFAULT_SUFFIX
    longest = longest_prompt(tokenizer, prompts_of(prompts, suffix))
    if generation.batch_size == "auto":
        batch = batch_for(recipe, checkpoints, samples=samples, max_new_tokens=generation.max_new_tokens,
                          prompt_tokens=longest, queries=len(prompts), device=device)  # fmt: skip
        generation = dataclasses.replace(generation, batch_size=batch)
    candidate = ResidentCandidate(recipe, checkpoints, device=device, generation=generation, tokenizer=tokenizer,
                                  settings={"max_model_len": longest + generation.max_new_tokens,
                                            "max_num_seqs": int(generation.batch_size) * samples,
                                            "max_num_batched_tokens": vllm_step_tokens(
                                                int(generation.batch_size) * samples, longest)},
                                  quiet=quiet, trust_remote_code=trust_remote_code)  # fmt: skip
    extract = make_extractor(spec.answer if spec else "auto")
    _, equal = answer_comparator(spec.compare if spec else "auto")
    space = [Dimension(m, "weight", 0.0, 1.0) for m in finetunes]
    per_model: dict[str, list[float]] = {}
    progress = tqdm.tqdm(total=len(prompts) * len(finetunes), desc="Scoring the pool", unit="prompt",
                         disable=True if quiet else None)  # fmt: skip
    try:
        for model in finetunes:
            progress.set_postfix_str(Path(model).name or model)
            alone = trial_recipe(recipe, space, [1.0 if m == model else 0.0 for m in finetunes])
            candidate.apply(alone)
            scores = score(
                candidate.engine,
                prompts,
                objectives=make_objectives(["consistency"]),
                suffix=suffix,
                extract=extract,
                equal=equal,
                generation=dataclasses.replace(generation, samples=samples),
                seed=seed,
                quiet=quiet,
            )
            per_model[model] = scores.per_query["per_query_consistency"]
            for warning in health_warnings(scores.health, generation.max_new_tokens):
                LOG.warning("scoring the pool with %s: %s", Path(model).name or model, warning)
            progress.update(len(prompts))
    finally:
        candidate.close()
    progress.close()
    difficulty = [1.0 - sum(per_model[m][i] for m in finetunes) / len(finetunes) for i in range(len(prompts))]
    rows = [
        {
            "prompt": prompts[i],
            "difficulty": difficulty[i],
            "split": split,
            "consistency": {m: per_model[m][i] for m in finetunes},
        }
        for i, split in choose(difficulty, n, seed=seed, max_difficulty=max_difficulty)
    ]
    write_atomic(Path(out), "".join(json.dumps(r) + "\n" for r in rows))
    return rows
