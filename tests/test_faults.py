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


def _dense(vector) -> torch.Tensor:
    out = torch.empty(vector.compact.numel)
    for sl, chunk in vector.chunks(torch.device("cpu")):
        out[sl] = chunk
    return out


def test_the_vector_store_keys_on_dtype_and_rescale_mode():
    store = VectorStore(torch.device("cpu"), budget=1 << 30)
    base, tuned = torch.zeros(1000), torch.randn(1000, generator=torch.Generator().manual_seed(0))
    loads = []

    def vector(b, norms=False, density=0.3):
        return store.vector("sft", "w", b, lambda: loads.append(1) or tuned.to(b.dtype), density, ceiling=0.5,
                            check_finite=True, norms=norms)  # fmt: skip

    first = vector(base)
    vector(base)
    assert len(loads) == 1  # the second ask is a hit
    vector(base, density=0.1)
    assert len(loads) == 1  # a lower density comes from the same entry
    total, kept = store.squared_norms(vector(base, norms=True))  # rescale: tensor needs the norms: a miss
    assert len(loads) == 2 and total > kept > 0
    half = vector(base.to(torch.bfloat16))  # inputs in another dtype: other numbers, a miss
    assert len(loads) == 3 and not torch.equal(_dense(half), _dense(first))


def _store(tmp_path, **kw) -> VectorStore:
    return VectorStore(torch.device("cpu"), spill_dir=tmp_path / "vectors", **kw)


def _ask(store, name, loads=None):
    g = torch.Generator().manual_seed(len(name))
    tuned = torch.randn(4096, generator=g)
    return store.vector("sft", name, torch.zeros(4096), lambda: (loads if loads is not None else []).append(name) or tuned, 0.2,
                        ceiling=0.5, check_finite=True, norms=False)  # fmt: skip


def test_the_spill_is_bounded_and_evicts_the_least_recently_used(tmp_path):
    entry = 4096 // 8 + 2048 * 4  # bitmask + half the values in float32
    store = _store(tmp_path, budget=entry, spill_budget=2 * entry + 1024)  # one in RAM, two on disk
    loads: list[str] = []
    for trial, names in enumerate([["a"], ["b"], ["c"], ["d"], ["a"]]):
        store.begin_trial()
        for name in names:
            _ask(store, name, loads)
        assert store.peak_bytes <= store.budget and store.peak_disk <= store.spill_budget, trial
    # a went to disk when b came, b when c came, c when d came — and a (least recently used) was deleted to
    # make room for c: asking for a again recomputes it
    assert loads == ["a", "b", "c", "d", "a"]
    assert len(list((tmp_path / "vectors").glob("*.safetensors"))) == 2
    assert not list((tmp_path / "vectors").glob("*.partial"))


def test_a_resumed_store_reuses_the_spill_and_the_end_of_the_run_removes_it(tmp_path):
    first = _store(tmp_path, budget=0, salt="weights-1")
    reference = _dense(_ask(first, "w"))
    first.close(remove=False)  # an interrupted run keeps its spill
    loads: list[str] = []
    again = _store(tmp_path, budget=0, salt="weights-1")
    assert torch.equal(_dense(_ask(again, "w", loads)), reference) and loads == []  # read back, not recomputed
    other = _store(tmp_path, budget=0, salt="weights-2")  # other weights: the old files are not theirs
    _ask(other, "w", loads)
    assert loads == ["w"]
    (tmp_path / "vectors" / "junk.partial").write_bytes(b"half")
    worker = VectorStore(torch.device("cpu"), budget=0, spill_dir=tmp_path / "vectors" / "tp1", salt="weights-2")
    _ask(worker, "w")  # a vLLM worker's spill (tensor parallelism) lies in a folder inside the run's
    _store(tmp_path, budget=0, salt="weights-2")  # the run's own store adopts its files and leaves that folder
    assert not (tmp_path / "vectors" / "junk.partial").exists() and list((tmp_path / "vectors" / "tp1").iterdir())
    _store(tmp_path, budget=0, salt="weights-2").close(remove=True)
    assert not (tmp_path / "vectors").exists()


def test_a_full_disk_during_spill_is_one_clear_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    store = VectorStore(torch.device("cpu"), budget=0, spill_dir=tmp_path / "vectors")

    def full(tensors, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dots_merge.tune.vectors.save_file", full)
    base, tuned = torch.zeros(100), torch.randn(100)
    with pytest.raises(DotsMergeError, match=r"vectors: no space left on device while spilling task vectors"):
        store.vector("sft", "w", base, lambda: tuned, 0.3, ceiling=0.3, check_finite=True, norms=False)
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


@pytest.mark.parametrize("fault", ["generate:2:int", "ask:2:lost"])
def test_an_interrupted_trial_is_put_back_and_the_message_says_how_to_resume(llama_trio, tmp_path, fault):
    """Ctrl-C during the 2nd trial, or SIGTERM before it is asked for with its KeyboardInterrupt swallowed (as
    scipy's Sobol set-up does): the run stops as interrupted either way (SIGTERM elsewhere: test_fault_injection)."""
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=3))
    run = tmp_path / "run"
    env = {**os.environ, "DOTS_MERGE_FAULTS": fault}
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
    numbers = [0, 2, 3] if fault.startswith("generate") else [0, 1, 2]  # trial 1's recipe was not written yet
    assert [r["number"] for r in records] == numbers and records[1]["point"] == put_back
    assert records[1]["retry_of"] == 1 and (run / "model" / "model.safetensors").exists()


def test_a_sleep_fault_pauses_the_process_at_its_point(monkeypatch):
    import time

    from dots_merge import faults

    monkeypatch.setenv("DOTS_MERGE_FAULTS", "ask:2:sleep0.3")
    faults.reset()
    try:
        started = time.perf_counter()
        faults.fault_point("ask")  # the 1st time: nothing
        assert time.perf_counter() - started < 0.2
        faults.fault_point("ask")  # the 2nd: 0.3 s
        assert time.perf_counter() - started >= 0.3
        monkeypatch.setenv("DOTS_MERGE_FAULTS", "ask:1:nap")
        faults.reset()
        with pytest.raises(ValueError, match="unknown action 'nap'"):
            faults.fault_point("ask")
    finally:
        monkeypatch.delenv("DOTS_MERGE_FAULTS")
        faults.reset()
