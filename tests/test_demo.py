"""`dots-merge demo --quick`: the whole pipeline offline, end to end."""

from __future__ import annotations

import json

import pytest
import yaml

from dots_merge.cli.main import main
from dots_merge.demo.data import FAMILIES, KNOWN, NEW, Problem, splits
from dots_merge.demo.pipeline import recipe_data
from dots_merge.demo.trio import build_tokenizer
from dots_merge.recipe import load_recipe


def test_splits_are_disjoint_and_labelled_correctly():
    data = splits(0, pool=5, test=7)
    pool, test = set(data["pool"]), set(data["test"])
    assert not pool & test and len(pool) == 5 * len(FAMILIES) and len(test) == 7 * len(FAMILIES)
    assert Problem("max", 47, 82).answer == 82 and Problem("max", 47, 82).slip == 47
    assert Problem("rev", 4721).answer == 1274 and Problem("rev", 4721).slip == 4721
    assert Problem("rot", 4721).answer == 7214 and Problem("sort", 4721).answer == 1247
    for p in data["test"]:
        digits = str(p.a)
        expected = {"max": max(p.a, p.b), "rev": int(digits[::-1]), "rot": int(digits[1:] + digits[0]),
                    "sort": int("".join(sorted(digits)))}[p.family]  # fmt: skip
        assert p.answer == expected and p.query.endswith("=")


def test_tokenizer_round_trips_the_answer_format():
    tok = build_tokenizer()
    ids = tok("\\boxed{1274}")["input_ids"]
    assert len(ids) == 6 and tok.decode(ids) == "\\boxed{1274}"


def test_shipped_recipe_is_the_demo_recipe(tmp_path):
    shipped = load_recipe("recipes/demo.yml").data
    generated = recipe_data(tmp_path, trials=24, samples=7, seed=0)
    assert json.loads(json.dumps(shipped).replace(str(tmp_path) + "/", "")) == json.loads(
        json.dumps(generated).replace(str(tmp_path) + "/", "")
    )


def test_quick_demo_end_to_end(tmp_path, capsys, monkeypatch):
    import dots_merge.tune.queries
    import dots_merge.tune.run
    from dots_merge.demo import data

    # The label-free part must never read an answer: answers raise while queries are chosen and the tune runs.
    label_free = []
    for prop in ("answer", "slip"):
        original = getattr(data.Problem, prop)

        def guarded(self, _get=original.fget, _prop=prop):
            assert not label_free, f"Problem.{_prop} read during {label_free[-1]}"
            return _get(self)

        monkeypatch.setattr(data.Problem, prop, property(guarded))
    for module, name in ((dots_merge.tune.queries, "select_queries"), (dots_merge.tune.run, "tune")):
        original_function = getattr(module, name)

        def wrapped(*args, _f=original_function, _name=name, **kwargs):
            label_free.append(_name)
            try:
                return _f(*args, **kwargs)
            finally:
                label_free.pop()

        monkeypatch.setattr(module, name, wrapped)

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--trials", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "demo"
    report = json.loads((root / "report.json").read_text())
    expected = {"base", "sft", "rlvr", "task_arithmetic", "ties", "dare", "dots_untuned", "dots_tuned"}
    assert set(report["accuracy"]) == expected
    for acc in report["accuracy"].values():  # equal counts per family: overall = mean of the families
        assert set(acc) == {"all", *FAMILIES} and acc["all"] == pytest.approx(sum(acc[f] for f in FAMILIES) / 4)
    assert report["quick"] and "smoke test" in report["note"].lower() and "Smoke test" in (root / "report.md").read_text()
    assert report["seconds"] > 0 and len(report["trials"]) == 4
    # the tune's inputs hold no labels: the pool and the queries are prompts only
    for name in ("pool.jsonl", "queries.jsonl"):
        for line in (root / name).read_text().splitlines():
            assert set(json.loads(line)) <= {"prompt", "difficulty", "split", "consistency"}, name
    # the trio: the parents answer differently from the base — SFT gains on the puzzles it was shown; RLVR,
    # trained by its own samples on the other two, changes its answers there (too briefly in --quick to gain)
    base, sft, rlvr = (report["accuracy"][m] for m in ("base", "sft", "rlvr"))
    assert sum(sft[f] for f in NEW) > sum(base[f] for f in NEW)
    assert any(rlvr[f] != base[f] for f in KNOWN)
    # every trial scored held out; pick and oracle are trials, the oracle the best of them
    pareto = json.loads((root / "run" / "pareto.json").read_text())
    pick, oracle = report["picked"], report["oracle"]
    assert pick["trial"] == pareto["pick"] and pick["trial"] in pareto["front"]
    by_number = {t["number"]: t for t in report["trials"]}
    assert oracle["accuracy"] == max(t["accuracy"]["all"] for t in report["trials"])
    assert report["pick_below_oracle"] == pytest.approx(oracle["accuracy"] - by_number[pick["trial"]]["accuracy"]["all"])
    assert pick["accuracy"] == pytest.approx(report["accuracy"]["dots_tuned"]["all"])  # in place == merged on disk
    assert {t["number"] for t in report["trials"] if t["on_front"]} == set(pareto["front"])
    tv = report["task_vectors"]
    assert tv["norm_ratio_sft_over_rlvr"] == pytest.approx(tv["norms"]["sft"] / tv["norms"]["rlvr"])
    assert set(tv["sign_conflict_both_changed"]) == {"dense", "0.1", "0.3", "0.5"}
    assert (root / "run" / "best.yml").read_text() == (root / "run" / "trials" / f"{pick['trial']:04d}.yml").read_text()
    for path in ("report.md", "front.png", "families.png", "run/pareto.png", "run/model/README.md",
                 "analysis/analysis.json", "analysis/module_share.png", "queries.jsonl", "demo.yml"):  # fmt: skip
        assert (root / path).exists(), path
    assert (root / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (root / "report.md").read_text()
    assert "dots_tuned" in out and "would upload" in text and "oracle" in text and "front.png" in text
    assert len((root / "queries.jsonl").read_text().splitlines()) == 8
    assert yaml.safe_load((root / "demo.yml").read_text())["tune"]["trials"] == 4
    # a second run reuses the trio and resumes the finished tune
    assert main(["demo", "--quick", "--out", str(root), "--trials", "4", "--quiet"]) == 0
    assert "reusing the toy trio" in capsys.readouterr().out
