"""The two label-free objectives of DoTS (method.md §5): answer self-consistency and query perplexity.

Answer extraction and comparison are pure string functions; `generate_answers` and `perplexity` run a
transformers causal LM (batched, KV cache, seeded).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

ANSWER_RULES = ("auto", "boxed", "last_number")


@dataclass(frozen=True)
class Generation:
    """How the answers of a consistency measurement are sampled (method.md §5; the reference's defaults)."""

    samples: int = 7
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int = 8


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


def chat_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as a user turn with the generation prompt (plain text without a chat template)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True
        )
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    return list(tokenizer(text)["input_ids"])


def _pad_id(tokenizer) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if pid is not None:
            return int(pid)
    return 0


def pad_batch(ids: Sequence[Sequence[int]], pad: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token lists padded to one width, on the left (generation) or right."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        span = slice(width - len(x), width) if left else slice(0, len(x))
        input_ids[i, span] = torch.tensor(list(x), dtype=torch.long)
        mask[i, span] = 1
    return input_ids, mask


@torch.no_grad()
def query_nll(model, tokenizer, queries: Sequence[str], *, batch_size: int = 8) -> list[float]:
    """Mean token negative log-likelihood of each query wrapped as a user turn (teacher forcing)."""
    device = next(model.parameters()).device
    out: list[float] = []
    pad = _pad_id(tokenizer)
    for start in range(0, len(queries), batch_size):
        ids = [chat_prompt(tokenizer, q) for q in queries[start : start + batch_size]]
        input_ids, mask = pad_batch(ids, pad, left=False)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
        )  # (batch, width-1)
        target_mask = mask[:, 1:].float()
        per_query = (nll * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
        out += [float(v) for v in per_query]
    return out


def perplexity(nlls: Sequence[float]) -> float:
    """exp of the mean over queries of the per-query mean token NLL."""
    return math.exp(sum(nlls) / len(nlls))


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 8,
) -> list[list[str]]:
    """`samples` completions per prompt (sampling, KV cache, left-padded batches), seeded per batch."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        ids = [chat_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        input_ids, mask = pad_batch(ids, pad, left=True)
        width = input_ids.shape[1]
        torch.manual_seed(seed + start)
        sampling = temperature > 0
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=0 if sampling else None,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            pad_token_id=pad,
            use_cache=True,
        )
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        out += [texts[i * samples : (i + 1) * samples] for i in range(len(ids))]
    return out


@dataclass
class Scores:
    """Both objectives of one candidate on a query set, with what they were computed from."""

    consistency: float
    perplexity: float
    per_query_consistency: list[float]
    per_query_nll: list[float]
    answers: list[list[str | None]]
    seconds_generation: float
    seconds_perplexity: float


def score(
    model,
    tokenizer,
    queries: Sequence[str],
    *,
    suffix: str,
    extract: Callable[[str], str | None],
    equal: Callable[[str, str], bool],
    generation: Generation,
    seed: int,
    with_perplexity: bool = True,
) -> Scores:
    """Consistency of `samples` answers per query (prompt = query + suffix) and perplexity of the bare queries."""
    started = time.perf_counter()
    prompts = [f"{q}\n{suffix}" if suffix else q for q in queries]
    g = generation
    completions = generate_answers(
        model,
        tokenizer,
        prompts,
        samples=g.samples,
        temperature=g.temperature,
        top_p=g.top_p,
        max_new_tokens=g.max_new_tokens,
        seed=seed,
        batch_size=g.batch_size,
    )
    answers = [[extract(text) for text in texts] for texts in completions]
    per_query = [consistency(a, equal) for a in answers]
    generated = time.perf_counter()
    nlls = query_nll(model, tokenizer, queries, batch_size=g.batch_size) if with_perplexity else []
    return Scores(
        consistency=sum(per_query) / len(per_query),
        perplexity=perplexity(nlls) if nlls else math.nan,
        per_query_consistency=per_query,
        per_query_nll=nlls,
        answers=answers,
        seconds_generation=generated - started,
        seconds_perplexity=time.perf_counter() - generated,
    )
