"""Safetensors shards read one tensor at a time, with plain reads (no mmap), so a tensor's bytes are
resident only while it is used; a shard that vanished or was cut short midway is one clear error."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from phi_edge.runtimes.errors import PhiEdgeError

DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class ShardError(PhiEdgeError):
    """A weight shard is missing or truncated while the export reads it."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offset of the first byte in the file
    nbytes: int


def list_tensors(files: list[Path]) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint's shards, from their headers alone."""
    entries: dict[str, TensorEntry] = {}
    for f in files:
        for e in _header(f):
            entries[e.name] = e
    return entries


def _header(f: Path) -> list[TensorEntry]:
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except FileNotFoundError:
        raise _missing(f) from None
    except (struct.error, ValueError) as e:
        raise ShardError(f"weight shard {f.name} has no valid safetensors header ({e}); it is truncated or "
                         f"corrupted: re-download it") from None
    out = []
    for name, v in header.items():
        if name == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out.append(TensorEntry(name, f, v["dtype"], tuple(v["shape"]), 8 + n + a, b - a))
    return out


def read_tensor(entry: TensorEntry):
    """The tensor's bytes as a torch tensor (a fresh buffer, nothing mapped)."""
    import torch

    if entry.dtype not in DTYPES:
        raise ShardError(f"tensor {entry.name} in {entry.shard.name} has dtype {entry.dtype}, which the streamed "
                         f"int4 export does not read; convert the checkpoint to bf16/fp16/fp32")
    buf = bytearray(entry.nbytes)
    try:
        with open(entry.shard, "rb") as fh:
            fh.seek(entry.start)
            got = fh.readinto(buf)
    except FileNotFoundError:
        raise _missing(entry.shard) from None
    if got != entry.nbytes:
        raise ShardError(f"weight shard {entry.shard.name} ended after {entry.start + got} bytes while reading "
                         f"{entry.name} (needs {entry.start + entry.nbytes}): it was truncated during the export; "
                         f"re-download it and export again")
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=getattr(torch, DTYPES[entry.dtype]))
    return torch.frombuffer(buf, dtype=getattr(torch, DTYPES[entry.dtype])).reshape(entry.shape)


def _missing(f: Path) -> ShardError:
    return ShardError(f"weight shard {f.name} disappeared from '{f.parent}' during the export; "
                      f"restore it (re-download the checkpoint) and export again")
