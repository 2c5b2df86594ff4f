#!/usr/bin/env bash
# The CUDA path on real hardware, in one script (≤ 10 minutes on one GPU): merge and tune a ≈1B bfloat16 trio with
# --device cuda and record peak GPU memory against the plan. Run it from the repository root on a machine with a
# GPU and the project installed (pip install -e ".[dev]" with a CUDA build of torch):
#
#     bash benchmarks/gpu_check.sh [WORK_DIR]          # results in WORK_DIR/gpu_check.json (default /tmp/gpu_check)
#
# It builds the trio (random weights, ~1.1B parameters, Llama layout), then:
#   1. dots-merge plan --device cuda --json            the planned GPU / host / disk figures;
#   2. dots-merge merge --device cuda                  timed, peak GPU memory by nvidia-smi sampling;
#   3. dots-merge tune --device cuda, 6 trials          both densities searched, 4 queries × 4 samples × 64 tokens;
#   4. with vLLM installed: the same tune with --engine vllm, benchmarks/engine_bench.py --device cuda (bf16), and
#      the in-place update's exactness tests on CUDA (eager, and compiled with CUDA graphs: vLLM's GPU default);
# and writes planned vs measured. Exit status ≠ 0 when a step fails, the measured peak exceeds the plan, or an
# exactness test fails.
set -euo pipefail
WORK=${1:-/tmp/gpu_check}
mkdir -p "$WORK"
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 DOTS_MERGE_CACHE="$WORK/cache"

$PY - "$WORK" <<'EOF'
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, ".")
from tests.toy_models import build_trio
work = Path(sys.argv[1])
if not (work / "trio" / "rlvr" / "config.json").exists():
    build_trio(work / "trio", arch="llama", hidden=2048, layers=16, intermediate=5632, heads=16, vocab=32000,
               dtype=torch.bfloat16, shard_size="2GB")
(work / "queries.jsonl").write_text("".join(json.dumps({"prompt": f"{i} + {i + 1} = ?"}) + "\n" for i in range(4)))
t = work / "trio"
space = [{"model": str(t / m), "param": p, "low": lo, "high": hi}
         for m in ("sft", "rlvr") for p, lo, hi in (("weight", 0.5, 1.5), ("density", 0.1, 0.6))]
recipe = {"merge_method": "dots", "base_model": str(t / "base"), "out_dtype": "bfloat16",
          "models": [{"model": str(t / m), "parameters": {"weight": 1.0, "density": 0.3}} for m in ("sft", "rlvr")],
          "parameters": {"rescale": "global"},
          "tune": {"queries": str(work / "queries.jsonl"), "trials": 6, "backend": "random",
                   "generation": {"samples": 4, "max_new_tokens": 64, "batch_size": "auto"}, "space": space}}
import yaml
(work / "recipe.yml").write_text(yaml.safe_dump(recipe, sort_keys=False))
EOF

sample_gpu() {  # run "$@" while nvidia-smi samples the GPU's used memory (MiB) into $WORK/$1.smi
  local name=$1; shift
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/$name.smi" &
  local smi=$!
  "$@"
  kill $smi
}

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1 > "$WORK/idle.smi"
$PY -m dots_merge.cli.main plan "$WORK/recipe.yml" --device cuda --out "$WORK/run" --json "$WORK/plan.json"
sample_gpu merge /usr/bin/time -v -o "$WORK/merge.time" $PY -m dots_merge.cli.main merge "$WORK/recipe.yml" \
  "$WORK/merged" --device cuda --force --quiet
rm -rf "$WORK/run"
sample_gpu tune /usr/bin/time -v -o "$WORK/tune.time" $PY -m dots_merge.cli.main tune "$WORK/recipe.yml" \
  --out "$WORK/run" --device cuda --quiet

if $PY -c "import vllm" 2>/dev/null; then
  rm -rf "$WORK/run-vllm"
  $PY -m dots_merge.cli.main plan "$WORK/recipe.yml" --device cuda --engine vllm --out "$WORK/run-vllm" \
    --json "$WORK/plan-vllm.json"
  sample_gpu tune-vllm /usr/bin/time -v -o "$WORK/tune-vllm.time" $PY -m dots_merge.cli.main tune "$WORK/recipe.yml" \
    --out "$WORK/run-vllm" --device cuda --engine vllm --no-merge --quiet
  $PY benchmarks/engine_bench.py --work "$WORK" --device cuda --dtypes bfloat16 --engines transformers vllm --trials 2 | tee "$WORK/engine_bench.txt"
  DOTS_MERGE_TEST_DEVICE=cuda DOTS_MERGE_REQUIRE_VLLM=1 $PY -m pytest -q -m vllm tests/test_vllm_engine.py \
    -k in_place 2>&1 | tee "$WORK/vllm_exact.txt" || true  # its verdict goes into gpu_check.json
fi

$PY - "$WORK" <<'EOF'
import json, re, sys
from pathlib import Path
work = Path(sys.argv[1])
mib = lambda f: max(int(x) for x in (work / f).read_text().split()) << 20
idle, merge_peak, tune_peak = mib("idle.smi"), mib("merge.smi"), mib("tune.smi")
plan = json.loads((work / "plan.json").read_text())
rss = lambda f: int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", (work / f).read_text()).group(1)) * 1024
records = [json.loads(l) for l in (work / "run" / "trials.jsonl").read_text().splitlines() if l.strip()]
out = {"planned_gpu": plan["gpu"]["needed"], "planned_host": plan["host"]["needed"],
       "tune_peak_gpu": tune_peak - idle, "merge_peak_gpu": merge_peak - idle,
       "tune_peak_rss": rss("tune.time"), "merge_peak_rss": rss("merge.time"),
       "seconds": [r["seconds"] for r in records], "spill_left": (work / "run" / "cache" / "vectors").exists(),
       "torch": __import__("torch").__version__, "gpu": __import__("torch").cuda.get_device_name(0)}
if (work / "tune-vllm.smi").exists():
    vllm_plan = json.loads((work / "plan-vllm.json").read_text())
    vllm_records = [json.loads(l) for l in (work / "run-vllm" / "trials.jsonl").read_text().splitlines() if l.strip()]
    out["vllm"] = {"planned_gpu": vllm_plan["gpu"]["needed"], "tune_peak_gpu": mib("tune-vllm.smi") - idle,
                   "settings": {k: vllm_plan["settings"].get(k) for k in ("gpu_memory_utilization", "max_num_seqs")},
                   "seconds": [r["seconds"] for r in vllm_records],
                   "exactness_tests": (work / "vllm_exact.txt").read_text().strip().splitlines()[-1]}
(work / "gpu_check.json").write_text(json.dumps(out, indent=2))
print(json.dumps(out, indent=2))
exact = "vllm" not in out or re.fullmatch(r"=* ?2 passed.*", out["vllm"]["exactness_tests"]) is not None
sys.exit(0 if out["tune_peak_gpu"] <= out["planned_gpu"] and not out["spill_left"] and exact else 1)
EOF
