"""The label-free signal: sample health, per-query seeds, every EOS id, self-certainty, N-objective fronts, recipe
checks, warnings and --strict, and the optional few-label validation (which never reaches the search)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from dots_merge.cli.main import main
from dots_merge.errors import RecipeError
from dots_merge.recipe import load_recipe, parse_tune
from dots_merge.tune.generation import chat_prompt, eos_ids, generate
from dots_merge.tune.objectives import health_warnings, make_objectives, reference_point, spread_warning
from dots_merge.tune.objectives.health import consistency_noise
from dots_merge.tune.pareto import front, hypervolume, knee_scores, pick, rule_order
from dots_merge.tune.samplers import make_tuner
from dots_merge.tune.validation import spearman
from tests.conftest import write_recipe
from tests.test_tune import QUERIES, tune_recipe

PROMPTS = ["1 + 2", "3 * 4", "9 - 5", "7 + 1", "2 + 2"]


@pytest.fixture(scope="module")
def tiny_lm(llama_trio):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama_trio["base"]).eval(), AutoTokenizer.from_pretrained(
        llama_trio["base"]
    )


# --- generation ---------------------------------------------------------------------------------------------------


def test_greedy_is_what_transformers_generates(tiny_lm):
    model, tok = tiny_lm
    ours = generate(model, tok, PROMPTS, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=8, seed=0,
                    batch_size=5)  # fmt: skip
    for prompt, (completion,) in zip(PROMPTS, ours, strict=True):
        ids = torch.tensor([chat_prompt(tok, prompt)])
        theirs = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=sorted(eos_ids(model, tok)))
        new = theirs[0, ids.shape[1] :].tolist()
        assert completion.tokens == len(new)
        stopped = new[-1] in eos_ids(model, tok)
        assert completion.finished == stopped
        assert completion.text == tok.decode(new[:-1] if stopped else new, skip_special_tokens=True)


def test_a_querys_samples_depend_on_the_seed_and_the_query_only(tiny_lm):
    model, tok = tiny_lm
    args = dict(samples=4, temperature=0.8, top_p=0.9, max_new_tokens=8, seed=7)
    alone = [generate(model, tok, [p], batch_size=1, **args)[0] for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, batch_size=3, **args)
    reordered = generate(model, tok, PROMPTS[::-1], batch_size=5, **args)[::-1]
    texts = lambda groups: [[(c.text, c.finished, c.tokens) for c in g] for g in groups]  # noqa: E731
    assert texts(alone) == texts(batched) == texts(reordered)
    other_seed = generate(model, tok, PROMPTS, batch_size=3, **{**args, "seed": 8})
    assert texts(other_seed) != texts(batched)
    assert len({c.text for g in batched for c in g}) > 3  # it does sample


def test_generation_stops_at_every_eos_id(llama_trio, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_trio["base"]).eval()
    tok = AutoTokenizer.from_pretrained(llama_trio["base"])
    with torch.no_grad():  # every logit equal: greedy decoding picks token 0 every time
        model.get_output_embeddings().weight.zero_()
    only_tokenizer_eos = generate(model, tok, PROMPTS[:2], samples=1, temperature=0.0, top_p=1.0, max_new_tokens=5,
                                  seed=0)  # fmt: skip
    assert all(not g[0].finished and g[0].tokens == 5 for g in only_tokenizer_eos)
    model.generation_config.eos_token_id = [tok.eos_token_id, 0]  # a config that lists two
    model.save_pretrained(tmp_path / "two_eos")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two_eos").eval()
    assert eos_ids(reloaded, tok) >= {0, tok.eos_token_id}
    stopped = generate(reloaded, tok, PROMPTS[:2], samples=2, temperature=0.0, top_p=1.0, max_new_tokens=5, seed=0)
    assert all(c.finished and c.tokens == 1 and c.text == "" for g in stopped for c in g)


def test_self_certainty_by_hand(tiny_lm):
    model, tok = tiny_lm
    (completion,) = generate(model, tok, ["1 + 2"], samples=1, temperature=0.0, top_p=1.0, max_new_tokens=6, seed=0,
                             self_certainty=True)[0]  # fmt: skip
    prompt = chat_prompt(tok, "1 + 2")
    new = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                         eos_token_id=sorted(eos_ids(model, tok)))[0, len(prompt):]  # fmt: skip
    ids = torch.tensor([prompt + new.tolist()])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(new)].double()
    vocab = logits.shape[-1]
    kl = -(torch.log_softmax(logits, -1) + math.log(vocab)).mean(-1)  # KL(U‖p) = −(1/V)Σ log(V p_j)
    assert completion.self_certainty == pytest.approx(kl.mean().item(), rel=1e-4)
    assert completion.self_certainty > 0


# --- health and warnings -------------------------------------------------------------------------------------------


def test_truncated_samples_have_no_answer_and_are_reported(llama_trio, tmp_path):
    from dots_merge.tune.answers import answer_comparator, make_extractor
    from dots_merge.tune.objectives import score

    recipe = load_recipe(write_recipe(tmp_path / "r.yml", tune_recipe(llama_trio, tmp_path)))
    spec = parse_tune(recipe)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dots_merge.tune.engines.hf import TransformersEngine

    model = AutoModelForCausalLM.from_pretrained(llama_trio["base"]).eval()
    engine = TransformersEngine(model, AutoTokenizer.from_pretrained(llama_trio["base"]))
    settings = dict(objectives=make_objectives(), suffix="", extract=make_extractor("auto"),
                    equal=answer_comparator("string")[1], seed=0)  # fmt: skip
    cut = score(engine, QUERIES, generation=dataclasses.replace(spec.generation, max_new_tokens=1), **settings)
    whole = score(engine, QUERIES, generation=dataclasses.replace(spec.generation, max_new_tokens=40), **settings)
    # with one token, every sample that did not stop at once is truncated: no answer, although it holds a digit
    assert cut.health["truncated"] > 0.5
    assert all(a is None for answers in cut.answers for a in answers)
    assert cut.values["consistency"] == 0.0 and cut.health["no_answer"] == 1.0
    assert len(cut.health["per_query"]) == len(QUERIES) and cut.health["mean_tokens"] == pytest.approx(1.0)
    assert whole.health["truncated"] < 0.2 and whole.health["finished"] + whole.health["truncated"] == 1.0
    assert whole.values["consistency"] > 0
    warnings = health_warnings(cut.health, 1)
    assert any("max_new_tokens" in w and "1 tokens" in w and "%" in w for w in warnings)
    assert any("no extractable answer" in w for w in warnings)
    assert not any("max_new_tokens" in w for w in health_warnings(whole.health, 40))


def test_spread_below_sampling_noise_is_flagged():
    assert consistency_noise([0.5, 0.5], 4) == pytest.approx(math.sqrt(2 * 0.25 / 4) / 2)
    flat = [{"consistency": 0.95 + 0.001 * i, "per_query_consistency": [0.9, 1.0, 0.95]} for i in range(4)]
    text = spread_warning(flat, samples=7)
    assert text is not None and "too easy" in text and "0.003" in text
    spread = [{"consistency": c, "per_query_consistency": [c, c]} for c in (0.2, 0.5, 0.9)]
    assert spread_warning(spread, samples=7) is None
    assert spread_warning(flat[:2], samples=7) is None  # too few trials to say


# --- recipe checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"generation": {"samples": 3, "temperature": 0}}, "tune.generation.temperature: must be above 0"),
        ({"generation": {"samples": 3, "temperature": -0.5}}, "tune.generation.temperature"),
        ({"generation": {"samples": 1}}, "tune.generation.samples: must be at least 2"),
        ({"generation": {"top_p": 0}}, "tune.generation.top_p: must be in (0, 1]"),
        ({"generation": {"top_p": 1.5}}, "tune.generation.top_p: must be in (0, 1]"),
        ({"objectives": ["consistency"]}, "tune.objectives: a list of two or more"),
        ({"objectives": ["consistency", "consistency"]}, "twice"),
        ({"perplexity": {"over": "answer"}}, "tune.perplexity.over: must be one of query, templated"),
        ({"pick": "validation"}, "tune.pick: validation needs labeled problems"),
        ({"pick": "max_self_certainty"}, "tune.pick: must be one of"),
        ({"validation": "missing.jsonl"}, "validation file not found"),
    ],
)
def test_bad_signal_settings_are_refused_at_load(llama_trio, tmp_path, change, needle):
    data = tune_recipe(llama_trio, tmp_path)
    for key, value in change.items():
        data["tune"][key] = {**data["tune"][key], **value} if key == "generation" else value
    with pytest.raises(RecipeError) as error:
        parse_tune(load_recipe(write_recipe(tmp_path / "r.yml", data)))
    assert needle in str(error.value)


def test_bad_validation_files_name_the_line(llama_trio, tmp_path):
    data = tune_recipe(llama_trio, tmp_path, validation="labels.jsonl")
    path = write_recipe(tmp_path / "r.yml", data)
    (tmp_path / "labels.jsonl").write_text(json.dumps({"prompt": "1 + 1", "answer": 2}) + "\n" * 1 + "{oops\n")
    with pytest.raises(RecipeError, match=r"labels.jsonl:2: not a JSON object"):
        parse_tune(load_recipe(path))
    (tmp_path / "labels.jsonl").write_text(json.dumps({"prompt": "1 + 1"}) + "\n")
    with pytest.raises(RecipeError, match=r'labels.jsonl:1: no "answer"'):
        parse_tune(load_recipe(path))
    (tmp_path / "labels.jsonl").write_text(json.dumps({"prompt": "1 + 1", "answer": "2"}) + "\n")
    with pytest.raises(RecipeError, match=r"1 labeled problems; tune\.validation takes 10 to 200"):
        parse_tune(load_recipe(path))


def test_unknown_objective_and_wrong_extreme_fail_before_loading(llama_trio, tmp_path, capsys):
    data = tune_recipe(llama_trio, tmp_path, objectives=["consistency", "fluency"])
    assert main(["tune", str(write_recipe(tmp_path / "r.yml", data)), "--out", str(tmp_path / "run")]) == 2
    assert "tune.objectives: unknown objective 'fluency'" in capsys.readouterr().err
    data = tune_recipe(llama_trio, tmp_path, pick="max_perplexity")
    assert main(["tune", str(write_recipe(tmp_path / "r.yml", data)), "--out", str(tmp_path / "run")]) == 2
    assert "perplexity is better lower; use min_perplexity" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- N objectives ------------------------------------------------------------------------------------------------


def test_three_objective_front_hypervolume_and_knee():
    directions = ("maximize", "minimize", "maximize")
    pts = [(1.0, 2.0, 0.0), (0.0, 1.0, 0.0), (0.0, 2.0, 1.0), (0.5, 1.5, 0.5), (0.2, 2.5, 0.1)]
    assert front(pts, directions) == [0, 3, 1, 2]
    # unit cubes: from ref (0, 3, 0), point 0 dominates 1×1×0 … use a ref below every value instead
    ref = (-1.0, 3.0, -1.0)
    boxes = [(2.0, 1.0, 1.0), (1.0, 2.0, 1.0), (1.0, 1.0, 2.0)]  # each point's box above ref
    union = hypervolume(pts[:3], ref, directions)
    # inclusion–exclusion of three boxes sharing the 1×1×1 corner
    assert union == pytest.approx(sum(a * b * c for a, b, c in boxes) - 3 * 1 + 1)
    assert hypervolume(pts, ref, directions) > union  # (0.5, 1.5, 0.5) adds a corner
    scores = knee_scores([pts[i] for i in (0, 1, 2, 3)], directions)
    assert scores is not None and max(range(4), key=lambda j: scores[j]) == 3  # the point off the extremes' plane
    assert pick(pts, "knee", directions, ("a", "b", "c")) == 3
    assert pick(pts, "max_a", directions, ("a", "b", "c")) == 0
    assert pick(pts, "min_b", directions, ("a", "b", "c")) == 1
    assert rule_order(pts, "utopia", directions, ("a", "b", "c"))[0] == 3
    # fewer front points than objectives + 1: knee falls back to utopia
    assert pick(pts[:3], "knee", directions, ("a", "b", "c")) == pick(pts[:3], "utopia", directions, ("a", "b", "c"))


def test_two_objective_hypervolume_agrees_with_the_general_one():
    pts = [(0.5, 3.0), (0.9, 5.0), (0.4, 4.0)]
    assert hypervolume(pts, (0.0, 10.0)) == pytest.approx(5.5)
    objectives = make_objectives(["consistency", "perplexity", "self_certainty"])
    assert reference_point([(0.5, 3.0, 0.2), (0.7, 4.0, 0.9)], objectives) == (0.0, 4.4, 0.0)


@pytest.mark.parametrize("backend", ["bayes", "random", "optuna"])
def test_samplers_take_three_objectives(backend):
    objectives = make_objectives(["consistency", "perplexity", "self_certainty"])
    tuner = make_tuner(backend, [(0.0, 1.0), (0.0, 2.0)], seed=0, initial=[], objectives=objectives)
    for k in range(7):
        x = tuner.ask()
        tuner.tell(x, (x[0], 1.0 + (x[1] - 1) ** 2, x[0] * x[1] + 0.01 * k))
    assert len(tuner.history) == 7 and all(len(v) == 3 for _, v in tuner.history)
    with pytest.raises(ValueError, match="3"):
        tuner.tell([0.5, 0.5], (0.1, 2.0))


def test_spearman_by_hand():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # ties get mean ranks
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


# --- whole runs ----------------------------------------------------------------------------------------------------


def _labels(path: Path, n: int = 12) -> Path:
    rows = [{"prompt": f"{a} + {b}", "answer": str(a + b)} for a, b in zip(range(n), range(3, 3 + n), strict=True)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_three_objectives_health_and_card(llama_trio, tmp_path, capsys):
    data = tune_recipe(llama_trio, tmp_path, trials=5, objectives=["consistency", "perplexity", "self_certainty"])
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    run = tmp_path / "run"
    assert main(["tune", str(recipe), "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "self_certainty" in out
    records = [json.loads(line) for line in (run / "trials.jsonl").read_text().splitlines()]
    for r in records:
        assert r["self_certainty"] > 0 and len(r["per_query_self_certainty"]) == len(QUERIES)
        assert set(r["health"]) == {"finished", "truncated", "no_answer", "mean_tokens", "per_query"}
        assert r["engine"] == "transformers"
    pareto = json.loads((run / "pareto.json").read_text())
    assert [o["name"] for o in pareto["objectives"]] == ["consistency", "perplexity", "self_certainty"]
    assert set(pareto["reference_point"]) == {"consistency", "perplexity", "self_certainty"}
    assert set(pareto["pick_health"]) == {"finished", "truncated", "no_answer", "mean_tokens"}
    points = [(r["consistency"], r["perplexity"], r["self_certainty"]) for r in records]
    directions = ("maximize", "minimize", "maximize")
    assert pareto["front"] == [records[i]["number"] for i in front(points, directions)]
    card = (run / "model" / "README.md").read_text()
    assert "| consistency | perplexity | self_certainty |" in card and "Samples of the picked trial" in card


def test_validation_scores_the_front_and_never_reaches_the_search(llama_trio, tmp_path, capsys):
    plain = tune_recipe(llama_trio, tmp_path, trials=5)
    assert main(["tune", str(write_recipe(tmp_path / "plain.yml", plain)), "--out", str(tmp_path / "plain"),
                 "--quiet", "--no-merge"]) == 0  # fmt: skip
    labeled = tune_recipe(llama_trio, tmp_path, trials=5, validation=str(_labels(tmp_path / "labels.jsonl")),
                          pick="validation")  # fmt: skip
    run = tmp_path / "labeled"
    assert main(["tune", str(write_recipe(tmp_path / "labeled.yml", labeled)), "--out", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "validation (12 labeled problems)" in out and "Spearman" in out
    searched = lambda folder: [  # noqa: E731
        {k: r[k] for k in ("number", "point", "consistency", "perplexity", "answers")}
        for r in map(json.loads, (folder / "trials.jsonl").read_text().splitlines())
    ]
    assert searched(run) == searched(tmp_path / "plain")  # the labels changed nothing in the search
    pareto = json.loads((run / "pareto.json").read_text())
    v = pareto["validation"]
    assert v["items"] == 12 and set(v["spearman"]) == {"consistency", "perplexity"}
    scored = {int(n): acc for n, acc in v["accuracy"].items()}
    assert set(pareto["front"]) <= set(scored)
    best = max(scored[n]["majority"] for n in pareto["front"])
    assert scored[pareto["pick"]]["majority"] == best and pareto["rule"] == "validation"
    assert all(0.0 <= acc["majority"] <= 1.0 and 0.0 <= acc["greedy"] <= 1.0 for acc in scored.values())
    saved = json.loads((run / "validation.json").read_text())
    assert {int(n) for n in saved["scored"]} == set(scored)
    assert "labeled problems after the search" in (run / "model" / "README.md").read_text()
    # a resume scores nothing again; another rule on the same run keeps the validation numbers
    assert main(["tune", str(tmp_path / "labeled.yml"), "--out", str(run), "--quiet", "--resume", "--pick",
                 "utopia"]) == 0  # fmt: skip
    assert json.loads((run / "validation.json").read_text()) == saved
    assert "validation: scoring" not in (run / "tune.log").read_text().split("session started")[-1]


def test_strict_turns_warnings_into_errors(llama_trio, tmp_path, capsys):
    data = tune_recipe(llama_trio, tmp_path, trials=3, generation={"samples": 3, "max_new_tokens": 1, "batch_size": 4})
    recipe = write_recipe(tmp_path / "recipe.yml", data)
    assert main(["tune", str(recipe), "--out", str(tmp_path / "lenient"), "--quiet", "--no-merge"]) == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.out and "raise `tune.generation.max_new_tokens`" in captured.out
    pareto = json.loads((tmp_path / "lenient" / "pareto.json").read_text())
    assert any("max_new_tokens" in w for w in pareto["warnings"])
    assert main(["tune", str(recipe), "--out", str(tmp_path / "strict"), "--quiet", "--strict"]) == 2
    err = capsys.readouterr().err
    assert "trial #0" in err and "hit max_new_tokens (1 tokens)" in err and "--strict" in err
    assert len((tmp_path / "strict" / "trials.jsonl").read_text().splitlines()) == 1  # stopped after the first


def test_a_run_scored_by_an_older_version_is_not_resumed(llama_trio, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=1))
    run = tmp_path / "run"
    assert main(["tune", str(recipe), "--out", str(run), "--quiet", "--no-merge"]) == 0
    info = json.loads((run / "run.json").read_text())
    del info["identity"]["scoring"]  # as written by a version with batch-seeded samples and templated perplexity
    (run / "run.json").write_text(json.dumps(info))
    assert main(["tune", str(recipe), "--out", str(run), "--quiet", "--resume", "--trials", "2"]) == 2
    assert "scoring changed" in capsys.readouterr().err


def test_a_shared_study_holds_every_objective_with_its_direction(llama_trio, tmp_path):
    import optuna

    objectives = ["self_certainty", "perplexity", "consistency"]
    data = tune_recipe(llama_trio, tmp_path, trials=3, backend="optuna", objectives=objectives)
    run = tmp_path / "run"
    assert main(["tune", str(write_recipe(tmp_path / "recipe.yml", data)), "--out", str(run), "--quiet",
                 "--no-merge"]) == 0  # fmt: skip
    (summary,) = optuna.study.get_all_study_summaries(f"sqlite:///{run / 'study.db'}")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{run / 'study.db'}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MAXIMIZE"]
    records = {r["number"]: r for r in map(json.loads, (run / "trials.jsonl").read_text().splitlines())}
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        assert trial.values == [records[trial.number][name] for name in objectives]


def test_self_certainty_is_taken_from_the_models_own_distribution_when_sampling(tiny_lm):
    model, tok = tiny_lm
    (completion, *_) = generate(model, tok, ["3 * 4"], samples=3, temperature=0.6, top_p=1.0, max_new_tokens=6,
                                seed=4, self_certainty=True)[0]  # fmt: skip
    prompt = chat_prompt(tok, "3 * 4")
    new = list(completion.ids)
    assert len(new) == completion.tokens and (new[-1] in eos_ids(model, tok)) == completion.finished
    with torch.no_grad():
        logits = model(torch.tensor([prompt + new])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(new)].double()
    raw = -(torch.log_softmax(logits, -1) + math.log(logits.shape[-1])).mean(-1).mean().item()
    tempered = -(torch.log_softmax(logits / 0.6, -1) + math.log(logits.shape[-1])).mean(-1).mean().item()
    assert completion.self_certainty == pytest.approx(raw, rel=1e-4)
    assert completion.self_certainty != pytest.approx(tempered, rel=1e-2)


def test_the_knee_bulges_toward_the_ideal_point():
    # (0.3, 0.3) is a dent behind the extremes' line: no knee, utopia decides; (0.8, 0.8) is one
    dent = [(1.0, 0.0), (0.0, 1.0), (0.3, 0.3), (0.45, 0.5)]
    maxmax = ("maximize", "maximize")
    assert knee_scores(dent, maxmax) is None
    assert pick(dent, "knee", maxmax) == pick(dent, "utopia", maxmax)
    bulge = [(1.0, 0.0), (0.0, 1.0), (0.8, 0.8), (0.3, 0.3)]
    assert pick(bulge, "knee", maxmax) == 2


def test_a_third_objective_changes_what_bayes_prefers():
    import numpy as np

    from dots_merge.tune.samplers.bayes import scalarise

    objectives = make_objectives(["consistency", "perplexity", "self_certainty"])
    rows = [(0.9, 2.0, 0.1), (0.5, 2.0, 0.9)]
    first, second = scalarise(rows, np.array([1.0, 0.0, 0.0]), objectives)
    assert first < second  # consistency alone prefers the first
    first, second = scalarise(rows, np.array([0.0, 0.0, 1.0]), objectives)
    assert second < first  # self-certainty alone prefers the second


def test_the_validation_pick_and_what_the_correlations_say(llama_trio, tmp_path):
    from dots_merge.tune.run import _summary, _validation_summary

    data = tune_recipe(llama_trio, tmp_path, validation=str(_labels(tmp_path / "labels.jsonl")), pick="validation")
    spec = parse_tune(load_recipe(write_recipe(tmp_path / "r.yml", data)))
    objectives = make_objectives()
    records = [
        {"number": 0, "consistency": 0.9, "perplexity": 9.0},
        {"number": 1, "consistency": 0.7, "perplexity": 4.0},  # the knee
        {"number": 2, "consistency": 0.5, "perplexity": 3.0},
        {"number": 3, "consistency": 0.1, "perplexity": 2.0},
        {"number": 4, "consistency": 0.2, "perplexity": 9.5},  # dominated
    ]
    scored = {0: {"majority": 0.2, "greedy": 0.1}, 1: {"majority": 0.4, "greedy": 0.4},
              2: {"majority": 0.6, "greedy": 0.5}, 3: {"majority": 0.6, "greedy": 0.7}}  # fmt: skip
    knee = _summary(records, dataclasses.replace(spec, pick="knee"), objectives)
    assert knee["pick"] == 1
    chosen = _summary(records, spec, objectives, scored)
    assert chosen["pick"] == 2  # best accuracy 0.6, tied with #3: the label-free (utopia) order breaks the tie
    summary = _validation_summary(spec, objectives, records, scored)
    assert summary["spearman"]["consistency"] < 0 and summary["spearman"]["perplexity"] < 0
    # accuracy rises as consistency falls (not to be trusted) and as perplexity falls (to be trusted)
    assert summary["agreement"]["consistency"] < 0 < summary["agreement"]["perplexity"]
    assert summary["accuracy"]["2"] == scored[2] and summary["items"] == 12
    assert "mirror" in summary["note"]  # two objectives, front points only
    every = dataclasses.replace(spec, validation=dataclasses.replace(spec.validation, points="all"))
    assert _validation_summary(every, objectives, records, scored)["note"] is None


def test_the_query_is_found_where_the_template_puts_it(tiny_lm):
    from dots_merge.tune.generation import scored_prompt

    _, tok = tiny_lm
    ids, scored = scored_prompt(tok, "assistant")  # a word the template also holds, later
    tokens = tok.convert_ids_to_tokens(ids)
    assert [t for t, s in zip(tokens, scored, strict=True) if s] == ["<unk>"] and tokens[0] == "<|user|>"
    assert scored.index(True) == 1


def test_pick_validation_with_an_empty_validation_key_is_refused(llama_trio, tmp_path):
    data = tune_recipe(llama_trio, tmp_path, validation=None, pick="validation")
    with pytest.raises(RecipeError, match="validation needs labeled problems"):
        parse_tune(load_recipe(write_recipe(tmp_path / "r.yml", data)))
