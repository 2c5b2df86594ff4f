"""Model folders on disk: find their weight files, read safetensors headers, check they fit together.

Everything here reads headers and config.json only, never tensor data, so the checks cost milliseconds
even for a 70B model, and every problem is found before any output is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dots_merge.errors import ModelInputError

LOG = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it."""

    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """A model folder: its config, its weight files and (for safetensors) its tensor table."""

    reference: str
    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    tensors: dict[str, TensorInfo] | None  # None for pickle checkpoints

    @property
    def has_tokenizer(self) -> bool:
        """Whether the folder holds a tokenizer."""
        return any((self.path / f).is_file() for f in TOKENIZER_FILES)

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return str(archs[0])

    def fingerprint(self) -> list[tuple[str, int, int]]:
        """(file, size, mtime in ns) of each weight file: changes whenever the weights do."""
        out = []
        for f in self.weight_files:
            st = f.stat()
            out.append((str(f.resolve()), st.st_size, st.st_mtime_ns))
        return out

    def content_digest(self, samples: int = 16, chunk: int = 4096) -> str:
        """A digest of the weights that does not depend on where they are: each file's name, size, header and
        `samples` evenly spaced `chunk`-byte slices of its data. Reads about 64 KiB a file, so machines that
        hold the same checkpoint under different paths agree on it in milliseconds; computed again only when
        a file's size or mtime changed."""
        import hashlib

        stamp = (self.fingerprint(), samples, chunk)
        cached = self.__dict__.get("_digest")
        if cached is not None and cached[0] == stamp:
            return cached[1]

        digest = hashlib.sha256()
        for f in sorted(self.weight_files, key=lambda p: p.name):
            size = f.stat().st_size
            digest.update(f"{f.name}\0{size}\0".encode())
            with open(f, "rb") as fh:
                head = fh.read(8)
                header_len = struct.unpack("<Q", head)[0] if f.suffix == ".safetensors" and len(head) == 8 else 0
                digest.update(head + fh.read(min(header_len, _MAX_HEADER)))
                start = fh.tell()
                span = max(0, size - start - chunk)
                for i in range(samples):
                    fh.seek(start + span * i // max(1, samples - 1))
                    digest.update(fh.read(chunk))
        self.__dict__["_digest"] = (stamp, digest.hexdigest())
        return digest.hexdigest()

    def dominant_dtype(self) -> str | None:
        """The torch dtype name most of the floating-point parameters are stored in."""
        if not self.tensors:
            return None
        counts = Counter()
        for info in self.tensors.values():
            if info.dtype in FLOAT_DTYPES:
                counts[info.dtype] += info.numel
        if not counts:
            return None
        return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(
            counts.most_common(1)[0][0]
        )


def looks_like_hub_id(path: str) -> bool:
    """`org/name` that is not a local path: the only form that may cause a download."""
    return bool(_HUB_ID.match(path)) and not os.path.exists(path)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header against the file size (detects truncation and corruption)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelInputError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelInputError(
                    f"{path}: corrupt or truncated safetensors file (header length {n}, file {size} bytes)"
                )
            raw = f.read(n)
    except OSError as error:
        raise ModelInputError(f"{path}: cannot read: {error.strerror}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelInputError(f"{path}: corrupt safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ModelInputError(f"{path}: corrupt safetensors file (header is not a mapping)")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = (
                entry["dtype"],
                tuple(int(d) for d in entry["shape"]),
                entry["data_offsets"],
            )
            itemsize = SAFETENSORS_DTYPES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ModelInputError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if stop - start != math.prod(shape) * itemsize or start < 0:
            raise ModelInputError(f"{path}: corrupt safetensors file: tensor {name!r} has inconsistent offsets")
        if stop > data_size:
            raise ModelInputError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {stop} of {data_size}"
            )
        end = max(end, stop)
        tensors[name] = TensorInfo(dtype, shape, path)
    if end != data_size:
        raise ModelInputError(f"{path}: corrupt safetensors file: {data_size - end} unexpected trailing bytes")
    return tensors


def _weight_files(folder: Path, reference: str, allow_pickle: bool) -> tuple[list[Path], bool]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ModelInputError(f"{index}: corrupt index (no weight_map)") from None
        files = sorted({folder / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise ModelInputError(f"{index}: shard {f.name} is listed but missing")
        return files, False
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], False
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        if not allow_pickle:
            raise ModelInputError(
                f"{folder}: only pickle checkpoints ({pickles[0].name}); loading pickle can run arbitrary code. "
                "Convert the model to safetensors, or pass --allow-pickle if you trust it"
            )
        return pickles, True
    raise ModelInputError(f"model {reference}: no model.safetensors or model.safetensors.index.json in {folder}")


def resolve_local_path(reference: str, revision: str | None = None) -> Path:
    """The folder of a model: a local path as is, an `org/name` Hub id from the Hub cache (downloading)."""
    if os.path.exists(reference):
        folder = Path(reference)
        if not folder.is_dir():
            raise ModelInputError(f"model {reference}: not a folder (give the folder that holds config.json)")
        return folder
    if not looks_like_hub_id(reference):
        raise ModelInputError(f"model {reference}: path does not exist")
    try:
        import huggingface_hub

        return Path(
            huggingface_hub.snapshot_download(
                reference,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "README.md"],
            )
        )
    except Exception as error:  # network, auth, not found: all user-fixable
        raise ModelInputError(
            f"model {reference}: not a local folder, and fetching it from the Hub failed: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        ) from None


def open_checkpoint(reference: str, *, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Locate a model and read its config and tensor table; raise `ModelInputError` on any defect."""
    folder = resolve_local_path(reference, revision)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelInputError(f"model {reference}: no config.json in {folder}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ModelInputError(f"{config_path}: not valid JSON") from None
    files, is_pickle = _weight_files(folder, reference, allow_pickle)
    tensors = None
    if not is_pickle:
        tensors = {}
        for f in files:
            tensors.update(read_safetensors_header(f))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            for name, shard in json.loads(index.read_text())["weight_map"].items():
                if name not in tensors or tensors[name].file.name != shard:
                    raise ModelInputError(f"{index}: tensor {name!r} is not in shard {shard}")
    return Checkpoint(reference, folder, config, files, tensors)


def check_compatible(
    base: Checkpoint, others: list[Checkpoint], *, same_tensors: bool, vocab_may_differ: bool = False
) -> None:
    """Same architecture, same tensor shapes and (when `same_tensors`) no tensor missing from a fine-tune."""
    for other in others:
        if other.architecture != base.architecture or other.config.get("model_type") != base.config.get("model_type"):
            raise ModelInputError(
                f"models have different architectures: {base.reference} is {base.architecture}, "
                f"{other.reference} is {other.architecture}"
            )
        if base.tensors is None or other.tensors is None:
            continue
        for name, info in base.tensors.items():
            theirs = other.tensors.get(name)
            if theirs is None:
                if same_tensors:
                    raise ModelInputError(f"tensor {name!r} is in {base.reference} but missing from {other.reference}")
                continue
            if theirs.shape != info.shape and not (vocab_may_differ and theirs.shape[1:] == info.shape[1:]):
                raise ModelInputError(
                    f"tensor {name!r} has shape {list(theirs.shape)} in {other.reference} "
                    f"but {list(info.shape)} in {base.reference}"
                )
        extra = sorted(set(other.tensors) - set(base.tensors))
        if extra and same_tensors:
            LOG.warning("%s has %d tensor(s) the base lacks, ignored: %s", other.reference, len(extra), extra[0])
