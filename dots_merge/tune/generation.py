"""Generation with transformers: prompts as chat turns, seeded sampling with a KV cache, query NLL.

The sampling loop is ours rather than `model.generate`'s, for three things a tune needs from it:
- each query's samples depend only on the seed and the query (one random generator per query, seeded from
  both), never on the batch size or the query's place in a batch;
- a sample stops at any end-of-sequence id of the base (its generation config, model config and tokenizer
  may list several), and a sample cut at `max_new_tokens` is known to be truncated;
- the model's own next-token distribution at each generated token is at hand for self-certainty.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import tqdm

from dots_merge.errors import DotsMergeError
from dots_merge.faults import fault_point

PERPLEXITY_OVER = ("query", "templated")


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its text (end-of-sequence token not included) and how it ended."""

    text: str
    tokens: int  # generated tokens, the end-of-sequence token included when there is one
    finished: bool  # stopped at an end-of-sequence id (False: cut at max_new_tokens)
    self_certainty: float = math.nan  # mean over its tokens of KL(U ‖ p), when asked for
    ids: tuple[int, ...] = ()  # the generated token ids, the end-of-sequence token included


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


def scored_prompt(tokenizer, text: str, over: str = "query") -> tuple[list[int], list[bool]]:
    """Token ids of `text` as a user turn, and which of them perplexity scores.

    `templated`: every token of the chat-templated turn. `query`: only the tokens of `text` itself, each
    conditioned on everything before it (the template's opening included); the template's own tokens, the
    same for every query and every candidate, are context but not scored.
    """
    if over not in PERPLEXITY_OVER:
        raise ValueError(f"perplexity over {over!r}: use one of {', '.join(PERPLEXITY_OVER)}")
    if over == "templated":
        ids = chat_prompt(tokenizer, text)
        return ids, [True] * len(ids)
    if not getattr(tokenizer, "is_fast", False):
        raise DotsMergeError(
            "perplexity over the query needs a fast tokenizer (token offsets); set tune.perplexity.over: templated"
        )
    core = text.strip()
    if getattr(tokenizer, "chat_template", None):
        rendered, start = _render(tokenizer, text), -1
        prefix = _render(tokenizer, _PLACEHOLDER).split(_PLACEHOLDER)[0]  # where the template puts the content
        if rendered.startswith(prefix):
            found = rendered.find(core, len(prefix))
            start = found if found >= 0 and not rendered[len(prefix) : found].strip() else -1
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    else:
        rendered, start = text, text.find(core)
        encoded = tokenizer(rendered, return_offsets_mapping=True)
    if start < 0 or not core:
        raise DotsMergeError(
            f"the chat template does not keep the query {text[:40]!r} verbatim; set tune.perplexity.over: templated"
        )
    end = start + len(core)
    scored = [s < end and e > start and e > s for s, e in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), scored


_PLACEHOLDER = "\u2063dots-merge query\u2063"


