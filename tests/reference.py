"""An independent float64 implementation of the DoTS formula (sort-based top-k), for the tests."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors model folder, single-file or sharded."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        state = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(folder / shard))
        return state
    return load_file(folder / "model.safetensors")


def sparsify64(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep exactly k = floor(density·n) largest |τ| (ties: lowest flat index), dense when k < 1."""
    flat = tau.reshape(-1)
    n = flat.numel()
    k = math.floor(Fraction(repr(density)) * n)
    if k < 1 or k >= n:
        return tau.clone()
    order = torch.sort(-flat.abs(), stable=True).indices
    out = torch.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(tau.shape)


def reference_merge(
    base: Path,
    models: list[tuple[Path, Callable[[str], float], Callable[[str], float]]],
    rescale: str = "global",
) -> dict[str, torch.Tensor]:
    """θ_base + Σ λ·f·S(τ) in float64; `models` holds (folder, weight_of(name), density_of(name))."""
    base_state = load_state(base)
    names = [n for n, t in base_state.items() if t.is_floating_point()]
    parts = []
    for folder, weight_of, density_of in models:
        state = load_state(folder)
        taus = {n: (state[n].double() - base_state[n].double()).float().double() for n in names}
        sparse = {n: sparsify64(taus[n], density_of(n)) for n in names}
        if rescale == "global":
            total = sum(float((t * t).sum()) for t in taus.values())
            kept = sum(float((s * s).sum()) for s in sparse.values())
            factors = dict.fromkeys(names, math.sqrt(total / kept) if kept else 1.0)
        elif rescale == "tensor":
            factors = {}
            for n in names:
                kept = float((sparse[n] ** 2).sum())
                factors[n] = math.sqrt(float((taus[n] ** 2).sum()) / kept) if kept else 1.0
        else:
            factors = dict.fromkeys(names, 1.0)
        parts.append((sparse, factors, weight_of))
    out = {}
    for n in names:
        acc = base_state[n].double().clone()
        for sparse, factors, weight_of in parts:
            acc += weight_of(n) * factors[n] * sparse[n]
        out[n] = acc
    return out
