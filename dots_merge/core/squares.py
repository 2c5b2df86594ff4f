"""Exact sums of squares of float32 values: ‖S(τ)‖² that does not depend on the order it is summed in.

A finite float32 x is m · 2^(e−150) with an integer m < 2^24 and e' = max(biased exponent, 1), so x² is the
integer m² · 2^(2e') in units of 2^-300. Summing those integers is exact in any order and in any grouping: the
merge sums the kept entries tensor by tensor (`square_units`), the tune's vector store from per-tier sums and the
moments of radix bins (`rows_units`, `bin_units`), and both round the same integer to the same float64 once
(`units_to_float`). The int64 sums below hold for tensors of fewer than 2^31 entries.
"""

from __future__ import annotations

import numpy as np
import torch

UNIT_SHIFT = 300  # a square's units are 2^-300
_LOW = (1 << 24) - 1


def square_units(x: torch.Tensor) -> int:
    """Σ x² of a finite float32 tensor, exactly, as an integer number of 2^-300 units."""
    flat = x.reshape(-1)
    if flat.dtype != torch.float32:
        raise TypeError("square_units expects float32")
    if flat.numel() == 0:
        return 0
    exponent = (flat.view(torch.int32) & 0x7FFFFFFF) >> 23
    lowest, highest = max(int(exponent.min()), 1), int(exponent.max())
    span = 2 * (highest - lowest) + flat.numel().bit_length()  # bits a sum of n shifted squares spans, less 24
    if span + 24 <= 53:
        return _units_split(flat)
    if flat.device.type != "cpu":
        high, low = _groups_torch(flat.view(torch.int32))
    else:
        bits = flat.view(torch.int32).numpy() & 0x7FFFFFFF
        if span + 24 <= 63:
            return _units_narrow(bits, bits >> 23, lowest)
        high, low = _groups_numpy(bits)
    return sum(((high[e] << 24) + low[e]) << (2 * e) for e in range(256) if high[e] or low[e])


def _units_split(flat: torch.Tensor) -> int:
    """`square_units` by three float64 dot products: x = x_h + x_l with 12 significant bits each, so x_h², x_h·x_l
    and x_l² have 24 bits, and when n of them shifted to the lowest binade fit in 53 bits every partial sum is
    exact, in whatever order the dot adds them."""
    high = (flat.view(torch.int32) & ~0xFFF).view(torch.float32)
    h, low = high.double(), (flat - high).double()
    return _to_units(torch.dot(h, h)) + 2 * _to_units(torch.dot(h, low)) + _to_units(torch.dot(low, low))