def _render(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def _pad_id(tokenizer) -> int:
    for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if pid is not None:
            return int(pid)
    return 0


def eos_ids(model, tokenizer) -> set[int]:
    """Every end-of-sequence id of the model: its generation config, its config and its tokenizer."""
    out: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if value is None:
            continue
        out.update(int(v) for v in (value if isinstance(value, list | tuple) else [value]))
    return out


def query_seed(seed: int, query: str) -> int:
    """The seed of one query's samples: a function of the run's seed and the query's text only."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{query}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


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
def query_nll(model, tokenizer, queries: Sequence[str], *, batch_size: int = 8, over: str = "query") -> list[float]:
    """Mean token negative log-likelihood of each query wrapped as a user turn (teacher forcing), over the tokens
    `scored_prompt` scores."""
    device = next(model.parameters()).device
    out: list[float] = []
    pad = _pad_id(tokenizer)
    for start in range(0, len(queries), batch_size):
        prompts = [scored_prompt(tokenizer, q, over) for q in queries[start : start + batch_size]]
        input_ids, mask = pad_batch([ids for ids, _ in prompts], pad, left=False)
        scored = torch.zeros_like(mask)
        for i, (_, flags) in enumerate(prompts):
            scored[i, : len(flags)] = torch.tensor(flags, dtype=torch.long)
        input_ids, mask = input_ids.to(device), mask.to(device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
        )  # (batch, width-1): the NLL of token t+1
        target = scored[:, 1:].to(device).float()
        per_query = (nll * target).sum(1) / target.sum(1).clamp(min=1)
        out += [float(v) for v in per_query]
    return out


def _cache_name(model) -> str:
    """What this transformers release calls the KV cache, in a forward's arguments and output: `cache` (5.2x) or
    `past_key_values` (before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it: the prompt's forward then makes logits for its last position
    only, not a (batch, prompt length, vocabulary) tensor."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def _sample_rows(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row by inverse CDF of softmax(logits / T), nucleus-filtered, at the given uniforms."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= top_p] = 0.0  # keep the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    cdf = probs.cumsum(-1)
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


def _certainty(logits: torch.Tensor) -> torch.Tensor:
    """KL(U ‖ p) per row = −log V − mean_j log p_j, p = softmax(logits) (the model's own distribution)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -math.log(logits.shape[-1]) - logp.mean(-1)


@torch.no_grad()
def generate(
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
    self_certainty: bool = False,
    quiet: bool = True,
    ignore_eos: bool = False,
) -> list[list[Completion]]:
    """`samples` completions per prompt, `batch_size` prompts at a time (temperature 0: greedy).

    A prompt's samples come from its own generator (`query_seed`), so they do not depend on the batch.
    `ignore_eos` (benchmarks): every sample runs to `max_new_tokens`."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    stops = torch.tensor([-1] if ignore_eos else sorted(eos_ids(model, tokenizer)) or [-1], device=device)
    cache = _cache_name(model)
    out: list[list[Completion]] = []
    progress = tqdm.tqdm(total=len(prompts) * samples, desc="Generating", unit="sample", leave=False,
                         disable=True if quiet else None)  # fmt: skip
    started, produced = time.perf_counter(), 0
    for start in range(0, len(prompts), batch_size):
        fault_point("generate")
        batch = list(prompts[start : start + batch_size])
        generators = [torch.Generator().manual_seed(query_seed(seed, p)) for p in batch]
        ids = [chat_prompt(tokenizer, p) for p in batch for _ in range(samples)]
        input_ids, mask = pad_batch(ids, pad, left=True)
        input_ids, mask = input_ids.to(device), mask.to(device)
        rows = input_ids.shape[0]
        tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        length = torch.zeros(rows, dtype=torch.long, device=device)
        finished = torch.zeros(rows, dtype=torch.bool, device=device)
        certainty = torch.zeros(rows, dtype=torch.float64, device=device)
        position = (mask.cumsum(-1) - 1).clamp_(min=0)
        result = model(input_ids=input_ids, attention_mask=mask, position_ids=position, use_cache=True,
                       **_last_logits_only(model))  # fmt: skip
        for step in range(max_new_tokens):
            logits = result.logits[:, -1, :].float()
            if temperature > 0:
                uniforms = torch.cat([torch.rand(samples, generator=g, dtype=torch.float64) for g in generators])
                chosen = _sample_rows(logits.double(), uniforms.to(device), temperature, top_p)
            else:
                chosen = logits.argmax(-1)
            active = ~finished
            if self_certainty:
                certainty += torch.where(active, _certainty(logits), 0.0)
            tokens[:, step] = torch.where(active, chosen, pad)
            length += active.long()
            finished |= active & torch.isin(chosen, stops)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype, device=device)], dim=1)
            position = position[:, -1:] + 1
            result = model(input_ids=tokens[:, step : step + 1], attention_mask=mask, position_ids=position,
                           use_cache=True, **{cache: getattr(result, cache)})  # fmt: skip
        for i in range(len(batch)):
            group = []
            for r in range(i * samples, (i + 1) * samples):
                n = int(length[r])
                done = bool(finished[r])
                ids = tokens[r, :n].tolist()
                group.append(Completion(
                    text=tokenizer.decode(ids[: n - 1] if done else ids, skip_special_tokens=True),
                    tokens=n,
                    finished=done,
                    self_certainty=float(certainty[r] / n) if self_certainty and n else math.nan,
                    ids=tuple(ids),
                ))  # fmt: skip
            out.append(group)
        produced += int(length.sum())
        progress.update(rows)
        progress.set_postfix_str(f"{produced / max(time.perf_counter() - started, 1e-9):.0f} tok/s")
    progress.close()
    return out


def generate_answers(model, tokenizer, prompts: Sequence[str], **kwargs) -> list[list[str]]:
    """The texts of `generate`'s completions (for callers that need no more than the text)."""
    return [[c.text for c in group] for group in generate(model, tokenizer, prompts, **kwargs)]
