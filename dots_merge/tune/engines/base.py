"""The generation engine interface: what a trial needs from the model that holds the candidate's weights.

An engine is built once per run from the base model and keeps its weights on its device; `write` replaces them in
place with a candidate's, tensor by tensor (checkpoint names, as the merge writes them); `generate` samples
completions and `query_nll` scores the queries' tokens, the same way whichever engine runs them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch

from dots_merge.tune.generation import Completion

# (checkpoint tensor name, merged tensor, the dtype the merge writes it in or None for the engine's own)
Weights = Iterable[tuple[str, torch.Tensor, torch.dtype | None]]


class Engine(ABC):
    """A model that generates and scores text, and whose weights can be replaced in place."""

    name: ClassVar[str]
    # True when the engine forbids changing torch's thread count (vLLM on the CPU): the update then runs its
    # per-tensor work on the calling thread instead of one thread per core
    threads_fixed: bool = False
    # True when the engine computes each candidate itself from the recipe (vLLM's workers under tensor
    # parallelism): the resident candidate then calls open_candidate / apply_recipe / close_candidate, not write
    computes_candidate: bool = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def check_names(self, names: Sequence[str]) -> None:  # noqa: B027 - optional check
        """Raise when the engine cannot take a tensor of these names (before any arithmetic runs)."""

    @abstractmethod
    def write(self, weights: Weights) -> None:
        """Replace the model's weights with these tensors; every cache derived from the old weights is dropped."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        *,
        samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        batch_size: int = 8,
        self_certainty: bool = False,
        quiet: bool = True,
        ignore_eos: bool = False,
    ) -> list[list[Completion]]:
        """`samples` completions of each prompt as a user turn (temperature 0: greedy); a prompt's samples depend
        only on the seed and the prompt (`generation.query_seed`); `ignore_eos` (benchmarks): all run to
        `max_new_tokens`."""

    @abstractmethod
    def query_nll(self, queries: Sequence[str], *, batch_size: int = 8, over: str = "query") -> list[float]:
        """Mean token NLL of each query as a user turn, over the tokens `generation.scored_prompt` scores."""

    def open_candidate(self, spec: dict) -> None:
        """(computes_candidate) What the engine needs to build the candidate: recipe, density range, store."""
        raise NotImplementedError(f"engine {self.name} takes weights, not recipes")

    def apply_recipe(self, recipe):
        """(computes_candidate) Hold the weights of `recipe`; returns the recipe actually used."""
        raise NotImplementedError(f"engine {self.name} takes weights, not recipes")

    def close_candidate(self, *, keep_spill: bool = False) -> None:
        """(computes_candidate) Release what open_candidate built."""
        raise NotImplementedError(f"engine {self.name} takes weights, not recipes")

    def close(self) -> None:  # noqa: B027 - nothing to release by default
        """Release the engine (processes, device memory)."""
