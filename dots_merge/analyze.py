"""`dots-merge analyze`: the paper's task-vector diagnostics, streamed tensor by tensor.

For the fine-tunes of a recipe: the norm of each task vector and where it lives (module types, layers),
how large it is against the base, and for each pair the magnitude ratio, the share of coordinates with
opposite signs (dense and after sparsifying both at each density) and the overlap of what S keeps.
Memory: one task vector per fine-tune for the tensor in hand, nothing more.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import tqdm
from mergekit.io.tasks import LoaderCache
from mergekit.options import MergeOptions

from dots_merge.core import NonFiniteTaskVector, TopK, keep_count, select_topk, sparse_task_vector, squared_norm
from dots_merge.core.diagnostics import MODULE_TYPES, NO_LAYER, PairCounts, layer_of, module_type, pair_counts
from dots_merge.errors import DotsMergeError
from dots_merge.fileio import write_atomic
from dots_merge.merge import mergekit_compat
from dots_merge.merge.driver import as_recipe, inspect_models, resolve_device
from dots_merge.merge.method import nonfinite_error
from dots_merge.recipe import Recipe, model_entries, model_name
from dots_merge.report.plots import pyplot, save_figure

DEFAULT_DENSITIES = (0.1, 0.3, 0.5)


def parse_densities(text: str) -> tuple[float, ...]:
    """`0.1,0.3,0.5` → (0.1, 0.3, 0.5); each must be in (0, 1]."""
    out = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise DotsMergeError(f"--densities: {item.strip()!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise DotsMergeError(f"--densities: {value} is outside (0, 1]")
        out.append(value)
    return tuple(sorted(set(out)))


def _finetunes(recipe: Recipe) -> tuple[str, list[str]]:
    base = recipe.data.get("base_model")
    if not base:
        raise DotsMergeError(f"{recipe.source}: base_model: analyze needs a base model (task vectors are θ − θ_base)")
    base = model_name(base)
    names = []
    for entry in model_entries(recipe.data):
        name = model_name(entry["model"])
        if name != base and name not in names:
            names.append(name)
    if not names:
        raise DotsMergeError(f"{recipe.source}: models: no fine-tune besides the base model")
    return base, names


def analyze(
    recipe: Recipe | str | os.PathLike,
    *,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    device: str = "cpu",
    allow_pickle: bool = False,
    allow_nonfinite: bool = False,
    quiet: bool = True,
) -> dict[str, Any]:
    """Stream the recipe's task vectors once and return the diagnostics as a JSON-ready dict."""
    recipe = as_recipe(recipe)
    base_name, finetunes = _finetunes(recipe)
    device = resolve_device(device)
    inspect_models(recipe, allow_pickle=allow_pickle)
    refs = {str(r): r for r in recipe.merge_config().referenced_models()}
    labels = [repr(float(d)) for d in densities]
    mergekit_compat.reset_loaders(MergeOptions(lazy_unpickle=False))
    try:
        loaders = {name: LoaderCache().get(refs[name]) for name in [base_name, *finetunes]}
        sq = {m: defaultdict(float) for m in finetunes}  # (kind, key) → Σ τ²
        base_sq: dict[str, float] = defaultdict(float)
        pairs = {pair: defaultdict(PairCounts) for pair in itertools.combinations(finetunes, 2)}
        names = sorted(loaders[base_name].index.tensor_paths)
        for name in tqdm.tqdm(names, desc="Analyzing", disable=quiet):
            base = loaders[base_name].get_tensor(name, device=device)
            if not base.is_floating_point():
                continue
            kind, layer = module_type(name), layer_of(name)
            base_sq[kind] += squared_norm(base)
            taus: dict[str, torch.Tensor] = {}
            selections: dict[str, dict[str, TopK]] = {}
            for model in finetunes:
                tuned = loaders[model].get_tensor(name, device=device)
                try:
                    sparse = sparse_task_vector(base, tuned, 1.0, check_finite=not allow_nonfinite)
                except NonFiniteTaskVector:
                    raise nonfinite_error(name, base, base_name, model) from None
                taus[model] = sparse.values
                sq[model][("module", kind)] += sparse.squared_norm
                sq[model][("layer", layer)] += sparse.squared_norm
                n = sparse.values.numel()
                selections[model] = {
                    lv: select_topk(sparse.values, keep_count(d, n)) for lv, d in zip(labels, densities, strict=True)
                }
            for (a, b), counts in pairs.items():
                for level, c in pair_counts(taus[a], taus[b], selections[a], selections[b]).items():
                    counts[level] += c
            del taus, selections
    finally:
        mergekit_compat.reset_loaders()
    return _report(base_name, finetunes, labels, sq, base_sq, pairs)


