"""The model card (README.md) written into every merge output, richer after a tune."""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from huggingface_hub import ModelCard, ModelCardData

from dots_merge.checkpoints import Checkpoint, looks_like_hub_id
from dots_merge.core import METHOD_NAME, PAPER_URL
from dots_merge.recipe import Recipe, model_entries, model_name

LOG = logging.getLogger(__name__)
_WARNED: set[tuple[str, ...]] = set()  # local models already warned about in this process
TAGS = ["merge", "mergekit", "dots-merge"]
PAPER = (
    f"[Decouple before Integration: Test-time Synthesis of SFT and RLVR Task Vectors (arXiv 2605.00610)]({PAPER_URL})"
)


@dataclass
class TuningSummary:
    """What a tune adds to the card."""

    front: list[dict]  # trial records on the Pareto front
    pick: dict  # the picked trial record
    rule: str
    hypervolume: float
    trials: int
    seconds: float
    queries: list[str]
    include_queries: bool = False
    plot: str | None = "pareto.png"
    labels: list[str] = field(default_factory=list)
    objectives: list[str] = field(default_factory=lambda: ["consistency", "perplexity"])
    health: dict | None = None  # the pick's sample health (shares of finished / truncated / no-answer samples)
    warnings: list[str] = field(default_factory=list)
    validation: dict | None = None  # few-label validation: accuracies by trial, Spearman's ρ per objective

    @property
    def queries_sha256(self) -> str:
        return hashlib.sha256("\n".join(self.queries).encode()).hexdigest()


def hub_id(checkpoint: Checkpoint, hub_ids: Mapping[str, str] | None = None) -> str | None:
    """The Hub repo id of a model: the recipe's `hub_ids`, its reference when that is one, else the
    `_name_or_path` of its config when that is a repo id."""
    if hub_ids and checkpoint.reference in hub_ids:
        return hub_ids[checkpoint.reference]
    if looks_like_hub_id(checkpoint.reference):
        return checkpoint.reference
    named = str(checkpoint.config.get("_name_or_path") or "")
    if named and looks_like_hub_id(named) and not os.path.isabs(named):
        return named
    return None


def base_model_ids(checkpoints: Sequence[Checkpoint], hub_ids: Mapping[str, str] | None = None) -> list[str]:
    """Hub ids for `base_model`; a model known only by a local path is left out with a warning."""
    ids: list[str] = []
    local: list[str] = []
    for ckpt in checkpoints:
        repo = hub_id(ckpt, hub_ids)
        if repo is None:
            local.append(ckpt.reference)
        elif repo not in ids:
            ids.append(repo)
    if local and tuple(local) not in _WARNED:
        _WARNED.add(tuple(local))
        LOG.warning(
            "model card: base_model leaves out %s (local paths with no Hub id; map them with `hub_ids:`)",
            ", ".join(local),
        )
    return ids


def common_license(checkpoints: Sequence[Checkpoint]) -> str | None:
    """The license all parent models declare in their own cards, when they agree."""
    from huggingface_hub import metadata_load

    licenses = set()
    for ckpt in checkpoints:
        readme = ckpt.path / "README.md"
        try:
            meta = metadata_load(readme) if readme.is_file() else None
        except Exception:
            meta = None
        licenses.add((meta or {}).get("license"))
    return licenses.pop() if len(licenses) == 1 and None not in licenses else None


def versions() -> dict[str, str]:
    """Versions of the packages that produced the merge."""
    out = {}
    for package in ("dots-merge", "mergekit", "torch", "transformers"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "unknown"
    return out


def render_card(
    recipe: Recipe,
    checkpoints: Sequence[Checkpoint],
    *,
    rescale_factors: Mapping[str, float] | None = None,
    tuning: TuningSummary | None = None,
) -> str:
    """README.md for a merge: metadata, the method, coefficients, recipe; after a tune the search too."""
    is_dots = recipe.method == METHOD_NAME
    data = ModelCardData(
        base_model=base_model_ids(checkpoints, recipe.data.get("hub_ids")) or None,
        base_model_relation="merge",
        library_name="transformers",
        pipeline_tag="text-generation",
        license=common_license(checkpoints),
        tags=[*TAGS, METHOD_NAME] if is_dots else TAGS,
    )
    lines = ["# Merged model", ""]
    if is_dots:
        lines += [
            f"Merged with dots-merge using **DoTS** ({PAPER}): the task vectors τ = θ_finetune − θ_base of each "
            "fine-tune are sparsified (magnitude top-k per tensor), rescaled to keep their norm, and added to the "
            "base: θ = θ_base + Σ λ_i · f_i · S(τ_i).",
            "",
        ]
    else:
        lines += [f"Merged with dots-merge (mergekit method `{recipe.method}`).", ""]
    lines += _coefficients_table(recipe, rescale_factors or {})
    if tuning is not None:
        lines += _tuning_section(tuning)
    lines += ["## Recipe", "", "```yaml", recipe.to_yaml(include_tune=False).rstrip(), "```", ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in versions().items()), ""]
    if tuning is not None:
        lines += [
            "## Limitations",
            "",
            "The coefficients were chosen without labels, by unsupervised proxies: answer self-consistency and "
            "self-certainty reward answers the model gives confidently, not correct ones, and the perplexity of the "
            "queries measures how familiar the prompts are to the model, not how well it solves them. The tuning "
            "queries are few; the pick may fit them rather than the task. Evaluate the model on labeled benchmarks "
            "of your own before relying on it.",
            "",
        ]
    card = ModelCard.from_template(
        data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n", body="\n".join(lines)
    )
    return str(card)


