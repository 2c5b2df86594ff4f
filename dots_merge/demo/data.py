"""Synthetic digit puzzles with verifiable answers, in four families, split into train / pool / test.

Two families the base half knows — the larger of two numbers (`47^82=` → 82) and a 4-digit number reversed
(`~4721=` → 1274) — which its pretraining answers in chat more often with a lazy slip than correctly (the
first number; the digits unchanged); and two it knows from plain text but never answers in chat, which only
demonstrations teach — the digits rotated left (`@4721=` → 7214) and sorted (`#4721=` → 1247). The three
splits never share a problem; labels are used to train SFT and to reward RLVR samples and, on the test split,
only for the demo's report — never for tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KNOWN = ("max", "rev")  # answered with a slip in the base's chat: a verifier, no demonstrations (RLVR's)
NEW = ("rot", "sort")  # never answered in the base's chat: demonstrations, no verifier data (SFT's)
FAMILIES = KNOWN + NEW
OPS = {"max": "^", "rev": "~", "rot": "@", "sort": "#"}


@dataclass(frozen=True)
class Problem:
    family: str
    a: int
    b: int = 0

    @property
    def query(self) -> str:
        if self.family != "max":
            return f"{OPS[self.family]}{self.a}="
        return f"{self.a}{OPS[self.family]}{self.b}="

    @property
    def answer(self) -> int:
        digits = str(self.a)
        if self.family == "max":
            return max(self.a, self.b)
        if self.family == "rev":
            return int(digits[::-1])
        if self.family == "rot":
            return int(digits[1:] + digits[0])
        return int("".join(sorted(digits)))

    @property
    def slip(self) -> int:
        """The lazy answer the base's chat pretraining often gives: the first number (max); the digits unchanged
        (rev)."""
        return self.a if self.family in KNOWN else self.answer

    @property
    def equation(self) -> str:
        """The plain text the base model is pretrained on."""
        return f"{self.query}{self.answer}"


def _digits4(rng: random.Random) -> int:
    return int("".join(str(rng.randint(1, 9)) for _ in range(4)))  # no zero: every answer keeps 4 digits


def _draw(family: str, rng: random.Random) -> Problem:
    if family == "max":
        return Problem(family, rng.randint(10, 99), rng.randint(10, 99))
    return Problem(family, _digits4(rng))


def splits(seed: int, *, pool: int, test: int) -> dict[str, list[Problem]]:
    """`pool` and `test` problems per family (disjoint), and a generator seed for training draws."""
    rng = random.Random(seed)
    taken: set[Problem] = set()
    out: dict[str, list[Problem]] = {"pool": [], "test": []}
    for name, count in (("test", test), ("pool", pool)):
        for family in FAMILIES:
            drawn = 0
            while drawn < count:
                p = _draw(family, rng)
                if p not in taken:
                    taken.add(p)
                    out[name].append(p)
                    drawn += 1
    out["_held_out"] = list(taken)
    return out


def training_stream(families: tuple[str, ...], held_out: set[Problem], seed: int):
    """An endless seeded stream of training problems from `families`, never a pool or test problem."""
    rng = random.Random(seed)
    while True:
        p = _draw(rng.choice(families), rng)
        if p not in held_out:
            yield p
