"""The demo's base / SFT / RLVR trio: a small Llama trained from scratch on the CPU, seeded.

- base: pretrained on plain equations of every family and on chat-formatted problems answered with the
  final answer in `\\boxed{}`, mostly easy ones (so it knows the chat format, and the hard families only a
  little in it);
- SFT (breadth): fine-tuned from base on demonstrations — final answer in `\\boxed{}` — of the families that
  have them (addition, 3-digit addition, multiplication);
- RLVR (depth): from base, rejection-sampling fine-tuning with the verifier's reward (exact answer) on
  subtraction, the family that comes with a verifier and no demonstrations (as RLVR data does in the
  paper's setting): rounds of sampling 8 answers per problem, keeping the ones the verifier accepts and
  fine-tuning on them. The base partly solves subtraction, so there is room for the reward to sharpen it.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dots_merge.demo.data import EASY, FAMILIES, HARD, Problem, training_stream
from dots_merge.tune.answers import extract_answer, normalize_answer
from dots_merge.tune.generation import chat_prompt

CHARS = "0123456789+-*= \n\\boxed{}"
SFT_FAMILIES = ("add2", "add3", "mul21")  # the families with demonstrations
RLVR_FAMILIES = ("sub2",)  # a verifier only; partly solved by the base: room for the reward to sharpen
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class TrioConfig:
    hidden: int
    layers: int
    intermediate: int
    pretrain_steps: int
    sft_steps: int
    rlvr_rounds: int
    rlvr_prompts: int
    rlvr_samples: int
    rlvr_steps: int  # fine-tuning steps per round
    rlvr_lr: float
    batch: int
    heads: int = 4
    seed: int = 0


FULL = TrioConfig(hidden=128, layers=4, intermediate=384, pretrain_steps=1500, sft_steps=300, rlvr_rounds=6,
                  rlvr_prompts=512, rlvr_samples=8, rlvr_steps=40, rlvr_lr=1e-4, batch=128)  # fmt: skip
QUICK = TrioConfig(hidden=96, layers=3, intermediate=288, pretrain_steps=600, sft_steps=80, rlvr_rounds=2,
                   rlvr_prompts=128, rlvr_samples=8, rlvr_steps=15, rlvr_lr=1e-4, batch=96)  # fmt: skip


def build_tokenizer():
    """A character-level tokenizer (digits, operators, `\\boxed{}`) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + list(dict.fromkeys(CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _chat_example(tok, query: str, answer: str) -> tuple[list[int], list[int]]:
    prompt = chat_prompt(tok, query)
    target = tok(answer)["input_ids"] + [tok.eos_token_id]
    return prompt + target, [0] * len(prompt) + [1] * len(target)


def _plain_example(tok, text: str) -> tuple[list[int], list[int]]:
    ids = [tok.bos_token_id, *tok(text)["input_ids"], tok.eos_token_id]
    return ids, [1] * len(ids)


def _train(model, tok, batches, steps: int, lr: float) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    for step in range(steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.05)
        examples = next(batches)
        width = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), width), tok.pad_token_id)
        labels = torch.full((len(examples), width), -100)
        attention = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (ids, mask) in enumerate(examples):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask, strict=True)])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


def _batches(make, batch: int):
    while True:
        yield [make() for _ in range(batch)]


def boxed(answer: int) -> str:
    """A chat answer: the final answer in `\\boxed{}`, as the paper's models write it."""
    return f"\\boxed{{{answer}}}"


def correct(completion: str, problem: Problem) -> bool:
    """The verifier: the extracted final answer equals the true one."""
    return normalize_answer(extract_answer(completion)) == normalize_answer(str(problem.answer))


def build(out: Path, cfg: TrioConfig, held_out: set[Problem], *, log=print) -> dict[str, Path]:
    """Train and save base/, sft/ and rlvr/ under `out`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    config = LlamaConfig(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        vocab_size=len(tok),
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    paths = {}

    everything = training_stream(FAMILIES, held_out, cfg.seed + 1)
    easy = training_stream(EASY, held_out, cfg.seed + 2)
    hard_chat = training_stream(HARD, held_out, cfg.seed + 5)
    rng = random.Random(cfg.seed)

    def pretrain_example():
        u = rng.random()
        if u < 0.5:
            return _plain_example(tok, next(everything).equation)
        p = next(easy) if u < 0.9 else next(hard_chat)
        return _chat_example(tok, p.query, boxed(p.answer))

    _train(model, tok, _batches(pretrain_example, cfg.batch), cfg.pretrain_steps, 3e-3)
    paths["base"] = _save(model, tok, out / "base")
    log(f"  base: pretrained {cfg.pretrain_steps} steps")

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    sft_stream = training_stream(SFT_FAMILIES, held_out, cfg.seed + 3)

    def sft_example():
        p = next(sft_stream)
        return _chat_example(tok, p.query, boxed(p.answer))

    _train(model, tok, _batches(sft_example, cfg.batch), cfg.sft_steps, 5e-4)
    paths["sft"] = _save(model, tok, out / "sft")
    log(f"  sft: {cfg.sft_steps} steps on demonstrations of {', '.join(SFT_FAMILIES)}")

    model.load_state_dict(base_state)
    _rejection_sampling(model, tok, training_stream(RLVR_FAMILIES, held_out, cfg.seed + 4), cfg, log)
    paths["rlvr"] = _save(model, tok, out / "rlvr")
    return paths


def _rejection_sampling(model, tok, problems, cfg: TrioConfig, log) -> None:
    """RLVR by rejection sampling: each round samples `rlvr_samples` answers (temperature 1) to fresh problems,
    keeps one the verifier accepts per problem, and fine-tunes on those (the reward is the filter)."""
    from dots_merge.tune.generation import generate_answers

    rng = random.Random(cfg.seed + 4)
    for r in range(cfg.rlvr_rounds):
        batch = [next(problems) for _ in range(cfg.rlvr_prompts)]
        model.eval()
        samples = generate_answers(model, tok, [p.query for p in batch], samples=cfg.rlvr_samples, temperature=1.0,
                                   top_p=1.0, max_new_tokens=16, seed=cfg.seed + 1000 + r, batch_size=256)  # fmt: skip
        kept = []
        for p, answers in zip(batch, samples, strict=True):
            accepted = sorted({a.strip() for a in answers if correct(a, p)})
            if accepted:
                kept.append(_chat_example(tok, p.query, accepted[0]))
        log(f"  rlvr round {r + 1}/{cfg.rlvr_rounds}: reward {len(kept) / len(batch):.2f} (pass@{cfg.rlvr_samples})")
        if kept:
            _train(
                model,
                tok,
                _batches(functools.partial(rng.choice, kept), min(64, len(kept))),
                cfg.rlvr_steps,
                cfg.rlvr_lr,
            )
    model.eval()


def _save(model, tok, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def config_key(cfg: TrioConfig) -> dict:
    return {"version": 4, **asdict(cfg)}  # 4: RLVR samples drawn by dots-merge's own seeded sampler
