"""Data-aware int4 for the streamed ONNX export (``--awq`` / ``--gptq`` with ``--calibration-text``), one
decoder layer at a time.

The calibration text runs through the float model layer by layer: each layer is a transformers
``Phi3DecoderLayer`` built from that layer's tensors alone, its linear inputs are recorded, and its float
output feeds the next layer. So memory holds one layer and the calibration activations, never the model.

- AWQ: per input channel of the QKV and gate/up projections (scales folded into the RMSNorm before them)
  and of the down projection (folded into the up projection's rows), the scale ``mean|x|^a`` whose RTN
  int4 output error on the calibration activations is smallest over a grid of ``a`` (a = 0 is plain RTN).
- GPTQ: each projection is quantized column by column (block-32 symmetric, ORT's layout), the rounding error
  of every column spread over the columns not yet quantized through the inverse Hessian of its inputs.
The embeddings, the output projection of attention and the lm_head stay RTN.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

from . import rtn

AWQ_GRID = [i / 10 for i in range(11)]
AWQ_EVAL_TOKENS = 2048  # activation rows the AWQ search scores against
MAX_WINDOWS = 32  # calibration windows of 128 tokens (4096 tokens): enough for per-channel statistics
GPTQ_DAMP = 0.01
FUSED_INPUTS = {"self_attn.qkv_proj.weight": "input_layernorm.weight",
                "mlp.gate_up_proj.weight": "post_attention_layernorm.weight"}


class Calibrator:
    """Feed :meth:`layer` each decoder layer's float tensors in order; it returns them (AWQ-scaled) and the
    projections it quantized itself (GPTQ)."""

    def __init__(self, ckpt, text_file: str | Path, awq: bool, gptq: bool, block: int, io_dtype):
        import torch
        from transformers import AutoConfig

        from ...source_tokenizer import SourceTokenizer
        from ..openvino.calibration import MIN_TOKENS, read_text, token_windows
        from .shards import list_tensors, read_tensor

        self.awq, self.gptq, self.block, self.io_dtype = awq, gptq, block, io_dtype
        text = read_text(text_file)
        windows = token_windows(SourceTokenizer(ckpt.path).as_transformers(), text, max_samples=MAX_WINDOWS)
        if not windows:
            raise PhiEdgeError(f"--calibration-text file '{text_file}' holds fewer than {MIN_TOKENS} tokens; "
                               f"pass more text (a few paragraphs at least)")
        self.samples = len(windows)
        self.config = AutoConfig.from_pretrained(ckpt.path)
        self.config._attn_implementation = "sdpa"  # causal without a mask
        embed = read_tensor(list_tensors(ckpt.weight_files)["model.embed_tokens.weight"]).float()
        by_length: dict[int, list] = {}
        for w in windows:  # windows of one length run as one batch
            by_length.setdefault(len(w), []).append(w)
        self.hidden = [embed[torch.tensor(ws)] for ws in by_length.values()]
        del embed
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        rotary = Phi3RotaryEmbedding(self.config)
        self.rope = {}
        for h in self.hidden:
            n = h.shape[1]
            if n not in self.rope:
                pos = torch.arange(n).unsqueeze(0).expand(h.shape[0], -1)
                self.rope[n] = (pos, rotary(h, pos))

    def layer(self, index: int, tensors: dict[str, Any]) -> tuple[dict[str, Any], dict[str, rtn.Quantized]]:
        """``tensors``: this layer's float tensors by local name (``self_attn.qkv_proj.weight``...)."""
        import torch

        tensors = {k: v.float() for k, v in tensors.items()}
        inputs = self._record(index, tensors)  # also advances self.hidden through the float layer
        if self.awq:
            for name, norm in FUSED_INPUTS.items():
                s = _awq_scale(tensors[name], inputs[name], self.block)
                tensors[name] = tensors[name] * s
                tensors[norm] = tensors[norm] / s
                inputs[name] = _Scaled(inputs[name], s)
            s = _awq_scale(tensors["mlp.down_proj.weight"], inputs["mlp.down_proj.weight"], self.block)
            inter = tensors["mlp.down_proj.weight"].shape[1]
            tensors["mlp.down_proj.weight"] = tensors["mlp.down_proj.weight"] * s
            up = tensors["mlp.gate_up_proj.weight"]
            tensors["mlp.gate_up_proj.weight"] = torch.cat([up[:inter], up[inter:] / s[:, None]])
            inputs["mlp.down_proj.weight"] = _Scaled(inputs["mlp.down_proj.weight"], s)
        done: dict[str, rtn.Quantized] = {}
        if self.gptq:
            for name in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.gate_up_proj.weight",
                         "mlp.down_proj.weight"):
                done[name] = gptq_quantize(tensors[name], inputs[name].hessian(), self.block, self.io_dtype)
        return tensors, done

    def _record(self, index: int, tensors: dict[str, Any]) -> dict[str, "_Inputs"]:
        import torch
        from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer

        layer = Phi3DecoderLayer(self.config, index)
        layer.load_state_dict({k: v for k, v in tensors.items() if not k.endswith("inv_freq")}, strict=False)
        layer.eval()
        seen = {name: _Inputs(hessian=self.gptq) for name in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight",
                                             "mlp.gate_up_proj.weight", "mlp.down_proj.weight")}
        hooks = [layer.get_submodule(name[: -len(".weight")]).register_forward_pre_hook(
            lambda mod, args, name=name: seen[name].add(args[0])) for name in seen]
        with torch.no_grad():
            out = []
            for h in self.hidden:
                pos, emb = self.rope[h.shape[1]]
                r = layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb)
                out.append(r[0] if isinstance(r, tuple) else r)
        for hook in hooks:
            hook.remove()
        self.hidden = out
        return seen