def _coefficients_table(recipe: Recipe, factors: Mapping[str, float]) -> list[str]:
    base = recipe.data.get("base_model")
    rescale = (recipe.data.get("parameters") or {}).get("rescale", "global")
    rows = []
    for entry in model_entries(recipe.data):
        name = model_name(entry["model"])
        if base is not None and name == model_name(base):
            continue
        params = entry.get("parameters") or {}
        factor = factors.get(name, params.get("rescale_factor"))
        shown = f"{factor:.4f}" if isinstance(factor, int | float) else ("per tensor" if rescale == "tensor" else "–")
        rows.append(f"| {name} | {_show(params.get('weight', 1.0))} | {_show(params.get('density', 0.3))} | {shown} |")
    if recipe.method != METHOD_NAME or not rows:
        return []
    out = ["## Coefficients", "", f"Base: `{model_name(base)}` · rescale: `{rescale}`", ""]
    out += ["| fine-tune | λ (weight) | density | rescale factor f |", "|---|---|---|---|", *rows, ""]
    return out


OBJECTIVE_TEXT = {
    "consistency": "answer self-consistency (higher is better)",
    "perplexity": "the perplexity of the queries (lower is better)",
    "self_certainty": "self-certainty, the distance of the next-token distribution from uniform (higher is better)",
}


def _objective_text(names: list[str]) -> str:
    texts = [OBJECTIVE_TEXT.get(n, f"`{n}`") for n in names]
    return ", ".join(texts[:-1]) + " and " + texts[-1] if len(texts) > 1 else texts[0]


def _engine_text(pick: Mapping) -> str:
    engine = pick.get("engine")
    return f", on samples generated with {'vLLM' if engine == 'vllm' else engine}" if engine else ""


def _tuning_section(t: TuningSummary) -> list[str]:
    labels = t.labels or list(t.pick["params"])
    objectives = t.objectives
    out = [
        "## Test-time search",
        "",
        f"The coefficients were searched on {len(t.queries)} unlabeled queries (sha256 `{t.queries_sha256}`) "
        f"over {t.trials} trials in {_duration(t.seconds)}; each candidate was scored by "
        f"{_objective_text(objectives)}{_engine_text(t.pick)}. Picked: trial **#{t.pick['number']}** by the "
        f"`{t.rule}` rule "
        f"(hypervolume of the front {t.hypervolume:.4g}).",
        "",
        "Pareto front:",
        "",
        "| trial | " + " | ".join([*labels, *objectives]) + " |",
        "|---" * (len(labels) + len(objectives) + 1) + "|",
    ]
    for r in sorted(t.front, key=lambda r: r["number"]):
        mark = " ✔" if r["number"] == t.pick["number"] else ""
        values = [f"{r['params'][k]:.4g}" for k in labels] + [f"{r[o]:.4f}" for o in objectives]
        out.append(f"| #{r['number']}{mark} | " + " | ".join(values) + " |")
    out.append("")
    if t.plot:
        out += [f"![Pareto front of the search]({t.plot})", ""]
    if t.health:
        h = t.health
        out += [
            f"Samples of the picked trial: {h['finished']:.0%} finished at an end-of-sequence token, "
            f"{h['truncated']:.0%} truncated at the token limit, {h['no_answer']:.0%} without an extractable answer, "
            f"{h['mean_tokens']:.0f} tokens on average.",
            "",
        ]
    if t.warnings:
        out += ["Warnings about the label-free signal:", "", *[f"- {w}" for w in t.warnings], ""]
    if t.validation:
        out += _validation_lines(t)
    if t.include_queries:
        out += ["Queries:", "", *[f"1. {q}" for q in t.queries], ""]
    return out


def _validation_lines(t: TuningSummary) -> list[str]:
    v = t.validation
    picked = v["accuracy"].get(str(t.pick["number"]))
    out = [
        f"Checked on {v['items']} labeled problems after the search (labels never entered it): accuracy of the "
        "majority answer and of greedy decoding per scored trial.",
        "",
        "| trial | majority | greedy |",
        "|---|---|---|",
    ]
    for number, acc in sorted(v["accuracy"].items(), key=lambda kv: int(kv[0])):
        mark = " ✔" if int(number) == t.pick["number"] else ""
        out.append(f"| #{number}{mark} | {acc['majority']:.3f} | {acc['greedy']:.3f} |")
    out.append("")
    if picked is not None:
        out += [f"The pick's validation accuracy: {picked['majority']:.3f} (majority), {picked['greedy']:.3f} (greedy).", ""]
    rhos = [f"{name} ρ = {rho:+.2f}" if rho is not None else f"{name}: too few points or no variation"
            for name, rho in v["spearman"].items()]  # fmt: skip
    out += [
        "Spearman correlation of each label-free objective with validation accuracy across the scored trials "
        "(for an objective to trust, positive when it is maximised, negative when minimised): " + "; ".join(rhos) + ".",
        "",
    ]
    if v.get("note"):
        out += [f"Note: {v['note']}.", ""]
    return out


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value) if not isinstance(value, list | dict) else f"`{value}`"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
