"""One tensor of a GGUF file, found by walking the header without building the metadata in Python.

``gguf.GGUFReader`` turns every metadata entry into numpy views (seconds for a 200k-token vocabulary);
``logits()`` needs one matrix, so this skips the metadata by its lengths, reads the tensor table, and
maps the tensor's bytes. Imports numpy only.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from .errors import PhiEdgeError

# GGUF metadata value types: fixed sizes; 8 is a string, 9 an array
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def read_tensors(path: str | Path, names: set[str]) -> dict[str, tuple[int, tuple[int, ...], np.ndarray]]:
    """{name: (ggml type id, shape outermost first, raw bytes as uint8)} of the named tensors present."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _walk(buf, names)
    except (struct.error, IndexError, ValueError) as e:
        raise PhiEdgeError(f"{path} is not a complete GGUF file ({e}); re-export or re-copy the artifact") from None


def _walk(buf, names: set[str]) -> dict:
    if buf[:4] != b"GGUF":
        raise ValueError("bad magic")
    _, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, alignment = 24, 32

    def string(p: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", buf, p)
        return bytes(buf[p + 8:p + 8 + n]).decode("utf-8", "replace"), p + 8 + n

    def skip(kind: int, p: int) -> int:
        if kind in _SIZES:
            return p + _SIZES[kind]
        if kind == _STRING:
            (n,) = struct.unpack_from("<Q", buf, p)
            return p + 8 + n
        if kind == _ARRAY:
            inner, count = struct.unpack_from("<IQ", buf, p)
            p += 12
            if inner in _SIZES:
                return p + _SIZES[inner] * count
            for _ in range(count):
                p = skip(inner, p)
            return p
        raise ValueError(f"unknown metadata type {kind}")

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment" and kind == 4:
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = skip(kind, pos + 4)
    infos = {}
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos[name] = (ggml_type, tuple(int(d) for d in reversed(dims)), offset)
    start = (pos + alignment - 1) // alignment * alignment
    out = {}
    for name in names & set(infos):
        ggml_type, shape, offset = infos[name]
        out[name] = (ggml_type, shape, np.frombuffer(buf, np.uint8, count=_nbytes(ggml_type, shape),
                                                      offset=start + offset))
    return out


def _nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    return int(np.prod(shape)) // block * size
