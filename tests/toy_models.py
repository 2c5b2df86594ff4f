"""Synthetic base/SFT/RLVR checkpoints: real transformers models with random weights, built offline.

Used by the tests, the shipped example and the benchmark. The two fine-tunes imitate the paper's
observation (method.md §8): the SFT update is large and dense with most of its mass in the norms,
the RLVR update is small (`rlvr_scale`) and sparse, spread over attention and the output head.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHES = ("llama", "qwen2")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _config(arch: str, hidden: int, layers: int, vocab: int, tied: bool, intermediate: int | None, heads: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown toy architecture {arch!r} (use one of {ARCHES})")


def save_tokenizer(path: Path, vocab: int) -> None:
    """A word-level tokenizer with a chat template, `vocab` tokens in all."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
    words = [str(i) for i in range(10)] + ["+", "-", "*", "=", "\\boxed{", "}", "answer", "the", "is"]
    words += [f"w{i}" for i in range(max(0, vocab - len(specials) - len(words)))]
    table = {tok: i for i, tok in enumerate((specials + words)[:vocab])}
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


SPECIAL_IDS = {"pad": 1, "bos": 2, "eos": 3}  # as `save_tokenizer` numbers them
DIGIT_IDS = range(7, 17)


@torch.no_grad()
def _answer_briefly(model, hidden: int, vocab: int) -> None:
    """Make the random model talk like a terse solver: mostly digits, and an end-of-sequence token after a few of
    them, so that samples finish and carry an answer. Every embedding gets a constant component that dominates
    the last hidden state; the output rows of digits and EOS lean on it (by +3 and +4 in the logits)."""
    for key, value in SPECIAL_IDS.items():
        setattr(model.config, f"{key}_token_id", value)
        setattr(model.generation_config, f"{key}_token_id", value)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embed[:, 0] += 1.0
    lift = torch.zeros(vocab)
    lift[[i for i in DIGIT_IDS if i < vocab]] = 3.0
    lift[SPECIAL_IDS["eos"]] = 4.0
    if head is embed:  # tied: every row already has the constant; lean on it by a little more
        head[:, 0] += lift / hidden**0.5
    else:
        head[:, 0] = lift / hidden**0.5


def _save(model, path: Path, dtype: torch.dtype, shard_size: str | None, tokenizer: bool, vocab: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(str(path), max_shard_size=shard_size or "50GB")
    if tokenizer:
        save_tokenizer(path, vocab)
    return path


def build_trio(
    root: str | Path,
    *,
    arch: str = "llama",
    hidden: int = 32,
    layers: int = 2,
    vocab: int = 64,
    intermediate: int | None = None,
    heads: int = 4,
    dtype: torch.dtype = torch.float32,
    tied: bool = False,
    shard_size: str | None = None,
    tokenizer: bool = True,
    rlvr_scale: float = 1 / 30,
    seed: int = 0,
) -> dict[str, Path]:
    """Write `base/`, `sft/` and `rlvr/` under `root`; returns their paths."""
    from transformers import AutoModelForCausalLM

    root = Path(root)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        _config(arch, hidden, layers, vocab, tied, intermediate, heads), dtype=torch.float32
    )
    model.config._name_or_path = ""
    _answer_briefly(model, hidden, vocab)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {"base": _save(model, root / "base", dtype, shard_size, tokenizer, vocab)}
    gen = torch.Generator().manual_seed(seed + 1)
    for name in ("sft", "rlvr"):
        state = {}
        for key, value in base.items():
            if not value.is_floating_point():
                state[key] = value
                continue
            noise = torch.randn(value.shape, generator=gen) * 0.02
            if name == "sft":
                noise *= 5.0 if "norm" in key else 1.0
            else:
                keep = torch.rand(value.shape, generator=gen) < 0.5
                focus = any(s in key for s in ("self_attn", "lm_head", "embed_tokens"))
                noise = noise * keep * rlvr_scale * (3.0 if focus else 0.3)
            state[key] = value + noise
        model.load_state_dict(state)
        paths[name] = _save(model, root / name, dtype, shard_size, tokenizer, vocab)
    return paths
