"""The Python API: merge a recipe given as a dict, then load the result with transformers.

python examples/merge_api.py
"""

from pathlib import Path

import dots_merge

HERE = Path(__file__).resolve().parent
trio = HERE / "tiny-trio"

recipe = {
    "merge_method": "dots",
    "base_model": str(trio / "base"),
    "models": [
        {"model": str(trio / "sft"), "parameters": {"weight": 1.0, "density": 0.3}},
        # a per-module coefficient: attention gets λ = 1.5, everything else λ = 1.0
        {
            "model": str(trio / "rlvr"),
            "parameters": {"weight": [{"filter": "self_attn", "value": 1.5}, {"value": 1.0}]},
        },
    ],
    "out_dtype": "bfloat16",
}

if __name__ == "__main__":
    result = dots_merge.merge(recipe, HERE.parent / "merged" / "api-example", force=True)
    print(f"merged into {result.out_dir} in {result.seconds:.2f} s; rescale factors {result.rescale_factors}")

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.out_dir)
    print(f"loaded {type(model).__name__} with {sum(p.numel() for p in model.parameters())} parameters")
