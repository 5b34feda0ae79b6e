"""Round-to-nearest block quantization, bit for bit what ONNX Runtime's RTN quantizer writes for MatMulNBits.

The onnxruntime-genai builder quantizes with ``onnxruntime.quantization``'s RTN (``quant_tensor`` with
``dtype="uint"``): per block of ``block`` input values of one output row, symmetric ``scale = 2 * max|w| /
(2^bits - 1)`` around zero point ``2^(bits-1)``, or asymmetric ``scale = (max - min) / (2^bits - 1)`` with a
rounded zero point; arithmetic in float64 on the weights in the model's io type, scales stored in that type.
Here the same arithmetic runs on torch, a slice of rows at a time, and returns ORT's packed layout
(4-bit: two values per byte, low nibble first), which the builder's ``olive`` loader takes as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

CHUNK_ELEMENTS = 1 << 21  # rows quantized together: 16 MB of float64 scratch


@dataclass
class Quantized:
    qweight: "torch.Tensor"  # uint8 (out, in * bits / 8)
    scales: "torch.Tensor"  # io dtype (out, in / block)
    zeros: "torch.Tensor | None"  # uint8 (out, ceil(blocks * bits / 8)), asymmetric only


def quantize(weight, bits: int, block: int, symmetric: bool, io_dtype) -> Quantized:
    """``weight``: (out, in) as stored in a Hugging Face checkpoint; ``in`` a multiple of ``block``."""
    import torch

    out_features, in_features = weight.shape
    if in_features % block:
        raise ValueError(f"input size {in_features} is not a multiple of the block size {block}")
    blocks = in_features // block
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # slices this small run fastest on one thread (and far faster on a busy machine)
    try:
        return _quantize(weight, bits, block, symmetric, io_dtype, blocks)
    finally:
        torch.set_num_threads(threads)


def _quantize(weight, bits: int, block: int, symmetric: bool, io_dtype, blocks: int) -> Quantized:
    import torch

    out_features, in_features = weight.shape
    rows = max(1, min(out_features, CHUNK_ELEMENTS // in_features))
    qweight = torch.empty((out_features, in_features * bits // 8), dtype=torch.uint8)
    scales = torch.empty((out_features, blocks), dtype=io_dtype)
    zeros = None if symmetric else torch.empty((out_features, blocks), dtype=torch.uint8)
    # scratch reused for every slice of rows: fresh buffers per slice cost more in page faults than the math
    work = torch.empty(rows * in_features, dtype=torch.float64)
    data = torch.empty(rows * in_features, dtype=io_dtype)
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        n = (stop - start) * in_features
        x = data[:n].view(-1, block)
        x.copy_(weight[start:stop].reshape(-1, block))
        q, s, z = _quantize_blocks(x, work[:n].view(-1, block), bits, symmetric)
        qweight[start:stop] = q.reshape(stop - start, -1)
        scales[start:stop] = s.to(io_dtype).reshape(stop - start, blocks)
        if zeros is not None:
            zeros[start:stop] = z.reshape(stop - start, blocks)
    if zeros is not None and bits == 4:
        zeros = _pack_zero_points(zeros)
    return Quantized(qweight=qweight, scales=scales, zeros=zeros)


def _quantize_blocks(data, work, bits: int, symmetric: bool):
    """One block per row of ``data`` (io dtype); ``work``: float64 scratch of the same shape."""
    import torch

    maxq = 2**bits - 1
    if symmetric:
        max_range = data.abs().amax(dim=1, keepdim=True)  # == max(|min|, |max|)
        scale = torch.where(max_range > 0, (max_range * 2.0).double() / maxq, torch.ones((), dtype=torch.float64))
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        rmin, rmax = data.amin(dim=1, keepdim=True), data.amax(dim=1, keepdim=True)
        scale = torch.where(rmin != rmax, (rmax - rmin).double() / maxq, torch.ones((), dtype=torch.float64))
        zero = ((0.0 - rmin.double()) / scale).round().clamp(0, maxq)
    torch.div(data, scale, out=work)  # float64, as ORT computes it
    work.add_(zero).round_()
    if symmetric:  # x / scale lies in [-half, half]: only the top can round past the range
        work.clamp_max_(maxq)
    else:
        work.clamp_(0, maxq)
    if bits == 4:  # two values per byte, low nibble first, packed while still float (exact)
        pairs = work.view(-1, 2)
        packed = torch.addcmul(pairs[:, 0], pairs[:, 1], torch.tensor(16.0, dtype=torch.float64))
        return packed.to(torch.uint8).view(data.shape[0], -1), scale, zero.to(torch.uint8)
    return work.to(torch.uint8), scale, zero.to(torch.uint8)


def _pack_zero_points(zeros):
    """ORT's 4-bit zero points: the (out, blocks) values in row order, two per byte (low nibble first);
    an odd count per row spills into the next row's byte, as ORT's packing does (its blocks are even here)."""
    import torch

    flat = zeros.reshape(-1)
    if flat.numel() % 2:
        flat = torch.cat([flat, torch.full((1,), 8, dtype=torch.uint8)])
    return (flat[::2] | (flat[1::2] << 4)).reshape(zeros.shape[0], -1)
