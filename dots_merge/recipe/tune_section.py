"""The recipe's `tune:` section: what is searched, on which queries, how candidates are scored.

Checked key by key like the rest of the recipe, before any model is loaded. `trial_recipe` rewrites the
recipe's coefficients for one point of the search space; the result is a complete recipe that
`dots-merge merge` runs as is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dots_merge.errors import RecipeError
from dots_merge.recipe.recipe import Recipe, model_entries, model_name

BACKENDS = ("bayes", "optuna", "random")
PICK_RULES = ("utopia", "knee", "validation")  # and max_NAME / min_NAME: the best front point by one objective
DEFAULT_PICK = "utopia"  # the label-free rule: the default, and the order `validation` breaks ties in
EXTREME_RULE = re.compile(r"(max|min)_([a-z][a-z0-9_]*)")
DEFAULT_OBJECTIVES = ("consistency", "perplexity")
PERPLEXITY_OVER = ("query", "templated")
VALIDATION_ITEMS = (10, 200)  # how many labeled problems tune.validation may hold
ANSWER_RULES = ("auto", "boxed", "last_number")
PARAMS = {"weight": 1.0, "density": 0.3}  # searchable parameters and their defaults
DEFAULT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
_TUNE_KEYS = {"queries", "trials", "seed", "backend", "pick", "generation", "prompt_suffix", "answer", "compare",
              "space", "initial", "objectives", "perplexity", "validation"}  # fmt: skip
_GENERATION_KEYS = {"samples", "temperature", "top_p", "max_new_tokens", "batch_size", "engine", "vllm"}
ENGINES = ("transformers", "vllm")
_SPACE_KEYS = {"model", "param", "low", "high", "filter"}


@dataclass(frozen=True)
class VllmOptions:
    """`tune.generation.vllm`: settings of the vLLM engine (None: chosen from the plan, or vLLM's default)."""

    gpu_memory_utilization: float | None = None  # share of the GPU's memory vLLM takes (weights + KV cache)
    max_model_len: int | None = None  # longest prompt + completion (default: the longest query + max_new_tokens)
    max_num_seqs: int | None = None  # sequences decoded at once (default: batch_size × samples)
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None  # default: eager on the CPU, CUDA graphs on a GPU
    cpu_kvcache_space: int | None = None  # GiB of KV cache on the CPU (VLLM_CPU_KVCACHE_SPACE; default: planned)
    cpu_threads: int | None = None  # OpenMP threads on the CPU (default: torch's)


@dataclass(frozen=True)
class Generation:
    """How the answers of a consistency measurement are sampled (method.md §5; the reference's defaults)."""

    samples: int = 7
    temperature: float = 0.6
    top_p: float = 1.0
    max_new_tokens: int = 1024
    batch_size: int | str = "auto"  # queries per batch; auto: as many as the plan's generation share holds
    engine: str = "transformers"  # transformers | vllm
    vllm: VllmOptions = field(default_factory=VllmOptions)


@dataclass(frozen=True)
class Dimension:
    """One searched coefficient: `param` of `model`, optionally only for tensors matching `filter`."""

    model: str
    param: str
    low: float
    high: float
    filter: str | None = None

    @property
    def label(self) -> str:
        name = f"{Path(self.model).name or self.model}.{self.param}"
        return f"{name}[{self.filter}]" if self.filter else name


@dataclass(frozen=True)
class ValidationSet:
    """`tune.validation`: a few labeled problems, used after the search only, to score front points."""

    path: Path
    prompts: list[str]
    labels: list[str]
    points: str = "front"  # which trials are scored: the front (and the pick) or all

    @property
    def digest(self) -> str:
        import hashlib

        return hashlib.sha256(json.dumps([self.prompts, self.labels]).encode()).hexdigest()[:16]


@dataclass
class TuneSpec:
    """The validated `tune:` section."""

    queries: list[str]
    space: list[Dimension]
    trials: int = 40
    seed: int = 0
    backend: str = "bayes"
    pick: str = DEFAULT_PICK
    generation: Generation = field(default_factory=Generation)
    prompt_suffix: str = DEFAULT_SUFFIX
    answer: str = "auto"
    compare: str = "auto"
    initial: list[list[float]] = field(default_factory=list)
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))
    perplexity_over: str = "query"
    validation: ValidationSet | None = None

    @property
    def labels(self) -> list[str]:
        return [d.label for d in self.space]


