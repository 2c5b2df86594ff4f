"""Exact top-k selection, the tie rule, k, and norms — pure tensor functions."""

from __future__ import annotations

import math

import pytest
import torch

from dots_merge.core import (
    NonFiniteTaskVector,
    Term,
    TopK,
    combine,
    keep_count,
    norm_ratio,
    select_topk,
    sparse_task_vector,
    squared_norm,
)
from dots_merge.core import topk as topk_module
from tests.reference import sparsify64


@pytest.fixture(params=[1 << 18, 1000], ids=["one-chunk", "many-chunks"])
def chunk(request, monkeypatch):
    monkeypatch.setattr(topk_module, "CHUNK", request.param)
    return request.param


def apply_topk(x: torch.Tensor, sel: TopK) -> torch.Tensor:
    """x with every entry that `sel` does not keep zeroed (S of τ = x − 0)."""
    return sparse_task_vector(torch.zeros_like(x), x, 1.0, selection=sel).values


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
    got = apply_topk(x, sel)
    assert torch.equal(got, expected)
    kept_magnitudes = got.abs()[got != 0]
    assert kept_magnitudes.numel() <= k
    if kind != "many-zeros":
        assert torch.count_nonzero(got) == k


def test_ties_are_broken_by_lowest_index(chunk):
    x = torch.full((5000,), 0.5)
    sel = select_topk(x, 1234)
    assert sel.ties == 1234 and sel.threshold_bits == int(torch.tensor([0.5]).view(torch.int32))
    got = apply_topk(x, sel)
    assert torch.equal(got[:1234], x[:1234]) and torch.count_nonzero(got[1234:]) == 0


def test_threshold_ties_mixed_with_larger_values(chunk):
    x = torch.tensor([0.1, 3.0, 0.2, 0.2, -0.2, 5.0, 0.2] * 300)
    sel = select_topk(x, 700)  # 600 values above 0.2, then 100 of the 1200 ties at |0.2|
    assert sel.ties == 100
    got = apply_topk(x, sel)
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
    assert torch.equal(apply_topk(x, sel), x)


def test_task_vector_is_float32_difference_of_mixed_dtypes(chunk):
    base = torch.randn(3000).to(torch.bfloat16)
    tuned = (base.float() + torch.randn(3000) * 1e-2).to(torch.bfloat16)
    tau = sparse_task_vector(base, tuned, 1.0).values
    assert tau.dtype == torch.float32
    assert torch.equal(tau, tuned.float() - base.float())


@pytest.mark.parametrize("density", [0.3, 1.0])
def test_the_chunked_sum_equals_the_two_step_path_bitwise(chunk, density):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(5001, generator=gen).to(torch.bfloat16)
    tuned = (base.float() + torch.randn(5001, generator=gen) * 1e-2).to(torch.bfloat16)
    sparse = sparse_task_vector(base, tuned, density)
    two_step = base.float().add_(sparse.values, alpha=1.37)
    fused = combine(base, [Term(1.37, tuned=tuned, selection=sparse.selection)])
    materialised = combine(base, [Term(1.37, values=sparse.values)])
    assert torch.equal(fused, two_step) and torch.equal(materialised, two_step)


def test_sparse_task_vector_norms_and_nonfinite(chunk):
    base = torch.zeros(4000)
    tuned = torch.randn(4000, generator=torch.Generator().manual_seed(3))
    sparse = sparse_task_vector(base, tuned, 0.25)
    assert sparse.squared_norm == pytest.approx(float((tuned.double() ** 2).sum()), rel=1e-12)
    assert sparse.squared_norm_kept == pytest.approx(squared_norm(sparse.values), rel=1e-12)
    assert torch.count_nonzero(sparse.values) == 1000
    assert norm_ratio(sparse.squared_norm, sparse.squared_norm_kept) > 1.0
    tuned[1234] = math.inf
    with pytest.raises(NonFiniteTaskVector):
        sparse_task_vector(base, tuned, 0.25)
    assert torch.count_nonzero(sparse_task_vector(base, tuned, 0.25, check_finite=False).values) == 1000


def test_norm_ratio_of_an_empty_selection_is_one():
    assert norm_ratio(0.0, 0.0) == 1.0
    assert norm_ratio(4.0, 1.0) == 2.0


def test_combine_adds_terms_in_order_and_names_a_nonfinite_fine_tune(chunk):
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(4321, generator=gen)
    a, b = base + torch.randn(4321, generator=gen) * 1e-2, base + torch.randn(4321, generator=gen) * 1e-3
    sa, sb = sparse_task_vector(base, a, 0.3), sparse_task_vector(base, b, 0.5)
    got = combine(base, [Term(0.7, tuned=a, selection=sa.selection), Term(1.9, values=sb.values)])
    assert torch.equal(got, base.clone().add_(sa.values, alpha=0.7).add_(sb.values, alpha=1.9))
    a[4000] = math.nan
    with pytest.raises(NonFiniteTaskVector) as error:
        combine(base, [Term(1.0, tuned=a, selection=sa.selection, model="sft")])
    assert error.value.model == "sft"
