"""The `dots` merge method for mergekit: θ = θ_base + Σ λ_i · f_i · S(τ_i), per tensor, in float32.

The kernel sees one tensor group at a time and knows nothing about files. Two things reach it from the
driver (`dots_merge.merging`) rather than from the recipe, through `kernel_context`:
- cached top-k selections from the pre-pass (an optimisation: the kernel computes the same ones itself);
- whether non-finite inputs are allowed.
The global rescale factors f_i travel as the per-model parameter `rescale_factor`, which the driver writes
into the recipe after its pre-pass, so the recipe it saves reproduces the merge with plain mergekit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Literal, Optional

import torch
from mergekit import merge_methods
from mergekit.merge_methods import (
    BasePolicy,
    InputContract,
    PerNonBase,
    TensorGroup,
    merge_method,
)
from pydantic import Field

from dots_merge.errors import DotsMergeError, NonFiniteError
from dots_merge.sparsify import (
    NonFiniteTaskVector,
    TopK,
    add_sparse_task_vector_,
    is_finite,
    keep_count,
    norm_ratio,
    sparse_task_vector,
)

METHOD_NAME = "dots"
RESCALE_MODES = ("global", "tensor", "none")
PAPER_URL = "https://arxiv.org/abs/2605.00610"

SelectionKey = tuple[str, str, int]  # (model, output tensor name, k)


@dataclass
class KernelContext:
    """Run-time settings of the kernel that are not part of the recipe."""

    selections: Mapping[SelectionKey, TopK] = field(default_factory=dict)
    check_finite: bool = True
    inputs_checked: bool = False  # the pre-pass already checked every input the selections cover


_context = KernelContext()


@contextlib.contextmanager
def kernel_context(
    *, selections: Mapping[SelectionKey, TopK] | None = None, check_finite: bool = True, inputs_checked: bool = False
) -> Iterator[None]:
    """Give the kernel cached selections and the non-finite policy for the duration of one merge."""
    global _context
    previous = _context
    _context = KernelContext(selections=selections or {}, check_finite=check_finite, inputs_checked=inputs_checked)
    try:
        yield
    finally:
        _context = previous


def nonfinite_error(tensor: str, base: torch.Tensor, base_model: object, model: object) -> NonFiniteError:
    """The error for a non-finite task vector, naming the tensor and whichever input is at fault."""
    culprit = base_model if not is_finite(base) else model
    return NonFiniteError(
        f"tensor {tensor!r} of model {culprit} holds NaN or Inf (pass --allow-nonfinite to merge it anyway)"
    )


@merge_method(
    name=METHOD_NAME,
    pretty_name="DoTS (Decouple before Integration)",
    reference_url=PAPER_URL,
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def dots_kernel(
    group: TensorGroup,
    weight: PerNonBase[float] = 1.0,
    density: PerNonBase[Annotated[float, Field(gt=0.0, le=1.0)]] = 0.3,
    rescale: Literal["global", "tensor", "none"] = "global",
    rescale_factor: PerNonBase[Optional[float]] = None,  # noqa: UP045 (mergekit reads the annotation)
) -> torch.Tensor:
    """θ_base + Σ λ·f·S(τ) for one tensor, in float32 (mergekit casts the result to `out_dtype`)."""
    base = group.base.tensor
    name = group.metadata.name or ""
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    out.copy_(base.reshape(-1))
    scratch = None
    for entry in group.non_base:
        selection = _cached_selection(str(entry.id), name, density[entry.id], base.numel())
        try:
            if selection is not None and rescale != "tensor":
                # Known selection and factor: one fused pass, no task-vector-sized buffer.
                factor = 1.0 if rescale == "none" else rescale_factor_for(entry.id, rescale_factor)
                add_sparse_task_vector_(
                    out,
                    base,
                    entry.tensor,
                    selection,
                    weight[entry.id] * factor,
                    check_finite=_context.check_finite and not _context.inputs_checked,
                )
                continue
            if scratch is None:
                scratch = torch.empty_like(out)
            sparse = sparse_task_vector(
                base,
                entry.tensor,
                density[entry.id],
                selection=selection,
                out=scratch,
                check_finite=_context.check_finite,
                norms=rescale == "tensor",
            )
        except NonFiniteTaskVector:
            raise nonfinite_error(name, base, group.base.id, entry.id) from None
        if rescale == "tensor":
            factor = norm_ratio(sparse.squared_norm, sparse.squared_norm_kept)
        elif rescale == "none":
            factor = 1.0
        else:
            factor = rescale_factor_for(entry.id, rescale_factor)
        out.add_(sparse.values, alpha=weight[entry.id] * factor)
    return out.view(base.shape)


def rescale_factor_for(model: object, factors: Mapping[object, float | None]) -> float:
    """The global factor the driver computed for `model`; a clear error when there is none."""
    factor = factors[model]
    if factor is None:
        raise DotsMergeError(
            f"rescale: global needs whole-model norms for {model}: merge with `dots-merge merge`, "
            "`dots-merge-yaml` or `dots_merge.merge()` (they compute them first), or set rescale: tensor"
        )
    return float(factor)


def _cached_selection(model: str, tensor: str, density: float, numel: int) -> TopK | None:
    if not _context.selections:
        return None
    return _context.selections.get((model, tensor, keep_count(density, numel)))


def register() -> None:
    """Register `dots` with mergekit; calling it again is harmless."""
    if all(m.spec.name != METHOD_NAME for m in merge_methods.registered_methods()):
        merge_methods.register(dots_kernel)
