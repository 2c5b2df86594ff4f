"""The memory and disk plan of a tune, from configs, the tokenizer and safetensors headers only (no tensor data).

For the device (GPU or CPU), host RAM and disk it adds up what each part of a run needs — the resident model,
the base tensors, the compact vector store, generation (KV cache, logits, prefill activations), the update's
scratch, the spill and the merged output — against what is available, and chooses the settings: where the
base and the vectors live, the spill budget, the generation batch size when `batch_size: auto`. `tune` makes
the same plan first and refuses before loading any weights when it does not fit.

Sizes are estimates, calibrated on this project's measurements (benchmarks/plan_bench.py, README): the
planned host RAM and run-folder size are within 20 % of the measured peak RSS and peak folder size at
0.1–1.5B parameters on CPU; the GPU figures are unmeasured until a GPU check runs.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dots_merge.checkpoints import Checkpoint
from dots_merge.errors import DotsMergeError
from dots_merge.recipe import Recipe, TuneSpec, trial_recipe
from dots_merge.recipe.tune_section import Generation

GIB = 1 << 30
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
NAME_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
RUNTIME_CPU = int(0.75 * GIB)  # Python, torch, transformers, mergekit, tokenizer: measured RSS before any weights
RUNTIME_CUDA_HOST = int(2.5 * GIB)  # the same plus the CUDA libraries' host memory
CUDA_CONTEXT = int(0.6 * GIB)  # CUDA context and kernels on the GPU
GPU_MARGIN = 0.06  # of the GPU: allocator fragmentation
HOST_MARGIN = 0.10  # of host RAM left free: the OS, page cache for the checkpoints being read
VLLM_OVERHEAD = int(0.25 * GIB)  # vLLM's libraries and buffers beyond weights and KV cache: 0.21 GiB measured (CPU)
RECORD_BYTES = 64 << 10  # a trial's record, recipe and log lines on disk
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str, *, where: str) -> int:
    """'24GiB' (binary), '24GB' (decimal), '512M', '1.5T' or plain bytes, as bytes."""
    match = _SIZE.match(str(text))
    if not match:
        raise DotsMergeError(f"{where}: not a size: {text!r} (e.g. 24GiB, 80GB, 512MiB)")
    value, unit, binary = match.groups()
    power = "kmgtp".find(unit.lower()) + 1 if unit else 0
    return int(float(value) * (1024 if binary or not unit else 1000) ** power)


def human(n: int | float) -> str:
    """Bytes as GiB/MiB with one decimal."""
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class Part:
    """What one part of the run needs, and where."""

    name: str
    where: str  # gpu | host | disk
    bytes: int
    note: str = ""
    phase: str = ""  # "": the whole search; "update" / "generation": one phase of a trial; "merge": the final
    # merge, after the search's memory and spill are freed; "all": search and merge
    reclaimable: bool = False  # memory-mapped pages read once: in the RSS while RAM is free, not needed to fit

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "where": self.where, "bytes": self.bytes, "note": self.note, "phase": self.phase,
                "reclaimable": self.reclaimable}  # fmt: skip


@dataclass
class Plan:
    """The plan of one run: needs and availability per resource, the parts, and the chosen settings."""

    device: str
    parts: list[Part]
    available: dict[str, int | None]  # gpu (None when planning for CPU), host, disk
    settings: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None

    def needed(self, where: str) -> int:
        """Bytes needed at once on `where` (see `needed_bytes`): what must fit."""
        return needed_bytes(self.parts, where)

    @property
    def expected_rss(self) -> int:
        """The peak RSS to expect where RAM is plentiful: what is needed plus memory-mapped pages read once."""
        return needed_bytes(self.parts, "host", reclaimable=True)

    @property
    def fits(self) -> bool:
        return self.reason is None

    def to_json(self) -> dict[str, Any]:
        gpu = None
        if self.available.get("gpu") is not None:
            gpu = {"needed": self.needed("gpu"), "available": self.available["gpu"]}
        return {
            "fits": self.fits,
            "reason": self.reason,
            "device": self.device,
            "gpu": gpu,
            "host": {
                "needed": self.needed("host"),
                "available": self.available["host"],
                "expected_peak_rss": self.expected_rss,
            },
            "disk": {"needed": self.needed("disk"), "available": self.available["disk"]},
            "parts": [p.to_json() for p in self.parts],
            "settings": self.settings,
        }

    def table(self) -> str:
        """The plan as a text table: each part, then needed vs available per resource, then the settings."""
        lines = [f"plan for --device {self.device}", f"  {'where':<5} {'part':<38} {'bytes':>10}  {'when':<10} note"]
        for p in self.parts:
            when = {"": "search", "all": "always", "update": "update", "generation": "sampling", "merge": "final merge"}
            lines.append(f"  {p.where:<5} {p.name:<38} {human(p.bytes):>10}  {when[p.phase]:<10} {p.note}")
        lines.append("")
        for where in ("gpu", "host", "disk"):
            available = self.available.get(where)
            if available is None:
                continue
            need = self.needed(where)
            mark = "ok" if need <= available else f"SHORT by {human(need - available)}"
            lines.append(f"  {where:<5} needs {human(need):>10} of {human(available):>10}  {mark}")
            if where == "host":
                lines.append(f"        expected peak RSS {human(self.expected_rss)} (with memory-mapped pages)")
        lines.append("")
        for key, value in self.settings.items():
            lines.append(f"  {key}: {human(value) if key.endswith('_bytes') else value}")
        lines.append("")
        lines.append("fits" if self.fits else f"does not fit: {self.reason}")
        return "\n".join(lines)


def needed_bytes(parts: Sequence[Part], where: str, *, reclaimable: bool = False) -> int:
    """The larger of the search (its parts plus the larger of a trial's two phases: the update's buffers are freed
    before sampling starts) and the final merge (which starts once the search's memory and spill are freed)."""
    here = [p for p in parts if p.where == where and (reclaimable or not p.reclaimable)]

    def total(phase: str) -> int:
        return sum(p.bytes for p in here if p.phase == phase)

    update = max((p.bytes for p in here if p.phase == "update"), default=0)  # its steps run one after another
    search = total("") + max(update, total("generation"))
    return total("all") + max(search, total("merge"))


@dataclass
class Shape:
    """What the plan reads of the base model: parameter bytes and the attention/MLP sizes."""

    params: int
    model_bytes: int  # in the output dtype
    largest: int  # entries of the largest tensor
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int


def model_shape(base: Checkpoint, out_bytes: int) -> Shape:
    """The base's sizes from its config and safetensors headers."""
    if base.tensors is None:
        raise DotsMergeError(f"{base.reference}: the plan reads safetensors headers; this checkpoint has none")
    cfg = base.config.get("text_config", base.config)
    floats = [t for t in base.tensors.values() if t.dtype.startswith(("F", "BF"))]
    params = sum(t.numel for t in floats)
    hidden = int(cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model") or 0)
    heads = int(cfg.get("num_attention_heads") or cfg.get("n_head") or 1)
    head_dim = int(cfg.get("head_dim") or (hidden // heads if hidden else 0))
    return Shape(
        params=params,
        model_bytes=params * out_bytes,
        largest=max((t.numel for t in floats), default=0),
        layers=int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0),
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        hidden=hidden,
        intermediate=int(cfg.get("intermediate_size") or 4 * hidden),
        vocab=int(cfg.get("vocab_size") or 0),
    )


def store_bytes(
    ranges: Mapping[tuple[str, str], tuple[float, float]], tensors: Mapping[str, Any], loaded_bytes: int
) -> int:
    """Bytes of the compact vector store: per (fine-tune, tensor) and tier (`tier_densities` of its density range)
    a bitmask, the kept values and at most `moments_limit` of bin moments; a dense entry keeps its values only."""
    from dots_merge.core import keep_count, tier_densities
    from dots_merge.core.compact import moments_limit

    total = 0
    for (_, name), (low, high) in ranges.items():
        info = tensors.get(name)
        if info is None:
            continue
        if keep_count(high, info.numel) >= info.numel:
            total += info.numel * loaded_bytes
            continue
        before = 0
        for density in tier_densities(low, high, info.numel):
            k = keep_count(density, info.numel)
            entry = (info.numel + 7) // 8 + (k - before) * loaded_bytes
            total += entry + moments_limit(entry)
            before = k
    return total


def largest_tier(ranges: Mapping[tuple[str, str], tuple[float, float]], numel: int) -> float:
    """The largest share of a `numel`-entry tensor one tier of the store holds (what a new density reads)."""
    from dots_merge.core import keep_count, tier_densities

    share = 0.0
    for low, high in set(ranges.values()):
        counts = [0] + [keep_count(d, numel) for d in tier_densities(low, high, numel)]
        share = max(share, max(b - a for a, b in itertools.pairwise(counts)) / max(numel, 1))
    return share


def generation_bytes(shape: Shape, *, sequences: int, prompt: int, new_tokens: int, act_bytes: int) -> int:
    """Peak memory of sampling `sequences` completions at once: KV cache at full length, the last step's logits
    and sampling buffers (float32 probabilities, sort values and int64 indices), the prefill's activations."""
    length = prompt + new_tokens
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * act_bytes * sequences * length
    sampling = sequences * shape.vocab * (4 * 4 + 8)
    prefill = sequences * prompt * (4 * shape.hidden + 3 * shape.intermediate) * act_bytes
    prefill += sequences * prompt * shape.vocab * 4 // max(prompt, 1)  # logits of the last prompt position only
    return kv + sampling + prefill


def vllm_step_tokens(sequences: int, prompt_tokens: int) -> int:
    """vLLM's per-step token budget on the CPU that prefills every prompt whole: its CPU build fails on a seeded
    request whose prompt it splits across steps."""
    return sequences * (prompt_tokens + 1)


def vllm_settings(shape: Shape, g: Generation, *, prompt_tokens: int, queries: int, act_bytes: int, share: int,
                  gpu_total: int | None, workers: int = 1) -> dict[str, Any]:  # fmt: skip
    """The vLLM engine's sizes: the longest sequence, how many are decoded at once (every sample of every query
    when the KV cache for them fits the generation share), its KV cache, and what vLLM is told: on the CPU the
    KV cache in whole GiB (VLLM_CPU_KVCACHE_SPACE), on a GPU its share of the GPU's memory (weights included);
    with `workers` (tensor parallelism) both per worker, each holding a shard of the weights and KV heads."""
    options = g.vllm
    length = options.max_model_len or prompt_tokens + g.max_new_tokens
    # per worker: tensor parallelism shards the KV heads (each worker of `workers` holds its part)
    per_token = -(-2 * shape.layers * shape.kv_heads * shape.head_dim * act_bytes // workers)
    fit = max(1, share // (workers if gpu_total is None else 1) // max(per_token * length, 1))  # host: shared
    sequences = options.max_num_seqs or max(1, min(queries * g.samples, fit))
    kv = per_token * length * sequences
    out: dict[str, Any] = {"max_model_len": length, "max_num_seqs": sequences}
    if gpu_total is None:
        gib = options.cpu_kvcache_space or max(1, -(-int(kv * 1.1) // GIB))
        budget = vllm_step_tokens(sequences, prompt_tokens)
        prefill = budget * (4 * shape.hidden + 3 * shape.intermediate) * act_bytes
        out.update(kv_cache_gib=gib, kv_bytes=workers * gib * GIB + prefill, max_num_batched_tokens=budget)
    else:
        need = -(-shape.model_bytes // workers) + kv + VLLM_OVERHEAD  # per GPU
        out.update(kv_bytes=kv, gpu_memory_utilization=options.gpu_memory_utilization
                   or round(min(0.95, need / max(gpu_total, 1) + 0.01), 3))  # fmt: skip
    return out


def perplexity_bytes(shape: Shape, *, prompts: int, prompt: int, act_bytes: int) -> int:
    """The NLL pass over a batch of prompts: full logits in the model dtype and in float32 (log-softmax)."""
    return prompts * prompt * shape.vocab * (act_bytes + 8) + prompts * prompt * 3 * shape.intermediate * act_bytes


def make_plan(
    recipe: Recipe,
    spec: TuneSpec,
    checkpoints: Mapping[str, Checkpoint],
    *,
    device: str,
    run_dir: Path,
    prompt_tokens: int,
    gpu_memory: int | None = None,
    host_memory: int | None = None,
    disk_free: int | None = None,
    cache_budget: int | None = None,
    ranges: Mapping[tuple[str, str], tuple[float, float]] | None = None,
) -> Plan:
    """The plan of tuning `recipe` on `device` (cpu or cuda[:N]); see the module docstring.

    `ranges` maps (fine-tune, tensor) to the lowest and highest density the run asks of it (`density_ranges`);
    `prompt_tokens` the longest chat-templated query. Availability is detected unless given."""
    from dots_merge.merge.driver import output_dtype

    base = next(iter(checkpoints.values()))
    out_bytes = NAME_BYTES.get(output_dtype(recipe, checkpoints), 2)
    loaded = NAME_BYTES.get(str(recipe.data.get("dtype") or ""), 0) or max(
        (DTYPE_BYTES.get(t.dtype, 2) for c in list(checkpoints.values())[1:] for t in (c.tensors or {}).values()),
        default=out_bytes,
    )
    shape = model_shape(base, out_bytes)
    gpu = device.startswith("cuda")
    available = {
        "gpu": (gpu_memory if gpu_memory is not None else _gpu_free(device)) if gpu else None,
        "host": host_memory if host_memory is not None else host_available(),
        "disk": disk_free if disk_free is not None else _disk_free(run_dir),
    }
    dev = "gpu" if gpu else "host"
    g = spec.generation
    parts = [Part("runtime (python, torch, libraries)", "host", RUNTIME_CUDA_HOST if gpu else RUNTIME_CPU, "", "all")]
    if gpu:
        parts.append(Part("CUDA context", "gpu", CUDA_CONTEXT, "", "all"))
    # vLLM with tensor parallelism: each GPU holds a shard, and each worker process its own vector store
    workers = g.vllm.tensor_parallel_size if g.engine == "vllm" else 1
    if workers > 1:
        parts.append(Part(f"vLLM engine core and {workers} worker processes", "host",
                          workers * (RUNTIME_CUDA_HOST if gpu else RUNTIME_CPU), "each a Python runtime", "all"))  # fmt: skip
    sharded = gpu and workers > 1
    parts.append(Part("resident model", dev, shape.model_bytes // workers if sharded else shape.model_bytes,
                      f"{shape.params / 1e9:.2f}B parameters" + (f", a 1/{workers} shard per GPU" if sharded else "")))  # fmt: skip
    update = (4 + out_bytes) * shape.largest  # float32 result + its cast, largest tensor
    build = (4 + loaded) * shape.largest  # τ in float32 + the fine-tune's tensor while an entry is compressed
    tier = largest_tier(ranges or {}, shape.largest)
    select = int(8 * tier * shape.largest) * (1 if gpu else 2)  # τ and |τ| of one tier's entries; CPU: 2 at once
    if gpu:  # the result buffer goes back to the allocator before sampling
        parts.append(Part("update: result and its cast", dev, update, "largest tensor", "update"))
    else:  # kept between trials (a fresh one would page-fault every trial)
        parts.append(Part("update: float32 result", dev, 4 * shape.largest, "largest tensor, kept"))
        parts.append(Part("update: cast of the result", dev, out_bytes * shape.largest, "largest tensor", "update"))
    parts.append(Part("update: store build", dev, build, "first trial, largest tensor", "update"))
    parts.append(Part("update: selection of a new density", dev, select, "largest tensor", "update"))
    store = store_bytes(ranges or {}, base.tensors or {}, loaded) * workers  # one store per worker

    # generation: the batch that fits the device's share
    batch = g.batch_size
    share = None
    if gpu:
        fixed = sum(p.bytes for p in parts if p.where == "gpu" and p.phase in ("", "all"))
        share = int(available["gpu"] * (1 - GPU_MARGIN)) - fixed
    else:
        share = max(int(available["host"] * (1 - HOST_MARGIN)) // 4, 1 << 30)  # a quarter of RAM at most
    if batch == "auto":
        batch = _auto_batch(shape, g.samples, len(spec.queries), prompt_tokens, g.max_new_tokens, out_bytes, share)
    batch = max(1, min(int(batch), max(len(spec.queries), 1)))
    gen = generation_bytes(shape, sequences=batch * g.samples, prompt=prompt_tokens, new_tokens=g.max_new_tokens,
                           act_bytes=out_bytes)  # fmt: skip
    nll = perplexity_bytes(shape, prompts=batch, prompt=prompt_tokens, act_bytes=out_bytes)
    sampling_note = f"{batch} queries × {g.samples} samples × ({prompt_tokens} + {g.max_new_tokens}) tokens"
    engine: dict[str, Any] = {"engine": g.engine}
    if g.engine == "vllm":
        # vLLM's KV cache stays allocated through the update: the update's peak comes out of its share
        update_peak = sum(p.bytes for p in parts if p.where == dev and p.phase == "update")
        engine.update(vllm_settings(shape, g, prompt_tokens=prompt_tokens, queries=len(spec.queries), workers=workers,
                                    act_bytes=out_bytes, share=share - update_peak - VLLM_OVERHEAD,
                                    gpu_total=available["gpu"]))  # fmt: skip
        gen = engine.pop("kv_bytes")
        parts.append(Part("vLLM KV cache", dev, gen, f"{engine['max_num_seqs']} sequences × "
                          f"{engine['max_model_len']} tokens" + ("" if gpu else " (VLLM_CPU_KVCACHE_SPACE), prefill")))  # fmt: skip
        parts.append(Part("vLLM runtime and activations", dev, VLLM_OVERHEAD, "measured on the CPU (a tiny model)"))
    else:
        parts.append(Part("generation (KV cache, logits)", dev, max(gen, nll), sampling_note, "generation"))

    # the base: on the GPU when it fits there besides everything else, else read from the mapped checkpoint
    base_where = "host (memory-mapped checkpoint)"
    base_bytes = sum(t.numel for t in (base.tensors or {}).values() if t.dtype.startswith(("F", "BF"))) * loaded
    if gpu and workers == 1 and needed_bytes(parts, "gpu") + base_bytes <= available["gpu"] * (1 - GPU_MARGIN):
        base_where = "gpu"
    parts.append(Part("base tensors", "gpu" if base_where == "gpu" else "host", base_bytes, base_where))

    # the vector store: host RAM up to what is left, the rest spilled to disk within the cache budget
    host_fixed = needed_bytes(parts, "host")
    room = int(available["host"] * (1 - HOST_MARGIN)) - host_fixed
    in_ram = max(0, min(store, room))
    spill = store - in_ram
    spill_budget = spill if cache_budget is None else min(spill, cache_budget)
    parts.append(
        Part(
            "vector store (in RAM)",
            "host",
            in_ram,
            f"{_per_param(store, shape.params * max(len(checkpoints) - 1, 1))} bytes per parameter and fine-tune",
        )
    )
    if spill:
        parts.append(Part("vector store (spilled)", "disk", spill_budget, "RUN_DIR/cache/vectors, removed at the end"))
    inputs = sum(t.numel * DTYPE_BYTES.get(t.dtype, 2) for c in checkpoints.values() for t in (c.tensors or {}).values())
    parts.append(Part("final merge: inputs (memory-mapped)", "host", inputs, "read once; evictable", "merge", True))
    parts.append(Part("final merge: buffers (largest tensor)", dev, update, "", "merge"))
    parts.append(Part("merged model (output)", "disk", shape.model_bytes, "RUN_DIR/model", "merge"))
    parts.append(Part("trial records", "disk", RECORD_BYTES * spec.trials, "", "all"))

    moved = store + (0 if base_where == "gpu" else base_bytes)
    settings = {
        "parameters": shape.params,
        "batch_size": batch,
        "base": base_where,
        "vectors": "host RAM" if not spill else "host RAM + disk spill" + (
            " + recomputed each trial" if spill > spill_budget else ""),
        "store_bytes": store,
        "store_ram_bytes": in_ram,
        "cache_budget_bytes": spill_budget,
        "recomputed_each_trial_bytes": spill - spill_budget,
        "generation_share_bytes": share,
        "per_trial_read_bytes": moved,
        "per_trial_written_bytes": shape.model_bytes,
        **engine,
    }
    plan = Plan(device=device, parts=parts, available=available, settings=settings)
    plan.reason = _reason(plan, shape, gen, batch, g.samples, spill, spill_budget, cache_budget)
    return plan


def _auto_batch(shape: Shape, samples: int, queries: int, prompt: int, new_tokens: int, act_bytes: int,
                share: int) -> int:  # fmt: skip
    """The most queries per batch whose sampling fits `share` (at least 1)."""
    best = 1
    for batch in range(1, max(queries, 1) + 1):
        need = generation_bytes(shape, sequences=batch * samples, prompt=prompt, new_tokens=new_tokens,
                                act_bytes=act_bytes)  # fmt: skip
        if need > share:
            break
        best = batch
    return best


def _reason(plan: Plan, shape: Shape, gen: int, batch: int, samples: int, spill: int, spill_budget: int,
            cache_budget: int | None) -> str | None:  # fmt: skip
    """One message for what does not fit (the first resource short), by how much, and what to change."""
    gpu = plan.available.get("gpu")
    if gpu is not None and plan.needed("gpu") > gpu:
        short = plan.needed("gpu") - gpu
        if shape.model_bytes + CUDA_CONTEXT > gpu:
            return (f"GPU: the model's weights alone take {human(shape.model_bytes)} and {human(gpu)} is available "
                    f"(short by {human(short)}): use a GPU with at least {human(plan.needed('gpu'))}, or plan "
                    "--device cpu")  # fmt: skip
        return (f"GPU: needs {human(plan.needed('gpu'))}, {human(gpu)} available (short by {human(short)}); "
                f"generating {batch} × {samples} samples takes {human(gen)}: lower tune.generation.batch_size "
                "(or set it to auto), samples or max_new_tokens, or use a bigger GPU")  # fmt: skip
    host = plan.available["host"]
    if plan.needed("host") > host:
        short = plan.needed("host") - host
        return (
            f"host RAM: needs {human(plan.needed('host'))}, {human(host)} available (short by {human(short)}): "
            "free memory, plan with --host-memory for a bigger machine, or lower max_new_tokens / batch_size"
        )
    disk = plan.available["disk"]
    if plan.needed("disk") > disk:
        short = plan.needed("disk") - disk
        hint = "free disk space or choose another --out"
        if spill_budget:
            hint += f", or pass --cache-budget below {human(max(spill_budget - short, 0))} (vectors beyond it are "
            hint += "recomputed each trial)"
        return f"disk: needs {human(plan.needed('disk'))}, {human(disk)} free (short by {human(short)}): {hint}"
    return None


def _per_param(store: int, params: int) -> str:
    return f"{store / params:.3f}" if params else "0"


def density_ranges(
    recipe: Recipe, spec: TuneSpec, checkpoints: Mapping[str, Checkpoint]
) -> dict[tuple[str, str], tuple[float, float]]:
    """(fine-tune, tensor) → the lowest and the largest density the run can ask of it (each searched density at
    its `low` and its `high`)."""
    from dots_merge.core import METHOD_NAME

    if recipe.method != METHOD_NAME:
        return {}
    top = _densities(ceiling_recipe(recipe, spec), checkpoints)
    bottom = _densities(floor_recipe(recipe, spec), checkpoints)
    return {key: (bottom.get(key, high), high) for key, high in top.items()}


def _densities(recipe: Recipe, checkpoints: Mapping[str, Checkpoint]) -> dict[tuple[str, str], float]:
    from mergekit.options import MergeOptions

    from dots_merge.merge.driver import plan_tasks, with_output_dtype

    _, _, _, targets = plan_tasks(with_output_dtype(recipe, checkpoints), MergeOptions())
    out = {}
    for task, weight in targets.items():
        params = getattr(task, "input_parameters", None) or {}
        for model in task.model_order:
            if model != task.base_model and "density" in params.get(model, {}):
                out[(str(model), weight.name)] = float(params[model]["density"])
    return out


def ceiling_recipe(recipe: Recipe, spec: TuneSpec) -> Recipe:
    """The recipe with every searched density at the top of its range."""
    return trial_recipe(recipe, spec.space, [d.high if d.param == "density" else 1.0 for d in spec.space])


def floor_recipe(recipe: Recipe, spec: TuneSpec) -> Recipe:
    """The recipe with every searched density at the bottom of its range."""
    return trial_recipe(recipe, spec.space, [d.low if d.param == "density" else 1.0 for d in spec.space])


def longest_prompt(tokenizer, prompts: Sequence[str]) -> int:
    """Tokens of the longest prompt as the model sees it (chat template applied)."""
    from dots_merge.tune.generation import chat_prompt

    return max((len(chat_prompt(tokenizer, p)) for p in prompts), default=1)


def _gpu_free(device: str) -> int:
    import torch

    if not torch.cuda.is_available():
        raise DotsMergeError(f"--device {device}: no CUDA device here; to plan for one, give --gpu-memory (e.g. 24GiB)")
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def host_available() -> int:
    """The machine's available RAM (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def _disk_free(run_dir: Path) -> int:
    path = Path(run_dir).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def plan_tune(
    recipe: Recipe,
    spec: TuneSpec,
    checkpoints: Mapping[str, Checkpoint],
    *,
    device: str,
    run_dir: Path,
    gpu_memory: int | None = None,
    host_memory: int | None = None,
    disk_free: int | None = None,
    cache_budget: int | None = None,
    trust_remote_code: bool = False,
) -> Plan:
    """The plan of `tune` for a parsed recipe: reads the tokenizer (prompt lengths) and the ceiling plan."""
    from dots_merge.tune.generation import load_tokenizer
    from dots_merge.tune.objectives import prompts_of

    tokenizer = load_tokenizer(next(iter(checkpoints.values())).path, trust_remote_code=trust_remote_code)
    texts = list(spec.queries) + (list(spec.validation.prompts) if spec.validation is not None else [])
    prompts = prompts_of(texts, spec.prompt_suffix)
    return make_plan(
        recipe,
        spec,
        checkpoints,
        device=device,
        run_dir=run_dir,
        prompt_tokens=longest_prompt(tokenizer, prompts),
        gpu_memory=gpu_memory,
        host_memory=host_memory,
        disk_free=disk_free,
        cache_budget=cache_budget,
        ranges=density_ranges(recipe, spec, checkpoints),
    )


def batch_for(
    recipe: Recipe,
    checkpoints: Mapping[str, Checkpoint],
    *,
    samples: int,
    max_new_tokens: int,
    prompt_tokens: int,
    queries: int,
    device: str,
) -> int:
    """`batch_size: auto` outside a tune (e.g. `queries select`): what fits beside the resident model."""
    from dots_merge.merge.driver import output_dtype

    out_bytes = NAME_BYTES.get(output_dtype(recipe, checkpoints), 2)
    shape = model_shape(next(iter(checkpoints.values())), out_bytes)
    if device.startswith("cuda"):
        share = int(_gpu_free(device) * (1 - GPU_MARGIN)) - shape.model_bytes - CUDA_CONTEXT
    else:
        share = max(int(host_available() * (1 - HOST_MARGIN)) // 4, 1 << 30)
    return _auto_batch(shape, samples, queries, prompt_tokens, max_new_tokens, out_bytes, share)
