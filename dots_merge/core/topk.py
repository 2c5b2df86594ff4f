"""Exact magnitude top-k of a flat float32 tensor, chunked, with no sorted copy (method.md §2).

Selection is a two-pass radix select on the bit patterns of |τ|: for non-negative floats the int32 view is
ordered like the values. Tie rule: S keeps exactly k entries — every entry with |τ| above the threshold, then
the entries equal to it in increasing flat index until k are kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

CHUNK = 1 << 18  # elements per chunk on CPU: 1 MiB of float32 (small chunks reuse heap memory: few page faults)
GPU_CHUNK = 1 << 24  # on a GPU, larger chunks: fewer host synchronisations
_BINS = 1 << 16


def chunk_spans(n: int, device: torch.device) -> Iterator[slice]:
    """Consecutive slices covering range(n), sized for the device. Every chunked computation of the merge
    arithmetic walks these same spans, so two callers on one device compute bit for bit the same result."""
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


def keep_count(density: float, numel: int) -> int:
    """k = floor(density · numel), computed on the decimal value written (0.29 · 100 = 29, not 28).

    A tensor whose k would be below 1 stays dense (k = numel) instead of being deleted.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = math.floor(Fraction(repr(float(density))) * numel)
    return numel if k < 1 else min(k, numel)


def masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x[mask]` for flat tensors; on the CPU through numpy's compress, several times faster than torch's."""
    if x.device.type == "cpu":
        return _from_numpy(np.compress(mask.numpy(), _as_numpy(x)), x.dtype)
    return x[mask]


def gathered(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[index]` for a flat tensor and int64 indices; on the CPU through numpy's take (2× torch's for bfloat16)."""
    if x.device.type == "cpu":
        return _from_numpy(np.take(_as_numpy(x), index.numpy()), x.dtype)
    return x.index_select(0, index)


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; bfloat16, which numpy lacks, as its int16 bit patterns."""
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t.view(dtype) if dtype == torch.bfloat16 else t


def magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
    """|chunk| as int32 bit patterns (ordered like the magnitudes)."""
    return chunk.abs().view(torch.int32)


def _locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest entry, and the number of entries in higher bins."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], device=hist.device))[0])
    above = int(from_top[j - 1]) if j > 0 else 0
    return _BINS - 1 - j, above


def select_topk(tau: torch.Tensor, k: int, *, high_histogram: torch.Tensor | None = None) -> TopK:
    """Exact top-k of |τ| by two radix passes over the float32 bit patterns (16 high, then 16 low bits).

    `high_histogram` (bincount of the high 16 bits of |τ|) may be given when the caller already made
    it while producing τ, which saves the first pass.
    """
    flat = tau.reshape(-1)
    if flat.dtype != torch.float32:
        raise TypeError("select_topk expects a float32 tensor")
    spans = list(chunk_spans(flat.numel(), flat.device))
    return radix_select(lambda: (flat[sl] for sl in spans), k, flat.numel(), flat.device,
                        high_histogram=high_histogram)[0]  # fmt: skip


def radix_select(
    chunks: Callable[[], Iterable[torch.Tensor]],
    k: int,
    n: int,
    device: torch.device,
    *,
    high_histogram: torch.Tensor | None = None,
    as_bits: bool = False,
) -> tuple[TopK, int, torch.Tensor | None]:
    """`select_topk` over a float32 vector of `n` entries given as consecutive chunks, in flat order, with the
    threshold's high bin and the second pass's histogram (the low 16 bits of the entries in that bin; None when
    every entry is kept). `chunks()` is called once per radix pass, so the vector never needs to exist whole.
    With `as_bits` the chunks are already `magnitude_bits` of the vector."""
    if n == 0 or k >= n:
        return TopK(k=n, numel=n), -1, None
    if k < 1:
        raise ValueError("k must be at least 1")
    hist = high_histogram.clone() if high_histogram is not None else empty_histogram(device)
    if high_histogram is None:
        for chunk in chunks():
            bits = chunk if as_bits else magnitude_bits(chunk)
            hist += torch.bincount(bits >> 16, minlength=_BINS)
    high, above = _locate(hist, k)
    hist.zero_()
    for chunk in chunks():
        bits = chunk if as_bits else magnitude_bits(chunk)  # the low bits of the entries in the high bin only
        hist += torch.bincount(masked(bits, (bits >> 16) == high) & 0xFFFF, minlength=_BINS)
    low, above_low = _locate(hist, k - above)
    greater = above + above_low
    return TopK(k=k, numel=n, threshold_bits=(high << 16) | low, ties=k - greater), high, hist


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


def empty_histogram(device: torch.device) -> torch.Tensor:
    """A zeroed histogram for the first radix pass, to fill while τ is produced."""
    return torch.zeros(_BINS, dtype=torch.int64, device=device)


def add_to_histogram_(hist: torch.Tensor, chunk: torch.Tensor) -> None:
    """Count one chunk of τ into the first-pass histogram."""
    hist += torch.bincount(magnitude_bits(chunk) >> 16, minlength=_BINS)
