"""The objective interface: a label-free score of a candidate, computed from what one trial produced.

An objective is one small class: its name (the recipe's `tune.objectives` and the trial record's key), its
direction, what it needs from the trial (the queries' NLL, the model's distribution at each generated token),
its value per query and overall, and the reference a hypervolume is measured from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from dots_merge.recipe.tune_section import DEFAULT_OBJECTIVES
from dots_merge.tune.generation import Completion

MAXIMIZE, MINIMIZE = "maximize", "minimize"


@dataclass
class Evidence:
    """What a trial produced on its queries: the sampled completions, their answers (None when none was
    extracted or the sample was truncated), how answers compare, and each query's mean token NLL."""

    completions: list[list[Completion]]
    answers: list[list[str | None]]
    equal: Callable[[str, str], bool]
    nll: list[float]


class Objective(ABC):
    """One label-free objective of the search."""

    name: ClassVar[str]
    direction: ClassVar[str]  # MAXIMIZE or MINIMIZE
    symbol: ClassVar[str] = ""  # ↑ or ↓, for tables
    needs_nll: ClassVar[bool] = False  # teacher-forced NLL of the queries
    needs_certainty: ClassVar[bool] = False  # the model's full next-token distribution at each generated token

    @property
    def per_query_key(self) -> str:
        """The trial record's key of the per-query values."""
        return f"per_query_{self.name}"

    @abstractmethod
    def per_query(self, evidence: Evidence) -> list[float]:
        """The objective on each query."""

    def aggregate(self, per_query: Sequence[float]) -> float:
        """The candidate's value from the per-query values (their mean unless the objective says otherwise)."""
        return sum(per_query) / len(per_query)

    def cost(self, value: float) -> float:
        """The value as a quantity to minimise on a scale where differences mean the same everywhere (samplers
        scalarise these)."""
        return -value if self.direction == MAXIMIZE else value

    def reference(self, values: Sequence[float]) -> float:
        """A hypervolume reference worse than every value: the objective's worst possible value when bounded."""
        span = max(values) - min(values)
        return min(values) - 0.1 * span if self.direction == MAXIMIZE else max(values) + 0.1 * span


REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available to `tune.objectives` by its name."""
    REGISTRY[cls.name] = cls
    return cls


def make_objectives(names: Sequence[str] = DEFAULT_OBJECTIVES) -> list[Objective]:
    """The objectives of these names, in this order."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown objective {unknown[0]!r} (known: {', '.join(sorted(REGISTRY))})")
    return [REGISTRY[n]() for n in names]


def reference_point(rows: Sequence[Sequence[float]], objectives: Sequence[Objective]) -> tuple[float, ...]:
    """The hypervolume reference of these objective tuples: each objective's `reference`."""
    return tuple(o.reference([row[j] for row in rows]) for j, o in enumerate(objectives))
