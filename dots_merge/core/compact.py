"""S(τ) of one tensor kept compactly, exact at its own density and at every lower one (method.md §2).

`compress` keeps, for the largest density a tune can ask (k_max entries), the positions kept and the fine-tune's
values there in the dtype they were loaded in — never a dense float32 copy. The kept entries are split into
**tiers** by rank (|τ| descending, then flat index ascending: the tie rule of the merge): with boundaries at
densities d_1 < … < d_T = the ceiling, tier j holds the entries ranked between k(d_{j−1}) and k(d_j). Each tier is
a bitmask of its positions (1/8 byte per parameter), its values in flat order, the exact Σ τ² over it
(`dots_merge.core.squares`) and, when they take at most 1/8 of its bytes (and 128 KiB), the moments of its nonzero
first-radix bins: how many entries, Σ and Σ² of their low 16 bits.
τ at a kept position is rebuilt from the value and the base as the merge forms it (float32(tuned) − float32(base)),
so it is the same float.

A lower k is taken inside the tiers: the top-k under the tie rule is a prefix of the ranking, so it is every tier
before the one where k falls, plus the top-(k − what those hold) of that tier's entries in flat order. A new
density's selection therefore reads one tier, not every kept entry, and ‖S_k(τ)‖² is the exact sum of the whole
tiers before it plus what it keeps of that tier (from the bin moments and the second radix pass's histogram, with
no pass over the entries) — the same integer the merge sums over the kept entries, rounded once.
`sparse_chunks_of` yields S_k(τ) over `chunk_spans` with the same values as `sparse_task_vector(...).values`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dots_merge.core.squares import (
    BINS,
    add_moments_,
    bin_units,
    empty_moments,
    moment_rows,
    rows_units,
    square_units,
    units_to_float,
)
from dots_merge.core.task_vector import sparse_task_vector
from dots_merge.core.topk import (
    TopK,
    chunk_spans,
    gathered,
    keep_count,
    keep_mask,
    magnitude_bits,
    masked,
    radix_select,
    select_topk,
)

_SHIFTS = torch.arange(8, dtype=torch.uint8)
MOMENTS_SHARE = 8  # a tier keeps the moments of its nonzero bins when they take ≤ 1/8 of its bytes…
MOMENTS_ROWS = 4096  # …and at most this many rows (128 KiB)
_ROW = 32  # bytes of a row: bin, count, Σ low, Σ low², int64
SMALL_TIER = 1 << 14  # a tier of at most this many entries is selected by one sort (no 64K-bin radix passes)


@dataclass
class Tier:
    """Entries of one rank range of a compact S(τ): positions as packed bits (None: every position, a dense
    entry), the fine-tune's values there in flat order, Σ τ² over them exactly (2^-300 units; None without
    norms) and the moments of their nonzero first-radix bins as int64 (bin, count, Σ low, Σ low²) rows (or None)."""

    kept: int
    mask: torch.Tensor | None
    values: torch.Tensor
    square_units: int | None = None
    moments: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        rows = 0 if self.moments is None else self.moments.shape[0] * _ROW
        return _entry_bytes(self.mask, self.values) + rows


@dataclass
class CompactVector:
    """S(τ) of one tensor at its largest density, as tiers of decreasing |τ|; `squared_norm` is ‖τ‖² (NaN when
    norms were not taken)."""

    numel: int
    tiers: list[Tier]
    squared_norm: float

    @property
    def kept(self) -> int:
        return sum(t.kept for t in self.tiers)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tiers)


@dataclass(frozen=True)
class Within:
    """S_k(τ) inside a compact entry: every tier before `tier` whole, the `top` of that tier, nothing after."""

    tier: int
    top: TopK


def _entry_bytes(mask: torch.Tensor | None, values: torch.Tensor) -> int:
    return (0 if mask is None else mask.numel()) + values.numel() * values.element_size()


def moments_limit(entry_bytes: int) -> int:
    """The most bytes a tier of `entry_bytes` (bitmask and values) spends on its bin moments."""
    return min(MOMENTS_ROWS * _ROW, entry_bytes // MOMENTS_SHARE)


def tier_densities(low: float, high: float, numel: int) -> tuple[float, ...]:
    """The tier boundaries of an entry that serves every density in [low, high] of a `numel`-entry tensor: the
    middle of the range and its top (one tier when the middle keeps no fewer entries than the top, or none).
    A density in the lower half then reads the first tier, one in the upper half the second."""
    top = keep_count(high, numel)
    middle = (low + high) / 2
    if low < high and keep_count(middle, numel) < top:  # (a k below 1 counts as dense: never below the top)
        return (middle, high)
    return (high,)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor as uint8, eight entries a byte, lowest bit first (padded with False)."""
    if keep.device.type == "cpu":
        return torch.from_numpy(np.packbits(keep.numpy(), bitorder="little"))
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
    base: torch.Tensor,
    tuned: torch.Tensor,
    densities: float | Sequence[float],
    *,
    check_finite: bool = True,
    norms: bool = True,
) -> CompactVector:
    """S(τ) at the largest of `densities` as a `CompactVector` (on the CPU), in one tier per density (each
    boundary keeping fewer entries than the next), computed once on the tensors' device."""
    bounds = sorted([densities] if isinstance(densities, (int, float)) else densities)
    sparse = sparse_task_vector(base, tuned, bounds[-1], check_finite=check_finite, norms=norms, kept_norm=False)
    flat = tuned.reshape(-1)
    n, top = flat.numel(), sparse.selection
    if top.dense:
        rows = moment_rows(_moments([magnitude_bits(sparse.values[sl]) for sl in chunk_spans(n, sparse.values.device)]))
        tier = Tier(n, None, flat.detach().to("cpu", copy=True), rows_units(rows) if norms else None)
        return CompactVector(n, [tier], sparse.squared_norm)
    selections = [select_topk(sparse.values, k) for k in sorted({keep_count(d, n) for d in bounds[:-1]}) if k < top.k]
    selections.append(top)  # nested top-k sets, one per tier boundary: the first k of the ranking each
    counts = [s.k - (selections[i - 1].k if i else 0) for i, s in enumerate(selections)]
    masks = [torch.empty((n + 7) // 8, dtype=torch.uint8) for _ in selections]
    values = [torch.empty(c, dtype=flat.dtype) for c in counts]
    moments = [empty_moments(sparse.values.device) for _ in selections]
    ties = [s.ties for s in selections]
    at = [0 for _ in selections]
    for sl in chunk_spans(n, sparse.values.device):
        bits = magnitude_bits(sparse.values[sl])
        below = None  # entries of the earlier tiers in this span
        for j, selection in enumerate(selections):
            upto, ties[j] = keep_mask(bits, selection, ties[j])
            keep = upto if below is None else upto & ~below
            below = upto
            masks[j][sl.start // 8 : (sl.stop + 7) // 8] = pack_bits(keep.cpu())
            chunk = masked(flat[sl], keep)
            values[j][at[j] : at[j] + chunk.numel()] = chunk.cpu()
            at[j] += chunk.numel()
            add_moments_(moments[j], masked(bits, keep))
    tiers = []
    for j in range(len(selections)):
        rows = moment_rows(moments[j])
        kept = _ROW * rows.shape[0] <= moments_limit(_entry_bytes(masks[j], values[j]))
        units = rows_units(rows) if norms else None
        tiers.append(Tier(counts[j], masks[j], values[j], units, rows if kept else None))
    return CompactVector(n, tiers, sparse.squared_norm)


def _moments(bits: list[torch.Tensor]) -> torch.Tensor:
    moments = empty_moments(bits[0].device if bits else torch.device("cpu"))
    for chunk in bits:
        add_moments_(moments, chunk)
    return moments


def kept_positions(packed: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Flat indices (int64, ascending, on `device`) of the set bits among the first `n` of a `pack_bits` result."""
    if packed.device.type == "cpu" and device.type == "cpu":  # numpy's unpack and flatnonzero: ~10× torch's on CPU
        bits = np.unpackbits(packed.numpy(), count=n, bitorder="little")
        return torch.from_numpy(np.flatnonzero(bits.view(np.bool_)))  # bool: 4× faster than uint8
    return unpack_bits(packed.to(device), n).nonzero().squeeze(1)


def _tier_tau(
    tier: Tier, numel: int, base: torch.Tensor, device: torch.device
) -> Iterator[tuple[slice, torch.Tensor | None, torch.Tensor]]:
    """(span, positions of the tier's entries in it, τ at those entries in float32) over `chunk_spans(numel)`."""
    b = base.reshape(-1)
    at = 0
    for sl in chunk_spans(numel, device):
        part = b[sl].to(device)
        if tier.mask is None:
            where, count = None, sl.stop - sl.start
        else:
            where = kept_positions(tier.mask[sl.start // 8 : (sl.stop + 7) // 8], sl.stop - sl.start, device)
            count = where.numel()
            part = gathered(part, where)
        tau = tier.values[at : at + count].to(device=device, dtype=torch.float32, copy=True)
        at += count
        yield sl, where, tau.sub_(part.to(dtype=torch.float32))


def select_within(
    cv: CompactVector, base: torch.Tensor, density: float, device: torch.device, *, norm: bool = False
) -> tuple[Within, float]:
    """S_k(τ) (k from `density` and the tensor's numel) inside the entry, and with `norm` ‖S_k(τ)‖² as the merge
    sums it (NaN without `norm`). Only the tier where k falls is read; its τ is held for this tensor only."""
    k = keep_count(density, cv.numel)
    if k > cv.kept:
        raise ValueError(f"density {density} keeps {k} entries, more than the {cv.kept} kept")
    before, t = 0, 0
    while k > before + cv.tiers[t].kept:
        before += cv.tiers[t].kept
        t += 1
    tier, want = cv.tiers[t], k - before
    taus = [tau for _, _, tau in _tier_tau(tier, cv.numel, base, device)]
    bits = [magnitude_bits(tau) for tau in taus]  # |τ| once, for every pass below
    if tier.kept <= SMALL_TIER:
        top, part = _select_small(taus, bits, want, tier.kept, norm=norm)
    else:
        top, part = _select_radix(tier, bits, want, device, norm=norm)
    within = Within(t, top)
    if not norm:
        return within, math.nan
    if k >= cv.numel:  # dense: the merge takes ‖τ‖² itself
        return within, cv.squared_norm
    whole = sum(cv.tiers[j].square_units for j in range(t))
    return within, units_to_float(whole + (tier.square_units if top.dense else part))


def _select_small(taus, bits, want: int, count: int, *, norm: bool) -> tuple[TopK, int]:
    """The top-`want` of a small tier by one sort, and (with `norm`) Σ τ² of what it keeps, exactly."""
    if want >= count:
        return TopK(k=count, numel=count), 0
    flat = torch.cat(bits)
    threshold = int(torch.sort(flat, descending=True).values[want - 1])
    top = TopK(k=want, numel=count, threshold_bits=threshold, ties=want - int((flat > threshold).sum()))
    if not norm:
        return top, 0
    keep, _ = keep_mask(flat, top, top.ties)
    return top, square_units(masked(torch.cat(taus), keep))


def _select_radix(tier: Tier, bits, want: int, device: torch.device, *, norm: bool) -> tuple[TopK, int]:
    """The top-`want` of a tier by the radix passes (the first from its stored bin moments when it has them), and
    (with `norm`) Σ τ² of what it keeps, exactly, from the bin moments and the second pass's histogram."""
    rows, first = tier.moments, None
    if rows is None and norm:  # without stored moments the first radix pass runs here, and makes them
        rows = moment_rows(_moments(bits))
    if rows is not None:
        first = torch.zeros(BINS, dtype=torch.int64)
        first[rows[:, 0]] = rows[:, 1]
        first = first.to(device)
    top, high, low_counts = radix_select(lambda: bits, want, tier.kept, device, high_histogram=first, as_bits=True)
    if not norm or top.dense:
        return top, 0
    low = top.threshold_bits & 0xFFFF  # the bins above the threshold's, and what the threshold's bin keeps
    return top, rows_units(rows, above=high) + bin_units(high, low_counts, above=low, ties=top.ties)


def sparse_chunks_of(
    cv: CompactVector, base: torch.Tensor, within: Within, device: torch.device
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(span, S_k(τ)[span]) in float32 over `chunk_spans`: the values of `sparse_task_vector` at that k."""
    top, ties_left, buffer = within.top, within.top.ties, None
    streams = [_tier_tau(cv.tiers[j], cv.numel, base, device) for j in range(within.tier + 1)]
    for parts in zip(*streams, strict=True):
        sl = parts[0][0]
        out = None
        for j, (_, where, tau) in enumerate(parts):
            if j == within.tier and not top.dense:
                keep, ties_left = keep_mask(magnitude_bits(tau), top, ties_left)
                tau.masked_fill_(keep.logical_not_(), 0.0)
            if where is None:  # a dense entry: one tier over every position
                out = tau
                continue
            if out is None:
                if buffer is None:
                    buffer = torch.empty(sl.stop - sl.start, dtype=torch.float32, device=device)
                out = buffer[: sl.stop - sl.start].zero_()
            out.index_copy_(0, where, tau)
        yield sl, out
