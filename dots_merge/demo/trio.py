"""The demo's base / SFT / RLVR trio: a small Llama trained from scratch on the CPU, seeded.

- base: pretrained on plain equations of every family and on chat-formatted problems answered with the
  bare number, mostly easy ones (so it knows the chat format, and the hard families only a little in it);
- SFT (breadth): fine-tuned from base on demonstrations of every family;
- RLVR (depth): from base, GRPO-style policy gradient with the verifier's reward (exact answer) on the
  families the base already partly solves (subtraction, multiplication): groups of sampled answers per
  prompt, each weighted by its reward minus the group mean.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dots_merge.demo.data import EASY, FAMILIES, HARD, Problem, training_stream
from dots_merge.objectives import chat_prompt, extract_answer, normalize_answer, pad_batch

CHARS = "0123456789+-*= \n\\boxed{}"
RLVR_FAMILIES = ("sub2", "mul21")  # partly solved by the base: room for the verifier's reward to sharpen
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
    rlvr_steps: int
    rlvr_prompts: int
    rlvr_samples: int
    rlvr_lr: float
    batch: int
    heads: int = 4
    seed: int = 0


FULL = TrioConfig(hidden=128, layers=4, intermediate=384, pretrain_steps=1500, sft_steps=300, rlvr_steps=400,
                  rlvr_prompts=32, rlvr_samples=8, rlvr_lr=5e-5, batch=128)  # fmt: skip
QUICK = TrioConfig(hidden=96, layers=3, intermediate=288, pretrain_steps=600, sft_steps=80, rlvr_steps=30,
                   rlvr_prompts=16, rlvr_samples=8, rlvr_lr=5e-5, batch=96)  # fmt: skip


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
        return _chat_example(tok, p.query, str(p.answer))

    _train(model, tok, _batches(pretrain_example, cfg.batch), cfg.pretrain_steps, 3e-3)
    paths["base"] = _save(model, tok, out / "base")
    log(f"  base: pretrained {cfg.pretrain_steps} steps")

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    sft_stream = training_stream(FAMILIES, held_out, cfg.seed + 3)

    def sft_example():
        p = next(sft_stream)
        return _chat_example(tok, p.query, str(p.answer))

    _train(model, tok, _batches(sft_example, cfg.batch), cfg.sft_steps, 5e-4)
    paths["sft"] = _save(model, tok, out / "sft")
    log(f"  sft: {cfg.sft_steps} steps on demonstrations of every family")

    model.load_state_dict(base_state)
    _grpo(model, tok, training_stream(RLVR_FAMILIES, held_out, cfg.seed + 4), cfg, log)
    paths["rlvr"] = _save(model, tok, out / "rlvr")
    return paths


def _grpo(model, tok, prompts, cfg: TrioConfig, log) -> None:
    """GRPO-style policy gradient with the verifier's reward: per prompt a group of sampled answers, each
    weighted by its reward minus the group mean (over the group's std), on-policy, no KL term."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rlvr_lr, weight_decay=0.0)
    pad = tok.pad_token_id
    for step in range(cfg.rlvr_steps):
        problems = [next(prompts) for _ in range(cfg.rlvr_prompts)]
        input_ids, mask = pad_batch([chat_prompt(tok, p.query) for p in problems], pad, left=True)
        width = input_ids.shape[1]
        model.eval()
        torch.manual_seed(cfg.seed + 1000 + step)
        with torch.no_grad():
            seqs = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  max_new_tokens=8, num_return_sequences=cfg.rlvr_samples, pad_token_id=pad)  # fmt: skip
        completions = seqs[:, width:]
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        rewards = torch.tensor([float(correct(t, problems[i // cfg.rlvr_samples])) for i, t in enumerate(texts)]).view(
            len(problems), cfg.rlvr_samples
        )
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        # completion tokens up to and including the first end-of-sequence
        done = (completions == tok.eos_token_id).long().cumsum(1)
        target_mask = ((done == 0) | ((done == 1) & (completions == tok.eos_token_id))).float()
        full_mask = torch.cat([mask.repeat_interleave(cfg.rlvr_samples, 0), target_mask.long()], 1)
        model.train()
        positions = (full_mask.cumsum(1) - 1).clamp(min=0)  # as generate numbered them under left padding
        logits = model(input_ids=seqs, attention_mask=full_mask, position_ids=positions).logits
        logits = logits[:, width - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
        per_sample = (logp * target_mask).sum(1) / target_mask.sum(1).clamp(min=1)
        loss = -(advantages.view(-1) * per_sample).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, cfg.rlvr_steps // 4) == 0 or step == cfg.rlvr_steps - 1:
            log(f"  rlvr step {step + 1}/{cfg.rlvr_steps}: mean reward {rewards.mean():.2f}")
    model.eval()


def _save(model, tok, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def config_key(cfg: TrioConfig) -> dict:
    return {"version": 1, **asdict(cfg)}
