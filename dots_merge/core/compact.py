"""S(τ) of one tensor kept compactly, exact at its own density and at every lower one (method.md §2).

`compress` keeps, for the largest density a tune can ask (k_max entries), a bitmask of the kept positions and the
fine-tune's values there in the dtype they were loaded in: 1/8 byte per parameter plus k_max/numel times the
dtype's size (bfloat16 at density 0.6: 1.325 bytes per parameter), never a dense float32 copy; and, when its
nonzero bins take at most 1/32 of that, the first radix histogram of the kept |τ| (the same for every density:
a new density's selection then makes one pass over the kept entries instead of two). τ at a kept
position is rebuilt from it and the base as the merge forms it (float32(tuned) − float32(base)), so it is the
same float.

A lower k is taken inside the kept entries: the top-k of |τ| under the tie rule (larger |τ| first, then lower flat
index) is a prefix of the top-k_max, so an exact top-k over the kept entries in flat order selects exactly what a
top-k over the whole tensor selects. `sparse_chunks_of` then yields S_k(τ) over `chunk_spans` with the same values
as `sparse_task_vector(...).values`, and `select_within(..., norm=True)` sums ‖S_k(τ)‖² exactly as it does.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dots_merge.core.task_vector import chunk_squared_norm, sparse_task_vector
from dots_merge.core.topk import (
    TopK,
    add_to_histogram_,
    chunk_spans,
    empty_histogram,
    gathered,
    keep_count,
    keep_mask,
    magnitude_bits,
    masked,
    select_topk_chunks,
)

_SHIFTS = torch.arange(8, dtype=torch.uint8)
HISTOGRAM_SHARE = 32  # the first radix histogram is kept when its nonzero bins take ≤ 1/32 of the entry's bytes


@dataclass
class CompactVector:
    """S(τ) of one tensor at its largest density: kept positions as packed bits (None: all kept) and the
    fine-tune's values there, in flat order; `squared_norm` is ‖τ‖² (NaN when norms were not taken)."""

    numel: int
    kept: int
    mask: torch.Tensor | None
    values: torch.Tensor
    squared_norm: float
    high_histogram: torch.Tensor | None = None  # int32 (bin, count) rows: nonzero bins of the kept |τ|'s high bits

    @property
    def nbytes(self) -> int:
        hist = 0 if self.high_histogram is None else self.high_histogram.numel() * 4
        return _entry_bytes(self.mask, self.values) + hist


def _entry_bytes(mask: torch.Tensor | None, values: torch.Tensor) -> int:
    return (0 if mask is None else mask.numel()) + values.numel() * values.element_size()


