"""Faults a tune must survive or report in one line: stale caches, a full disk, non-finite objectives, interrupts."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dots_merge
from dots_merge.errors import DotsMergeError
from dots_merge.merge import prepass
from dots_merge.tune.objectives import nonfinite_reason
from dots_merge.tune.vectors import VectorStore
from tests.conftest import dots_recipe, write_recipe
from tests.test_tune import tune_recipe

CLI = [sys.executable, "-c", "import sys; from dots_merge.cli.main import main; sys.exit(main(sys.argv[1:]))"]


def test_the_prepass_cache_misses_whenever_its_numbers_would_change(llama_trio, tmp_path, monkeypatch):
    trio = {name: shutil.copytree(path, tmp_path / name) for name, path in llama_trio.items()}
    cache = tmp_path / "cache"

    def cached(recipe: dict) -> bool:
        return dots_merge.merge(recipe, tmp_path / "out", force=True, cache_dir=cache).prepass_cached

    recipe = dots_recipe(trio)
    assert not cached(recipe) and cached(recipe)  # a miss, then a hit
    assert not cached(dots_recipe(trio, dtype="bfloat16"))  # inputs loaded in another dtype
    other_density = dots_recipe(trio)
    other_density["models"][1]["parameters"]["density"] = 0.25
    assert not cached(other_density)
    monkeypatch.setattr(prepass, "CACHE_VERSION", prepass.CACHE_VERSION + 1)  # another cache format
    assert not cached(recipe) and cached(recipe)
    weights = trio["rlvr"] / "model.safetensors"  # retrained in place: same size, same mtime
    stat, data = weights.stat(), bytearray(weights.read_bytes())
    data[-64:] = bytes(64)
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not cached(recipe)
    assert not cached(dots_recipe(trio, parameters={"rescale": "tensor"}))  # `tensor` needs no pre-pass at all


def test_the_vector_store_keys_on_dtype_and_rescale_mode():
    store = VectorStore(torch.device("cpu"), budget=1 << 30)
    base, tuned = torch.zeros(1000), torch.randn(1000, generator=torch.Generator().manual_seed(0))
    loads = []

    def vector(b, norms=False):
        return store.vector(("sft", "w", 300), b, lambda: loads.append(1) or tuned.to(b.dtype), 0.3,
                            selection=None, check_finite=True, norms=norms)  # fmt: skip

    first, ratio = vector(base)
    vector(base)
    assert len(loads) == 1 and ratio == 1.0  # the second ask is a hit
    _, tensor_ratio = vector(base, norms=True)  # rescale: tensor needs the norms: a miss
    assert len(loads) == 2 and tensor_ratio > 1.0
    half, _ = vector(base.to(torch.bfloat16))  # inputs in another dtype: other numbers, a miss
    assert len(loads) == 3 and not torch.equal(half, first)


def test_a_full_disk_during_spill_is_one_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    store = VectorStore(torch.device("cpu"), budget=0, spill_dir=tmp_path / "vectors")

    def full(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dots_merge.tune.vectors.save_file", full)
    base, tuned = torch.zeros(100), torch.randn(100)
    with pytest.raises(DotsMergeError, match=r"vectors: no space left on device while spilling task vectors"):
        store.vector(("sft", "w", 30), base, lambda: tuned, 0.3, selection=None, check_finite=True, norms=False)
    assert list((tmp_path / "vectors").iterdir()) == []


def test_a_full_disk_during_the_merge_is_one_clear_error_and_leaves_no_output(llama_trio, tmp_path, monkeypatch):
    from dots_merge.merge import writer

    real_write = writer.StreamingShardWriter.write

    def write_until_full(self, name, tensor):
        if self._written:  # the first tensor fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(writer.StreamingShardWriter, "write", write_until_full)
    with pytest.raises(DotsMergeError, match=r"out: no space left on device while writing the merged model"):
        dots_merge.merge(dots_recipe(llama_trio), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the output nor its partial folder


def test_nonfinite_objectives_say_why():
    def values(c, p, s=0.5):
        return {"consistency": c, "perplexity": p, "self_certainty": s}

    assert nonfinite_reason(values(0.5, 3.2), torch.float16) is None
    reason = nonfinite_reason(values(0.5, float("inf")), torch.float16)
    assert reason == "perplexity overflowed in float16 (inf): use out_dtype bfloat16 or float32"
    assert "logits are not finite" in nonfinite_reason(values(0.5, float("nan")), torch.bfloat16)
    assert nonfinite_reason(values(0.5, 3.2, float("nan")), torch.float32) == "self_certainty is nan"


@pytest.mark.parametrize("signal_name", ["int", "term"])
def test_an_interrupted_trial_is_put_back_and_the_message_says_how_to_resume(llama_trio, tmp_path, signal_name):
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=3))
    run = tmp_path / "run"
    env = {**os.environ, "DOTS_MERGE_FAULTS": f"generate:2:{signal_name}"}  # during the 2nd trial's generation
    done = subprocess.run([*CLI, "tune", str(recipe), "--out", str(run), "--quiet"], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 130, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "a running trial is put back" in last and f"--out {run} --resume" in last
    claims = json.loads((run / "claims.json").read_text())
    assert [q["retry_of"] for q in claims["queued"]] == [1] and claims["running"] == []
    put_back = claims["queued"][0]["point"]
    assert "session interrupted" in (run / "tune.log").read_text()
    command = last.split("go on with: ")[1].split()
    assert command[:2] == ["dots-merge", "tune"]
    resumed = subprocess.run([*CLI, *command[1:]], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    records = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    assert [r["number"] for r in records] == [0, 2, 3] and records[1]["point"] == put_back
    assert records[1]["retry_of"] == 1 and (run / "model" / "model.safetensors").exists()