def _to_units(value: torch.Tensor) -> int:
    numerator, denominator = float(value).as_integer_ratio()  # a multiple of 2^-300: the division is exact
    return numerator * ((1 << UNIT_SHIFT) // denominator)


def _units_narrow(bits: np.ndarray, exponent: np.ndarray, lowest: int) -> int:
    """`square_units` when the exponents span few enough binades that m² shifted to the lowest one, split in two
    24-bit halves, sums in int64 without overflow (kept entries of a tensor: typically a few binades)."""
    exponent, square = _squared_mantissas(bits, exponent)
    shift = (exponent - lowest).astype(np.int64)
    shift <<= 1
    high = (square >> 24) << shift
    square &= _LOW
    square <<= shift
    return ((int(high.sum()) << 24) + int(square.sum())) << (2 * lowest)


def _squared_mantissas(bits: np.ndarray, exponent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """e' = max(e, 1) (in place of `exponent`) and m² as int64, from |x| as int32 bit patterns."""
    mantissa = (bits & 0x7FFFFF) | ((exponent > 0).astype(np.int32) << 23)
    np.maximum(exponent, 1, out=exponent)
    square = mantissa.astype(np.int64)
    square *= square
    return exponent, square


def _groups_numpy(bits: np.ndarray) -> tuple[list[int], list[int]]:
    """Per exponent e': Σ of the high and low 24 bits of m² (each a float64 sum of integers below 2^53: exact)."""
    exponent, square = _squared_mantissas(bits, bits >> 23)
    high = np.bincount(exponent, weights=(square >> 24).astype(np.float64), minlength=256)
    low = np.bincount(exponent, weights=(square & _LOW).astype(np.float64), minlength=256)
    return high.astype(np.int64).tolist(), low.astype(np.int64).tolist()


def _groups_torch(bits: torch.Tensor) -> tuple[list[int], list[int]]:
    bits = bits & 0x7FFFFFFF
    exponent = bits >> 23
    mantissa = (bits & 0x7FFFFF) | ((exponent > 0).to(torch.int32) << 23)
    exponent = exponent.clamp_(min=1)
    square = mantissa.to(torch.int64).square_()
    high = torch.bincount(exponent, weights=(square >> 24).double(), minlength=256)
    low = torch.bincount(exponent, weights=(square & _LOW).double(), minlength=256)
    return high.to(torch.int64).tolist(), low.to(torch.int64).tolist()


def units_to_float(units: int) -> float:
    """An exact sum of squares in 2^-300 units as the nearest float64 (Python's int division rounds correctly)."""
    return units / (1 << UNIT_SHIFT)


# -- per-bin moments: the exact sum over any set of whole radix bins, without the entries -------------------------

BINS = 1 << 16  # the first radix pass's bins: the high 16 bits of |x| (8 exponent bits, 7 mantissa bits)
_FINITE_BINS = 255 << 7  # bins of exponent 255 (inf, NaN) are never summed


def empty_moments(device: torch.device) -> torch.Tensor:
    """Zeroed per-bin moments: int64, 3 × BINS (how many entries, Σ of their low 16 bits, Σ of those squared)."""
    return torch.zeros(3, BINS, dtype=torch.int64, device=device)


def add_moments_(moments: torch.Tensor, bits: torch.Tensor) -> None:
    """Add a chunk of |x| as int32 bit patterns (`magnitude_bits`) into `moments`."""
    if bits.device.type != "cpu":
        _add_moments_torch(moments, bits)
        return
    for start in range(0, bits.numel(), 1 << 21):  # float64 weights sum integers below 2^53 exactly: ≤ 2^21 at once
        b = bits[start : start + (1 << 21)].numpy()
        high, low = b >> 16, (b & 0xFFFF).astype(np.float64)
        moments[0] += torch.from_numpy(np.bincount(high, minlength=BINS))
        moments[1] += torch.from_numpy(np.bincount(high, weights=low, minlength=BINS).astype(np.int64))
        moments[2] += torch.from_numpy(np.bincount(high, weights=low * low, minlength=BINS).astype(np.int64))


def _add_moments_torch(moments: torch.Tensor, bits: torch.Tensor) -> None:
    high, low = (bits >> 16).long(), (bits & 0xFFFF).long()
    moments[0].index_add_(0, high, torch.ones_like(low))
    moments[1].index_add_(0, high, low)
    moments[2].index_add_(0, high, low * low)


def moment_rows(moments: torch.Tensor) -> torch.Tensor:
    """The nonzero bins of `moments` as int64 rows (bin, count, Σ low, Σ low²), ascending by bin, on the CPU."""
    bins = moments[0].nonzero().squeeze(1)
    return torch.cat([bins.unsqueeze(0), moments[:, bins]]).T.contiguous().cpu()


def rows_units(rows: torch.Tensor, *, above: int = -1) -> int:
    """Exact Σ x² (2^-300 units) of the entries of the `moment_rows` whose bin is above `above` (all by default).

    In bin b = e·128 + j every entry is m·2^(e'−150) with m = M_b + low, M_b = j·2^16 (+2^23 when e > 0), so the
    bin's Σ m² is count·M_b² + 2·M_b·Σlow + Σlow²; the terms are summed per exponent in int64 (no overflow for
    fewer than 2^31 entries) and shifted by 2e' as Python integers."""
    r = rows.numpy()
    r = r[np.searchsorted(r[:, 0], above, side="right") :]
    r = r[r[:, 0] < _FINITE_BINS]
    if not len(r):
        return 0
    b, count, first, second = r.T
    e, j = b >> 7, b & 0x7F
    starts = np.flatnonzero(np.r_[True, e[1:] != e[:-1]])
    parts = np.stack([count * j * j, count * j, count, first * j, first, second], axis=1)
    total = 0
    for exponent, (cjj, cj, c, s1j, s1, s2) in zip(e[starts].tolist(), np.add.reduceat(parts, starts).tolist(),
                                                   strict=True):  # fmt: skip
        implicit = 1 << 23 if exponent else 0
        square = (cjj << 32) + (implicit * cj << 17) + implicit * implicit * c + (s1j << 17) + 2 * implicit * s1 + s2
        total += square << (2 * max(exponent, 1))
    return total


def bin_units(bin_: int, low_counts: torch.Tensor, *, above: int, ties: int) -> int:
    """Exact Σ x² (2^-300 units) of the entries of bin `bin_` whose low 16 bits are above `above`, plus `ties`
    entries whose low bits equal it; `low_counts` (BINS) counts the bin's entries by their low 16 bits."""
    h = low_counts[above + 1 :].cpu().numpy()
    low = np.flatnonzero(h)
    h = h[low].astype(np.int64)
    low += above + 1
    c = int(h.sum()) + ties
    s1 = int((h * low).sum()) + ties * above
    s2 = int((h * low * low).sum()) + ties * above * above
    e, j = bin_ >> 7, bin_ & 0x7F
    base = (j << 16) + (1 << 23 if e else 0)
    return (c * base * base + 2 * base * s1 + s2) << (2 * max(e, 1))
