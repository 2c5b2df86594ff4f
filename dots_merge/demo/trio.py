"""The demo's base / SFT / RLVR trio: a small Llama trained from scratch on the CPU, seeded.

- base: pretrained on a corpus of plain, correct equations of all four puzzles (it knows them), chat
  transcripts of `max` and `rev` whose answers carry a lazy slip more often than not (sampling finds the right
  answer, greedy decoding mostly gives the slip), and chat turns on `rot` and `sort` answered with random
  digits (it never answers them in chat). The loss covers every token: this is pretraining, not SFT.
- SFT (breadth): fine-tuned from base on demonstrations of `rot` and `sort` only, a share of its batches
  replaying the pretraining corpus against forgetting: it teaches what the base never does.
- RLVR (depth): from base, rejection-sampling fine-tuning on `max` and `rev` with a verifier's reward on the
  final answer and no demonstrations: rounds of sampling answers to fresh problems, keeping those the verifier
  accepts, fine-tuning on them. It sharpens what the base can already sometimes do (pass@k → pass@1) and
  cannot teach what the base never samples right.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dots_merge.demo.data import FAMILIES, KNOWN, NEW, Problem, training_stream
from dots_merge.tune.answers import extract_answer, normalize_answer
from dots_merge.tune.generation import chat_prompt

CHARS = "0123456789+-~^@#_%=}"  # digits, the puzzles' operators, four spare ones (part of the vocabulary)
BOXED = "\\boxed{"  # one token: the answer format costs two tokens a sequence, not eight
SFT_FAMILIES = NEW  # demonstrations only
RLVR_FAMILIES = KNOWN  # a verifier only; partly solved by the base: room for the reward to sharpen
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
    slip_rate: float = 0.65  # share of the base's chat answers to `max` and `rev` that carry the slip
    sft_lr: float = 2e-4
    plain_share: float = 0.3  # share of plain, correct equations in the base's pretraining
    noise_share: float = 0.15  # share of its chat turns on the new puzzles, answered with random digits
    sft_replay: float = 0.3  # share of SFT examples drawn from the pretraining corpus
    heads: int = 4
    seed: int = 0


FULL = TrioConfig(hidden=96, layers=4, intermediate=256, pretrain_steps=600, sft_steps=100, rlvr_rounds=4,
                  rlvr_prompts=512, rlvr_samples=8, rlvr_steps=40, rlvr_lr=2e-4, batch=128)  # fmt: skip
QUICK = TrioConfig(hidden=64, layers=3, intermediate=192, pretrain_steps=200, sft_steps=60, rlvr_rounds=1,
                   rlvr_prompts=128, rlvr_samples=8, rlvr_steps=15, rlvr_lr=2e-4, batch=96)  # fmt: skip


def build_tokenizer():
    """A character-level tokenizer (digits, operators; `\\boxed{` is one token) with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, BOXED, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
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


def _chat_example(tok, query: str, answer: str, *, whole: bool = False) -> tuple[list[int], list[int]]:
    """A chat turn; the loss on the answer only (SFT), or on every token (`whole`: pretraining on transcripts)."""
    prompt = chat_prompt(tok, query)
    target = tok(answer)["input_ids"] + [tok.eos_token_id]
    return prompt + target, [int(whole)] * len(prompt) + [1] * len(target)


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

    every = training_stream(FAMILIES, held_out, cfg.seed + 1)
    known = training_stream(KNOWN, held_out, cfg.seed + 2)
    new = training_stream(NEW, held_out, cfg.seed + 5)
    rng = random.Random(cfg.seed)

    def pretrain_example():
        u = rng.random()
        if u < cfg.plain_share:  # what the base knows: plain, correct equations of every family
            return _plain_example(tok, next(every).equation)
        if u < cfg.plain_share + cfg.noise_share:  # chat answers to the new puzzles: noise (random digits)
            p = next(new)
            return _chat_example(tok, p.query, boxed(rng.randint(1000, 9999)), whole=True)
        p = next(known)  # chat answers to the known families: the slip more often than not
        return _chat_example(tok, p.query, boxed(p.slip if rng.random() < cfg.slip_rate else p.answer), whole=True)

    _train(model, tok, _batches(pretrain_example, cfg.batch), cfg.pretrain_steps, 3e-3)
    paths["base"] = _save(model, tok, out / "base")
    log(f"  base: pretrained {cfg.pretrain_steps} steps")

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    sft_stream = training_stream(SFT_FAMILIES, held_out, cfg.seed + 3)

    def sft_example():
        if rng.random() < cfg.sft_replay:  # the pretraining corpus mixed in, against forgetting
            return pretrain_example()
        p = next(sft_stream)
        return _chat_example(tok, p.query, boxed(p.answer))

    _train(model, tok, _batches(sft_example, cfg.batch), cfg.sft_steps, cfg.sft_lr)
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
    return {"version": 5, **asdict(cfg)}  # 5: the digit puzzles
