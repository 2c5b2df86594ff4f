"""Uniform random search: the baseline the other backends are measured against."""

from __future__ import annotations

from dots_merge.tune.samplers.base import Tuner


class RandomTuner(Tuner):
    name = "random"

    @property
    def startup(self) -> int:
        return 0

    def _guided(self, k: int) -> list[float]:
        return self._scale(self._rng(k).random(len(self.bounds)))
