"""Shared fixtures: tiny real checkpoints built once per session, offline environment."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from dots_merge.toy import build_trio


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No test may reach the network, and the pre-pass cache lives in a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DOTS_MERGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory) -> dict[str, Path]:
    """Llama, float32, single-file, untied, with a tokenizer."""
    return build_trio(tmp_path_factory.mktemp("llama"), arch="llama", hidden=32)


@pytest.fixture(scope="session")
def qwen_trio(tmp_path_factory) -> dict[str, Path]:
    """Qwen2 with tied embeddings, bfloat16, sharded checkpoints."""
    return build_trio(
        tmp_path_factory.mktemp("qwen"), arch="qwen2", hidden=64, dtype=torch.bfloat16, tied=True, shard_size="40KB"
    )


@pytest.fixture(scope="session")
def llama_third(llama_trio, tmp_path_factory) -> Path:
    """A third fine-tune of the Llama base (the SFT model with more noise)."""
    out = tmp_path_factory.mktemp("third") / "third"
    shutil.copytree(llama_trio["sft"], out)
    state = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    state = {k: v + torch.randn(v.shape, generator=gen) * 0.01 for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def dots_recipe(trio: dict[str, Path], **extra) -> dict:
    """A two-model dots recipe over a trio (weights 1.0 and 1.5, densities 0.3 and 0.2)."""
    data = {
        "merge_method": "dots",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(trio["sft"]), "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": str(trio["rlvr"]), "parameters": {"weight": 1.5, "density": 0.2}},
        ],
    }
    data.update(extra)
    return data
