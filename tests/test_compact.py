"""The compact vector store's arithmetic: every lower density taken from one compressed S(τ) is the merge's S(τ)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from dots_merge.core import compress, keep_count, select_within, sparse_chunks_of, sparse_task_vector, tier_densities
from dots_merge.core.compact import pack_bits, unpack_bits
from dots_merge.core.squares import square_units, units_to_float
from dots_merge.core.topk import chunk_spans


def _stream(compact, base, within):
    flat = torch.empty(compact.numel)
    for sl, chunk in sparse_chunks_of(compact, base, within, torch.device("cpu")):
        flat[sl] = chunk
    return flat


def _tied_pair(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bfloat16 base and fine-tune whose τ has many exact ties and exact zeros (as real bf16 checkpoints do)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).to(torch.bfloat16)
    step = torch.randint(-3, 4, (n,), generator=g).to(torch.bfloat16) * 2**-6
    return base, (base.float() + step.float()).to(torch.bfloat16)


@pytest.mark.parametrize("n", [1, 9, 1000, (1 << 18) + 77])  # 1 and 9: padding of the bitmask; last: two spans
def test_pack_bits_round_trips(n):
    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.4
    packed = pack_bits(keep)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), keep)


@pytest.mark.parametrize(
    ("n", "histogram", "tiers"),
    [(1000, False, (0.6,)), ((1 << 18) * 2 + 313, True, (0.6,)), ((1 << 18) + 5, False, (0.35, 0.6)),
     ((1 << 18) * 2 + 313, True, (0.1, 0.3, 0.6)), (20000, False, (0.1, 0.35, 0.6))],
)  # fmt: skip
def test_every_lower_density_equals_the_merge_bit_for_bit(n, histogram, tiers, monkeypatch):
    if not histogram:  # without the bin moments, the selection makes both radix passes and the moments itself
        monkeypatch.setattr("dots_merge.core.compact.MOMENTS_SHARE", 1 << 40)
    base, tuned = _tied_pair(n, seed=n)
    compact = compress(base, tuned, tiers)
    bounds = [keep_count(d, n) for d in tiers]
    assert [t.kept for t in compact.tiers] == [b - a for a, b in zip([0, *bounds], bounds, strict=False)]
    assert compact.kept == keep_count(0.6, n) and all(t.values.dtype == torch.bfloat16 for t in compact.tiers)
    reference = sparse_task_vector(base, tuned, 0.6)
    ranked = torch.sort(-reference.values.abs(), stable=True).indices  # the merge's ranking: |τ| down, index up
    for tier, a, b in zip(compact.tiers, [0, *bounds], bounds, strict=False):  # tier j: ranks a..b, in flat order
        positions = ranked[a:b].sort().values
        assert torch.equal(unpack_bits(tier.mask, n).nonzero().squeeze(1), positions)
        assert torch.equal(tier.values, tuned[positions])
        assert tier.square_units == square_units(reference.values[positions])
        entry = (n + 7) // 8 + 2 * tier.kept  # 1/8 byte + 2 bytes a kept value
        assert (tier.moments is not None) == histogram
        if histogram:  # its nonzero bins as (bin, count, Σ low 16 bits, Σ their squares) rows, within 1/8 of the tier
            rows = tier.moments
            assert rows.shape[1] == 4 and 32 * rows.shape[0] <= entry // 8 and int(rows[:, 1].sum()) == tier.kept
            bits = reference.values[positions].abs().view(torch.int32)
            assert torch.equal(rows[:, 0], torch.bincount(bits >> 16, minlength=1 << 16).nonzero().squeeze(1))
            for column, weight in [(1, None), (2, bits & 0xFFFF), (3, (bits & 0xFFFF).double() ** 2)]:
                hist = torch.bincount(bits >> 16, weights=weight, minlength=1 << 16).long()
                assert torch.equal(rows[:, column], hist[rows[:, 0]])
        assert tier.nbytes == entry + (32 * tier.moments.shape[0] if histogram else 0)
    for density in (0.6, 0.45, 0.35, 0.3, 0.29, 0.1, 0.01, 0.001):
        within, kept_norm = select_within(compact, base, density, torch.device("cpu"), norm=True)
        reference = sparse_task_vector(base, tuned, density)
        got = _stream(compact, base, within)
        assert torch.equal(got.view(torch.int32), reference.values.view(torch.int32)), density  # +0.0 stays +0.0
        assert kept_norm == reference.squared_norm_kept
        if n <= 1000:  # the exact sum of the kept squares, rounded once
            assert kept_norm == float(sum(Fraction(v) ** 2 for v in reference.values.tolist()))
        assert compact.squared_norm == reference.squared_norm


def test_ties_at_the_threshold_go_to_the_lowest_index():
    base = torch.zeros(16)
    tuned = torch.tensor([1.0, 2, 2, 2, 2, 2, 3, 0, 0, 2, 0, 0, 0, 0, 0, 0])
    compact = compress(base, tuned, 0.5)  # 8 kept: the 3, the seven 2s
    within = select_within(compact, base, 0.25, torch.device("cpu"))[0]  # 4 kept: the 3 and the first three 2s
    assert torch.nonzero(_stream(compact, base, within)).flatten().tolist() == [1, 2, 3, 6]


def test_a_density_above_the_stored_one_is_refused():
    base, tuned = _tied_pair(100, seed=0)
    with pytest.raises(ValueError, match="more than the 30 kept"):
        select_within(compress(base, tuned, 0.3), base, 0.5, torch.device("cpu"))


def test_dense_store_serves_every_density():
    base, tuned = _tied_pair(5000, seed=3)
    compact = compress(base, tuned, 1.0)
    assert len(compact.tiers) == 1 and compact.tiers[0].mask is None and compact.kept == 5000
    for density in (1.0, 0.2):
        within, _ = select_within(compact, base, density, torch.device("cpu"))
        assert torch.equal(_stream(compact, base, within), sparse_task_vector(base, tuned, density).values)


def test_the_compact_stream_uses_the_merges_spans():
    base, tuned = _tied_pair((1 << 18) + 5, seed=1)
    compact = compress(base, tuned, 0.4)
    within, _ = select_within(compact, base, 0.2, torch.device("cpu"))
    spans = [sl for sl, _ in sparse_chunks_of(compact, base, within, torch.device("cpu"))]
    assert spans == list(chunk_spans(compact.numel, torch.device("cpu")))


def test_square_units_is_the_exact_sum_in_any_grouping():
    g = torch.Generator().manual_seed(5)
    scale = 10.0 ** torch.randint(-40, 38, (4000,), generator=g).float()
    x = torch.cat([torch.randn(4000, generator=g) * scale, torch.tensor([1e-45, -3e38, 0.0, -0.0, 1.17e-38])])
    x = x[torch.isfinite(x)]
    exact = sum(Fraction(v) ** 2 for v in x.tolist())
    assert Fraction(square_units(x), 1 << 300) == exact
    assert units_to_float(square_units(x)) == float(exact)
    assert square_units(x[:1234]) + square_units(x[1234:]) == square_units(x.flip(0))
    signs = torch.where(torch.rand(3000, generator=g) < 0.5, -1.0, 1.0)
    one_binade = signs * (1 + torch.rand(3000, generator=g))  # three float64 dot products
    twelve = signs * torch.exp2(torch.rand(3000, generator=g) * 12)  # int64 sums
    subnormal = torch.cat([torch.tensor([1e-45, 3e-39, 0.0]), torch.exp2(-112 - 12 * torch.rand(100, generator=g))])
    for v in (one_binade, twelve, subnormal, torch.cat([one_binade, torch.tensor([1e30])])):  # int64 sums; per exponent
        assert Fraction(square_units(v), 1 << 300) == sum(Fraction(t) ** 2 for t in v.tolist())


def test_the_gpu_code_of_the_exact_sums_gives_the_cpu_numbers():
    """`square_units` and the bin moments take torch's path on a GPU: run it here on CPU tensors."""
    from dots_merge.core import squares

    g = torch.Generator().manual_seed(6)
    x = torch.randn(50_000, generator=g) * 10.0 ** torch.randint(-30, 30, (50_000,), generator=g).float()
    bits = x.abs().view(torch.int32)
    assert squares._groups_torch(bits) == squares._groups_numpy(bits.numpy())
    on_gpu, on_cpu = squares.empty_moments(torch.device("cpu")), squares.empty_moments(torch.device("cpu"))
    squares._add_moments_torch(on_gpu, bits)
    squares.add_moments_(on_cpu, bits)
    assert torch.equal(on_gpu, on_cpu)
    assert squares.rows_units(squares.moment_rows(on_cpu)) == square_units(x)


def test_tiers_split_the_searched_range_at_its_middle():
    assert tier_densities(0.1, 0.6, 1000) == (0.35, 0.6)
    assert tier_densities(0.6, 0.6, 1000) == (0.6,)  # a fixed density: one tier
    assert tier_densities(0.001, 0.01, 100) == (0.01,)  # the middle would keep no entry (k < 1 counts as dense)
    assert tier_densities(0.3, 0.31, 10) == (0.31,)  # the middle keeps as many as the top
