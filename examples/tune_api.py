"""The Python API end to end: analyze, tune, merge and plan a push, on the tiny shipped trio.

python examples/tune_api.py
"""

from pathlib import Path

from dots_merge.analyze import analyze, format_table
from dots_merge.hub import plan_push
from dots_merge.tune.run import tune

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    recipe = HERE / "tiny-trio-tune.yml"  # model paths in it are relative to the repository root
    print(format_table(analyze(recipe)))
    result = tune(recipe, HERE.parent / "runs" / "api-example", resume=(HERE.parent / "runs" / "api-example").exists())
    best = next(r for r in result.records if r["number"] == result.pick)
    print(f"picked trial #{result.pick} ({result.rule}): {best['params']}, merged into {result.model_dir}")
    print(plan_push(result.model_dir, "your-name/tiny-dots").describe())
