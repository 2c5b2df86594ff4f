"""The method as mergekit sees it: registration, run_merge, dots-merge-yaml, and other mergekit methods."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from mergekit import merge_methods
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions

import dots_merge
from dots_merge.errors import DotsMergeError
from dots_merge.merge.method import register
from tests.conftest import dots_recipe, write_recipe
from tests.reference import load_state, sparsify64


def test_import_registers_dots_once():
    assert "dots" in [m.spec.name for m in merge_methods.registered_methods()]
    register()
    importlib.reload(dots_merge)
    assert [m.spec.name for m in merge_methods.registered_methods()].count("dots") == 1
    spec = merge_methods.get("dots").spec
    assert {p.name for p in spec.parameters} == {"weight", "density", "rescale", "rescale_factor"}


def test_kernel_through_mergekits_api():
    base = torch.randn(64, 16)
    a, b = base + torch.randn(64, 16) * 0.1, base + torch.randn(64, 16) * 0.01
    group = merge_methods.TensorGroup.from_tensors([base, a, b], ids=["base", "a", "b"], base_index=0, name="w")
    (out,) = merge_methods.get("dots")(
        [group], parameters={"weight": {"a": 1.0, "b": 2.0}, "density": 0.5, "rescale": "none"}
    )

    def s(t):
        return sparsify64((t - base).double().reshape(-1), 0.5).float().reshape(t.shape)

    torch.testing.assert_close(out, base + s(a) + 2.0 * s(b))
    with pytest.raises(DotsMergeError, match="rescale: global needs"):
        merge_methods.get("dots")([group], parameters={"rescale": "global"})


def _run_merge(recipe: dict, out, **options):
    config = MergeConfiguration.model_validate(recipe)
    run_merge(config, str(out), options=MergeOptions(quiet=True, write_model_card=False, **options))


def test_mergekit_run_merge_sees_dots(llama_trio, tmp_path):
    recipe = dots_recipe(llama_trio, parameters={"rescale": "tensor"}, out_dtype="float32")
    _run_merge(recipe, tmp_path / "mk")
    dots_merge.merge(recipe, tmp_path / "ours")
    mk, ours = load_state(tmp_path / "mk"), load_state(tmp_path / "ours")
    assert set(mk) == set(ours)
    assert all(torch.equal(mk[k], ours[k]) for k in mk)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_other_mergekit_methods_run_unchanged(llama_trio, tmp_path, method):
    recipe = dots_recipe(llama_trio)
    recipe["merge_method"] = method
    recipe["models"][1]["parameters"] = {"weight": 0.5, "density": 0.4}
    if method == "task_arithmetic":
        for m in recipe["models"]:
            m["parameters"].pop("density")
    _run_merge(recipe, tmp_path / "mk")
    dots_merge.merge(recipe, tmp_path / "ours")
    mk, ours = load_state(tmp_path / "mk"), load_state(tmp_path / "ours")
    assert set(mk) == set(ours)
    assert all(torch.equal(mk[k], ours[k]) for k in mk)


def test_dare_ties_runs_through_dots_merge(llama_trio, tmp_path):
    recipe = dots_recipe(llama_trio)
    recipe["merge_method"] = "dare_ties"
    dots_merge.merge(recipe, tmp_path / "out")
    assert set(load_state(tmp_path / "out")) == set(load_state(llama_trio["base"]))


def test_dots_merge_yaml_runs_the_global_prepass(llama_trio, tmp_path):
    recipe = write_recipe(tmp_path / "r.yml", dots_recipe(llama_trio))
    done = subprocess.run(
        [sys.executable, "-c", "from dots_merge.cli.mergekit_yaml import main; main()", str(recipe), str(tmp_path / "mk")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    dots_merge.merge(recipe, tmp_path / "ours")
    mk, ours = load_state(tmp_path / "mk"), load_state(tmp_path / "ours")
    assert all(torch.equal(mk[k], ours[k]) for k in ours)
    assert "rescale_factor" in (tmp_path / "mk" / "mergekit_config.yml").read_text()
    assert "base_model_relation: merge" in (tmp_path / "mk" / "README.md").read_text()


def test_dots_merge_yaml_reports_recipe_errors_in_one_line(tmp_path):
    recipe = tmp_path / "r.yml"
    recipe.write_text("merge_method: dots\nbase_model: x\nmodels: [{model: y, parameters: {densty: 0.3}}]\n")
    done = subprocess.run(
        [sys.executable, "-c", "from dots_merge.cli.mergekit_yaml import main; main()", str(recipe), str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert "densty" in done.stderr and "Traceback" not in done.stderr