def histogram_limit(entry_bytes: int) -> int:
    """The most bytes an entry of `entry_bytes` (bitmask and values) spends on its first radix histogram."""
    return min(8 << 16, entry_bytes // HISTOGRAM_SHARE)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8, eight entries a byte, lowest bit first (padded with False)."""
    pad = (-keep.numel()) % 8
    if pad:
        keep = torch.cat([keep, keep.new_zeros(pad)])
    bits = keep.view(-1, 8).to(torch.uint8) << _SHIFTS.to(keep.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first `n` entries of a `pack_bits` result as a flat bool tensor."""
    bits = (packed.unsqueeze(1) >> _SHIFTS.to(packed.device)) & 1
    return bits.view(-1)[:n].bool()


def compress(
    base: torch.Tensor, tuned: torch.Tensor, density: float, *, check_finite: bool = True, norms: bool = True
) -> CompactVector:
    """S(τ) at `density` as a `CompactVector` (on the CPU), computed once on the tensors' device."""
    sparse = sparse_task_vector(base, tuned, density, check_finite=check_finite, norms=norms)
    flat = tuned.reshape(-1)
    n, selection = flat.numel(), sparse.selection
    if selection.dense:
        return CompactVector(n, n, None, flat.detach().to("cpu", copy=True), sparse.squared_norm)
    mask = torch.empty((n + 7) // 8, dtype=torch.uint8)
    values = torch.empty(selection.k, dtype=flat.dtype)
    hist = empty_histogram(sparse.values.device)
    ties_left, at = selection.ties, 0
    for sl in chunk_spans(n, sparse.values.device):
        keep, ties_left = keep_mask(magnitude_bits(sparse.values[sl]), selection, ties_left)
        mask[sl.start // 8 : (sl.stop + 7) // 8] = pack_bits(keep).cpu()
        chunk = flat[sl][keep]
        values[at : at + chunk.numel()] = chunk.cpu()
        at += chunk.numel()
        add_to_histogram_(hist, sparse.values[sl][keep])
    bins = hist.nonzero().squeeze(1)
    high = None
    if 8 * bins.numel() <= histogram_limit(_entry_bytes(mask, values)):
        high = torch.stack([bins, hist[bins]], dim=1).to(device="cpu", dtype=torch.int32)
    return CompactVector(n, selection.k, mask, values, sparse.squared_norm, high)


def kept_positions(packed: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Flat indices (int64, ascending, on `device`) of the set bits among the first `n` of a `pack_bits` result."""
    if packed.device.type == "cpu" and device.type == "cpu":  # numpy's unpack and flatnonzero: ~10× torch's on CPU
        bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")
        return torch.from_numpy(np.flatnonzero(bits.view(np.bool_)))  # bool: 4× faster than uint8
    return unpack_bits(packed.to(device), n).nonzero().squeeze(1)


def _kept_tau(
    cv: CompactVector, base: torch.Tensor, device: torch.device
) -> Iterator[tuple[slice, torch.Tensor | None, torch.Tensor]]:
    """(span, positions of the kept entries in it, τ at those entries in float32) over `chunk_spans(numel)`."""
    b = base.reshape(-1)
    at = 0
    for sl in chunk_spans(cv.numel, device):
        part = b[sl].to(device)
        if cv.mask is None:
            where, count = None, sl.stop - sl.start
        else:
            where = kept_positions(cv.mask[sl.start // 8 : (sl.stop + 7) // 8], sl.stop - sl.start, device)
            count = where.numel()
            part = gathered(part, where)
        tau = cv.values[at : at + count].to(device=device, dtype=torch.float32, copy=True)
        at += count
        yield sl, where, tau.sub_(part.to(dtype=torch.float32))


def select_within(
    cv: CompactVector, base: torch.Tensor, density: float, device: torch.device, *, norm: bool = False
) -> tuple[TopK, float]:
    """The top-k (k from `density` and the tensor's numel) among the kept entries, counted over those entries,
    and with `norm` ‖S_k(τ)‖² summed as `sparse_task_vector` sums it (per span, over the kept entries in flat
    order; NaN without `norm`). τ at the kept entries is formed once and held for this tensor only."""
    k = keep_count(density, cv.numel)
    if k > cv.kept:
        raise ValueError(f"density {density} keeps {k} entries, more than the {cv.kept} kept")
    taus = [tau for _, _, tau in _kept_tau(cv, base, device)]
    bits = [magnitude_bits(tau) for tau in taus]  # |τ| once, for every pass below
    high = None
    if cv.high_histogram is not None:
        rows = cv.high_histogram.to(device=device, dtype=torch.int64)
        high = empty_histogram(device)
        high[rows[:, 0]] = rows[:, 1]
    within = select_topk_chunks(lambda: bits, k, cv.kept, device, high_histogram=high, as_bits=True)
    if not norm:
        return within, math.nan
    total, ties_left = 0.0, within.ties
    for tau, chunk_bits in zip(taus, bits, strict=True):
        if not within.dense:
            keep, ties_left = keep_mask(chunk_bits, within, ties_left)
            tau = masked(tau, keep)
        total += chunk_squared_norm(tau)
    return within, total


def sparse_chunks_of(
    cv: CompactVector, base: torch.Tensor, within: TopK, device: torch.device
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(span, S_k(τ)[span]) in float32 over `chunk_spans`: the values of `sparse_task_vector` at that k."""
    ties_left, buffer = within.ties, None
    for sl, where, tau in _kept_tau(cv, base, device):
        if not within.dense:
            keep, ties_left = keep_mask(magnitude_bits(tau), within, ties_left)
            tau.masked_fill_(keep.logical_not_(), 0.0)
        if where is None:
            yield sl, tau
            continue
        if buffer is None:
            buffer = torch.empty(sl.stop - sl.start, dtype=torch.float32, device=device)
        out = buffer[: sl.stop - sl.start].zero_()
        out.index_copy_(0, where, tau)
        yield sl, out
