"""Exact top-k selection, the tie rule, k, and norms — pure tensor functions."""

from __future__ import annotations

import math

import pytest
import torch

from dots_merge import sparsify
from dots_merge.sparsify import (
    add_sparse_task_vector_,
    apply_topk_,
    keep_count,
    norm_ratio,
    select_topk,
    sparse_task_vector,
    squared_norm,
)
from tests.reference import sparsify64


@pytest.fixture(params=[1 << 18, 1000], ids=["one-chunk", "many-chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(sparsify, "CHUNK", request.param)
    return request.param


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("kind", ["gaussian", "bf16-ties", "many-zeros", "negative-only"])
def test_selection_matches_a_stable_sort(chunk, density, kind):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12_345, generator=gen)
    if kind == "bf16-ties":
        x = (x * 0.01).to(torch.bfloat16).float()  # thousands of exact ties
    elif kind == "many-zeros":
        x[torch.rand(x.shape, generator=gen) < 0.8] = 0.0
    elif kind == "negative-only":
        x = -x.abs()
    expected = sparsify64(x.double(), density).float()
    k = keep_count(density, x.numel())
    sel = select_topk(x, k)
    got = apply_topk_(x.clone(), sel)
    assert torch.equal(got, expected)
    kept_magnitudes = got.abs()[got != 0]
    assert kept_magnitudes.numel() <= k
    if kind != "many-zeros":
        assert torch.count_nonzero(got) == k


def test_ties_are_broken_by_lowest_index(chunk):
    x = torch.full((5000,), 0.5)
    sel = select_topk(x, 1234)
    assert sel.ties == 1234 and sel.threshold == 0.5
    got = apply_topk_(x.clone(), sel)
    assert torch.equal(got[:1234], x[:1234]) and torch.count_nonzero(got[1234:]) == 0


def test_threshold_ties_mixed_with_larger_values(chunk):
    x = torch.tensor([0.1, 3.0, 0.2, 0.2, -0.2, 5.0, 0.2] * 300)
    sel = select_topk(x, 700)  # 600 values above 0.2, then 100 of the 1200 ties at |0.2|
    assert sel.ties == 100
    got = apply_topk_(x.clone(), sel)
    assert torch.count_nonzero(got) == 700
    tie_positions = (got.abs() == 0.2).nonzero().flatten()
    all_ties = (x.abs() == 0.2).nonzero().flatten()
    assert torch.equal(tie_positions, all_ties[:100])


@pytest.mark.parametrize(
    ("density", "numel", "k"),
    [(0.3, 10, 3), (0.29, 100, 29), (0.7, 10, 7), (1.0, 17, 17), (0.3, 3, 3), (0.01, 50, 50), (0.5, 1, 1)],
)
def test_keep_count_uses_the_written_decimal_and_keeps_tiny_tensors_dense(density, numel, k):
    assert keep_count(density, numel) == k


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, math.nan])
def test_keep_count_rejects_densities_outside_the_unit_interval(density):
    with pytest.raises(ValueError):
        keep_count(density, 10)


def test_dense_selection_keeps_everything():
    x = torch.randn(10)
    sel = select_topk(x, 10)
    assert sel.dense
    assert torch.equal(apply_topk_(x.clone(), sel), x)


def test_task_vector_is_float32_difference_of_mixed_dtypes(chunk):
    base = torch.randn(3000).to(torch.bfloat16)
    tuned = (base.float() + torch.randn(3000) * 1e-2).to(torch.bfloat16)
    tau = sparse_task_vector(base, tuned, 1.0).values
    assert tau.dtype == torch.float32
    assert torch.equal(tau, tuned.float() - base.float())


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_fused_accumulation_equals_the_two_step_path_bitwise(chunk, density):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(5001, generator=gen).to(torch.bfloat16)
    tuned = (base.float() + torch.randn(5001, generator=gen) * 1e-2).to(torch.bfloat16)
    sparse = sparse_task_vector(base, tuned, density)
    two_step = base.float().add_(sparse.values, alpha=1.37)
    fused = add_sparse_task_vector_(base.float(), base, tuned, sparse.selection, 1.37)
    assert torch.equal(fused, two_step)


def test_sparse_task_vector_norms_and_nonfinite(chunk):
    base = torch.zeros(4000)
    tuned = torch.randn(4000, generator=torch.Generator().manual_seed(3))
    sparse = sparse_task_vector(base, tuned, 0.25)
    assert sparse.squared_norm == pytest.approx(float((tuned.double() ** 2).sum()), rel=1e-12)
    assert sparse.squared_norm_kept == pytest.approx(squared_norm(sparse.values), rel=1e-12)
    assert torch.count_nonzero(sparse.values) == 1000
    assert norm_ratio(sparse.squared_norm, sparse.squared_norm_kept) > 1.0
    tuned[1234] = math.inf
    with pytest.raises(sparsify.NonFiniteTaskVector):
        sparse_task_vector(base, tuned, 0.25)
    assert torch.count_nonzero(sparse_task_vector(base, tuned, 0.25, check_finite=False).values) == 1000


def test_norm_ratio_of_an_empty_selection_is_one():
    assert norm_ratio(0.0, 0.0) == 1.0
    assert norm_ratio(4.0, 1.0) == 2.0
