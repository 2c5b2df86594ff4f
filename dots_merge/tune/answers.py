"""Answers and their agreement (method.md §5): extract the final answer of a completion, compare two answers,
and the consistency of a query's samples. Pure string functions."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from dots_merge.recipe.tune_section import ANSWER_RULES

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?|-?\.\d+"
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer is[:\s]*([^\n]*)", re.IGNORECASE)
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

    auto: `<answer>…</answer>`, else the last `\\boxed{…}`, else "the answer is …", else the last number.
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
        said = _ANSWER_IS.findall(text)
        if said:
            answer = said[-1].strip().rstrip(".").strip().strip("$").strip()
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


def consistency(answers: Sequence[str | None], equal: Callable[[str, str], bool] | None = None) -> float:
    """Share of the most common answer among the samples; 0 when that answer is "none extracted".

    A sample with no answer stays in the denominator. Groups are formed greedily in sample order.
    """
    if not answers:
        return 0.0
    equal = equal or (lambda a, b: a == b)
    groups: list[tuple[str | None, int]] = []
    for ans in (normalize_answer(a) for a in answers):
        for i, (rep, count) in enumerate(groups):
            if (rep is None and ans is None) or (rep is not None and ans is not None and equal(rep, ans)):
                groups[i] = (rep, count + 1)
                break
        else:
            groups.append((ans, 1))
    best = max(count for _, count in groups)
    if any(rep is not None and count == best for rep, count in groups):
        return best / len(answers)
    return 0.0


