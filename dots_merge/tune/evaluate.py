"""One trial's work: its recipe written to trials/NNNN.yml, its weights applied to the resident candidate, its
objectives and sample health scored into the trial's record."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dots_merge.checkpoints import Checkpoint
from dots_merge.fileio import write_atomic
from dots_merge.recipe import Recipe, TuneSpec, trial_recipe
from dots_merge.tune.answers import answer_comparator, make_extractor
from dots_merge.tune.candidate import ResidentCandidate
from dots_merge.tune.generation import load_tokenizer, scored_prompt
from dots_merge.tune.loop import TrialFailed
from dots_merge.tune.objectives import make_objectives, nonfinite_reason, score
from dots_merge.tune.plan import Plan, ceiling_recipe, floor_recipe
from dots_merge.tune.run_folder import trial_path
from dots_merge.tune.stores.base import Trial
from dots_merge.tune.vectors import VectorStore


class TrialEvaluator:
    """Holds the resident candidate and the tokenizer for a whole run; evaluates one trial per call."""

    def __init__(
        self,
        recipe: Recipe,
        spec: TuneSpec,
        checkpoints: Mapping[str, Checkpoint],
        run_dir: Path,
        *,
        device: str,
        spill_dir: Path,
        plan: Plan | None = None,
        quiet: bool = True,
        trust_remote_code: bool = False,
    ):
        self.recipe, self.spec, self.run_dir = recipe, spec, run_dir
        self.tokenizer = load_tokenizer(next(iter(checkpoints.values())).path, trust_remote_code=trust_remote_code)
        self.objectives = make_objectives(spec.objectives)
        if any(o.needs_nll for o in self.objectives):  # a query the NLL cannot score fails before any weights load
            for query in spec.queries:
                scored_prompt(self.tokenizer, query, spec.perplexity_over)
        self.quiet = quiet
        self.extract = make_extractor(spec.answer)
        self.comparator, self.equal = answer_comparator(spec.compare)
        settings = plan.settings if plan is not None else {}
        salt = json.dumps({name: c.fingerprint() for name, c in checkpoints.items()}, default=str)
        budget = settings.get("store_ram_bytes")
        if budget is not None and budget >= settings.get("store_bytes", 0):
            budget = budget + (budget >> 6)  # all of it was planned in RAM: a planning error must not force a spill
        vectors = VectorStore(torch.device(device), budget=budget, spill_dir=spill_dir,
                              spill_budget=settings.get("cache_budget_bytes"), salt=salt)  # fmt: skip
        self.candidate = ResidentCandidate(recipe, checkpoints, device=device, vectors=vectors,
                                           ceiling=ceiling_recipe(recipe, spec) if spec.space else None,
                                           floor=floor_recipe(recipe, spec) if spec.space else None,
                                           base_on_device=settings.get("base") == "gpu",
                                           generation=spec.generation, tokenizer=self.tokenizer, settings=settings,
                                           quiet=quiet, trust_remote_code=trust_remote_code)  # fmt: skip

    def write_recipe(self, trial: Trial) -> Recipe:
        """The recipe of the trial's point, written to trials/NNNN.yml before its weights are applied."""
        recipe = trial_recipe(self.recipe, self.spec.space, trial.point)
        write_atomic(trial_path(self.run_dir, trial.number), recipe.to_yaml())
        return recipe

    def __call__(self, trial: Trial, recipe: Recipe) -> dict[str, Any]:
        """Apply the trial's weights, score them, and return the trial's record."""
        t0 = time.perf_counter()
        spec = self.spec
        _, update_seconds = self.candidate.apply(recipe)
        scores = score(
            self.candidate.engine,
            spec.queries,
            objectives=self.objectives,
            suffix=spec.prompt_suffix,
            extract=self.extract,
            equal=self.equal,
            generation=spec.generation,
            seed=spec.seed,
            perplexity_over=spec.perplexity_over,
            quiet=self.quiet,
        )
        reason = nonfinite_reason(scores.values, self.candidate.dtype)
        if reason is not None:
            raise TrialFailed(reason)
        return {
            "number": trial.number,
            "params": dict(zip(spec.labels, trial.point, strict=True)),
            "point": trial.point,
            **scores.values,
            **scores.per_query,
            "health": scores.health,
            "answers": scores.answers,
            "comparator": self.comparator,
            "engine": self.candidate.engine.name,
            "seconds": {
                "update": update_seconds,
                "generation": scores.seconds_generation,
                "perplexity": scores.seconds_perplexity,
                "total": time.perf_counter() - t0,
            },
        }

    def close(self, *, keep_spill: bool = False) -> None:
        """Free the candidate and its vector store (deleting the spill unless `keep_spill`)."""
        self.candidate.close(keep_spill=keep_spill)
