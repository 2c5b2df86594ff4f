"""The compact vector store's arithmetic: every lower density taken from one compressed S(τ) is the merge's S(τ)."""

from __future__ import annotations

import pytest
import torch

from dots_merge.core import compress, keep_count, select_within, sparse_chunks_of, sparse_task_vector
from dots_merge.core.compact import pack_bits, unpack_bits
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


@pytest.mark.parametrize(("n", "histogram"), [(1000, False), ((1 << 18) * 2 + 313, True), ((1 << 18) + 5, False)])
def test_every_lower_density_equals_the_merge_bit_for_bit(n, histogram, monkeypatch):
    if not histogram:  # without the first radix histogram, the selection makes both passes
        monkeypatch.setattr("dots_merge.core.compact.HISTOGRAM_SHARE", 1 << 40)
    base, tuned = _tied_pair(n, seed=n)
    compact = compress(base, tuned, 0.6)
    assert compact.kept == keep_count(0.6, n) and compact.values.dtype == torch.bfloat16
    assert (compact.high_histogram is not None) == histogram
    entry = (n + 7) // 8 + 2 * compact.kept  # 1/8 byte + 0.6 · 2 bytes per parameter
    if histogram:  # its nonzero bins as (bin, count) rows, within 1/32 of the entry
        rows = compact.high_histogram
        assert rows.shape[1] == 2 and 8 * rows.shape[0] <= entry // 32 and int(rows[:, 1].sum()) == compact.kept
        hist = torch.bincount(sparse_task_vector(base, tuned, 0.6).values.abs().view(torch.int32) >> 16,
                              minlength=1 << 16)  # fmt: skip
        hist[0] -= n - compact.kept  # the zeros S(τ) does not keep
        bins = rows[:, 0].long()
        assert torch.equal(hist.nonzero().squeeze(1), bins) and torch.equal(hist[bins], rows[:, 1].long())
    assert compact.nbytes == entry + (8 * compact.high_histogram.shape[0] if histogram else 0)
    for density in (0.6, 0.45, 0.3, 0.1, 0.01, 0.001):
        within, kept_norm = select_within(compact, base, density, torch.device("cpu"), norm=True)
        reference = sparse_task_vector(base, tuned, density)
        got = _stream(compact, base, within)
        assert torch.equal(got.view(torch.int32), reference.values.view(torch.int32)), density  # +0.0 stays +0.0
        assert kept_norm == reference.squared_norm_kept
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
    assert compact.mask is None and compact.kept == 5000
    for density in (1.0, 0.2):
        within, _ = select_within(compact, base, density, torch.device("cpu"))
        assert torch.equal(_stream(compact, base, within), sparse_task_vector(base, tuned, density).values)


def test_the_compact_stream_uses_the_merges_spans():
    base, tuned = _tied_pair((1 << 18) + 5, seed=1)
    compact = compress(base, tuned, 0.4)
    within, _ = select_within(compact, base, 0.2, torch.device("cpu"))
    spans = [sl for sl, _ in sparse_chunks_of(compact, base, within, torch.device("cpu"))]
    assert spans == list(chunk_spans(compact.numel, torch.device("cpu")))
