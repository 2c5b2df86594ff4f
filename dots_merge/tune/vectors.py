"""The sparse vector store of a tune: each S(τ) computed once per (model, tensor, k), reused by every trial.

Vectors (flat float32, on the candidate's device) are kept in memory while they fit in `budget` bytes, least
recently used evicted first; one that does not fit is written to `spill_dir` (RUN_DIR/cache/vectors during a
tune) and read back memory-mapped. Without a `spill_dir` it is recomputed when next needed. The base tensors,
as float32, are kept under the same budget (never spilled: they are a cheap read of the base checkpoint).
A trial that only changes λ is then one pass of additions (`dots_merge.core.combine`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dots_merge.core import TopK, norm_ratio, sparse_task_vector
from dots_merge.fileio import disk_full_is_an_error

CACHE_VERSION = 1  # in the names of spilled files
VectorKey = tuple[str, str, int]  # (model, tensor, k); k = -1 for the base tensor itself
_Key = tuple[str, str, int, str, bool]  # a VectorKey + the dtype the inputs were loaded in + whether norms were taken


class VectorStore:
    """S(τ) and its per-tensor norm ratio by (model, tensor, k), within a memory budget."""

    def __init__(self, device: torch.device, *, budget: int | None = None, spill_dir: Path | None = None):
        self.device = device
        self.budget = default_budget(device) if budget is None else budget
        self.spill_dir = spill_dir
        self._kept: OrderedDict[_Key, tuple[torch.Tensor, float]] = OrderedDict()
        self._bytes = 0
        self._in_use: set[_Key] = set()  # what the current trial uses: never evicted during it
        self._spilled: dict[_Key, tuple[Path, float]] = {}
        if spill_dir is not None:  # vectors spilled by an earlier session may be stale
            shutil.rmtree(spill_dir, ignore_errors=True)

    def begin_trial(self) -> None:
        """Every vector may be evicted again, except those the new trial asks for."""
        self._in_use = set()

    def base(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The base tensor as flat float32 on the device, kept while the budget allows."""
        key = ("", name, -1, str(base.dtype), False)
        if key in self._kept:
            self._in_use.add(key)
            return self._kept[key][0]
        return self._keep(key, (base.reshape(-1).to(device=self.device, dtype=torch.float32), 1.0))[0]

    def vector(
        self,
        key: VectorKey,
        base: torch.Tensor,
        load_tuned: Callable[[], torch.Tensor],
        density: float,
        *,
        selection: TopK | None,
        check_finite: bool,
        norms: bool,
    ) -> tuple[torch.Tensor, float]:
        """S(τ) (flat float32) and ‖τ‖/‖S(τ)‖ of this tensor (1.0 unless `norms`), computed on first use.

        Kept by `key`, the dtype of `base` (inputs loaded in another dtype give other numbers) and `norms`."""
        key = (*key, str(base.dtype), norms)
        if key in self._kept:
            self._in_use.add(key)
            self._kept.move_to_end(key)
            return self._kept[key]
        if key in self._spilled:
            path, factor = self._spilled[key]
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor("values").to(self.device), factor  # memory-mapped on the CPU
        sparse = sparse_task_vector(
            base, load_tuned().to(self.device), density, selection=selection, check_finite=check_finite, norms=norms
        )
        ratio = norm_ratio(sparse.squared_norm, sparse.squared_norm_kept) if norms else 1.0
        return self._keep(key, (sparse.values, ratio))

    @property
    def spilled(self) -> list[Path]:
        """The files of the vectors written to disk."""
        return [path for path, _ in self._spilled.values()]

    def close(self) -> None:
        """Drop every kept vector and delete the spill folder."""
        self._kept.clear()
        self._spilled.clear()
        self._bytes = 0
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)

    def _keep(self, key: _Key, value: tuple[torch.Tensor, float]) -> tuple[torch.Tensor, float]:
        """Keep `value` if it fits the budget, evicting what this trial does not use; return it either way."""
        self._in_use.add(key)
        size = value[0].numel() * value[0].element_size()
        while self._bytes + size > self.budget:
            stale = next((k for k in self._kept if k not in self._in_use), None)
            if stale is None:
                self._spill(key, value)
                return value
            evicted = self._kept.pop(stale)[0]
            self._bytes -= evicted.numel() * evicted.element_size()
        self._kept[key] = value
        self._bytes += size
        return value

    def _spill(self, key: _Key, value: tuple[torch.Tensor, float]) -> None:
        """Write a task vector that does not fit in memory to `spill_dir` (base tensors are not spilled)."""
        if self.spill_dir is None or key[2] < 0:
            return
        name = hashlib.sha256(repr((CACHE_VERSION, key)).encode()).hexdigest()[:24]
        path = self.spill_dir / f"{name}.safetensors"
        partial = path.with_suffix(".partial")
        with disk_full_is_an_error(self.spill_dir, "spilling task vectors that do not fit in memory"):
            try:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                save_file({"values": value[0].detach().to("cpu").contiguous()}, str(partial))
                os.replace(partial, path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        self._spilled[key] = (path, value[1])


def default_budget(device: torch.device) -> int:
    """30% of the free memory of a GPU; half the machine's available RAM for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024 // 2
    except (OSError, KeyError, ValueError):
        return 2 << 30
