"""Pure statistics of task vectors (method.md §8): module types, layers, sign conflict, overlap.

No I/O: `analyze.py` streams tensors through these functions and sums the counts they return.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from dots_merge.core.topk import TopK, chunk_spans, keep_mask, magnitude_bits

MODULE_TYPES = ("embed", "q", "k", "v", "o", "gate", "up", "down", "norms", "lm_head", "other")
_MODULE_PATTERNS = (
    ("lm_head", ("lm_head", "embed_out")),
    ("embed", ("embed_tokens", "wte", "word_embeddings", "embed_in")),
    ("q", ("q_proj",)),
    ("k", ("k_proj",)),
    ("v", ("v_proj",)),
    ("o", ("o_proj", "out_proj", "attn.c_proj")),
    ("gate", ("gate_proj", "w1")),
    ("up", ("up_proj", "w3")),
    ("down", ("down_proj", "w2")),
    ("norms", ("norm", "ln_")),
)
_LAYER = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
NO_LAYER = "none"


def module_type(name: str) -> str:
    """The module type of a tensor name: embed, q, k, v, o, gate, up, down, norms, lm_head or other."""
    for kind, needles in _MODULE_PATTERNS:
        if any(needle in name for needle in needles):
            return kind
    return "other"


def layer_of(name: str) -> str:
    """The decoder layer index of a tensor name as a string, or "none" (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return m.group(1) if m else NO_LAYER


@dataclass
class PairCounts:
    """Coordinate counts for one pair of task vectors at one sparsity level (or dense)."""

    coordinates: int = 0  # all coordinates
    opposite: int = 0  # both non-zero with opposite signs
    both: int = 0  # both non-zero
    either: int = 0  # at least one non-zero

    def __iadd__(self, other: PairCounts) -> PairCounts:
        self.coordinates += other.coordinates
        self.opposite += other.opposite
        self.both += other.both
        self.either += other.either
        return self

    @property
    def conflict_all(self) -> float:
        return self.opposite / self.coordinates if self.coordinates else 0.0

    @property
    def conflict_both(self) -> float:
        return self.opposite / self.both if self.both else 0.0

    @property
    def jaccard(self) -> float:
        return self.both / self.either if self.either else 0.0


def pair_counts(
    tau_a: torch.Tensor,
    tau_b: torch.Tensor,
    selections_a: Mapping[str, TopK],
    selections_b: Mapping[str, TopK],
) -> dict[str, PairCounts]:
    """Counts for the dense pair (key "dense") and for each sparsity level both mappings share.

    `selections_*` map a level label (e.g. "0.3") to the top-k selection of that task vector.
    """
    a, b = tau_a.reshape(-1), tau_b.reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(tau_a.shape)} vs {tuple(tau_b.shape)}")
    levels = [level for level in selections_a if level in selections_b]
    out = {"dense": PairCounts(coordinates=a.numel())} | {lv: PairCounts(coordinates=a.numel()) for lv in levels}
    ties_a = {lv: selections_a[lv].ties for lv in levels}
    ties_b = {lv: selections_b[lv].ties for lv in levels}
    for sl in chunk_spans(a.numel(), a.device):
        ca, cb = a[sl], b[sl]
        nz_a, nz_b = ca != 0, cb != 0
        opposite = (ca * cb) < 0
        _count(out["dense"], opposite, nz_a, nz_b)
        bits_a, bits_b = magnitude_bits(ca), magnitude_bits(cb)
        for lv in levels:
            keep_a, ties_a[lv] = _kept(bits_a, selections_a[lv], ties_a[lv])
            keep_b, ties_b[lv] = _kept(bits_b, selections_b[lv], ties_b[lv])
            _count(out[lv], opposite & keep_a & keep_b, nz_a & keep_a, nz_b & keep_b)
    return out


def _kept(bits: torch.Tensor, sel: TopK, ties_left: int) -> tuple[torch.Tensor, int]:
    if sel.dense:
        return torch.ones_like(bits, dtype=torch.bool), ties_left
    return keep_mask(bits, sel, ties_left)


def _count(counts: PairCounts, opposite: torch.Tensor, nz_a: torch.Tensor, nz_b: torch.Tensor) -> None:
    counts.opposite += int(torch.count_nonzero(opposite))
    counts.both += int(torch.count_nonzero(nz_a & nz_b))
    counts.either += int(torch.count_nonzero(nz_a | nz_b))
