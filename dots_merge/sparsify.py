"""Pure tensor math of DoTS: task vectors, exact magnitude top-k, norms (no I/O).

Everything here works on flat float32 tensors, in chunks, so that no function allocates more than
a chunk's worth of temporaries next to the tensors it is given. Selection is exact and needs no
sorted copy: a two-pass radix select on the bit patterns of |τ| (for non-negative floats the int32
view is ordered like the values).

Tie rule: S keeps exactly k entries — every entry with |τ| above the threshold, then the entries equal
to it in increasing flat index until k are kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch

CHUNK = 1 << 18  # elements per chunk on CPU: 1 MiB of float32 (small chunks reuse heap memory: few page faults)
GPU_CHUNK = 1 << 24  # on a GPU, larger chunks: fewer host synchronisations
_BINS = 1 << 16


def chunk_spans(n: int, device: torch.device) -> Iterator[slice]:
    """Consecutive slices covering range(n), sized for the device."""
    step = CHUNK if device.type == "cpu" else GPU_CHUNK
    return (slice(s, min(s + step, n)) for s in range(0, n, step))


@dataclass(frozen=True)
class TopK:
    """Which entries of a flat tensor S keeps: `k` of `numel`, threshold as float32 bits, ties kept."""

    k: int
    numel: int
    threshold_bits: int = 0
    ties: int = 0

    @property
    def dense(self) -> bool:
        return self.k >= self.numel

    @property
    def threshold(self) -> float:
        """The smallest kept magnitude, as a Python float."""
        return _bits_to_float(self.threshold_bits)


def keep_count(density: float, numel: int) -> int:
    """k = floor(density · numel), computed on the decimal value written (0.29 · 100 = 29, not 28).

    A tensor whose k would be below 1 stays dense (k = numel) instead of being deleted.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = math.floor(Fraction(repr(float(density))) * numel)
    return numel if k < 1 else min(k, numel)


def is_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite (chunked; no full-size bool mask)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[sl]).all()) for sl in chunk_spans(flat.numel(), flat.device))


def squared_norm(t: torch.Tensor) -> float:
    """Σ t² accumulated in float64."""
    flat = t.reshape(-1)
    return sum((_dot64(flat[sl]) for sl in chunk_spans(flat.numel(), flat.device)), 0.0)


def magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.abs().view(torch.int32)


def _bits_to_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest entry, and the number of entries in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], device=hist.device))[0])
    above = int(from_top[j - 1]) if j > 0 else 0
    return _BINS - 1 - j, above


def _high_histogram(flat: torch.Tensor) -> torch.Tensor:
    hist = torch.zeros(_BINS, dtype=torch.int64, device=flat.device)
    for sl in chunk_spans(flat.numel(), flat.device):
        hist += torch.bincount(magnitude_bits(flat[sl]) >> 16, minlength=_BINS)
    return hist


def select_topk(tau: torch.Tensor, k: int, *, high_histogram: torch.Tensor | None = None) -> TopK:
    """Exact top-k of |τ| by two radix passes over the float32 bit patterns (16 high, then 16 low bits).

    `high_histogram` (bincount of the high 16 bits of |τ|) may be given when the caller already made
    it while producing τ, which saves the first pass.
    """
    flat = tau.reshape(-1)
    if flat.dtype != torch.float32:
        raise TypeError("select_topk expects a float32 tensor")
    n = flat.numel()
    if k >= n:
        return TopK(k=n, numel=n)
    if k < 1:
        raise ValueError("k must be at least 1")
    hist = _high_histogram(flat) if high_histogram is None else high_histogram.clone()
    high, above = _locate(hist, k)
    hist.zero_()
    for sl in chunk_spans(n, flat.device):
        bits = magnitude_bits(flat[sl])
        hist += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=_BINS)
    low, above_low = _locate(hist, k - above)
    greater = above + above_low
    return TopK(k=k, numel=n, threshold_bits=(high << 16) | low, ties=k - greater)


def keep_mask(bits: torch.Tensor, sel: TopK, ties_left: int) -> tuple[torch.Tensor, int]:
    """Which entries of one chunk (as |τ| bits) S keeps, given how many threshold ties are still to keep."""
    keep = bits > sel.threshold_bits
    if ties_left > 0:
        equal = bits == sel.threshold_bits
        n_equal = int(torch.count_nonzero(equal))
        if n_equal <= ties_left:
            keep |= equal
            ties_left -= n_equal
        else:
            keep[equal.nonzero()[:ties_left, 0]] = True
            ties_left = 0
    return keep, ties_left


