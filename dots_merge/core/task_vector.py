"""Task vectors τ = θ_finetune − θ_base and their sparsified form S(τ), one tensor at a time (method.md §1–3).

Everything works on flat float32 tensors, in the chunks of `chunk_spans`, so that no function allocates more
than a chunk's worth of temporaries next to the tensors it is given.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from dots_merge.core.squares import square_units, units_to_float
from dots_merge.core.topk import (
    TopK,
    add_to_histogram_,
    chunk_spans,
    empty_histogram,
    keep_count,
    keep_mask,
    magnitude_bits,
    masked,
    select_topk,
)


class NonFiniteTaskVector(ValueError):
    """A task vector holds NaN or Inf; `model` names the fine-tune when the caller knows it."""

    def __init__(self, model: object = None):
        super().__init__("task vector holds NaN or Inf")
        self.model = model


def is_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite (chunked; no full-size bool mask)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[sl]).all()) for sl in chunk_spans(flat.numel(), flat.device))


def chunk_squared_norm(chunk: torch.Tensor) -> float:
    """Σ chunk² in float64 (one chunk: sums over a tensor add these per chunk of `chunk_spans`, in order)."""
    c = chunk.double()
    return float(torch.dot(c, c))


def squared_norm(t: torch.Tensor) -> float:
    """Σ t² accumulated in float64."""
    flat = t.reshape(-1)
    return sum((chunk_squared_norm(flat[sl]) for sl in chunk_spans(flat.numel(), flat.device)), 0.0)


def norm_ratio(squared_total: float, squared_kept: float) -> float:
    """‖τ‖₂ / ‖S(τ)‖₂, or 1.0 when nothing was kept."""
    if squared_kept <= 0.0:
        return 1.0
    return math.sqrt(squared_total / squared_kept)


def _tau_chunk(base: torch.Tensor, tuned: torch.Tensor, sl: slice, out: torch.Tensor) -> torch.Tensor:
    """τ[sl] = tuned[sl] − base[sl] in float32, written into `out` (a chunk-sized float32 tensor)."""
    out.copy_(tuned[sl])
    return out.sub_(base[sl].to(device=out.device, dtype=torch.float32))


@dataclass
class SparseTaskVector:
    """S(τ) for one tensor of one fine-tune, before λ and f; ‖τ‖² is a float64 sum of squares, ‖S(τ)‖² the
    exact sum rounded once (`dots_merge.core.squares`; ‖τ‖² itself when S keeps everything)."""

    values: torch.Tensor
    selection: TopK
    squared_norm: float
    squared_norm_kept: float


def sparse_task_vector(
    base: torch.Tensor,
    tuned: torch.Tensor,
    density: float,
    *,
    selection: TopK | None = None,
    out: torch.Tensor | None = None,
    check_finite: bool = True,
    norms: bool = True,
    kept_norm: bool = True,
) -> SparseTaskVector:
    """S(τ) of one tensor, materialised: τ in float32, exact top-k (or the given `selection`), zeros elsewhere.

    Fused: one pass makes τ, its norm and the first radix histogram; one more finds the threshold;
    one applies it. `out` (flat float32, numel of `base`) is reused as storage when given. With
    `norms=False` the norms are not computed (NaN); with `kept_norm=False` only ‖τ‖² is.
    """
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    b, t = base.reshape(-1), tuned.reshape(-1)
    n = b.numel()
    tau = torch.empty(n, dtype=torch.float32, device=tuned.device) if out is None else out
    k = keep_count(density, n) if selection is None else selection.k
    hist = empty_histogram(tau.device) if selection is None and k < n else None
    total = 0.0 if norms else math.nan
    for sl in chunk_spans(n, tau.device):
        chunk = _tau_chunk(b, t, sl, tau[sl])
        if norms:
            total += chunk_squared_norm(chunk)  # a non-finite entry makes the sum non-finite: it doubles as the check
        elif check_finite and not bool(torch.isfinite(chunk).all()):
            raise NonFiniteTaskVector()
        if hist is not None:
            add_to_histogram_(hist, chunk)
    if check_finite and norms and not math.isfinite(total):
        raise NonFiniteTaskVector()
    if selection is None:
        selection = select_topk(tau, k, high_histogram=hist) if hist is not None else TopK(k=n, numel=n)
    if selection.dense:
        return SparseTaskVector(tau, selection, total, total)
    exact = norms and kept_norm and math.isfinite(total)
    units, ties_left = 0, selection.ties
    for sl in chunk_spans(n, tau.device):
        chunk = tau[sl]
        keep, ties_left = keep_mask(magnitude_bits(chunk), selection, ties_left)
        if exact:  # exact over the kept entries: the compact store sums the same integer in its own grouping
            units += square_units(masked(chunk, keep))
        chunk.masked_fill_(keep.logical_not_(), 0.0)
    kept = units_to_float(units) if exact else (total if norms and kept_norm else math.nan)
    return SparseTaskVector(tau, selection, total, kept)


def sparse_chunks(
    base: torch.Tensor,
    tuned: torch.Tensor,
    selection: TopK,
    *,
    device: torch.device,
    check_finite: bool = True,
    model: object = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """S(τ) chunk by chunk for a known selection, with no task-vector-sized buffer: the same values, chunk for
    chunk, as `sparse_task_vector(...).values` (τ is formed and masked the same way)."""
    b, t = base.reshape(-1), tuned.reshape(-1)
    n = b.numel()
    if n != selection.numel:
        raise ValueError(f"selection is for {selection.numel} entries, tensor has {n}")
    ties_left = selection.ties
    buffer = None
    for sl in chunk_spans(n, device):
        if buffer is None:
            buffer = torch.empty(sl.stop - sl.start, dtype=torch.float32, device=device)
        chunk = _tau_chunk(b, t, sl, buffer[: sl.stop - sl.start])
        if check_finite and not bool(torch.isfinite(chunk).all()):
            raise NonFiniteTaskVector(model)
        if not selection.dense:
            keep, ties_left = keep_mask(magnitude_bits(chunk), selection, ties_left)
            chunk.masked_fill_(keep.logical_not_(), 0.0)
        yield sl, chunk
