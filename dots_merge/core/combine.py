"""The λ-sum of DoTS (method.md §4): θ = θ_base + Σ_i λ_i · f_i · S(τ_i), in float32, one tensor at a time.

This is the only place the sum is computed. The mergekit kernel (`dots_merge.merge.method`) and a trial's
in-memory update (`dots_merge.tune.candidate`) both call `combine`, chunk by chunk over the same spans, so a
trial's weights are bit for bit those that `dots-merge merge` writes for the trial's recipe.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from dots_merge.core.task_vector import sparse_chunks
from dots_merge.core.topk import TopK, chunk_spans

RESCALE_MODES = ("global", "tensor", "none")


def rescale_factor(mode: str, *, tensor_ratio: float | None = None, global_factor: float | None = None) -> float:
    """f for one tensor: 1 (`none`), ‖τ‖/‖S(τ)‖ of this tensor (`tensor`) or of the whole model (`global`)."""
    if mode == "none":
        return 1.0
    value = tensor_ratio if mode == "tensor" else global_factor
    if mode not in RESCALE_MODES or value is None:
        raise ValueError(f"rescale {mode!r} needs its factor")
    return float(value)


@dataclass
class Term:
    """One fine-tune's contribution α · S(τ) to one tensor, α = λ · f.

    S(τ) is materialised (`values`: flat float32), computed chunk by chunk from `tuned` and a known `selection`
    (the streamed merge: no task-vector-sized buffer), or given as `stream`, a function of the device that yields
    (span, S(τ)[span]) over `chunk_spans` (a tune's compact vector store)."""

    alpha: float
    values: torch.Tensor | None = None
    stream: Callable[[torch.device], Iterator[tuple[slice, torch.Tensor]]] | None = None
    tuned: torch.Tensor | None = None
    selection: TopK | None = None
    check_finite: bool = True
    model: object = None  # names the fine-tune in a NonFiniteTaskVector

    def chunks(self, base: torch.Tensor, device: torch.device) -> Iterator[tuple[slice, torch.Tensor]]:
        """(span, S(τ)[span]) over `chunk_spans`, on `device`."""
        if self.stream is not None:
            return self.stream(device)
        if self.values is not None:
            flat = self.values.reshape(-1)
            return ((sl, flat[sl].to(device)) for sl in chunk_spans(flat.numel(), device))
        if self.tuned is None or self.selection is None:
            raise ValueError("a Term needs `values`, or `tuned` and `selection`")
        return sparse_chunks(
            base, self.tuned, self.selection, device=device, check_finite=self.check_finite, model=self.model
        )


def combine(base: torch.Tensor, terms: Iterable[Term], *, out: torch.Tensor | None = None) -> torch.Tensor:
    """θ = base + Σ α_i · S(τ_i) in float32 (shaped like `base`), accumulated in the order of `terms`.

    `terms` is consumed one at a time, so a generator may build each materialised term in one reused buffer.
    `out` (flat float32 with base's numel) receives the result when given; it sets the device of the math.
    """
    flat = base.reshape(-1)
    n = flat.numel()
    if out is None:
        out = torch.empty(n, dtype=torch.float32, device=base.device)
    elif out.numel() != n or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 with {n} entries")
    device = out.device
    for sl in chunk_spans(n, device):
        out[sl].copy_(flat[sl])
    for term in terms:
        for sl, chunk in term.chunks(flat, device):
            out[sl].add_(chunk, alpha=term.alpha)
    return out.view(base.shape)
