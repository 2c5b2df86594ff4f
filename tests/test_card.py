"""The model card's metadata: Hub ids from hub_ids and _name_or_path, a license only when parents agree."""

from __future__ import annotations

import json
import shutil

import yaml

import dots_merge
from tests.conftest import dots_recipe


def card_metadata(folder) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---")[1])


def test_hub_ids_name_or_path_and_a_shared_license(llama_trio, tmp_path):
    trio = {}
    for name in ("base", "sft", "rlvr"):
        trio[name] = tmp_path / name
        shutil.copytree(llama_trio[name], trio[name])
        (trio[name] / "README.md").write_text("---\nlicense: apache-2.0\n---\n# parent\n")
    config = json.loads((trio["sft"] / "config.json").read_text())
    config["_name_or_path"] = "org/sft-model"
    (trio["sft"] / "config.json").write_text(json.dumps(config))
    recipe = dots_recipe(trio, hub_ids={str(trio["base"]): "org/base"})
    dots_merge.merge(recipe, tmp_path / "out")
    meta = card_metadata(tmp_path / "out")
    assert meta["base_model"] == ["org/base", "org/sft-model"]  # rlvr has no Hub id: left out, never a path
    assert meta["license"] == "apache-2.0"
    assert "hub_ids" in (tmp_path / "out" / "mergekit_config.yml").read_text()

    (trio["rlvr"] / "README.md").write_text("---\nlicense: mit\n---\n")
    dots_merge.merge(recipe, tmp_path / "out2")
    assert "license" not in card_metadata(tmp_path / "out2")


def test_hub_ids_must_name_models_of_the_recipe(llama_trio, tmp_path):
    import pytest

    from dots_merge.errors import RecipeError

    with pytest.raises(RecipeError, match=r"hub_ids\.nowhere"):
        dots_merge.merge(dots_recipe(llama_trio, hub_ids={"nowhere": "org/x"}), tmp_path / "o")
    with pytest.raises(RecipeError, match="not a Hub repo id"):
        dots_merge.merge(dots_recipe(llama_trio, hub_ids={str(llama_trio["sft"]): "/local/path"}), tmp_path / "o")
