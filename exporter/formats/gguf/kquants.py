"""llama.cpp's K-quants (Q4_K, Q5_K, Q6_K) in numpy: the inverse of ``gguf.quants``' dequantizers.

With an importance matrix (per-column mean squared activations, :mod:`.imatrix`) each sub-block's
scale search minimizes the error weighted by ``importance * sqrt(sigma2 + x^2)`` per weight, as
llama.cpp's ``quantize_row_q*_K_impl`` do with ``quant_weights``; without one, the plain squared error.
"""

from __future__ import annotations

import numpy as np

QK_K = 256  # weights per super-block
TYPES = ("Q4_K", "Q5_K", "Q6_K")
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
CHUNK = 2048  # super-blocks quantized at a time (bounds the temporary arrays to a few MiB)
# the candidate grid: each sub-block tries steps of range / (levels - 1 + delta) and keeps the one whose
# least-squares refit has the smallest squared error (delta 0 is plain round-to-nearest on min/max)
GRID = np.linspace(-1.0, 1.0, 21, dtype=np.float32)


def quantize(array: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """``array``'s bytes as GGUF ``qtype``: shape ``(*rows, width // 256 * block bytes)``, uint8, as
    ``gguf.quants.quantize`` returns. Refuses a row width that is not a multiple of 256.
    ``importance``: one non-negative weight per column (an importance matrix row), or None."""
    if qtype not in TYPES:
        raise ValueError(f"{qtype} is not a K-quant this module writes ({', '.join(TYPES)})")
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 0 or array.shape[-1] % QK_K:
        raise ValueError(f"{qtype} needs rows whose width is a multiple of {QK_K}, not {array.shape[-1:]}")
    blocks = array.reshape(-1, QK_K)
    encode = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}[qtype]
    per_row = array.shape[-1] // QK_K
    if importance is not None:
        importance = np.asarray(importance, dtype=np.float32).reshape(-1)
        if importance.shape != (array.shape[-1],):
            raise ValueError(f"importance has {importance.size} entries for rows of width {array.shape[-1]}")
        importance = floor_importance(importance).reshape(per_row, QK_K)

    def chunk(i: int) -> np.ndarray:
        b = blocks[i:i + CHUNK]
        imp = None if importance is None else importance[np.arange(i, i + len(b)) % per_row]
        return encode(b, imp)

    out = np.concatenate([chunk(i) for i in range(0, len(blocks), CHUNK)] or
                         [np.zeros((0, BLOCK_BYTES[qtype]), np.uint8)])
    return out.reshape(*array.shape[:-1], array.shape[-1] // QK_K * BLOCK_BYTES[qtype])


def floor_importance(importance: np.ndarray) -> np.ndarray:
    """Columns the calibration text never activated keep a small weight (1e-4 of the mean), so a
    sub-block of them is still fitted to its own weights rather than collapsed."""
    mean = float(importance.mean()) if importance.size else 0.0
    if not np.isfinite(mean) or mean <= 0:
        return np.ones_like(importance)
    return np.maximum(importance, 1e-4 * mean)


def _dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise sum of ``u * v`` as a float64 column (the candidates' errors are compared in float64)."""
    return np.einsum("ij,ij->i", u, v)[:, None].astype(np.float64)


def fit_min_scale(x: np.ndarray, levels: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row of 2-D ``x``: (scale >= 0, offset >= 0) with x ~ scale * q - offset, q in 0..levels-1,
    chosen over :data:`GRID` by a (``w``-weighted) least-squares refit of both for each candidate
    rounding; each candidate's error comes from the weighted sums, without another pass over ``x``."""
    nmax = levels - 1
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = None if w is None else np.ascontiguousarray(w, dtype=np.float32)
    ones = np.ones_like(x) if w is None else w
    wx = x if w is None else w * x
    n = ones.sum(-1, keepdims=True, dtype=np.float64)
    lo = np.minimum(x.min(-1, keepdims=True), 0.0)  # the offset is subtracted, so the range includes 0
    rng = x.max(-1, keepdims=True) - lo
    shifted = x - lo
    sx, sxx = _dot(ones, x), _dot(wx, x)
    best = np.full(n.shape, np.inf)
    best_a, best_b = (rng / nmax).astype(np.float64), lo.astype(np.float64)
    q = np.empty_like(x)
    wq = np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        for delta in GRID:
            inv = np.where(rng > 0, (nmax + delta) / rng, 0.0).astype(np.float32)
            np.multiply(shifted, inv, out=q)
            np.rint(q, out=q)
            np.minimum(q, nmax, out=q)
            if w is None:
                sq, sqq, sxq = q.sum(-1, keepdims=True, dtype=np.float64), _dot(q, q), _dot(x, q)
            else:
                np.multiply(w, q, out=wq)
                sq, sqq, sxq = wq.sum(-1, keepdims=True, dtype=np.float64), _dot(wq, q), _dot(wq, x)
            det = n * sqq - sq * sq
            a = np.where(det > 0, (n * sxq - sq * sx) / det, 0.0)
            b = np.where(det > 0, (sx - a * sq) / np.where(n > 0, n, 1.0), 0.0)
            # an offset above zero is not representable: refit the scale alone with no offset
            alone = (b > 0) | (det <= 0)
            a = np.where(alone, np.where(sqq > 0, sxq / sqq, 0.0), a)
            b = np.where(alone, np.where(sqq > 0, 0.0, lo), b)
            a = np.maximum(a, 0.0)
            err = a * a * sqq + 2 * a * b * sq + n * b * b - 2 * a * sxq - 2 * b * sx + sxx
            take = err < best
            best, best_a, best_b = np.where(take, err, best), np.where(take, a, best_a), np.where(take, b, best_b)
    return best_a[..., 0].astype(np.float32), -best_b[..., 0].astype(np.float32)


def fit_scale(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> np.ndarray:
    """Per row of 2-D ``x``: a signed scale with x ~ scale * q, q in -nmax..nmax-1 (the largest magnitude
    maps to -nmax), chosen over :data:`GRID` by a (``w``-weighted) least-squares refit for each rounding
    (error sum(w x^2) - sum(w x q)^2 / sum(w q^2), from the sums)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    w = None if w is None else np.ascontiguousarray(w, dtype=np.float32)
    wx = x if w is None else w * x
    idx = np.abs(x).argmax(-1)[..., None]
    peak = np.take_along_axis(x, idx, -1)
    best = np.full(peak.shape, -np.inf)  # the largest sum(w x q)^2 / sum(w q^2) is the smallest error
    best_s = (-peak / nmax).astype(np.float64)
    q = np.empty_like(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        for delta in GRID:
            inv = np.where(peak != 0, -(nmax + delta) / peak, 0.0).astype(np.float32)
            np.multiply(x, inv, out=q)
            np.rint(q, out=q)
            np.clip(q, -nmax, nmax - 1, out=q)
            sqq = _dot(q, q) if w is None else _dot(w * q, q)
            sxq = _dot(wx, q)
            gain = np.where(sqq > 0, sxq * sxq / sqq, -np.inf)
            take = gain > best
            best, best_s = np.where(take, gain, best), np.where(take, np.where(sqq > 0, sxq / sqq, 0.0), best_s)
    return best_s[..., 0].astype(np.float32)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _six_bit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f16 super-scale, 6-bit codes) for non-negative per-sub-block values: codes * scale ~ values."""
    d = _f16(values.max(-1) / 63)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(df > 0, np.clip(np.rint(values / df), 0, 63), 0).astype(np.uint8)
    return d, codes


def _weights(blocks: np.ndarray, importance: np.ndarray | None, spread: float) -> np.ndarray | None:
    """llama.cpp's per-weight importance in a super-block: importance * sqrt(sigma2 + x^2) with
    sigma2 = spread * the super-block's mean square (2 for Q4_K / Q5_K, 1 for Q6_K)."""
    if importance is None:
        return None
    sigma2 = spread * (blocks * blocks).mean(-1, keepdims=True)
    return importance * np.sqrt(sigma2 + blocks * blocks)


def _min_scale_blocks(blocks: np.ndarray, levels: int, importance: np.ndarray | None = None):
    """Shared by Q4_K and Q5_K: 8 sub-blocks of 32 with a 6-bit scale and min each.
    Returns (d, dmin, 12 packed scale bytes, q in 0..levels-1 of shape (n, 8, 32))."""
    n = len(blocks)
    x = blocks.reshape(n, 8, 32)
    w = _weights(blocks, importance, 2.0)
    scale, offset = fit_min_scale(x.reshape(-1, 32), levels, None if w is None else w.reshape(-1, 32))
    d, sc = _six_bit(scale.reshape(n, 8))
    dmin, mn = _six_bit(offset.reshape(n, 8))
    step = (d.astype(np.float32)[:, None] * sc)[..., None]
    off = (dmin.astype(np.float32)[:, None] * mn)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(step > 0, np.clip(np.rint((x + off) / step), 0, levels - 1), 0).astype(np.uint8)
    # scales and mins: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks
    # 4-7 keep their low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in
    # the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)
    packed = np.empty((n, 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return d, dmin, packed, q


def _nibbles(q: np.ndarray) -> np.ndarray:
    """128 bytes per super-block: byte j of 32-byte chunk c holds sub-block 2c (low nibble) and 2c+1 (high)."""
    low = q & 0x0F
    return (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(len(q), 128)


def _q4_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q4_K, 144 bytes: d (f16), dmin (f16), 12 bytes of scales/mins, 128 bytes of 4-bit q;
    w = d * scale_j * q - dmin * min_j."""
    d, dmin, packed, q = _min_scale_blocks(blocks, 16, importance)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed,
                           _nibbles(q)], axis=1)


def _q5_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q5_K, 176 bytes: as Q4_K with 32 bytes of fifth bits before the nibbles (bit j of byte l:
    element l of sub-block j)."""
    d, dmin, packed, q = _min_scale_blocks(blocks, 32, importance)
    high = ((q >> 4) & 1) << np.arange(8, dtype=np.uint8)[None, :, None]
    qh = np.bitwise_or.reduce(high, axis=1)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, qh,
                           _nibbles(q)], axis=1)


def _q6_k(blocks: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """Q6_K, 210 bytes: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 scales, d (f16);
    16 sub-blocks of 16, w = d * scale_j * (q - 32) with q in 0..63."""
    n = len(blocks)
    x = blocks.reshape(n, 16, 16)
    w = _weights(blocks, importance, 1.0)
    scale = fit_scale(x.reshape(-1, 16), 32, None if w is None else w.reshape(-1, 16)).reshape(n, 16)
    idx = np.abs(scale).argmax(-1)[:, None]
    peak = np.take_along_axis(scale, idx, -1)
    d = _f16(-peak[:, 0] / 128)
    df = d.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(df != 0, np.clip(np.rint(scale / df), -128, 127), 0).astype(np.int8)
        step = (df * sc)[..., None]
        q = np.where(step != 0, np.clip(np.rint(x / step), -32, 31), 0)
    q = (q + 32).astype(np.uint8).reshape(n, 256)
    # element 128h + 64s + p: nibble s of ql[64h + p]; element 128h + 32s + p: bits 2s..2s+1 of qh[32h + p]
    halves = q.reshape(n, 2, 2, 64)
    ql = ((halves[:, :, 0] & 0x0F) | ((halves[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    quarters = (q.reshape(n, 2, 4, 32) >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    qh = np.bitwise_or.reduce(quarters, axis=2).reshape(n, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