class _Inputs:
    """A projection's calibration inputs: mean |x| per channel, a sample of rows, and X^T X."""

    def __init__(self, hessian: bool):
        self.rows: list = []
        self.want_hessian = hessian
        self.abs_sum = None
        self.xtx = None
        self.count = 0

    def add(self, x) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        if self.want_hessian:
            xtx = (x.T @ x).double()
            self.xtx = xtx if self.xtx is None else self.xtx + xtx
        self.count += x.shape[0]
        if sum(r.shape[0] for r in self.rows) < AWQ_EVAL_TOKENS:
            self.rows.append(x)

    def mean_abs(self):
        return self.abs_sum / max(self.count, 1)

    def sample(self):
        import torch

        return torch.cat(self.rows)[:AWQ_EVAL_TOKENS]

    def hessian(self):
        return self.xtx / max(self.count, 1)


class _Scaled:
    """Inputs divided per channel by ``s`` (what the projection sees once AWQ's scales are folded in)."""

    def __init__(self, inner: _Inputs, s):
        self.inner, self.s = inner, s.double()

    def hessian(self):
        return self.inner.hessian() / self.s[:, None] / self.s[None, :]


def _fake_quant(w, block: int):
    """RTN block-symmetric int4 round trip in float (for scoring candidates)."""
    blocks = w.reshape(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True) * 2.0 / 15
    scale = scale.masked_fill(scale == 0, 1.0)
    return ((blocks / scale + 8).round().clamp(0, 15) - 8).mul(scale).reshape(w.shape)


def _awq_scale(w, inputs: _Inputs, block: int):
    """The per-input-channel scale (grid over the exponent) with the smallest int4 output error."""
    import torch

    x = inputs.sample()
    ref = x @ w.T
    mean = inputs.mean_abs().clamp(min=1e-5)
    best, best_err = torch.ones_like(mean), None
    for a in AWQ_GRID:
        s = mean.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        err = (ref - (x / s) @ _fake_quant(w * s, block).T).pow(2).mean().item()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def gptq_quantize(w, hessian, block: int, io_dtype) -> rtn.Quantized:
    """GPTQ (Frantar et al.) with block-symmetric int4 scales fixed as each block is reached."""
    import torch

    w = w.double().clone()
    out_features, columns = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(columns, dtype=torch.float64) * GPTQ_DAMP * torch.diag(h).mean()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty((out_features, columns), dtype=torch.uint8)
    scales = torch.empty((out_features, columns // block), dtype=io_dtype)
    for start in range(0, columns, block):
        stop = start + block
        chunk = w[:, start:stop].clone()
        err = torch.zeros_like(chunk)
        s = (chunk.abs().amax(dim=1) * 2.0 / 15).to(io_dtype)
        s = torch.where(s == 0, torch.ones((), dtype=io_dtype), s)
        scales[:, start // block] = s
        sd = s.double()
        hblock = hinv[start:stop, start:stop]
        for j in range(block):
            col = chunk[:, j]
            qc = (col / sd + 8).round().clamp(0, 15)
            q[:, start + j] = qc.to(torch.uint8)
            e = (col - (qc - 8) * sd) / hblock[j, j]
            chunk[:, j + 1:] -= e[:, None] * hblock[j, j + 1:][None, :]
            err[:, j] = e
        w[:, stop:] -= err @ hinv[start:stop, stop:]
    packed = q[:, ::2] | (q[:, 1::2] << 4)
    return rtn.Quantized(qweight=packed.contiguous(), scales=scales, zeros=None)
