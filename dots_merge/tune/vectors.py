"""The sparse vector store of a tune: S(τ) of each (fine-tune, tensor) computed once, kept compact and exact.

Each entry is a `CompactVector` (`dots_merge.core.compact`): the positions kept at the largest density the search
can ask for that tensor (its ceiling) plus the fine-tune's values there, in the dtype they were loaded in, split in
two tiers of |τ| at the middle of the searched range (`tier_densities`). Any lower density is taken from it exactly
(same entries, same tie rule as the merge) by reading one tier, so a trial with a new density recomputes nothing
from the checkpoints and stores nothing new but a few numbers per tensor: the selection within the entry and
‖S_k(τ)‖².

Entries live in host memory while they fit in `budget` bytes, least recently used evicted first; an evicted
one is written to `spill_dir` (RUN_DIR/cache/vectors during a tune) while the spill stays within `spill_budget`
bytes, again least recently used first, and is read back memory-mapped. What fits nowhere is recomputed from
the checkpoints when next needed. Spilled files are named by the entry (and the weights' fingerprints), so a
resumed run reuses them; `close(remove=True)` deletes the spill.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dots_merge.core import (
    CompactVector,
    Tier,
    Within,
    compress,
    keep_count,
    select_within,
    sparse_chunks_of,
    tier_densities,
)
from dots_merge.faults import fault_point
from dots_merge.fileio import disk_full_is_an_error

CACHE_VERSION = 4  # in the names of spilled files; 2: compact vectors; 3: sparse histogram; 4: tiers, bin moments
EntryKey = tuple[str, str, str, bool, str]  # (model, tensor, loaded dtype, norms taken, tier densities as "0.35,0.6")


@dataclass
class StoredVector:
    """S_k(τ) of one tensor, ready to stream: its compact entry, the top-k within it, and the base it needs."""

    compact: CompactVector
    within: Within
    base: torch.Tensor
    kept_norm: float  # ‖S_k(τ)‖² (NaN when the entry was asked without norms)

    def chunks(self, device: torch.device):
        """(span, S_k(τ)[span]) in float32 over `chunk_spans`, bit for bit the merge's."""
        return sparse_chunks_of(self.compact, self.base, self.within, device)