def apply_topk_(tau: torch.Tensor, sel: TopK) -> torch.Tensor:
    """Zero, in place, every entry of flat `tau` that `sel` does not keep; returns `tau`."""
    flat = tau.reshape(-1)
    if flat.numel() != sel.numel:
        raise ValueError(f"selection is for {sel.numel} entries, tensor has {flat.numel()}")
    if sel.dense:
        return tau
    ties_left = sel.ties
    for sl in chunk_spans(flat.numel(), flat.device):
        chunk = flat[sl]
        keep, ties_left = keep_mask(magnitude_bits(chunk), sel, ties_left)
        chunk.masked_fill_(keep.logical_not_(), 0.0)
    return tau


def _dot64(chunk: torch.Tensor) -> float:
    c = chunk.double()
    return float(torch.dot(c, c))


def norm_ratio(squared_total: float, squared_kept: float) -> float:
    """‖τ‖₂ / ‖S(τ)‖₂, or 1.0 when nothing was kept."""
    if squared_kept <= 0.0:
        return 1.0
    return math.sqrt(squared_total / squared_kept)


class NonFiniteTaskVector(ValueError):
    """A task vector holds NaN or Inf."""


@dataclass
class SparseTaskVector:
    """f·S(τ) for one tensor of one fine-tune, before λ; norms are float64 sums of squares."""

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
) -> SparseTaskVector:
    """S(τ) of one tensor: τ in float32, exact top-k (or the given `selection`), zeros elsewhere.

    Fused: one pass makes τ, its norm and the first radix histogram; one more finds the threshold;
    one applies it. `out` (flat float32, numel of `base`) is reused as storage when given. With
    `norms=False` the norms are not computed (NaN).
    """
    if base.shape != tuned.shape:
        raise ValueError(f"shape mismatch: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    b, t = base.reshape(-1), tuned.reshape(-1)
    n = b.numel()
    tau = torch.empty(n, dtype=torch.float32, device=tuned.device) if out is None else out
    k = keep_count(density, n) if selection is None else selection.k
    hist = torch.zeros(_BINS, dtype=torch.int64, device=tau.device) if selection is None and k < n else None
    total = 0.0 if norms else math.nan
    for sl in chunk_spans(n, tau.device):
        chunk = tau[sl]
        chunk.copy_(t[sl])
        chunk.sub_(b[sl].to(device=chunk.device, dtype=torch.float32))
        if norms:
            total += _dot64(chunk)  # a non-finite entry makes the sum non-finite: it doubles as the check
        elif check_finite and not bool(torch.isfinite(chunk).all()):
            raise NonFiniteTaskVector("task vector holds NaN or Inf")
        if hist is not None:
            hist += torch.bincount(magnitude_bits(chunk) >> 16, minlength=_BINS)
    if check_finite and norms and not math.isfinite(total):
        raise NonFiniteTaskVector("task vector holds NaN or Inf")
    if selection is None:
        selection = select_topk(tau, k, high_histogram=hist) if hist is not None else TopK(k=n, numel=n)
    if selection.dense:
        return SparseTaskVector(tau, selection, total, total)
    kept = 0.0 if norms else math.nan
    ties_left = selection.ties
    for sl in chunk_spans(n, tau.device):
        chunk = tau[sl]
        keep, ties_left = keep_mask(magnitude_bits(chunk), selection, ties_left)
        chunk.masked_fill_(keep.logical_not_(), 0.0)
        if norms:
            kept += _dot64(chunk)
    return SparseTaskVector(tau, selection, total, kept)


def add_sparse_task_vector_(
    acc: torch.Tensor,
    base: torch.Tensor,
    tuned: torch.Tensor,
    selection: TopK,
    alpha: float,
    *,
    check_finite: bool = True,
) -> torch.Tensor:
    """acc += alpha · S(τ) for a known selection, in one chunked pass with no full-size temporary.

    Gives bit-for-bit the same `acc` as `acc.add_(sparse_task_vector(...).values, alpha=alpha)`.
    """
    b, t, a = base.reshape(-1), tuned.reshape(-1), acc.view(-1)
    n = b.numel()
    if n != selection.numel:
        raise ValueError(f"selection is for {selection.numel} entries, tensor has {n}")
    ties_left = selection.ties
    for sl in chunk_spans(n, a.device):
        chunk = t[sl].to(device=a.device, dtype=torch.float32, copy=True)
        chunk.sub_(b[sl].to(device=a.device, dtype=torch.float32))
        if check_finite and not bool(torch.isfinite(chunk).all()):
            raise NonFiniteTaskVector("task vector holds NaN or Inf")
        if not selection.dense:
            keep, ties_left = keep_mask(magnitude_bits(chunk), selection, ties_left)
            chunk.masked_fill_(keep.logical_not_(), 0.0)
        a[sl].add_(chunk, alpha=alpha)
    return acc
