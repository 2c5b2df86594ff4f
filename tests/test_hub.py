"""Publishing against a local Hub-compatible server: files, branches, PRs, dry run, token hygiene, errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from huggingface_hub import constants

import dots_merge
from dots_merge.cli.main import main
from tests.conftest import dots_recipe
from tests.hub_server import TOKEN, FakeHub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_dir(llama_trio, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pub") / "model"
    data = dots_recipe(llama_trio)
    data["hub_ids"] = {str(llama_trio[k]): f"org/{k}" for k in ("base", "sft", "rlvr")}
    dots_merge.merge(data, out, out_shard_size="30KB")
    return out


def push(capsys, *args) -> tuple[int, str]:
    code = main(["push", *args])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert TOKEN not in output
    return code, output


def local_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_byte_identical(hub, model_dir, capsys):
    code, out = push(capsys, str(model_dir), "tester/merged", "--private")
    assert code == 0, out
    assert "committed:" in out
    assert hub.files("tester/merged") == local_files(model_dir)
    assert hub.repos["tester/merged"]["private"] is True
    card = hub.files("tester/merged")["README.md"].decode()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == ["org/base", "org/rlvr", "org/sft"]
    assert meta["base_model_relation"] == "merge" and "dots" in meta["tags"]
    puts = len(hub.puts)
    code, out = push(capsys, str(model_dir), "tester/merged")  # nothing changed: nothing is sent again
    assert code == 0 and len(hub.puts) == puts


def test_branch_and_pull_request(hub, model_dir, capsys, tmp_path):
    assert push(capsys, str(model_dir), "tester/m")[0] == 0
    code, out = push(capsys, str(model_dir), "tester/m", "--revision", "experiment")
    assert code == 0, out
    assert hub.files("tester/m", "experiment") == local_files(model_dir)
    changed = tmp_path / "changed"
    shutil.copytree(model_dir, changed)
    (changed / "README.md").write_text((model_dir / "README.md").read_text() + "\nRevised.\n")
    code, out = push(capsys, str(changed), "tester/m", "--create-pr", "--commit-message", "try this")
    assert code == 0 and "pull request: " in out and "/discussions/1" in out
    assert hub.files("tester/m", "refs/pr/1")["README.md"] == (changed / "README.md").read_bytes()
    assert hub.files("tester/m")["README.md"] == (model_dir / "README.md").read_bytes()  # main untouched


def test_dry_run_makes_no_request(hub, model_dir, capsys):
    code, out = push(capsys, str(model_dir), "tester/dry", "--dry-run")
    assert code == 0
    assert hub.requests == []
    assert "tester/dry (public)" in out and "model.safetensors.index.json" in out
    assert "base_model_relation: merge" in out and "dry run: nothing was sent" in out


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        (lambda hub, mp: mp.delenv("HF_TOKEN"), "no Hugging Face token"),
        (lambda hub, mp: mp.setenv("HF_TOKEN", "hf_wrong"), "rejected the token (401)"),
        (lambda hub, mp: None, "no write access to someone-else/m (403)"),
        (lambda hub, mp: hub.faults.update(commit=404), "was not found (404)"),
        (lambda hub, mp: hub.faults.update(commit=412), "meanwhile (412): run the same command again"),
    ],
    ids=["no-token", "401", "403", "404", "412"],
)
def test_errors(hub, model_dir, capsys, monkeypatch, setup, needle):
    setup(hub, monkeypatch)
    repo = "someone-else/m" if needle.startswith("no write") else "tester/m"
    code, out = push(capsys, str(model_dir), repo)
    assert code == 2, out
    assert needle in out and "Traceback" not in out
    assert "hf_wrong" not in out


def test_card_metadata_refused(hub, model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(model_dir, bad)
    text = (bad / "README.md").read_text()
    (bad / "README.md").write_text(
        text.replace("library_name: transformers", "license: not-a-license\nlibrary_name: transformers")
    )
    code, out = push(capsys, str(bad), "tester/card")
    assert code == 2 and "refused the model card metadata (400)" in out
    assert hub.puts == []  # refused before any weights went up


def test_card_with_a_local_path_base_model_is_refused_locally(hub, model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    text = (bad / "README.md").read_text()
    (bad / "README.md").write_text(text.replace("- org/base", "- /home/me/models/base"))
    code, out = push(capsys, str(bad), "tester/card", "--dry-run")
    assert code == 2 and "not a Hub repo id" in out and hub.requests == []


def test_network_failure_mid_upload_then_resume(hub, model_dir, capsys, monkeypatch):
    import hashlib

    monkeypatch.setattr(time, "sleep", lambda _s: None)  # huggingface_hub retries with back-off
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) >= 2
    victim = hashlib.sha256(shards[-1].read_bytes()).hexdigest()
    hub.drop_oids.add(victim)
    code, out = push(capsys, str(model_dir), "tester/flaky")
    assert code == 2 and "network failure" in out and "run the same command again" in out
    arrived = set(hub.puts)
    assert victim not in arrived and arrived
    hub.drop_oids.clear()
    before = list(hub.puts)
    code, out = push(capsys, str(model_dir), "tester/flaky")
    assert code == 0, out
    assert hub.puts[len(before) :] == [victim]  # only the missing object was sent
    assert hub.files("tester/flaky") == local_files(model_dir)


def test_tune_push_fails_fast_then_publishes(hub, llama_trio, tmp_path, capsys, monkeypatch):
    from tests.test_tune import tune_recipe, write_recipe

    recipe = write_recipe(tmp_path / "recipe.yml", tune_recipe(llama_trio, tmp_path, trials=2))
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    assert main(["tune", str(recipe), "--out", str(tmp_path / "run"), "--push", "tester/tuned", "--quiet"]) == 2
    assert "401" in capsys.readouterr().err
    assert not (tmp_path / "run" / "trials.jsonl").exists()  # no trial ran
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code = main(["tune", str(recipe), "--out", str(tmp_path / "run2"), "--push", "tester/tuned", "--private",
                 "--include-queries", "--quiet"])  # fmt: skip
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "published:" in out.out and TOKEN not in out.out + out.err
    files = hub.files("tester/tuned")
    assert files["pareto.png"][:4] == b"\x89PNG"
    card = files["README.md"].decode()
    assert "## Test-time search" in card and "![Pareto front of the search](pareto.png)" in card
    assert "on samples generated with transformers" in card
    assert "Queries:" in card and "1 + 2" in card and "## Limitations" in card and "mergekit 0.1.5" in card
    for path in (tmp_path / "run2").rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_push_through_the_console_script_environment(hub, model_dir, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from dots_merge.cli.main import main; sys.exit(main(sys.argv[1:]))",
            "push",
            str(model_dir),
            "tester/sub",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout + done.stderr
    assert hub.files("tester/sub") == local_files(model_dir)


@pytest.mark.skipif(not os.environ.get("DOTS_MERGE_LIVE_HUB_REPO"), reason="set DOTS_MERGE_LIVE_HUB_REPO and HF_TOKEN")
def test_live_push(model_dir, monkeypatch, capsys):
    """Opt-in: publishes the tiny merge as a private repo on the real Hub (needs network and a write token)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    repo = os.environ["DOTS_MERGE_LIVE_HUB_REPO"]
    code, out = push(capsys, str(model_dir), repo, "--private")
    assert code == 0, out
    assert "README.md" in huggingface_hub.HfApi().list_repo_files(repo)
