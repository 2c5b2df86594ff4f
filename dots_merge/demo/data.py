"""Synthetic arithmetic with verifiable answers, in four families, split into train / pool / test.

Easy families (2-digit addition and subtraction) and hard ones (3-digit addition, 2-digit × 1-digit
multiplication). The three splits never share a problem; labels are used to train SFT and to reward RLVR
samples and, on the test split, only for the demo's accuracy table — never for tuning.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

EASY = ("add2", "sub2")
HARD = ("add3", "mul21")
FAMILIES = EASY + HARD


@dataclass(frozen=True)
class Problem:
    family: str
    a: int
    b: int

    @property
    def op(self) -> str:
        return {"add2": "+", "add3": "+", "sub2": "-", "mul21": "*"}[self.family]

    @property
    def query(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        return {"+": self.a + self.b, "-": self.a - self.b, "*": self.a * self.b}[self.op]

    @property
    def equation(self) -> str:
        """The plain text the base model is pretrained on."""
        return f"{self.query}{self.answer}"


def _draw(family: str, rng: random.Random) -> Problem:
    if family == "add2":
        return Problem(family, rng.randint(0, 99), rng.randint(0, 99))
    if family == "sub2":
        a = rng.randint(0, 99)
        return Problem(family, a, rng.randint(0, a))
    if family == "add3":
        return Problem(family, rng.randint(100, 999), rng.randint(100, 999))
    return Problem(family, rng.randint(10, 99), rng.randint(2, 9))


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