def _fail(source: str, where: str, message: str):
    raise RecipeError(f"{source}: {where}: {message}")


def _number(source: str, where: str, value: Any, *, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and not isinstance(value, int)):
        _fail(source, where, f"must be {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def read_queries(spec_value: Any, source: str, base_dir: Path) -> list[str]:
    """Queries from a JSONL file (a "prompt" per line, path relative to the recipe) or an inline list."""
    if isinstance(spec_value, list):
        if not spec_value:
            _fail(source, "tune.queries", "empty list")
        for i, q in enumerate(spec_value):
            if not isinstance(q, str) or not q.strip():
                _fail(source, f"tune.queries[{i}]", "must be a non-empty string")
        return list(spec_value)
    if not isinstance(spec_value, str):
        _fail(source, "tune.queries", "a JSONL file path or a list of prompts")
    path, rows = _prompt_rows(spec_value, base_dir, f"query file not found (tune.queries in {source})")
    if not rows:
        raise RecipeError(f"{path}: query file is empty")
    return [row["prompt"] for _, row in rows]


def _prompt_rows(name: str, base_dir: Path, missing: str) -> tuple[Path, list[tuple[int, dict]]]:
    """The file (relative to `base_dir`) and its (line number, object) rows, each with a "prompt" string;
    `missing` says what the file was for when it is not there."""
    path = Path(name) if Path(name).is_absolute() else base_dir / name
    if not path.is_file():
        raise RecipeError(f"{path}: {missing}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise RecipeError(f"{path}:{number}: not a JSON object") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise RecipeError(f'{path}:{number}: no "prompt" string')
        rows.append((number, row))
    return path, rows


def parse_tune(recipe: Recipe, *, load_queries: bool = True) -> TuneSpec:
    """Validate `recipe.tune`; raise `RecipeError` naming the key at fault.

    With `load_queries=False` the query file is neither required nor read (a plain merge of the recipe).
    """
    src = recipe.source
    raw = recipe.tune
    if raw is None:
        raise RecipeError(f"{src}: no `tune:` section (see recipes/ for an example)")
    unknown = sorted(set(raw) - _TUNE_KEYS)
    if unknown:
        _fail(src, f"tune.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_TUNE_KEYS))})")
    base_dir = Path(src).parent if Path(src).is_file() else Path.cwd()
    if "queries" not in raw and load_queries:
        _fail(src, "tune.queries", "missing: a JSONL file of prompts or a list of prompts")
    queries = read_queries(raw["queries"], src, base_dir) if "queries" in raw and load_queries else []

    trials = int(_number(src, "tune.trials", raw.get("trials", 40), integer=True))
    if trials < 1:
        _fail(src, "tune.trials", f"must be at least 1, got {trials}")
    seed = int(_number(src, "tune.seed", raw.get("seed", 0), integer=True))
    backend = raw.get("backend", "bayes")
    if backend not in BACKENDS:
        _fail(src, "tune.backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    objectives = _objectives(src, raw.get("objectives", list(DEFAULT_OBJECTIVES)))
    pick = raw.get("pick", DEFAULT_PICK)
    check_pick(pick, objectives, where=f"{src}: tune.pick")
    validation = _validation(src, raw.get("validation"), base_dir) if load_queries else None
    if pick == "validation" and raw.get("validation") is None:
        _fail(src, "tune.pick", "validation needs labeled problems: add `tune.validation: FILE.jsonl`")
    answer = raw.get("answer", "auto")
    if not isinstance(answer, str) or not (answer in ANSWER_RULES or answer.startswith("regex:")):
        _fail(src, "tune.answer", f"must be auto, boxed, last_number or regex:PATTERN, got {answer!r}")
    if answer.startswith("regex:"):
        try:
            re.compile(answer[len("regex:") :])
        except re.error as error:
            _fail(src, "tune.answer", f"invalid regular expression: {error}")
    compare = raw.get("compare", "auto")
    if compare not in ("auto", "string", "math"):
        _fail(src, "tune.compare", f"must be auto, string or math, got {compare!r}")
    suffix = raw.get("prompt_suffix", DEFAULT_SUFFIX)
    if not isinstance(suffix, str):
        _fail(src, "tune.prompt_suffix", "must be a string")
    space = _space(recipe, raw.get("space"))
    return TuneSpec(
        queries=queries,
        space=space,
        trials=trials,
        seed=seed,
        backend=backend,
        pick=pick,
        generation=_generation(src, raw.get("generation") or {}),
        prompt_suffix=suffix,
        answer=answer,
        compare=compare,
        initial=_initial_points(recipe, space, raw.get("initial")),
        objectives=objectives,
        perplexity_over=_perplexity(src, raw.get("perplexity")),
        validation=validation,
    )


def check_pick(pick: Any, objectives: list[str], *, where: str) -> None:
    """A pick rule this search can apply: knee, utopia, validation, or max_NAME / min_NAME of one of its
    objectives (the direction is checked where the objectives are known)."""
    extreme = EXTREME_RULE.fullmatch(pick) if isinstance(pick, str) else None
    if pick in PICK_RULES or (extreme and extreme.group(2) in objectives):
        return
    extremes = ", ".join(f"max_{o} or min_{o}" for o in objectives)
    raise RecipeError(f"{where}: must be one of {', '.join(PICK_RULES)}, {extremes}; got {pick!r}")


def check_engine(engine: Any, *, where: str) -> None:
    """A generation engine this tool has (the recipe's `tune.generation.engine`, or `--engine`)."""
    if engine not in ENGINES:
        raise RecipeError(f"{where}: must be one of {', '.join(ENGINES)}, got {engine!r}")


def _objectives(src: str, raw: Any) -> list[str]:
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(o, str) and o for o in raw):
        _fail(src, "tune.objectives", f"a list of two or more objective names, got {raw!r}")
    if len(set(raw)) != len(raw):
        _fail(src, "tune.objectives", f"lists an objective twice: {raw}")
    return list(raw)


def _perplexity(src: str, raw: Any) -> str:
    if raw is None:
        return "query"
    if not isinstance(raw, dict) or set(raw) - {"over"}:
        _fail(src, "tune.perplexity", "a mapping {over: query|templated}")
    over = raw.get("over", "query")
    if over not in PERPLEXITY_OVER:
        _fail(src, "tune.perplexity.over", f"must be one of {', '.join(PERPLEXITY_OVER)}, got {over!r}")
    return over


def _validation(src: str, raw: Any, base_dir: Path) -> ValidationSet | None:
    """`tune.validation: FILE.jsonl` or `{file: FILE.jsonl, points: front|all}`; {"prompt", "answer"} lines."""
    if raw is None:
        return None
    setting = {"file": raw} if isinstance(raw, str) else raw
    if not isinstance(setting, dict) or not isinstance(setting.get("file"), str) or set(setting) - {"file", "points"}:
        _fail(src, "tune.validation", "a JSONL file of {\"prompt\", \"answer\"} lines, or {file: FILE, points: front|all}")
    points = setting.get("points", "front")
    if points not in ("front", "all"):
        _fail(src, "tune.validation.points", f"must be front or all, got {points!r}")
    path, rows = _prompt_rows(setting["file"], base_dir, f"validation file not found (tune.validation in {src})")
    prompts, labels = [], []
    for number, row in rows:
        answer = row.get("answer")
        if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
            raise RecipeError(f'{path}:{number}: no "answer" (a string or a number)')
        prompts.append(row["prompt"])
        labels.append(str(answer))
    low, high = VALIDATION_ITEMS
    if not low <= len(prompts) <= high:
        raise RecipeError(f"{path}: {len(prompts)} labeled problems; tune.validation takes {low} to {high}")
    return ValidationSet(path=path, prompts=prompts, labels=labels, points=points)


def _generation(src: str, raw: Any) -> Generation:
    if not isinstance(raw, dict):
        _fail(src, "tune.generation", "must be a mapping")
    unknown = sorted(set(raw) - _GENERATION_KEYS)
    if unknown:
        _fail(src, f"tune.generation.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_GENERATION_KEYS))})")
    engine = raw.get("engine", "transformers")
    check_engine(engine, where=f"{src}: tune.generation.engine")
    if raw.get("vllm") is not None and engine != "vllm":
        _fail(src, "tune.generation.vllm", "options of the vllm engine: set tune.generation.engine: vllm")
    g = Generation(**{**raw, "engine": engine, "vllm": _vllm_options(src, raw.get("vllm") or {})})
    for key in ("samples", "max_new_tokens", "batch_size"):
        if key == "batch_size" and g.batch_size == "auto":
            continue
        if _number(src, f"tune.generation.{key}", getattr(g, key), integer=True) < 1:
            _fail(src, f"tune.generation.{key}", "must be at least 1")
    if g.samples < 2:
        _fail(src, "tune.generation.samples", f"must be at least 2 (one sample always agrees with itself), got {g.samples}")
    if _number(src, "tune.generation.temperature", g.temperature) <= 0:
        _fail(src, "tune.generation.temperature",
              f"must be above 0 (at {g.temperature} every sample is the same and consistency is 1 for every candidate)")  # fmt: skip
    if not 0 < _number(src, "tune.generation.top_p", g.top_p) <= 1:
        _fail(src, "tune.generation.top_p", "must be in (0, 1]")
    return g


_VLLM_TYPES = {"gpu_memory_utilization": float, "max_model_len": int, "max_num_seqs": int,
               "tensor_parallel_size": int, "enforce_eager": bool, "cpu_kvcache_space": int, "cpu_threads": int}


def _vllm_options(src: str, raw: Any) -> VllmOptions:
    """`tune.generation.vllm`, key by key."""
    if not isinstance(raw, dict):
        _fail(src, "tune.generation.vllm", "must be a mapping")
    unknown = sorted(set(raw) - set(_VLLM_TYPES))
    if unknown:
        _fail(src, f"tune.generation.vllm.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_VLLM_TYPES))})")
    for key, value in raw.items():
        where = f"tune.generation.vllm.{key}"
        if _VLLM_TYPES[key] is bool:
            if not isinstance(value, bool):
                _fail(src, where, f"must be true or false, got {value!r}")
            continue
        number = _number(src, where, value, integer=_VLLM_TYPES[key] is int)
        if key == "gpu_memory_utilization" and not 0 < number <= 1:
            _fail(src, where, f"must be in (0, 1], got {value}")
        if number < 1 and key != "gpu_memory_utilization":
            _fail(src, where, f"must be at least 1, got {value}")
    return VllmOptions(**raw)


def _space(recipe: Recipe, raw: Any) -> list[Dimension]:
    src = recipe.source
    if not isinstance(raw, list) or not raw:
        _fail(src, "tune.space", "a non-empty list of {model, param, low, high} entries")
    base = model_name(recipe.data["base_model"]) if recipe.data.get("base_model") else None
    models = [model_name(e["model"]) for e in model_entries(recipe.data)]
    dims: list[Dimension] = []
    for i, entry in enumerate(raw):
        where = f"tune.space[{i}]"
        if not isinstance(entry, dict):
            _fail(src, where, "must be a mapping {model, param, low, high}")
        unknown = sorted(set(entry) - _SPACE_KEYS)
        if unknown:
            _fail(src, f"{where}.{unknown[0]}", f"unknown key (known: {', '.join(sorted(_SPACE_KEYS))})")
        for key in ("model", "param", "low", "high"):
            if key not in entry:
                _fail(src, f"{where}.{key}", "missing")
        model = str(entry["model"])
        if model not in models or model == base:
            _fail(
                src,
                f"{where}.model",
                f"{model!r} is not a fine-tune under `models:` (have: {', '.join(m for m in models if m != base)})",
            )
        if entry["param"] not in PARAMS:
            _fail(src, f"{where}.param", f"unknown param {entry['param']!r} (searchable: {', '.join(PARAMS)})")
        low = _number(src, f"{where}.low", entry["low"])
        high = _number(src, f"{where}.high", entry["high"])
        if low >= high:
            _fail(src, where, f"low ({low}) must be below high ({high})")
        if entry["param"] == "density" and not (low > 0 and high <= 1):
            _fail(src, where, f"density bounds must lie in (0, 1], got [{low}, {high}]")
        filt = entry.get("filter")
        if filt is not None and (not isinstance(filt, str) or not filt):
            _fail(src, f"{where}.filter", "must be a non-empty string")
        dim = Dimension(model, entry["param"], float(low), float(high), filt)
        if any((d.model, d.param, d.filter) == (dim.model, dim.param, dim.filter) for d in dims):
            _fail(src, where, f"{dim.label} is searched twice")
        dims.append(dim)
    return dims


def _initial_points(recipe: Recipe, space: list[Dimension], raw: Any) -> list[list[float]]:
    """`tune.initial`, or by default one point: every weight 1.0, densities as written, when inside the bounds."""
    src = recipe.source
    if raw is None:
        point = [current_value(recipe, d) if d.param == "density" else 1.0 for d in space]
        inside = all(d.low <= v <= d.high for d, v in zip(space, point, strict=True))
        return [point] if inside else []
    if not isinstance(raw, list):
        _fail(src, "tune.initial", "a list of points, each a list with one value per `space` entry")
    for i, point in enumerate(raw):
        if not isinstance(point, list) or len(point) != len(space):
            _fail(src, f"tune.initial[{i}]", f"must list {len(space)} values, one per `space` entry")
        for j, (d, v) in enumerate(zip(space, point, strict=True)):
            _number(src, f"tune.initial[{i}][{j}]", v)
            if not d.low <= v <= d.high:
                _fail(src, f"tune.initial[{i}][{j}]", f"{v} is outside [{d.low}, {d.high}] of {d.label}")
    return [[float(v) for v in p] for p in raw]


def _entry(data: dict, model: str) -> dict:
    for entry in model_entries(data):
        if model_name(entry["model"]) == model:
            return entry
    raise KeyError(model)


def current_value(recipe: Recipe, dim: Dimension) -> float:
    """The recipe's own value of a searched coefficient (its default entry when filtered)."""
    setting = (_entry(recipe.data, dim.model).get("parameters") or {}).get(dim.param, PARAMS[dim.param])
    if isinstance(setting, list):
        setting = next(
            (c.get("value") for c in setting if isinstance(c, dict) and not c.get("filter")), PARAMS[dim.param]
        )
    return float(setting) if isinstance(setting, int | float) else PARAMS[dim.param]


def trial_recipe(recipe: Recipe, space: list[Dimension], values: list[float]) -> Recipe:
    """The recipe with each searched coefficient set; filtered values go first, in `space` order."""
    out = recipe.copy()
    for dim, value in zip(space, values, strict=True):
        entry = _entry(out.data, dim.model)
        params = entry.setdefault("parameters", {}) or {}
        entry["parameters"] = params
        setting = params.get(dim.param, PARAMS[dim.param])
        if dim.filter is None:
            if isinstance(setting, list):
                rest = [c for c in setting if isinstance(c, dict) and c.get("filter")]
                params[dim.param] = [*rest, {"value": float(value)}]
            else:
                params[dim.param] = float(value)
            continue
        conditions = setting if isinstance(setting, list) else [{"value": setting}]
        conditions = [c for c in conditions if c.get("filter") != dim.filter]
        filtered = [c for c in conditions if c.get("filter")]
        default = [c for c in conditions if not c.get("filter")] or [{"value": PARAMS[dim.param]}]
        params[dim.param] = [*filtered, {"filter": dim.filter, "value": float(value)}, *default]
    out.data.pop("tune", None)
    return out
