"""The `dots` merge method for mergekit: θ = θ_base + Σ λ_i · f_i · S(τ_i), per tensor, in float32.

The kernel sees one tensor group at a time and knows nothing about files. Two things reach it from the
driver (`dots_merge.merge.driver`) rather than from the recipe, through `kernel_context`:
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

from dots_merge.core import (
    METHOD_NAME,
    PAPER_URL,
    NonFiniteTaskVector,
    Term,
    TopK,
    combine,
    is_finite,
    keep_count,
    norm_ratio,
    sparse_task_vector,
)
from dots_merge.core import rescale_factor as factor_for  # the kernel's `rescale_factor` is a recipe parameter
from dots_merge.errors import DotsMergeError, NonFiniteError

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

    def terms():
        scratch = None  # one buffer for every materialised S(τ): each is added before the next is made
        for entry in group.non_base:
            selection = _cached_selection(str(entry.id), name, density[entry.id], base.numel())
            if selection is not None and rescale != "tensor":  # known selection and factor: S(τ) chunk by chunk
                factor = factor_for(rescale, global_factor=_global_factor(rescale, entry.id, rescale_factor))
                yield Term(
                    weight[entry.id] * factor,
                    tuned=entry.tensor,
                    selection=selection,
                    check_finite=_context.check_finite and not _context.inputs_checked,
                    model=entry.id,
                )
                continue
            if scratch is None:
                scratch = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
            try:
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
                raise NonFiniteTaskVector(entry.id) from None
            factor = factor_for(
                rescale,
                tensor_ratio=norm_ratio(sparse.squared_norm, sparse.squared_norm_kept),
                global_factor=_global_factor(rescale, entry.id, rescale_factor),
            )
            yield Term(weight[entry.id] * factor, values=sparse.values)

    try:
        return combine(base, terms())
    except NonFiniteTaskVector as error:
        raise nonfinite_error(name, base, group.base.id, error.model) from None


def _global_factor(rescale: str, model: object, factors: Mapping[object, float | None]) -> float | None:
    return rescale_factor_for(model, factors) if rescale == "global" else None


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
