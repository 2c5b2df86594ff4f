"""Shared fixtures: tiny real checkpoints built once per session, offline environment."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.toy_models import build_trio

# A shell starts background jobs with SIGINT ignored, and a process started with SIGINT ignored never gets Python's
# Ctrl-C handler, nor do the CLI processes the tests start: the interrupt tests would then test nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: one core per worker, for it and the tools it starts
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    """No test may reach the network, and the pre-pass cache lives in a temporary folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("DOTS_MERGE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def llama_trio(tmp_path_factory) -> dict[str, Path]:
    """Llama, float32, single-file, untied, with a tokenizer."""
    return build_trio(tmp_path_factory.mktemp("llama"), arch="llama", hidden=32)


@pytest.fixture(scope="session")
def qwen_trio(tmp_path_factory) -> dict[str, Path]:
    """Qwen2 with tied embeddings, bfloat16, sharded checkpoints."""
    return build_trio(
        tmp_path_factory.mktemp("qwen"), arch="qwen2", hidden=64, dtype=torch.bfloat16, tied=True, shard_size="40KB"
    )


@pytest.fixture(scope="session")
def llama_third(llama_trio, tmp_path_factory) -> Path:
    """A third fine-tune of the Llama base (the SFT model with more noise)."""
    out = tmp_path_factory.mktemp("third") / "third"
    shutil.copytree(llama_trio["sft"], out)
    state = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(7)
    state = {k: v + torch.randn(v.shape, generator=gen) * 0.01 for k, v in state.items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


def write_recipe(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def dots_recipe(trio: dict[str, Path], **extra) -> dict:
    """A two-model dots recipe over a trio (weights 1.0 and 1.5, densities 0.3 and 0.2)."""
    data = {
        "merge_method": "dots",
        "base_model": str(trio["base"]),
        "models": [
            {"model": str(trio["sft"]), "parameters": {"weight": 1.0, "density": 0.3}},
            {"model": str(trio["rlvr"]), "parameters": {"weight": 1.5, "density": 0.2}},
        ],
    }
    data.update(extra)
    return data


def _postgres_bin() -> Path | None:
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[::-1]), None)
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server on 127.0.0.1 for the session: `$DOTS_MERGE_TEST_POSTGRES` if set, else one started
    here from the installed server (Debian's postgresql package; `.ci/run` installs it). Skipped when there is
    none, unless `$DOTS_MERGE_REQUIRE_POSTGRES` is set (CI), where that is an error."""
    if os.environ.get("DOTS_MERGE_TEST_POSTGRES"):
        yield os.environ["DOTS_MERGE_TEST_POSTGRES"]
        return
    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("DOTS_MERGE_REQUIRE_POSTGRES"):
            pytest.fail("no PostgreSQL server installed (initdb not found)")
        pytest.skip("no PostgreSQL server installed (apt-get install postgresql)")
    data = Path(tempfile.mkdtemp(prefix="dots-merge-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "check": True}
    subprocess.run([*run_as, str(bindir / "initdb"), "-D", str(data / "db"), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8"], **quiet)  # fmt: skip
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-o", options, "-l",
                    str(data / "server.log"), "-w", "start"], **quiet)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "immediate", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        shutil.rmtree(data, ignore_errors=True)
