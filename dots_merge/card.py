"""The model card (README.md) written into every merge output."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from huggingface_hub import ModelCard, ModelCardData

from dots_merge.checkpoints import Checkpoint, looks_like_hub_id
from dots_merge.method import METHOD_NAME, PAPER_URL
from dots_merge.recipe import Recipe, model_entries, model_name

LOG = logging.getLogger(__name__)
TAGS = ["merge", "mergekit", "dots-merge"]


def hub_id(checkpoint: Checkpoint) -> str | None:
    """The Hub repo id of a model: its reference when that is one, else `_name_or_path` from its config."""
    if looks_like_hub_id(checkpoint.reference):
        return checkpoint.reference
    named = str(checkpoint.config.get("_name_or_path") or "")
    if named and looks_like_hub_id(named) and not os.path.isabs(named):
        return named
    return None


def base_model_ids(checkpoints: Sequence[Checkpoint]) -> list[str]:
    """Hub ids for `base_model`; a model known only by a local path is left out with a warning."""
    ids: list[str] = []
    local: list[str] = []
    for ckpt in checkpoints:
        repo = hub_id(ckpt)
        if repo is None:
            local.append(ckpt.reference)
        elif repo not in ids:
            ids.append(repo)
    if local:
        LOG.warning("model card: base_model leaves out %s (local paths with no Hub id)", ", ".join(local))
    return ids


def render_card(
    recipe: Recipe, checkpoints: Sequence[Checkpoint], *, rescale_factors: Mapping[str, float] | None = None
) -> str:
    """README.md for a merge: metadata, what the method is, the coefficients, and the recipe used."""
    is_dots = recipe.method == METHOD_NAME
    data = ModelCardData(
        base_model=base_model_ids(checkpoints) or None,
        base_model_relation="merge",
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*TAGS, METHOD_NAME] if is_dots else TAGS,
    )
    lines = ["# Merged model", ""]
    if is_dots:
        lines += [
            f"Merged with dots-merge using **DoTS** "
            f"([Decouple before Integration, arXiv 2605.00610]({PAPER_URL})): the task vectors "
            "τ = θ_finetune − θ_base of each fine-tune are sparsified (magnitude top-k per tensor), rescaled "
            "to keep their norm, and added to the base: θ = θ_base + Σ λ_i · f_i · S(τ_i).",
            "",
        ]
    else:
        lines += [f"Merged with dots-merge (mergekit method `{recipe.method}`).", ""]
    lines += _coefficients_table(recipe, rescale_factors or {})
    lines += ["## Recipe", "", "```yaml", recipe.to_yaml(include_tune=False).rstrip(), "```", ""]
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
        rows.append(
            f"| {name} | {_show(params.get('weight', 1.0))} | {_show(params.get('density', 0.3))} | "
            f"{factors[name]:.4f} |"
            if name in factors
            else f"| {name} | {_show(params.get('weight', 1.0))} | {_show(params.get('density', 0.3))} | – |"
        )
    if recipe.method != METHOD_NAME or not rows:
        return []
    out = ["## Coefficients", "", f"Base: `{model_name(base)}` · rescale: `{rescale}`", ""]
    out += ["| fine-tune | λ (weight) | density | rescale factor f |", "|---|---|---|---|", *rows, ""]
    return out


def _show(value: object) -> str:
    return str(value) if not isinstance(value, list | dict) else f"`{value}`"
