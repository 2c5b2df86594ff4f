"""Label-free, difficulty-aware query selection."""

from __future__ import annotations

import json

import pytest

from dots_merge.cli.main import main
from dots_merge.errors import DotsMergeError
from dots_merge.tune.queries import choose
from tests.conftest import dots_recipe, write_recipe


def test_choose_drops_the_too_hard_and_draws_evenly_from_both_halves():
    difficulties = [0.1, 0.9, 0.3, 0.5, 0.85, 0.2, 0.7, 0.6, 1.0, 0.4]
    chosen = choose(difficulties, 4, seed=1)
    assert len(chosen) == 4 and all(difficulties[i] <= 0.8 for i, _ in chosen)
    easy = {i for i, s in chosen if s == "easy"}
    hard = {i for i, s in chosen if s == "hard"}
    assert len(easy) == len(hard) == 2
    assert max(difficulties[i] for i in easy) <= min(difficulties[i] for i in hard)
    assert choose(difficulties, 4, seed=1) == chosen
    with pytest.raises(DotsMergeError, match="only 7 prompts"):
        choose(difficulties, 8)


def test_choose_fills_from_the_other_half():
    assert [s for _, s in choose([0.1, 0.2, 0.3], 3)] == ["easy", "hard", "hard"]


def test_select_command(llama_trio, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"{a} + {b}"}) + "\n" for a in range(4) for b in range(3)))
    recipe = write_recipe(tmp_path / "r.yml", dots_recipe(llama_trio))
    out = tmp_path / "q.jsonl"
    code = main(["queries", "select", str(recipe), "--pool", str(pool), "--n", "4", "--out", str(out),
                 "--samples", "3", "--max-difficulty", "1.0", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and {r["split"] for r in rows} == {"easy", "hard"}
    prompts = {json.loads(line)["prompt"] for line in pool.read_text().splitlines()}
    for r in rows:
        assert r["prompt"] in prompts
        assert set(r["consistency"]) == {str(llama_trio["sft"]), str(llama_trio["rlvr"])}
        assert r["difficulty"] == pytest.approx(1 - sum(r["consistency"].values()) / 2)
    assert main(["queries", "select", str(recipe), "--pool", str(pool), "--n", "99", "--out", str(out), "--quiet"]) == 2
