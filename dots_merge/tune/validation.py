"""Optional few-label validation (`tune.validation`): after the search, score front points on a handful of labeled
problems, to see whether the label-free objectives can be trusted on this task and, with `pick: validation`, to
choose among the front points by accuracy.

Labels are read here only, after the search: they never reach a trial's objectives or the sampler.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dots_merge.fileio import write_atomic
from dots_merge.recipe.tune_section import TuneSpec, ValidationSet
from dots_merge.tune.answers import majority_answer, normalize_answer
from dots_merge.tune.objectives import prompts_of

VALIDATION_FILE = "validation.json"


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); None with fewer than 3 points or a constant side."""
    if len(x) != len(y) or len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def accuracy(
    engine,
    validation: ValidationSet,
    spec: TuneSpec,
    *,
    extract: Callable[[str], str | None],
    equal: Callable[[str, str], bool],
    quiet: bool = True,
) -> dict[str, float]:
    """Accuracy on the labeled problems of the majority answer of the tune's samples (same sampling settings and
    seed as the search) and of greedy decoding."""
    g = spec.generation
    prompts = prompts_of(validation.prompts, spec.prompt_suffix)
    settings = dict(max_new_tokens=g.max_new_tokens, seed=spec.seed, batch_size=g.batch_size, quiet=quiet)
    sampled = engine.generate(prompts, samples=g.samples, temperature=g.temperature, top_p=g.top_p,
                       **settings)  # fmt: skip
    greedy = engine.generate(prompts, samples=1, temperature=0.0, top_p=1.0, **settings)

    def right(answer: str | None, label: str) -> bool:
        got, wanted = normalize_answer(answer), normalize_answer(label)
        return got is not None and wanted is not None and equal(got, wanted)

    majority = [
        majority_answer([extract(c.text) if c.finished else None for c in group], equal) for group in sampled
    ]
    first = [extract(group[0].text) if group[0].finished else None for group in greedy]
    n = len(validation.labels)
    return {
        "majority": sum(right(a, y) for a, y in zip(majority, validation.labels, strict=True)) / n,
        "greedy": sum(right(a, y) for a, y in zip(first, validation.labels, strict=True)) / n,
    }


def load_scored(run_dir: Path, validation: ValidationSet) -> dict[int, dict[str, float]]:
    """Validation accuracies already computed in this run folder for this labeled set, by trial number."""
    path = Path(run_dir) / VALIDATION_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if data.get("digest") != validation.digest:
        return {}
    return {int(k): v for k, v in data.get("scored", {}).items()}


def save_scored(run_dir: Path, validation: ValidationSet, scored: Mapping[int, dict[str, float]]) -> None:
    """Keep the accuracies computed so far (a crash or Ctrl-C during validation redoes only what is missing)."""
    data = {
        "file": str(validation.path),
        "digest": validation.digest,
        "items": len(validation.labels),
        "scored": {str(k): scored[k] for k in sorted(scored)},
    }
    write_atomic(Path(run_dir) / VALIDATION_FILE, json.dumps(data, indent=2) + "\n")


def correlations(records: Sequence[dict[str, Any]], scored: Mapping[int, dict[str, float]], names: Sequence[str]
                 ) -> dict[str, float | None]:  # fmt: skip
    """Spearman's ρ between each label-free objective and the majority validation accuracy, over scored trials."""
    rows = [r for r in records if r["number"] in scored]
    accuracy_values = [scored[r["number"]]["majority"] for r in rows]
    return {name: spearman([r[name] for r in rows], accuracy_values) for name in names}
