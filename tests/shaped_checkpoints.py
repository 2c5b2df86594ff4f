"""Checkpoints with the exact layout of real 7B–70B models that cost no disk: real config.json, tokenizer,
safetensors headers and index, and each shard `truncate`d to its full size (a sparse file, data as holes).

Anything that reads only configs and headers — `dots-merge plan`, `inspect_models`, mergekit's planner — sees
the real model. Used by tests/test_plan.py and benchmarks/plan_bench.py.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from tests.toy_models import save_tokenizer

PRESETS = {  # hidden, layers, heads, kv heads, intermediate, vocab, attention bias, architecture
    "qwen2.5-7b": (3584, 28, 28, 4, 18944, 152064, True, "Qwen2ForCausalLM", "qwen2"),
    "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256, False, "LlamaForCausalLM", "llama"),
    "qwen2.5-14b": (5120, 48, 40, 8, 13824, 152064, True, "Qwen2ForCausalLM", "qwen2"),
    "llama-3.1-70b": (8192, 80, 64, 8, 28672, 128256, False, "LlamaForCausalLM", "llama"),
}
SHARD_BYTES = 5 * 10**9


def tensor_shapes(preset: str) -> dict[str, list[int]]:
    """Every tensor of the preset's checkpoint and its shape (untied embeddings, as these models ship)."""
    hidden, layers, heads, kv, inter, vocab, bias, _, _ = PRESETS[preset]
    head_dim = hidden // heads
    shapes = {"model.embed_tokens.weight": [vocab, hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = [heads * head_dim, hidden]
        shapes[p + "self_attn.k_proj.weight"] = [kv * head_dim, hidden]
        shapes[p + "self_attn.v_proj.weight"] = [kv * head_dim, hidden]
        if bias:
            shapes[p + "self_attn.q_proj.bias"] = [heads * head_dim]
            shapes[p + "self_attn.k_proj.bias"] = [kv * head_dim]
            shapes[p + "self_attn.v_proj.bias"] = [kv * head_dim]
        shapes[p + "self_attn.o_proj.weight"] = [hidden, heads * head_dim]
        shapes[p + "mlp.gate_proj.weight"] = [inter, hidden]
        shapes[p + "mlp.up_proj.weight"] = [inter, hidden]
        shapes[p + "mlp.down_proj.weight"] = [hidden, inter]
        shapes[p + "input_layernorm.weight"] = [hidden]
        shapes[p + "post_attention_layernorm.weight"] = [hidden]
    shapes["model.norm.weight"] = [hidden]
    shapes["lm_head.weight"] = [vocab, hidden]
    return shapes


def write_shaped(path: Path, preset: str, *, dtype: str = "BF16", tokenizer: bool = True) -> Path:
    """One checkpoint folder of `preset`'s layout in `dtype`, data as holes."""
    hidden, layers, heads, kv, inter, vocab, _, arch, model_type = PRESETS[preset]
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": [arch], "model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 2, "eos_token_id": 3,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    size = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    shards: list[list[tuple[str, list[int]]]] = [[]]
    used = 0
    for name, shape in tensor_shapes(preset).items():
        nbytes = size * _numel(shape)
        if shards[-1] and used + nbytes > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            end = offset + size * _numel(shape)
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
            weight_map[name] = file
            offset = end
        blob = json.dumps(header).encode()
        blob += b" " * ((-len(blob)) % 8)
        with open(path / file, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
        os.truncate(path / file, 8 + len(blob) + offset)  # the data: a hole of the right size
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    if tokenizer:
        save_tokenizer(path, 256)
    return path


def write_shaped_trio(root: Path, preset: str) -> dict[str, Path]:
    """base, sft and rlvr folders of `preset`'s layout (sparse files: a few MB on disk in all)."""
    return {role: write_shaped(root / role, preset, tokenizer=role == "base") for role in ("base", "sft", "rlvr")}


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
