"""`dots-merge analyze` on constructed checkpoints with known answers, and its outputs and errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dots_merge.analyze import analyze
from dots_merge.cli.main import main
from dots_merge.core.diagnostics import layer_of, module_type
from tests.conftest import write_recipe
from tests.reference import load_state, sparsify64
from tests.toy_models import build_trio


def write_like(template: Path, out: Path, state: dict[str, torch.Tensor]) -> Path:
    """A model folder with `template`'s config and file layout (single-file or sharded), holding `state`."""
    out.mkdir(parents=True)
    shutil.copy(template / "config.json", out / "config.json")
    index = template / "model.safetensors.index.json"
    if index.exists():
        shutil.copy(index, out / index.name)
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in set(weight_map.values()):
            save_file(
                {k: state[k] for k, f in weight_map.items() if f == shard}, out / shard, metadata={"format": "pt"}
            )
    else:
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", params=["single-file-fp32", "sharded-bf16"])
def known(request, tmp_path_factory) -> dict:
    """Zero base; A = 30·u; B = u with exactly 45% of signs flipped in every tensor; C changes only q_proj."""
    root = tmp_path_factory.mktemp(request.param)
    sharded = request.param == "sharded-bf16"
    trio = build_trio(
        root / "src",
        arch="qwen2" if sharded else "llama",
        hidden=40,
        dtype=torch.bfloat16 if sharded else torch.float32,
        tied=sharded,
        shard_size="20KB" if sharded else None,
        tokenizer=False,
    )
    template = trio["base"]
    base = {k: torch.zeros_like(v) for k, v in load_state(template).items()}
    gen = torch.Generator().manual_seed(0)
    a, b, c = {}, {}, {}
    for name, zero in base.items():
        n = zero.numel()
        assert n % 20 == 0, name
        magnitude = torch.randint(1, 8, (n,), generator=gen).float() / 16
        sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
        u = magnitude * sign
        flip = torch.ones(n)
        flip[torch.randperm(n, generator=gen)[: n * 9 // 20]] = -1.0
        a[name] = (30 * u).reshape(zero.shape).to(zero.dtype)
        b[name] = (u * flip).reshape(zero.shape).to(zero.dtype)
        c[name] = u.reshape(zero.shape).to(zero.dtype) if "q_proj" in name else zero
    paths = {
        "base": write_like(template, root / "base", base),
        "a": write_like(template, root / "a", a),
        "b": write_like(template, root / "b", b),
        "c": write_like(template, root / "c", c),
    }
    recipe = {
        "merge_method": "dots",
        "base_model": str(paths["base"]),
        "models": [{"model": str(paths[k])} for k in ("a", "b", "c")],
    }
    return {"paths": paths, "recipe": write_recipe(root / "recipe.yml", recipe), "states": (a, b)}


def test_known_answers(known):
    report = analyze(known["recipe"], densities=(0.1, 0.3))
    pa, pb, pc = (str(known["paths"][k]) for k in ("a", "b", "c"))
    ab = next(p for p in report["pairs"] if (p["a"], p["b"]) == (pa, pb))
    assert ab["magnitude_ratio"] == pytest.approx(30.0, rel=1e-12)
    assert all(r == pytest.approx(30.0, rel=1e-12) for r in ab["magnitude_ratio_by_module"].values())
    assert ab["sign_conflict_all"]["dense"] == pytest.approx(0.45, abs=1e-15)
    assert ab["sign_conflict_both"]["dense"] == pytest.approx(0.45, abs=1e-15)
    assert ab["jaccard"] == {"dense": 1.0, "0.1": 1.0, "0.3": 1.0}  # |τ_A| = 30|τ_B|: the same entries kept

    a, b = known["states"]
    for level, density in (("0.1", 0.1), ("0.3", 0.3)):
        kept = opposite = coords = 0
        for name in a:
            sa = sparsify64(a[name].double().reshape(-1), density)
            sb = sparsify64(b[name].double().reshape(-1), density)
            kept += int(((sa != 0) & (sb != 0)).sum())
            opposite += int((sa * sb < 0).sum())
            coords += sa.numel()
        assert ab["sign_conflict_both"][level] == pytest.approx(opposite / kept, abs=1e-15)
        assert ab["sign_conflict_all"][level] == pytest.approx(opposite / coords, abs=1e-15)

    only_q = report["models"][pc]["module_share"]
    assert only_q["q"] == 1.0 and sum(v for k, v in only_q.items() if k != "q") == 0.0
    ac = next(p for p in report["pairs"] if (p["a"], p["b"]) == (pa, pc))
    assert ac["jaccard"]["dense"] == pytest.approx(
        sum(v.numel() for k, v in a.items() if "q_proj" in k) / sum(v.numel() for v in a.values())
    )
    shares = report["models"][pa]["layer_share"]
    assert sum(shares.values()) == pytest.approx(1.0) and set(shares) == {"0", "1", "none"}


def test_shares_and_relative_update_by_hand(llama_trio):
    recipe = {
        "merge_method": "dots",
        "base_model": str(llama_trio["base"]),
        "models": [{"model": str(llama_trio["sft"])}],
    }
    report = analyze(recipe, densities=(0.3,))
    base, sft = load_state(llama_trio["base"]), load_state(llama_trio["sft"])
    tau = {k: (sft[k].double() - base[k].double()).float().double() for k in base}
    total = sum(float((t**2).sum()) for t in tau.values())
    m = report["models"][str(llama_trio["sft"])]
    assert m["l2_norm"] == pytest.approx(total**0.5, rel=1e-9)
    norms_sq = sum(float((t**2).sum()) for k, t in tau.items() if module_type(k) == "norms")
    assert m["module_share"]["norms"] == pytest.approx(norms_sq / total, rel=1e-9)
    base_norms_sq = sum(float((base[k].double() ** 2).sum()) for k in base if module_type(k) == "norms")
    assert m["relative_update"]["norms"] == pytest.approx((norms_sq / base_norms_sq) ** 0.5, rel=1e-9)
    layer0 = sum(float((t**2).sum()) for k, t in tau.items() if layer_of(k) == "0")
    assert m["layer_share"]["0"] == pytest.approx(layer0 / total, rel=1e-9)
    assert report["pairs"] == []


@pytest.mark.parametrize(
    ("name", "kind", "layer"),
    [
        ("model.embed_tokens.weight", "embed", "none"),
        ("model.layers.3.self_attn.q_proj.weight", "q", "3"),
        ("model.layers.12.self_attn.o_proj.bias", "o", "12"),
        ("model.layers.0.mlp.gate_proj.weight", "gate", "0"),
        ("model.layers.0.post_attention_layernorm.weight", "norms", "0"),
        ("model.norm.weight", "norms", "none"),
        ("lm_head.weight", "lm_head", "none"),
        ("model.rotary.inv_freq", "other", "none"),
    ],
)
def test_module_and_layer_of_tensor_names(name, kind, layer):
    assert module_type(name) == kind and layer_of(name) == layer


def test_cli_writes_table_json_and_plots(capsys, llama_trio, tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yml",
        {
            "merge_method": "dots",
            "base_model": str(llama_trio["base"]),
            "models": [{"model": str(llama_trio["sft"])}, {"model": str(llama_trio["rlvr"])}],
        },
    )
    code = main(["analyze", str(recipe), "--out", str(tmp_path / "an"), "--densities", "0.2,0.4", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "‖τ_a‖/‖τ_b‖" in out and "0.2" in out
    data = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert set(data) >= {"models", "pairs"} and data["densities"] == [0.2, 0.4]
    pair = data["pairs"][0]
    assert set(pair["sign_conflict_all"]) == {"dense", "0.2", "0.4"}
    for png in ("module_share.png", "layer_norms.png", "sign_conflict.png"):
        assert (tmp_path / "an" / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", str(recipe), "--json", str(tmp_path / "x.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "x.json").read_text())["densities"] == [0.1, 0.3, 0.5]


def _bad(capsys, *args) -> str:
    code = main(["analyze", *args, "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_cli_bad_input(capsys, llama_trio, tmp_path):
    recipe = {
        "merge_method": "dots",
        "base_model": str(llama_trio["base"]),
        "models": [{"model": str(llama_trio["sft"])}],
    }
    good = write_recipe(tmp_path / "good.yml", recipe)
    assert "--densities" in _bad(capsys, str(good), "--densities", "0.3,abc")
    assert "--densities" in _bad(capsys, str(good), "--densities", "1.5")
    typo = write_recipe(tmp_path / "typo.yml", {**recipe, "modles": []})
    assert "modles" in _bad(capsys, str(typo))
    no_base = write_recipe(tmp_path / "nobase.yml", {"merge_method": "linear", "models": recipe["models"]})
    assert "base_model" in _bad(capsys, str(no_base))
    bad = tmp_path / "bad"
    shutil.copytree(llama_trio["sft"], bad)
    state = load_file(bad / "model.safetensors")
    state["model.layers.0.mlp.down_proj.weight"] = torch.zeros(3, 3)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    shapes = write_recipe(tmp_path / "shapes.yml", {**recipe, "models": [{"model": str(bad)}]})
    assert "model.layers.0.mlp.down_proj.weight" in _bad(capsys, str(shapes))
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:-10])
    assert "truncated" in _bad(capsys, str(shapes))
