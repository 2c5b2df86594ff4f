"""Rebuild `examples/tiny-trio/` — the tiny base/SFT/RLVR Llama trio the quick-start merges.

    python examples/make_tiny_trio.py

Deterministic (seeded); the files are committed so the quick-start needs no build step. The weights are
random: the trio shows the mechanics (files, shapes, tokenizer, card), not model quality.
"""

import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the builder lives in tests/toy_models.py
    from tests.toy_models import build_trio

    out = Path(__file__).resolve().parent / "tiny-trio"
    paths = build_trio(out, arch="llama", hidden=64, layers=2, vocab=96, dtype=torch.bfloat16, seed=0)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
