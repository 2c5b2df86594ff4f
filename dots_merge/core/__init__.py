"""Pure tensor math of DoTS, no I/O: task vectors, exact top-k selection, rescale factors, the λ-sum.

The merge kernel and a trial's in-memory update both call these functions; nothing else does this arithmetic.
"""

from dots_merge.core.combine import RESCALE_MODES, Term, combine, rescale_factor
from dots_merge.core.compact import (
    CompactVector,
    Tier,
    Within,
    compress,
    select_within,
    sparse_chunks_of,
    tier_densities,
)
from dots_merge.core.task_vector import (
    NonFiniteTaskVector,
    SparseTaskVector,
    chunk_squared_norm,
    is_finite,
    norm_ratio,
    sparse_chunks,
    sparse_task_vector,
    squared_norm,
)
from dots_merge.core.topk import TopK, chunk_spans, keep_count, keep_mask, magnitude_bits, select_topk

METHOD_NAME = "dots"  # the merge_method name in recipes
PAPER_URL = "https://arxiv.org/abs/2605.00610"

__all__ = [
    "METHOD_NAME",
    "PAPER_URL",
    "RESCALE_MODES",
    "CompactVector",
    "NonFiniteTaskVector",
    "SparseTaskVector",
    "Term",
    "Tier",
    "TopK",
    "Within",
    "chunk_spans",
    "chunk_squared_norm",
    "combine",
    "compress",
    "is_finite",
    "keep_count",
    "keep_mask",
    "magnitude_bits",
    "norm_ratio",
    "rescale_factor",
    "select_topk",
    "select_within",
    "sparse_chunks",
    "sparse_chunks_of",
    "sparse_task_vector",
    "squared_norm",
    "tier_densities",
]
