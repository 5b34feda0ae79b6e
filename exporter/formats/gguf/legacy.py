"""llama.cpp's Q4_0, Q5_0 and Q5_1 with an importance matrix, in numpy (``gguf`` quantizes them plainly).

Blocks of 32 weights along a row, each with an f16 scale (and, for Q5_1, an f16 minimum); the scale
search minimizes the squared error weighted by ``importance * sqrt(sigma2 + x^2)`` with sigma2 the
row's mean square, as llama.cpp's ``quantize_row_q4_0_impl`` / ``q5_0`` / ``q5_1`` do with
``quant_weights``. Without an importance matrix the exporter uses ``gguf``'s own quantizer.
"""

from __future__ import annotations

import numpy as np

from .kquants import fit_min_scale, fit_scale, floor_importance

QK = 32
TYPES = ("Q4_0", "Q5_0", "Q5_1")
CHUNK = 1 << 16  # blocks at a time


def quantize(array: np.ndarray, qtype: str, importance: np.ndarray) -> np.ndarray:
    """``array``'s bytes as GGUF ``qtype``, shape ``(*rows, width // 32 * block bytes)``, uint8."""
    if qtype not in TYPES:
        raise ValueError(f"{qtype} is not a type this module writes ({', '.join(TYPES)})")
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 0 or array.shape[-1] % QK:
        raise ValueError(f"{qtype} needs rows whose width is a multiple of {QK}, not {array.shape[-1:]}")
    width = array.shape[-1]
    importance = floor_importance(np.asarray(importance, dtype=np.float32).reshape(-1))
    if importance.shape != (width,):
        raise ValueError(f"importance has {importance.size} entries for rows of width {width}")
    rows = array.reshape(-1, width)
    sigma2 = (rows * rows).mean(-1, keepdims=True)
    weights = importance[None, :] * np.sqrt(sigma2 + rows * rows)
    x, w = rows.reshape(-1, QK), weights.reshape(-1, QK)
    encode = {"Q4_0": _q4_0, "Q5_0": _q5_0, "Q5_1": _q5_1}[qtype]
    out = np.concatenate([encode(x[i:i + CHUNK], w[i:i + CHUNK]) for i in range(0, len(x), CHUNK)])
    return out.reshape(*array.shape[:-1], -1)


def _symmetric(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(f16 scale, q in 0..2*nmax-1) with x ~ scale * (q - nmax)."""
    d = fit_scale(x, nmax, w).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(df != 0, np.clip(np.rint(x / df), -nmax, nmax - 1), 0)
    return d, (q + nmax).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """16 bytes per block: byte j holds element j (low nibble) and element j + 16 (high)."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """The fifth bit of each element as a little-endian uint32 (bit j: element j), as 4 bytes."""
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(QK, dtype=np.uint32)
    return np.bitwise_or.reduce(bits, axis=1).astype("<u4").view(np.uint8).reshape(-1, 4)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _q4_0(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Q4_0, 18 bytes: d (f16), 16 bytes of nibbles; w = d * (q - 8)."""
    d, q = _symmetric(x, w, 8)
    return np.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)


def _q5_0(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Q5_0, 22 bytes: d (f16), fifth bits (uint32), 16 bytes of nibbles; w = d * (q - 16)."""
    d, q = _symmetric(x, w, 16)
    return np.concatenate([_f16_bytes(d), _high_bits(q), _nibbles(q)], axis=1)


def _q5_1(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Q5_1, 24 bytes: d (f16), m (f16), fifth bits, nibbles; w = d * q + m, q in 0..31."""
    scale, offset = fit_min_scale(x, 32, w)
    d, m = scale.astype(np.float16), (-offset).astype(np.float16)
    df, mf = d.astype(np.float32)[:, None], m.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(df > 0, np.clip(np.rint((x - mf) / df), 0, 31), 0).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _high_bits(q), _nibbles(q)], axis=1)
