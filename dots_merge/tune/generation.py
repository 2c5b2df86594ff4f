"""Generation with transformers: prompts as chat turns, batched sampling with a KV cache, query NLL."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
import tqdm

from dots_merge.errors import DotsMergeError
from dots_merge.faults import fault_point


def require_tokenizer(base) -> None:
    """Tuning generates text: the base model folder (a `Checkpoint`) must hold a tokenizer."""
    if not base.has_tokenizer:
        raise DotsMergeError(f"model {base.reference}: no tokenizer in {base.path} (tune generates text with it)")


def load_tokenizer(model_dir, *, trust_remote_code: bool = False):
    """The tokenizer of a model folder (the base's: candidates share it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)


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
    quiet: bool = True,
) -> list[list[str]]:
    """`samples` completions per prompt (sampling, KV cache, left-padded batches), seeded per batch."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out: list[list[str]] = []
    progress = tqdm.tqdm(total=len(prompts) * samples, desc="Generating", unit="sample", leave=False,
                         disable=True if quiet else None)  # fmt: skip
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(prompts), batch_size):
        fault_point("generate")
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
        new = generated[:, width:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        out += [texts[i * samples : (i + 1) * samples] for i in range(len(ids))]
        tokens += int(torch.count_nonzero(new != pad))
        progress.update(len(ids) * samples)
        progress.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):.0f} tok/s")
    progress.close()
    return out