class VectorStore:
    """Compact S(τ) entries by (model, tensor), within a host-memory budget and a disk budget."""

    def __init__(
        self,
        device: torch.device,
        *,
        budget: int | None = None,
        spill_dir: Path | None = None,
        spill_budget: int | None = None,
        salt: str = "",
    ):
        self.device = device
        self.budget = default_budget() if budget is None else budget
        self.spill_dir = spill_dir
        self.spill_budget = (1 << 62) if spill_budget is None else spill_budget
        self.salt = salt
        self._kept: OrderedDict[EntryKey, CompactVector] = OrderedDict()
        self._bytes = 0
        self._in_use: set[EntryKey] = set()  # what the current trial uses: never evicted during it
        self._spilled: OrderedDict[EntryKey, tuple[Path, int]] = OrderedDict()
        self._disk = 0
        self._within: dict[tuple[EntryKey, int], tuple[Within, float]] = {}  # by entry and k
        self.builds = 0  # entries computed from the checkpoints (a resumed run with its spill computes fewer)
        self.peak_bytes = 0  # the most host memory the entries took at once
        self.peak_disk = 0
        self._lock = threading.RLock()
        self._adopt_spill()

    def begin_trial(self) -> None:
        """Every entry may be evicted again, except those the new trial asks for."""
        self._in_use = set()

    def vector(
        self,
        model: str,
        tensor: str,
        base: torch.Tensor,
        load_tuned: Callable[[], torch.Tensor],
        density: float,
        *,
        ceiling: float,
        floor: float | None = None,
        check_finite: bool,
        norms: bool,
    ) -> StoredVector:
        """S(τ) of `tensor` at `density`, from an entry serving [`floor`, `ceiling`] (the run's range for it;
        `floor` None: only the ceiling and what lies below it, in one tier)."""
        n = base.numel()  # a density whose k would be below 1 keeps the tensor dense: it may need more than the ceiling
        if keep_count(ceiling, n) < keep_count(density, n):
            tiers: tuple[float, ...] = (float(density),)
        else:
            tiers = tier_densities(float(ceiling if floor is None else floor), float(ceiling), n)
        key: EntryKey = (model, tensor, str(base.dtype), norms, ",".join(repr(d) for d in tiers))
        with self._lock:  # entries are built and evicted one at a time; selections below may run in parallel
            compact = self._entry(key, tiers, base, load_tuned, check_finite=check_finite)
        k_key = (key, keep_count(density, base.numel()))
        if k_key not in self._within:
            self._within[k_key] = select_within(compact, base, density, self.device, norm=norms)
        within, kept_norm = self._within[k_key]
        return StoredVector(compact, within, base, kept_norm)

    @staticmethod
    def squared_norms(vector: StoredVector) -> tuple[float, float]:
        """(‖τ‖², ‖S_k(τ)‖²) of a stored vector (asked with `norms`), summed as the merge sums them."""
        return vector.compact.squared_norm, vector.kept_norm

    @property
    def spilled(self) -> list[Path]:
        """The files of the entries now on disk."""
        return [path for path, _ in self._spilled.values()]

    def close(self, *, remove: bool = True) -> None:
        """Drop every entry kept in memory; with `remove`, delete the spill folder too."""
        self._kept.clear()
        self._bytes = 0
        if remove and self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self._spilled.clear()
            self._disk = 0

    # -- entries ---------------------------------------------------------------------------------------------

    def _entry(self, key: EntryKey, tiers: tuple[float, ...], base, load_tuned, *, check_finite: bool) -> CompactVector:
        self._in_use.add(key)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        if key in self._spilled:
            self._spilled.move_to_end(key)
            return self._read(*self._spilled[key])
        fault_point("prepass")  # the tune's whole-model pass: the store is built on the first trial
        tuned = load_tuned().to(self.device)
        compact = compress(base.to(self.device), tuned, tiers, check_finite=check_finite, norms=key[3])
        self.builds += 1
        self._keep(key, compact)
        return compact

    def _keep(self, key: EntryKey, compact: CompactVector) -> None:
        """Keep `compact` in memory if it fits the budget, spilling what this trial does not use."""
        size = compact.nbytes
        while self._bytes + size > self.budget:
            stale = next((k for k in self._kept if k not in self._in_use), None)
            if stale is None:
                self._spill(key, compact)  # used by this trial from memory, then only from disk
                return
            evicted = self._kept.pop(stale)
            self._bytes -= evicted.nbytes
            self._spill(stale, evicted)
        self._kept[key] = compact
        self._bytes += size
        self.peak_bytes = max(self.peak_bytes, self._bytes)

    def _spill(self, key: EntryKey, compact: CompactVector) -> None:
        """Write an entry to `spill_dir` within the disk budget (least recently used files go first)."""
        if key in self._spilled or self.spill_dir is None:
            return
        size = compact.nbytes
        while self._disk + size > self.spill_budget:
            stale = next((k for k in self._spilled if k not in self._in_use), None)
            if stale is None:
                return  # no room on disk: recomputed when next needed
            path, stale_size = self._spilled.pop(stale)
            path.unlink(missing_ok=True)
            self._disk -= stale_size
        path = self.spill_dir / f"{self._name(key)}.safetensors"
        partial = path.with_suffix(".partial")
        tensors = {}
        for j, tier in enumerate(compact.tiers):
            tensors[f"values.{j}"] = tier.values.contiguous()
            if tier.mask is not None:
                tensors[f"mask.{j}"] = tier.mask
            if tier.moments is not None:
                tensors[f"moments.{j}"] = tier.moments
        tiers = [[t.kept, None if t.square_units is None else str(t.square_units)] for t in compact.tiers]
        meta = {"key": json.dumps(list(key)), "numel": str(compact.numel), "tiers": json.dumps(tiers),
                "squared_norm": repr(compact.squared_norm)}  # fmt: skip
        with disk_full_is_an_error(self.spill_dir, "spilling task vectors that do not fit in memory"):
            try:
                self.spill_dir.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(partial), metadata=meta)
                os.replace(partial, path)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
        self._spilled[key] = (path, path.stat().st_size)
        self._disk += self._spilled[key][1]
        self.peak_disk = max(self.peak_disk, self._disk)

    def _name(self, key: EntryKey) -> str:
        return hashlib.sha256(repr((CACHE_VERSION, self.salt, key)).encode()).hexdigest()[:24]

    @staticmethod
    def _read(path: Path, _size: int) -> CompactVector:
        """A spilled entry, memory-mapped."""
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            names = set(f.keys())
            tiers = []
            for j, (kept, units) in enumerate(json.loads(meta["tiers"])):
                mask = f.get_tensor(f"mask.{j}") if f"mask.{j}" in names else None
                moments = f.get_tensor(f"moments.{j}") if f"moments.{j}" in names else None
                tiers.append(Tier(kept, mask, f.get_tensor(f"values.{j}"), None if units is None else int(units),
                                  moments))  # fmt: skip
        return CompactVector(int(meta["numel"]), tiers, float(meta["squared_norm"]))

    def _adopt_spill(self) -> None:
        """Take over the entries a previous session of this run spilled (same weights: same names), oldest first;
        remove anything else found there (partial files, other weights, other versions)."""
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return
        found = []
        for path in self.spill_dir.iterdir():
            if path.is_dir():  # a tensor-parallel worker's own spill (tpR/), which that worker adopts
                continue
            key = None
            if path.suffix == ".safetensors":
                try:
                    with safe_open(str(path), framework="pt") as f:
                        key = tuple(json.loads(f.metadata()["key"]))
                except Exception:  # an unreadable file is only a cache miss
                    key = None
            if key is None or path.stem != self._name(key):
                path.unlink(missing_ok=True)
                continue
            found.append((path.stat().st_mtime, key, path))
        for _, key, path in sorted(found):
            self._spilled[key] = (path, path.stat().st_size)
            self._disk += path.stat().st_size
        self.peak_disk = self._disk


def default_budget() -> int:
    """Half the machine's available RAM (the compact vectors live in host memory)."""
    from dots_merge.tune.plan import host_available

    return host_available() // 2