def _report(base_name, finetunes, labels, sq, base_sq, pairs) -> dict[str, Any]:
    models = {}
    for model in finetunes:
        modules = {k: v for (kind, k), v in sq[model].items() if kind == "module"}
        layers = {k: v for (kind, k), v in sq[model].items() if kind == "layer"}
        total = sum(modules.values())
        models[model] = {
            "l2_norm": math.sqrt(total),
            "module_l2_norm": {k: math.sqrt(modules[k]) for k in MODULE_TYPES if k in modules},
            "module_share": {k: _ratio(modules[k], total) for k in MODULE_TYPES if k in modules},
            "layer_share": {k: _ratio(layers[k], total) for k in sorted(layers, key=_layer_key)},
            "relative_update": {
                k: math.sqrt(_ratio(modules[k], base_sq[k])) for k in MODULE_TYPES if k in modules and base_sq[k] > 0
            },
        }
    out_pairs = []
    for (a, b), counts in pairs.items():
        levels = ["dense", *labels]
        ma, mb = models[a]["module_l2_norm"], models[b]["module_l2_norm"]
        out_pairs.append(
            {
                "a": a,
                "b": b,
                "magnitude_ratio": _ratio(models[a]["l2_norm"], models[b]["l2_norm"]),
                "magnitude_ratio_by_module": {k: _ratio(ma[k], mb[k]) for k in ma if k in mb},
                "sign_conflict_all": {lv: counts[lv].conflict_all for lv in levels},
                "sign_conflict_both": {lv: counts[lv].conflict_both for lv in levels},
                "jaccard": {lv: counts[lv].jaccard for lv in levels},
            }
        )
    return {"base": base_name, "densities": [float(x) for x in labels], "models": models, "pairs": out_pairs}


def _ratio(a: float, b: float) -> float:
    return a / b if b else (math.inf if a else 0.0)


def _layer_key(layer: str) -> tuple[int, int]:
    return (1, 0) if layer == NO_LAYER else (0, int(layer))


def format_table(report: dict[str, Any]) -> str:
    """A terminal summary of the report."""
    kinds = [k for k in MODULE_TYPES if any(k in m["module_share"] for m in report["models"].values())]
    width = max(len(m) for m in report["models"]) + 2
    lines = [f"Task vectors against {report['base']}", ""]
    lines.append("model".ljust(width) + "‖τ‖₂".rjust(10) + "".join(k.rjust(8) for k in kinds) + "   (share of ‖τ‖², %)")
    for name, m in report["models"].items():
        shares = "".join(f"{100 * m['module_share'].get(k, 0.0):8.1f}" for k in kinds)
        lines.append(name.ljust(width) + f"{m['l2_norm']:10.4g}" + shares)
    for p in report["pairs"]:
        lines += ["", f"{p['a']}  vs  {p['b']}: ‖τ_a‖/‖τ_b‖ = {p['magnitude_ratio']:.4g}"]
        lines.append("  density      sign conflict (all)   sign conflict (both changed)   overlap (Jaccard)")
        for level in p["sign_conflict_all"]:
            lines.append(
                f"  {level:<12} {100 * p['sign_conflict_all'][level]:14.2f} %"
                f" {100 * p['sign_conflict_both'][level]:24.2f} %   {p['jaccard'][level]:18.3f}"
            )
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write the report atomically."""
    write_atomic(path, json.dumps(report, indent=2) + "\n")


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """module_share.png, layer_norms.png and sign_conflict.png in `out_dir`."""
    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    models = report["models"]
    written = []

    kinds = [k for k in MODULE_TYPES if any(k in m["module_share"] for m in models.values())]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(models)
    for i, (name, m) in enumerate(models.items()):
        xs = [j + i * width for j in range(len(kinds))]
        ax.bar(xs, [100 * m["module_share"].get(k, 0.0) for k in kinds], width, label=_short(name))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))], kinds)
    ax.set_ylabel("share of ‖τ‖² (%)")
    ax.set_title("Where each task vector lives")
    ax.legend()
    written.append(save_figure(fig, out_dir / "module_share.png"))

    fig, ax = plt.subplots(figsize=(9, 4))
    for name, m in models.items():
        layers = [k for k in m["layer_share"] if k != NO_LAYER]
        norms = [math.sqrt(m["layer_share"][k]) * m["l2_norm"] for k in layers]
        ax.plot([int(k) for k in layers], norms, marker="o", label=_short(name))
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("‖τ‖₂ of the layer")
    ax.set_title("Task-vector norm per layer")
    ax.legend()
    written.append(save_figure(fig, out_dir / "layer_norms.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for p in report["pairs"]:
        levels = [lv for lv in p["sign_conflict_both"] if lv != "dense"]
        xs = [float(lv) for lv in levels] + [1.0]
        label = f"{_short(p['a'])} vs {_short(p['b'])}"
        for key, style in (("sign_conflict_both", "-o"), ("sign_conflict_all", "--s")):
            ys = [100 * p[key][lv] for lv in levels] + [100 * p[key]["dense"]]
            ax.plot(xs, ys, style, label=f"{label} ({'both changed' if key.endswith('both') else 'all'})")
    ax.set_xlabel("density kept (1.0 = dense)")
    ax.set_ylabel("opposite signs (%)")
    ax.set_title("Sign conflict against density")
    ax.legend(fontsize=8)
    written.append(save_figure(fig, out_dir / "sign_conflict.png"))
    return written


def _short(name: str) -> str:
    return Path(name).name or name
