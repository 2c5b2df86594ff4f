"""`dots-merge-yaml`: mergekit's own `mergekit-yaml` (same arguments and output), with `dots` loaded.

The recipe is checked strictly first, and for `rescale: global` the pre-pass runs before mergekit's
`run_merge`, its factors written into the recipe that mergekit merges and saves.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from mergekit.merge import run_merge
from mergekit.options import MergeOptions, PrettyPrintHelp, add_merge_options

import dots_merge  # noqa: F401  (registers the method)
from dots_merge.cli.main import run_guarded


@click.command("dots-merge-yaml", cls=PrettyPrintHelp)
@click.argument("config_file")
@click.argument("out_path")
@add_merge_options
def _command(merge_options: MergeOptions, config_file: str, out_path: str) -> None:
    from dots_merge.merge.driver import RECIPE_FILE, inspect_models, prepare
    from dots_merge.merge.prepass import default_cache_dir
    from dots_merge.recipe import load_recipe
    from dots_merge.report.card import render_card

    merge_options.apply_global_options()

    def run() -> int:
        recipe = load_recipe(config_file)
        checkpoints = inspect_models(recipe, allow_pickle=True)  # mergekit-yaml's own policy
        used, prepass = prepare(recipe, checkpoints, merge_options, cache_dir=default_cache_dir())
        # mergekit's own card looks every local path up on the Hub; ours does not.
        options = merge_options.model_copy(update={"write_model_card": False})
        run_merge(used.merge_config(), out_path, options=options)
        if merge_options.write_model_card:
            out = Path(out_path)
            (out / RECIPE_FILE).write_text(used.to_yaml(include_tune=False), encoding="utf-8")
            card = render_card(used, list(checkpoints.values()), rescale_factors=prepass.factors)
            (out / "README.md").write_text(card, encoding="utf-8")
        return 0

    sys.exit(run_guarded(run, prog="dots-merge-yaml", debug=merge_options.verbosity > 1))


def main() -> None:
    """Entry point of `dots-merge-yaml`."""
    _command()
