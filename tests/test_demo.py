"""`dots-merge demo --quick`: the whole pipeline offline, end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from dots_merge.cli.main import main
from dots_merge.demo.data import FAMILIES, splits
from dots_merge.demo.pipeline import recipe_data
from dots_merge.recipe import load_recipe


def test_splits_are_disjoint_and_labelled_correctly():
    data = splits(0, pool=5, test=7)
    pool, test = set(data["pool"]), set(data["test"])
    assert not pool & test and len(pool) == 5 * len(FAMILIES) and len(test) == 7 * len(FAMILIES)
    for p in data["test"]:
        assert eval(p.query[:-1].replace("*", "*")) == p.answer


def test_shipped_recipe_is_the_demo_recipe(tmp_path):
    shipped = load_recipe("recipes/demo.yml").data
    generated = recipe_data(tmp_path, trials=24, samples=7, seed=0)
    assert json.loads(json.dumps(shipped).replace(str(tmp_path) + "/", "")) == json.loads(
        json.dumps(generated).replace(str(tmp_path) + "/", "")
    )


def test_quick_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--trials", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "demo"
    report = json.loads((root / "report.json").read_text())
    expected = {"base", "sft", "rlvr", "task_arithmetic", "ties", "dare", "dots_untuned", "dots_tuned"}
    assert set(report["accuracy"]) == expected
    for name, overall in report["accuracy"].items():  # equal counts per family: overall = mean of the families
        by_family = report["accuracy_by_family"][name]
        assert set(by_family) == set(FAMILIES) and overall == pytest.approx(sum(by_family.values()) / len(FAMILIES))
    assert report["seconds"] > 0 and report["trials"] == 4
    pareto = json.loads((root / "run" / "pareto.json").read_text())
    pick = report["picked"]["trial"]
    assert pick == pareto["pick"] and pick in pareto["front"]
    assert (root / "run" / "best.yml").read_text() == (root / "run" / "trials" / f"{pick:04d}.yml").read_text()
    models = json.loads((root / "analysis" / "analysis.json").read_text())["models"]
    norms = sorted(m["l2_norm"] for m in models.values())  # both parents moved away from the base, differently
    assert len(norms) == 2 and norms[0] > 0 and norms[1] > norms[0]
    for path in ("report.md", "run/pareto.png", "run/model/README.md", "analysis/analysis.json",
                 "analysis/module_share.png", "queries.jsonl", "demo.yml"):  # fmt: skip
        assert (root / path).exists(), path
    assert "dots_tuned" in out and "would upload" in (root / "report.md").read_text()
    assert len((root / "queries.jsonl").read_text().splitlines()) == 8
    assert yaml.safe_load((root / "demo.yml").read_text())["tune"]["trials"] == 4
    # a second run reuses the trio and resumes the finished tune
    assert main(["demo", "--quick", "--out", str(root), "--trials", "4", "--quiet"]) == 0
    assert "reusing the toy trio" in capsys.readouterr().out
