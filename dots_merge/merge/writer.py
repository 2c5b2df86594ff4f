"""A safetensors shard writer that streams: each tensor goes to disk the moment it is given.

mergekit's writer keeps tensors in RAM until a shard is full (up to 5 GB by default). Here each shard
file reserves room for its header up front — enough for every tensor name the merge can produce — and
the JSON header is written into that room, padded with spaces as the safetensors format allows, when the
shard is closed. Shards get their final `model-0000i-of-0000N` names once the count is known.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_ENTRY_ROOM = 160  # bytes per header entry beyond the quoted name: dtype, 4-D shape, two offsets
_METADATA = {"format": "pt"}


def parse_size(text: str | int) -> int:
    """`400MB`, `5GB`, `2GiB`, `5B` (mergekit's billions), or a plain byte count."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
             "K": 1000, "M": 1000**2, "G": 1000**3, "B": 1000**3}  # fmt: skip
    for unit, factor in units.items():
        if s.endswith(unit) and s[: -len(unit)].replace(".", "", 1).isdigit():
            return int(float(s[: -len(unit)]) * factor)
    if s.isdigit():
        return int(s)
    raise ValueError(f"not a size: {text!r} (use e.g. 400MB, 5GB, 2GiB)")


class StreamingShardWriter:
    """Write tensors into safetensors shards of at most `max_shard_size` bytes, one tensor at a time."""

    def __init__(self, out_dir: Path, names: Iterable[str], max_shard_size: int):
        self.out_dir = Path(out_dir)
        self.max_shard_size = max_shard_size
        room = len(json.dumps({"__metadata__": _METADATA}))
        room += sum(len(json.dumps(n)) + _ENTRY_ROOM for n in names)
        self._header_room = (room + 7) // 8 * 8
        self._shards: list[tuple[Path, dict[str, dict]]] = []
        self._file = None
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor (already in its output dtype) to the current shard."""
        if name in self._written:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        if self._file is not None and self._offset > 0 and self._offset + nbytes > self.max_shard_size:
            self._close_shard()
        if self._file is None:
            self._open_shard()
        if nbytes:
            self._file.write(data.view(torch.uint8).numpy().data)
        self._entries[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes
        self._written.add(name)

    def _open_shard(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.partial"
        self._file = open(path, "wb")  # noqa: SIM115 (closed in _close_shard or abort)
        self._file.seek(8 + self._header_room)
        self._entries = {}
        self._offset = 0
        self._shards.append((path, self._entries))

    def _close_shard(self) -> None:
        header = json.dumps({"__metadata__": _METADATA, **self._entries}, separators=(",", ":")).encode()
        if len(header) > self._header_room:
            raise RuntimeError("safetensors header larger than the room reserved for it")
        self._file.seek(0)
        self._file.write(struct.pack("<Q", self._header_room))
        self._file.write(header + b" " * (self._header_room - len(header)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def finish(self) -> list[Path]:
        """Close the last shard, give the shards their final names, write the index when sharded."""
        if self._file is not None:
            self._close_shard()
        if not self._shards:
            self._open_shard()
            self._close_shard()
        count = len(self._shards)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        total = 0
        for i, (path, entries) in enumerate(self._shards, start=1):
            name = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            target = self.out_dir / name
            os.replace(path, target)
            final.append(target)
            for tensor_name, entry in entries.items():
                weight_map[tensor_name] = name
                total += entry["data_offsets"][1] - entry["data_offsets"][0]
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return final

    def abort(self) -> None:
        """Close any open file (the caller removes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None
