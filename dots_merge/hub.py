"""Publishing a merged model folder on the Hugging Face Hub.

One entry point, `push`, with keyword-only options. The token comes from `HF_TOKEN` or the saved login
and is handled by huggingface_hub only: nothing here prints, logs or writes it. Every failure becomes a
`PushError` whose one-line message says what to do; an interrupted upload is resumed by running the same
command again (the Hub keeps the files that arrived, and unchanged files are not sent twice).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dots_merge.errors import DotsMergeError

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
IGNORED = [".*", "*/.*", "__pycache__/*"]


class PushError(DotsMergeError):
    """Publishing failed; the message says why and what to do."""


@dataclass
class PushPlan:
    """What `push` would do, computed without any network access."""

    model_dir: Path
    repo_id: str
    private: bool
    revision: str | None
    create_pr: bool
    files: list[tuple[str, int]]
    metadata: dict[str, Any]

    @property
    def total(self) -> int:
        return sum(size for _, size in self.files)

    def describe(self) -> str:
        target = "a pull request" if self.create_pr else f"branch {self.revision or 'main'}"
        lines = [
            f"repo:       {self.repo_id} ({'private' if self.private else 'public'})",
            f"target:     {target}",
            f"files:      {len(self.files)}, {_size(self.total)} in all",
        ]
        lines += [f"  {_size(size):>10}  {name}" for name, size in self.files]
        lines.append("card metadata:")
        lines += [f"  {key}: {value}" for key, value in self.metadata.items()]
        return "\n".join(lines)


@dataclass
class PushResult:
    plan: PushPlan
    commit_url: str | None = None
    pr_url: str | None = None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def validate_card(model_dir: Path) -> dict[str, Any]:
    """Parse MODEL_DIR/README.md with huggingface_hub; check the merge metadata. Returns the metadata."""
    from huggingface_hub import ModelCard

    readme = model_dir / "README.md"
    if not readme.is_file():
        raise PushError(f"{model_dir}: no README.md model card (merge with dots-merge to get one)")
    try:
        card = ModelCard.load(readme)
    except Exception as error:
        raise PushError(f"{readme}: the model card does not parse: {str(error).splitlines()[0]}") from None
    meta = card.data.to_dict()
    bases = meta.get("base_model") or []
    for base in [bases] if isinstance(bases, str) else bases:
        if not isinstance(base, str) or not _HUB_ID.match(base):
            raise PushError(f"{readme}: base_model entry {base!r} is not a Hub repo id (org/name)")
    if meta.get("base_model_relation") not in (None, "merge"):
        raise PushError(f"{readme}: base_model_relation must be 'merge'")
    return meta


def check_repo_id(repo_id: str) -> None:
    """`name` or `org/name`."""
    if not _REPO_ID.match(repo_id):
        raise PushError(f"{repo_id!r}: not a repo id (name or org/name)")


def plan_push(
    model_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None, create_pr: bool = False
) -> PushPlan:
    """Check the folder and the card locally; no network."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PushError(f"{model_dir}: not a folder")
    check_repo_id(repo_id)
    if revision and create_pr:
        raise PushError("--revision and --create-pr exclude each other")
    if not any(model_dir.glob("*.safetensors")):
        raise PushError(f"{model_dir}: no safetensors weights to publish")
    meta = validate_card(model_dir)
    files = sorted(
        (str(p.relative_to(model_dir)), p.stat().st_size)
        for p in model_dir.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(model_dir).parts)
    )
    return PushPlan(model_dir, repo_id, private, revision, create_pr, files, meta)


def _transport_errors() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            found.append(__import__(module).TransportError)
    return tuple(found)


def _is_network_error(error: BaseException | None) -> bool:
    """A transport failure, possibly wrapped (huggingface_hub re-raises upload errors as RuntimeError)."""
    transport = _transport_errors()
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, transport):
            return True
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub and network exceptions into one-line `PushError`s."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        yield
    except PushError:
        raise
    except LocalTokenNotFoundError:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login`") from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        server = (getattr(error, "server_message", None) or "").strip().splitlines()
        detail = f" ({server[0]})" if server else ""
        messages = {
            401: "the Hub rejected the token (401): it is invalid or expired; set a valid HF_TOKEN or run `hf auth login`",
            403: f"no write access to {repo_id} (403){detail}: use a token with write permission for this namespace",
            404: f"{repo_id}{'@' + revision if revision else ''} was not found (404){detail}",
            412: f"someone else committed to {repo_id} meanwhile (412): run the same command again",
            400: f"the Hub refused the request for {repo_id} (400){detail}",
        }
        raise PushError(messages.get(status, f"the Hub answered {status}{detail} for {repo_id}")) from None
    except ValueError as error:
        if str(error).startswith("Invalid metadata in README.md"):
            problems = [line.lstrip("- ") for line in str(error).splitlines()[1:] if line.strip()]
            raise PushError(
                f"the Hub refused the model card metadata (400): {problems[0] if problems else 'invalid'}"
            ) from None
        raise
    except Exception as error:
        if _is_network_error(error):
            raise PushError(
                f"network failure while publishing {repo_id} ({type(error).__name__}): run the same command again; "
                "files that already arrived are not sent again"
            ) from None
        raise


def authenticate() -> str:
    """Fail fast: the user name the token belongs to (`whoami`)."""
    from huggingface_hub import HfApi

    with hub_errors("the Hub"):
        info = HfApi().whoami()
    return str(info.get("name", "?"))


def push(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Publish MODEL_DIR as REPO_ID: create the repo (and branch) when missing, upload what is not there yet."""
    from huggingface_hub import HfApi

    plan = plan_push(model_dir, repo_id, private=private, revision=revision, create_pr=create_pr)
    if dry_run:
        return PushResult(plan)
    api = HfApi()
    with hub_errors(repo_id, revision):
        authenticate()  # a bad token fails here, before the repo is created
        repo = api.create_repo(repo_id, private=private or None, exist_ok=True, repo_type="model")
        full_id = repo.repo_id
        if revision:
            api.create_branch(full_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(  # the Hub validates README.md's metadata before any weights go up
            folder_path=str(model_dir),
            repo_id=full_id,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload merged model (dots-merge)",
            ignore_patterns=IGNORED,
        )
    plan.repo_id = full_id
    return PushResult(plan, commit_url=info.commit_url, pr_url=info.pr_url)
