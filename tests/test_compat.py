"""The private APIs dots-merge uses live in one module each and are checked against the pinned releases."""

from __future__ import annotations

import ast
from pathlib import Path

import mergekit.merge
import pytest

from dots_merge.merge import mergekit_compat
from dots_merge.tune.stores import optuna_compat

PACKAGE = Path(__file__).resolve().parent.parent / "dots_merge"


def test_the_installed_mergekit_has_every_private_name_used():
    mergekit_compat.check()  # raises MergekitChanged naming mergekit==0.1.5 otherwise
    assert mergekit_compat.installed_version() == mergekit_compat.PINNED


def test_a_changed_mergekit_fails_loudly_naming_the_pinned_release(monkeypatch):
    monkeypatch.delattr(mergekit.merge, "_copy_tokenizer")
    with pytest.raises(mergekit_compat.MergekitChanged, match=r"mergekit==0\.1\.5.*_copy_tokenizer is gone"):
        mergekit_compat.check()


def test_a_changed_signature_fails_loudly(monkeypatch):
    monkeypatch.setattr(mergekit.merge, "_set_chat_template", lambda tokenizer, config: None)
    with pytest.raises(mergekit_compat.MergekitChanged, match=r"_set_chat_template.*no longer takes"):
        mergekit_compat.check()


def test_the_installed_optuna_has_every_name_used():
    optuna_compat.check()


def test_a_changed_optuna_fails_loudly_naming_the_supported_releases(monkeypatch):
    import optuna

    monkeypatch.delattr(optuna.storages, "fail_stale_trials")
    with pytest.raises(optuna_compat.OptunaChanged, match=r"optuna>=4\.9,<6.*fail_stale_trials is gone"):
        optuna_compat.check()
    monkeypatch.undo()
    monkeypatch.setattr(optuna_compat, "installed_version", lambda: "6.1.0")
    with pytest.raises(optuna_compat.OptunaChanged, match="not supported"):
        optuna_compat.check()


def _private_uses(module: Path) -> set[str]:
    """`x._name` attribute reads and `from lib import _name` of mergekit/optuna objects in one file."""
    tree = ast.parse(module.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("mergekit", "optuna"):
            found |= {a.name for a in node.names if a.name.startswith("_")}
        if isinstance(node, ast.Attribute) and node.attr in ("_plan", "_tensors", "_tokenizer_task", "_trial_id"):
            found.add(node.attr)
    return found


def test_no_other_module_reaches_into_mergekit_or_optuna_privates():
    compat = {PACKAGE / "merge" / "mergekit_compat.py", PACKAGE / "tune" / "stores" / "optuna_compat.py"}
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(uses)
        for path in PACKAGE.rglob("*.py")
        if path not in compat and (uses := _private_uses(path))
    }
    assert offenders == {}
