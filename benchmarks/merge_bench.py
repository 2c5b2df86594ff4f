"""Merge benchmark: dots-merge against mergekit's task_arithmetic and ties on a ~320M-parameter bf16 trio.

Run by hand (it takes a few minutes and ~5 GB of disk):

    python benchmarks/merge_bench.py [--work benchmarks/_work] [--repeat 2]

Each merge runs in its own process under `/usr/bin/time -v` (peak total RSS, as the kernel counts it),
while this script samples the process's anonymous RSS (`RssAnon` in /proc/PID/status) every 10 ms.
Inputs are read once before timing so every run starts with the files in the page cache.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the tiny-model builder lives in tests/toy_models.py

HERE = Path(__file__).resolve().parent
MIB = 1024 * 1024


def build(work: Path) -> dict[str, Path]:
    import torch

    from tests.toy_models import build_trio

    trio = {name: work / "trio" / name for name in ("base", "sft", "rlvr")}
    if not all((p / "config.json").exists() for p in trio.values()):
        shutil.rmtree(work / "trio", ignore_errors=True)
        print("building the trio (Llama, hidden 1024, 16 layers, vocab 32000, bf16, 400 MB shards) ...", flush=True)
        build_trio(
            work / "trio",
            arch="llama",
            hidden=1024,
            layers=16,
            vocab=32000,
            intermediate=4096,
            heads=16,
            dtype=torch.bfloat16,
            shard_size="400MB",
            tokenizer=False,
        )
    return trio


def recipes(work: Path, trio: dict[str, Path]) -> dict[str, Path]:
    models = [
        {"model": str(trio["sft"]), "parameters": {"weight": 1.0, "density": 0.3}},
        {"model": str(trio["rlvr"]), "parameters": {"weight": 1.0, "density": 0.3}},
    ]
    out = {}
    for method in ("dots", "task_arithmetic", "ties"):
        entries = [
            {
                "model": m["model"],
                "parameters": {
                    k: v for k, v in m["parameters"].items() if method != "task_arithmetic" or k == "weight"
                },
            }
            for m in models
        ]
        data = {"merge_method": method, "base_model": str(trio["base"]), "models": entries, "out_dtype": "bfloat16"}
        path = work / f"{method}.yml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        out[method] = path
    return out


def _sample_anon(pid_holder: dict, peak: dict, stop: threading.Event) -> None:
    while not stop.is_set():
        for pid in _descendants(pid_holder["pid"]):
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            m = re.search(r"RssAnon:\s+(\d+) kB", status)
            if m:
                peak["anon"] = max(peak["anon"], int(m.group(1)) * 1024)
        time.sleep(0.01)


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        todo += [int(c) for c in children]
    return out


def measure(name: str, cmd: list[str]) -> dict:
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, stop = {"anon": 0}, threading.Event()
    sampler = threading.Thread(target=_sample_anon, args=({"pid": proc.pid}, peak, stop))
    sampler.start()
    started = time.perf_counter()
    _, err = proc.communicate()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    max_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    return {
        "name": name,
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(max_rss / MIB),
        "peak_anon_mib": round(peak["anon"] / MIB),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each command; the fastest is reported")
    args = parser.parse_args()
    work = args.work.resolve()
    trio = build(work)
    paths = recipes(work, trio)
    for folder in trio.values():  # warm the page cache
        for f in folder.glob("*.safetensors"):
            f.read_bytes()
    bin_dir = Path(sys.executable).parent
    cache = work / "cache"
    runs = {
        "dots (cold: pre-pass + merge)": lambda out: [str(bin_dir / "dots-merge"), "merge", str(paths["dots"]), out,
                                                       "--quiet", "--force", "--out-shard-size", "400MB", "--cache-dir", str(cache)],
        "dots (pre-pass cached)": lambda out: [str(bin_dir / "dots-merge"), "merge", str(paths["dots"]), out,
                                               "--quiet", "--force", "--out-shard-size", "400MB", "--cache-dir", str(cache)],
        "mergekit task_arithmetic": lambda out: [str(bin_dir / "mergekit-yaml"), str(paths["task_arithmetic"]), out,
                                                 "--out-shard-size", "400M", "--quiet", "--no-write-model-card"],
        "mergekit ties": lambda out: [str(bin_dir / "mergekit-yaml"), str(paths["ties"]), out,
                                      "--out-shard-size", "400M", "--quiet", "--no-write-model-card"],
    }  # fmt: skip
    results = []
    for name, make in runs.items():
        best = None
        for _ in range(args.repeat):
            if name.startswith("dots (cold"):
                shutil.rmtree(cache, ignore_errors=True)
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            r = measure(name, make(str(out)))
            best = r if best is None or r["wall_s"] < best["wall_s"] else best
        results.append(best)
        print(f"{best['name']:32s} {best['wall_s']:7.1f} s   peak RSS {best['peak_rss_mib']:6d} MiB"
              f"   peak anonymous RSS {best['peak_anon_mib']:6d} MiB", flush=True)  # fmt: skip
    from dots_merge.checkpoints import open_checkpoint

    ckpt = open_checkpoint(str(trio["base"]))
    largest = max(i.numel for i in ckpt.tensors.values())
    params = sum(i.numel for i in ckpt.tensors.values())
    bound = (4 * largest * 4) / MIB + 512
    summary = {"parameters": params, "largest_tensor": largest, "anon_bound_mib": round(bound), "runs": results}
    (work / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"parameters {params / 1e6:.0f}M; largest tensor {largest / 1e6:.1f}M entries; "
          f"anonymous-RSS bound 4 x largest fp32 + 512 MiB = {bound:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
