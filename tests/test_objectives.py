"""Answer extraction, consistency and perplexity against hand computation."""

from __future__ import annotations

import math

import pytest
import torch

from dots_merge.tune.answers import (
    answer_comparator,
    boxed_contents,
    consistency,
    extract_answer,
    make_extractor,
    normalize_answer,
)
from dots_merge.tune.generation import chat_prompt, generate_answers, query_nll
from dots_merge.tune.objectives import perplexity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"first \boxed{3}, then \boxed{4}", "4"),
        (r"\boxed{\sqrt{x^{2}+1}} done", r"\sqrt{x^{2}+1}"),
        ("<answer> 17 </answer> and \\boxed{3}", "17"),
        ("The answer is 12.", "12"),
        ("so the answer is: $x+1$.", "x+1"),
        ("The answer is 12 apples, since 5 + 7 = 12", "12"),  # X, not the rest of the line
        ("Therefore the answer is 3/4 of the cake.", "3/4"),
        (r"the answer is \boxed{7} (checked)", "7"),
        (r"the answer is \frac{1}{2} because", r"\frac{1}{2}"),
        ("The answer is **-4.5**.", "-4.5"),
        ("the answer is unclear, maybe 8 or 9", "9"),  # nothing after "is": the last number
        ("So the answer is (C).", "C"),
        ("The answer is B", "B"),
        (r"the answer is \pi, as the area shows", r"\pi"),
        ("The answer is yes, 3 of them", "yes"),
        ("we get 3 apples and 5 pears", "5"),
        ("no digits here", None),
        (r"\boxed{unclosed", None),
    ],
)
def test_extract_answer_auto(text, expected):
    assert extract_answer(text) == expected


def test_other_rules():
    assert extract_answer(r"The answer is 12 \boxed{3}", "boxed") == "3"
    assert extract_answer("The answer is 12", "boxed") is None
    assert extract_answer(r"\boxed{3} then 7", "last_number") == "7"
    assert make_extractor(r"regex:ANSWER:\s*(\w+)")("ANSWER: a ... ANSWER: b") == "b"
    assert make_extractor("regex:[0-9]+")("x 12 y 34") == "34"
    with pytest.raises(ValueError):
        make_extractor("nearest")
    assert boxed_contents(r"\boxed{a{b}c} \fbox{d}") == ["a{b}c", "d"]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("0.5", r"\frac{1}{2}"),
        ("1/2", r"\dfrac{1}{2}"),
        ("1,000", "1000"),
        ("2.0", "2"),
        (r"\text{5}", " 5 "),
        ("$7$", "7."),
    ],
)
def test_normalisation_makes_equal_answers_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_consistency_by_hand():
    assert consistency(["3", "3", "4", None, "3.0", "x", "3"]) == pytest.approx(4 / 7)
    assert consistency([None, None, None, "3"]) == 0.0  # most common is "none extracted"
    assert consistency([None, None, "3", "3"]) == 0.5  # tie: a real answer wins
    assert consistency([]) == 0.0
    assert consistency(["x+1", "1+x", "2"], answer_comparator("string")[1]) == pytest.approx(1 / 3)


def test_math_comparison_with_the_math_extra():
    pytest.importorskip("math_verify", reason="the `math` extra (math-verify) is not installed")
    name, equal = answer_comparator("auto")
    assert name == "math"
    assert consistency(["x+1", "1+x", "2"], equal) == pytest.approx(2 / 3)
    assert consistency([r"\frac{1}{2}", "0.5", "2/4", "1/3"], equal) == pytest.approx(3 / 4)


@pytest.fixture(scope="module")
def tiny_lm(llama_trio):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_trio["base"]).eval()
    tok = AutoTokenizer.from_pretrained(llama_trio["base"])
    return model, tok


def test_perplexity_by_hand(tiny_lm):
    model, tok = tiny_lm
    queries = ["1 + 2 = 3", "the answer is 4 5 6 7 8"]
    templated = query_nll(model, tok, queries, batch_size=2, over="templated")
    nlls = query_nll(model, tok, queries, batch_size=2)  # the default: the query's own tokens
    for q, whole, own in zip(queries, templated, nlls, strict=True):
        ids = torch.tensor([chat_prompt(tok, q)])
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        token_nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
        assert whole == pytest.approx(token_nll.mean().item(), rel=1e-5)
        # "<|user|> q... <|end|> <|assistant|>": the query's tokens are ids[1 : 1 + n], predicted by logits[0 : n]
        n = len(q.split())
        assert tok.convert_ids_to_tokens(ids[0, 1 : 1 + n].tolist()) == q.split()
        assert own == pytest.approx(token_nll[:n].mean().item(), rel=1e-5)
        assert own != pytest.approx(whole, rel=1e-3)
    assert query_nll(model, tok, queries, batch_size=1) == pytest.approx(nlls, rel=1e-5)
    assert perplexity(nlls) == pytest.approx(math.exp(sum(nlls) / 2))
    assert "<|user|>" in tok.decode(chat_prompt(tok, "1 + 2"))


def test_generation_is_seeded_and_batched(tiny_lm):
    model, tok = tiny_lm
    args = dict(samples=3, temperature=0.6, top_p=1.0, max_new_tokens=6, seed=11)
    a = generate_answers(model, tok, ["1 + 2", "3 * 4", "5 - 1"], batch_size=2, **args)
    b = generate_answers(model, tok, ["1 + 2", "3 * 4", "5 - 1"], batch_size=2, **args)
    assert a == b and len(a) == 3 and all(len(x) == 3 for x in a)
    assert len({t for x in a for t in x}) > 1
