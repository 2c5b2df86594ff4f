"""A trial's weights are bit for bit `dots-merge merge trials/NNNN.yml` on a tensor of more than 50M entries.

The toy-size tests cover every rescale mode and the spill; this one covers the size at which chunking matters
(about 200 chunks of the embedding), with two fine-tunes and per-module coefficients, in bfloat16 and float32.
"""

from __future__ import annotations

import pytest
import torch

from dots_merge.checkpoints import open_checkpoint
from dots_merge.cli.main import main
from dots_merge.merge.driver import inspect_models
from dots_merge.recipe import Dimension, load_recipe, parse_recipe, trial_recipe
from dots_merge.tune.candidate import ResidentCandidate
from dots_merge.tune.run_folder import trial_path
from tests.reference import load_state
from tests.toy_models import build_trio

VOCAB, HIDDEN = 800_000, 64  # the tied embedding: 51.2M entries


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_trial_is_bitwise_the_merge_of_its_recipe_at_50m_entries(tmp_path, dtype):
    trio = build_trio(tmp_path / "trio", arch="qwen2", hidden=HIDDEN, layers=2, vocab=VOCAB, tied=True,
                      dtype=getattr(torch, dtype), tokenizer=False, seed=3)  # fmt: skip
    largest = max(info.numel for info in open_checkpoint(str(trio["base"])).tensors.values())
    assert largest >= 50_000_000
    sft, rlvr = str(trio["sft"]), str(trio["rlvr"])
    recipe = parse_recipe(
        {
            "merge_method": "dots",
            "base_model": str(trio["base"]),
            "models": [
                {"model": sft, "parameters": {"weight": [{"filter": "mlp", "value": 0.9}, {"value": 1.0}]}},
                {"model": rlvr, "parameters": {"density": 0.5}},
            ],
            "dtype": dtype,
        }
    )
    space = [
        Dimension(sft, "weight", 0.5, 2.0, filter="self_attn"),
        Dimension(sft, "weight", 0.5, 2.0),
        Dimension(rlvr, "weight", 0.5, 2.0),
        Dimension(sft, "density", 0.1, 0.6),
    ]
    run = tmp_path / "run"
    candidate = None
    for number, point in enumerate([[1.7, 0.6, 1.25, 0.3], [0.8, 1.9, 0.55, 0.45]]):
        path = trial_path(run, number)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(trial_recipe(recipe, space, point).to_yaml())
        trial = load_recipe(path)
        if candidate is None:
            ceiling = trial_recipe(recipe, space, [1.0, 1.0, 1.0, 0.6])  # the densities come from one store
            floor = trial_recipe(recipe, space, [1.0, 1.0, 1.0, 0.1])  # two tiers: 0.3 reads one, 0.45 the other
            candidate = ResidentCandidate(trial, inspect_models(trial), ceiling=ceiling, floor=floor)
        candidate.apply(trial)
        out = tmp_path / f"merged-{number}"
        assert main(["merge", str(path), str(out), "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
        weights, merged = candidate.model.state_dict(), load_state(out)
        assert {t.dtype for t in merged.values()} == {getattr(torch, dtype)}
        for name, tensor in merged.items():
            assert weights[name].dtype == tensor.dtype, name
            assert torch.equal(weights[name], tensor), name
        del merged
