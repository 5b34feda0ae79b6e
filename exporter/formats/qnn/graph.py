"""Static-shape Phi graphs for the Hexagon NPU: a prefill graph over a fixed chunk of tokens and a
one-token decode graph, both over a fixed KV window, exported to ONNX (opset 23) with torch.

What makes them run well on HTP once quantized (see ``.quant``):

- RMSNorm goes through ``torch.nn.functional.rms_norm`` and exports as one ``RMSNormalization``
  node (the decomposed form's quantized reciprocal is badly off on HTP);
- the attention mask is an input the host fills with 0 or ``MASK_VALUE``, a moderate value:
  -3.4e38 overflows fp16 and would swallow any 16-bit quantization scale of the scores;
- rotary tables (LongRoPE included) are constants gathered by ``position_ids``; int32 ids;
- the KV cache travels as fp16, the precision HTP computes attention in.

Graph I/O (T = chunk, C = KV window, per layer ``i``):
  inputs  ``input_ids`` int32 [1, T], ``position_ids`` int32 [1, T], ``attention_bias`` f32
          [1, 1, T, C + T], ``past_key_i`` / ``past_value_i`` f16 [1, kv_heads, C, head_dim];
  outputs ``logits`` f32 [1, T, vocab], ``present_key_i`` / ``present_value_i`` f16
          [1, kv_heads, T, head_dim] (the new entries only: the host writes them into its cache).
"""

from __future__ import annotations

from pathlib import Path

MASK_VALUE = -100.0
OPSET = 23


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"present_{kind}_{i}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "position_ids", "attention_bias", *past], ["logits", *present]


def rope_tables(hf_config, positions: int):
    """cos/sin [positions, rotary_dim] as transformers computes them. LongRoPE: the short factors
    below ``original_max_position_embeddings``, the long ones from there on, which is what
    transformers does for a sequence generated token by token."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = hf_config.rope_parameters
    rope_type = params.get("rope_type", "default")
    pos = torch.arange(positions, dtype=torch.float32)
    if rope_type == "default":
        from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

        inv, scale = Phi3RotaryEmbedding.compute_default_rope_parameters(hf_config)
        freqs = torch.outer(pos, inv.float())
    elif rope_type == "longrope":
        fn = ROPE_INIT_FUNCTIONS["longrope"]
        original = int(params["original_max_position_embeddings"])
        short, scale = fn(hf_config, None)
        long, _ = fn(hf_config, None, seq_len=original + 1)
        inv = torch.where((pos < original)[:, None], short.float()[None, :], long.float()[None, :])
        freqs = pos[:, None] * inv
    else:
        from phi_edge.runtimes.errors import PhiEdgeError

        raise PhiEdgeError(f"rope type '{rope_type}' is not supported by the QNN exporter (default and longrope are)")
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def build_module(hf_model, context: int, chunk: int):
    """A torch module computing one static step of ``hf_model`` (a transformers Phi3ForCausalLM)."""
    import torch
    import torch.nn.functional as F

    cfg = hf_model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    eps = float(cfg.rms_norm_eps)
    cos, sin = rope_tables(cfg, context + chunk)
    rot = cos.shape[-1]
    inner = hf_model.model

    class StaticPhi(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = inner
            self.lm_head = hf_model.lm_head
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

        @staticmethod
        def _rotate(x, c, s):
            x_rot, x_pass = x[..., :rot], x[..., rot:]
            half = rot // 2
            rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
            out = x_rot * c + rotated * s
            return torch.cat((out, x_pass), dim=-1) if rot < head_dim else out

        def forward(self, input_ids, position_ids, attention_bias, *past):
            t = input_ids.shape[1]
            h = self.model.embed_tokens(input_ids)
            c = F.embedding(position_ids, self.cos).unsqueeze(1)  # [1, 1, T, rot], a Gather on int32
            s = F.embedding(position_ids, self.sin).unsqueeze(1)
            presents = []
            for i, layer in enumerate(self.model.layers):
                attn = layer.self_attn
                x = F.rms_norm(h, (h.shape[-1],), layer.input_layernorm.weight, eps)
                qkv = attn.qkv_proj(x)
                q = qkv[..., :heads * head_dim].view(1, t, heads, head_dim).transpose(1, 2)
                k = qkv[..., heads * head_dim:(heads + kv_heads) * head_dim].view(1, t, kv_heads, head_dim)
                v = qkv[..., (heads + kv_heads) * head_dim:].view(1, t, kv_heads, head_dim).transpose(1, 2)
                k = self._rotate(k.transpose(1, 2), c, s)
                q = self._rotate(q, c, s)
                presents += [k.half(), v.half()]  # the cache travels as fp16
                keys = torch.cat((past[2 * i].float(), k), dim=2)
                values = torch.cat((past[2 * i + 1].float(), v), dim=2)
                if kv_heads != heads:
                    keys = keys.repeat_interleave(heads // kv_heads, dim=1)
                    values = values.repeat_interleave(heads // kv_heads, dim=1)
                scores = torch.matmul(q, keys.transpose(2, 3)) * head_dim**-0.5 + attention_bias
                probs = torch.softmax(scores, dim=-1)
                out = torch.matmul(probs, values).transpose(1, 2).reshape(1, t, heads * head_dim)
                h = h + attn.o_proj(out)
                x = F.rms_norm(h, (h.shape[-1],), layer.post_attention_layernorm.weight, eps)
                h = h + layer.mlp(x)
            h = F.rms_norm(h, (h.shape[-1],), self.model.norm.weight, eps)
            return (self.lm_head(h), *presents)

    module = StaticPhi().eval()
    module.kv_shape = (1, kv_heads, context, head_dim)
    return module


def example_inputs(module, chunk: int):
    import torch

    _, kv_heads, context, head_dim = module.kv_shape
    n = len(module.model.layers)
    ids = torch.zeros((1, chunk), dtype=torch.int32)
    pos = torch.arange(chunk, dtype=torch.int32)[None]
    bias = torch.zeros((1, 1, chunk, context + chunk), dtype=torch.float32)
    past = [torch.zeros(module.kv_shape, dtype=torch.float16) for _ in range(2 * n)]
    return (ids, pos, bias, *past)


def export_onnx(hf_model, context: int, chunk: int, path: Path) -> Path:
    """Export one static step (``chunk`` tokens over a ``context`` KV window) to ``path``."""
    import torch

    module = build_module(hf_model, context, chunk)
    inputs, outputs = io_names(len(module.model.layers))
    with torch.no_grad():
        program = torch.onnx.export(module, example_inputs(module, chunk), dynamo=True, opset_version=OPSET,
                                    input_names=inputs, output_names=outputs, optimize=True, verbose=False)
    program.save(str(path), external_data=True)
    return path


def load_hf_model(ckpt):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=torch.float32,
                                                 trust_remote_code=ckpt.trust_remote_code)
    return model.eval()
