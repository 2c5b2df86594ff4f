"""What makes two tuning runs the same run: checked by `--resume`, and by every process joining a shared study."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from dots_merge.checkpoints import Checkpoint
from dots_merge.recipe import Recipe

SCORING = 2  # how trials are scored; 2: per-query sampling seeds, query-only perplexity, truncated samples answerless
RESUMABLE_KEYS = ("trials", "pick", "validation")  # may change between a run and its resume (validation: read after the search only)


def _settings(recipe: Recipe) -> dict[str, Any]:
    data = json.loads(json.dumps(recipe.data))
    for key in RESUMABLE_KEYS:
        (data.get("tune") or {}).pop(key, None)
    return data


def fingerprints(checkpoints: Mapping[str, Checkpoint], queries: list[str]) -> dict[str, Any]:
    """Digests of each model's weights (by reference) and of the queries, computed once for both identities."""
    prompts = hashlib.sha256(json.dumps(queries).encode()).hexdigest()[:16]
    return {
        "weights": {ref: ckpt.content_digest()[:16] for ref, ckpt in checkpoints.items()},
        "queries": f"{len(queries)} prompts {prompts}",
    }


def run_identity(recipe: Recipe, prints: dict[str, Any], seed: int, backend: str) -> dict[str, Any]:
    """The recipe as written (minus what a resume may change), the `fingerprints` of the weights and queries,
    the seed, the backend and the scoring version: a resume is refused when any of them changed, even with the
    same paths (trials scored by an older dots-merge are not mixed with new ones)."""
    return {"recipe": _settings(recipe), **prints, "seed": seed, "backend": backend, "scoring": SCORING}


def portable_identity(recipe: Recipe, prints: dict[str, Any], seed: int, backend: str) -> dict[str, Any]:
    """The recipe with every model path replaced by the digest of its weights and the queries file by the digest
    of its prompts: the same on every machine that holds the same checkpoints and prompts, wherever they are."""
    names = {ref: f"<weights {d}>" for ref, d in prints["weights"].items()}

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return names.get(value, value) if isinstance(value, str) else value

    data = swap(_settings(recipe))
    if isinstance(data.get("tune"), dict):
        data["tune"]["queries"] = f"<{prints['queries']}>"
    return {"recipe": data, "seed": seed, "backend": backend, "scoring": SCORING}


def digest(identity: Mapping[str, Any]) -> str:
    """A short stable hash of an identity."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def first_difference(a: Any, b: Any, where: str = "") -> str:
    """The dotted path of the first place two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{where}[{i}]")
    return where or "(whole recipe)"
