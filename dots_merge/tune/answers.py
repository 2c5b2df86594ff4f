"""Answers and their agreement (method.md §5): extract the final answer of a completion, compare two answers,
and the consistency of a query's samples. Pure string functions."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from dots_merge.recipe.tune_section import ANSWER_RULES

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer is[:\s]*", re.IGNORECASE)
_LAST_NUMBER = re.compile(_NUMBER)


def boxed_contents(text: str) -> list[str]:
    """Contents of every `\\boxed{…}` (and `\\fbox{…}`), braces matched properly (`\\boxed{\\frac{1}{2}}`)."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def _braced(text: str, i: int) -> int:
    """The index just past the `{…}` group that opens at text[i] (braces matched), or -1."""
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    return -1


def _stated_answer(rest: str) -> str | None:
    """X in "the answer is X": a `\\boxed{}`, a `$…$` or `\\(…\\)` expression, a LaTeX command with its braced
    arguments (`\\frac{1}{2}`, `\\pi`), a number or fraction, a choice letter (`B`, `(B)`) or yes / no / true /
    false; None when what follows is none of these."""
    rest = rest.lstrip().lstrip("*").lstrip()
    if rest.startswith(("\\boxed", "\\fbox")):
        boxed = boxed_contents(rest)
        return boxed[0].strip() if boxed else None
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = rest.find(closer, len(opener))
            return rest[len(opener) : end].strip() or None if end > 0 else None
    command = re.match(r"-?\\[a-zA-Z]+", rest)
    if command:
        end = command.end()
        while end < len(rest) and rest[end] == "{":
            close = _braced(rest, end)
            if close < 0:
                return None
            end = close
        return rest[:end]  # \\frac{1}{2}, \\sqrt{2}, \\pi
    number = re.match(_NUMBER, rest)
    if number:
        return number.group(0)
    choice = re.match(r"\(?([A-Z])\)?(?![A-Za-z])", rest) or re.match(r"(yes|no|true|false)\b", rest, re.IGNORECASE)
    return choice.group(1) if choice else None  # a multiple-choice letter, (B), or yes / no / true / false


def make_extractor(rule: str) -> Callable[[str], str | None]:
    """The answer extractor for a rule: auto, boxed, last_number or regex:PATTERN (group 1 if any)."""
    if rule.startswith("regex:"):
        pattern = re.compile(rule[len("regex:") :], re.DOTALL)

        def by_regex(text: str) -> str | None:
            matches = list(pattern.finditer(text))
            if not matches:
                return None
            last = matches[-1]
            return last.group(1) if pattern.groups else last.group(0)

        return by_regex
    if rule not in ANSWER_RULES:
        raise ValueError(f"unknown answer rule {rule!r} (use auto, boxed, last_number or regex:PATTERN)")
    return lambda text: extract_answer(text, rule)


def extract_answer(text: str, rule: str = "auto") -> str | None:
    """The final answer of a completion, or None.

    auto: `<answer>…</answer>`, else the last `\\boxed{…}`, else X of the last "the answer is X" (a number,
    fraction, `\\boxed{}` or LaTeX expression, not the rest of the line), else the last number.
    """
    if rule in ("auto",):
        tags = _ANSWER_TAG.findall(text)
        if tags:
            return tags[-1].strip()
    if rule in ("auto", "boxed"):
        boxed = boxed_contents(text)
        if boxed:
            return boxed[-1].strip()
        if rule == "boxed":
            return None
    if rule == "auto":
        for said in reversed(list(_ANSWER_IS.finditer(text))):
            answer = _stated_answer(text[said.end() :])
            if answer:
                return answer
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str | None) -> str | None:
    """A canonical string: LaTeX wrappers and spaces gone, numbers as exact fractions (0.50, 1/2, \\frac{1}{2} → 1/2)."""
    if answer is None:
        return None
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".")
    frac = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(\d+)\}", s) or re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
    if frac:
        s = f"{frac.group(1)}{frac.group(2)}/{frac.group(3)}"
    if re.fullmatch(_NUMBER, s):
        try:
            value = Fraction(s.replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return s
        return str(value)
    return s or None


def _math_equal() -> Callable[[str, str], bool] | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        return None

    def equal(a: str, b: str) -> bool:
        try:
            return bool(verify(parse(f"${a}$"), parse(f"${b}$")))
        except Exception:
            return False

    return equal


def answer_comparator(mode: str = "auto") -> tuple[str, Callable[[str, str], bool]]:
    """(name, equal): `math` (math-verify, when installed and mode allows) or `string` (normalised equality)."""
    if mode in ("auto", "math"):
        equal = _math_equal()
        if equal is not None:
            return "math", lambda a, b: a == b or equal(a, b)
        if mode == "math":
            raise RuntimeError("answer comparison 'math' needs the math extra: pip install 'dots-merge[math]'")
    return "string", lambda a, b: a == b


def _groups(answers: Sequence[str | None], equal: Callable[[str, str], bool]) -> list[tuple[str | None, int]]:
    """(representative, count) of the answers grouped by `equal`, greedily in sample order; None groups with None."""
    groups: list[tuple[str | None, int]] = []
    for ans in (normalize_answer(a) for a in answers):
        for i, (rep, count) in enumerate(groups):
            if (rep is None and ans is None) or (rep is not None and ans is not None and equal(rep, ans)):
                groups[i] = (rep, count + 1)
                break
        else:
            groups.append((ans, 1))
    return groups


def majority_answer(answers: Sequence[str | None], equal: Callable[[str, str], bool] | None = None) -> str | None:
    """The most common extracted answer (normalised; the first seen among equally common ones), None when no
    sample has an answer."""
    groups = [g for g in _groups(answers, equal or (lambda a, b: a == b)) if g[0] is not None]
    return max(groups, key=lambda g: g[1])[0] if groups else None


def consistency(answers: Sequence[str | None], equal: Callable[[str, str], bool] | None = None) -> float:
    """Share of the most common answer among the samples; 0 when that answer is "none extracted".

    A sample with no answer stays in the denominator. Groups are formed greedily in sample order.
    """
    if not answers:
        return 0.0
    groups = _groups(answers, equal or (lambda a, b: a == b))
    best = max(count for _, count in groups)
    if any(rep is not None and count == best for rep, count in groups):
        return best / len(answers)
    return 0.0


