"""Full-size export at workstation scale: a Phi-3-mini-shaped (3.8B) or Phi-3-medium-shaped (14B) checkpoint
(random weights) exported to int4, ours vs the raw tool, side by side.

    python benchmarks/export_full_size.py [--shape mini|medium] [--work DIR] [--layers N]
                                          [--formats onnx-genai,openvino,gguf,coreml,coreml-ane] [--skip-raw]

Prints, for each format, wall time and peak RSS of ``phi-export`` and of the underlying tool run
directly with the same settings, then decode tokens/s of the int4 artifact through phi_edge.runtimes
next to the memory-bandwidth bound (weight bytes read per token vs measured bandwidth).

Targets (issue 15): Phi-3-mini int4 through phi-export peaks at <= 6 GiB with a wall time no worse than the
raw builder's; Phi-3-medium int4 completes on a 24 GiB, 2-core machine at <= 12 GiB. A raw tool whose
estimated peak (``phi-export plan``'s export-memory estimate for the tool's route) exceeds this machine's
RAM is not run: its row reports the estimate instead of an out-of-memory kill (``--skip-raw`` skips it
always).

The checkpoint is written shard by shard (one layer's tensors at a time), so building it never
holds the model in memory. ``--layers`` below the shape's count gives a proportionally smaller model for
a quick run of the same pipeline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

PHI3_MINI = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 3072,
             "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096,
             "vocab_size": 32064, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
             "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
             "sliding_window": 2047, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
             "attention_dropout": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "initializer_range": 0.02,
             "use_cache": True}

PHI3_MEDIUM = {**PHI3_MINI, "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
               "num_attention_heads": 40, "num_key_value_heads": 10}
SHAPES = {"mini": PHI3_MINI, "medium": PHI3_MEDIUM}

# the same settings handed to the raw tools
RAW = {
    "onnx-genai": lambda ck, out: [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ck), "-o",
                                   str(out), "-p", "int4", "-e", "cpu", "-c", str(out) + "-cache", "--extra_options",
                                   "block_size=32", "is_symmetric=true", "accuracy_level=4", "algo_config=rtn"],
    "openvino": lambda ck, out: ["optimum-cli", "export", "openvino", "--model", str(ck), "--task",
                                 "text-generation-with-past", "--weight-format", "int4", "--group-size", "128",
                                 "--ratio", "0.8", str(out)],
}
OURS = {"onnx-genai": "cpu", "openvino": "intel-cpu", "gguf": "rpi5", "coreml": "iphone", "coreml-ane": "apple-ane"}
# formats whose runtime does not run on this machine (Core ML: macOS/iOS only): no decode measurement
NO_DECODE_HERE = {"coreml", "coreml-ane"}
# extra phi-export flags per format: gguf is the Pi's profile in llama.cpp's format (Q4_K_M at --int4); it has
# no raw tool here (llama.cpp's convert script is not installable from a registry), so only ours is timed
OUR_FLAGS = {"gguf": ["--format", "gguf"]}


def write_checkpoint(folder: Path, layers: int, shape: dict = PHI3_MINI) -> Path:
    """Shard per decoder layer; each shard is generated, saved and freed before the next."""
    import torch
    from safetensors.torch import save_file

    from phi_edge.exporter.fixtures.tokenizer import write_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / ".complete-v2").exists():
        return folder
    cfg = {**shape, "num_hidden_layers": layers}
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    g = torch.Generator().manual_seed(0)
    made: dict[tuple, torch.Tensor] = {}
    uses: dict[tuple, int] = {}

    def rand(*shape):
        # one random draw per shape, rolled by a different row offset for every use: drawing 3.8B normal
        # samples on 2 cores would take longer than the export, and identical tensors must be avoided
        # because OpenVINO folds identical constants into one (a tenth of the real size and work)
        if shape not in made:
            made[shape] = (torch.randn(*shape, generator=g) * (1.0 / shape[-1] ** 0.5)).to(torch.bfloat16)
        uses[shape] = uses.get(shape, 0) + 1
        return torch.roll(made[shape], shifts=uses[shape] * 7, dims=0).contiguous()

    weight_map = {}

    def save(name: str, tensors: dict):
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})

    n = layers + 2
    save(f"model-00001-of-{n:05d}.safetensors", {"model.embed_tokens.weight": rand(vocab, h)})
    for i in range(layers):
        p = f"model.layers.{i}."
        save(f"model-{i + 2:05d}-of-{n:05d}.safetensors", {
            p + "self_attn.qkv_proj.weight": rand(qkv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_up_proj.weight": rand(2 * inter, h), p + "mlp.down_proj.weight": rand(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)})
    save(f"model-{n:05d}-of-{n:05d}.safetensors", {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                                                     "lm_head.weight": rand(vocab, h)})
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [32007, 32001, 32000]}))
    write_tokenizer(folder)
    (folder / ".complete-v2").write_text("")
    return folder


def measured(cmd: list[str]) -> dict:
    """Wall time and peak RSS of ``cmd`` and every process it starts (an export's worker too), from a fresh
    parent: the larger of the biggest single process (the kernel's ru_maxrss) and the largest sum over the
    process tree sampled every 0.1 s."""
    probe = ("import json, resource, subprocess, sys, time, psutil; t = time.perf_counter(); "
             "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
             "tree = 0\n"
             "def rss(q):\n"
             "    try: return q.memory_info().rss\n"
             "    except psutil.Error: return 0\n"
             "while p.poll() is None:\n"
             "    try: procs = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]\n"
             "    except psutil.Error: procs = []\n"
             "    tree = max(tree, sum(rss(q) for q in procs)); time.sleep(0.1)\n"
             "err = p.stderr.read()\n"
             "print(json.dumps({'rc': p.returncode, 'wall_s': time.perf_counter() - t, "
             "'peak_rss_bytes': max(tree, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024), "
             "'peak_tree_rss_sampled_bytes': tree, "
             "'peak_single_process_rss_bytes': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
             "'stderr': err[-2000:]}))")
    out = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def bandwidth_bytes_per_s(size: int = 1 << 30) -> float:
    import numpy as np

    a = np.ones(size // 8, dtype=np.float64)
    b = np.empty_like(a)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        np.copyto(b, a)
        best = max(best, 2 * a.nbytes / (time.perf_counter() - t))  # read + write
    return best


def decode_vs_bound(artifact: Path) -> dict:
    from phi_edge.runtimes import load

    rt = load(artifact)
    rt.stop_token_ids = frozenset()
    ids = rt.encode("The Raspberry Pi 5 is a small computer")
    rt.generate(ids, max_new_tokens=4)
    tps = rt.generate(ids, max_new_tokens=32).timings.decode_tokens_per_s
    cfg = json.loads((artifact / "genai_config.json").read_text()) if (artifact / "genai_config.json").exists() else {}
    weights = sum(f.size for f in rt.manifest.files if f.path.endswith((".data", ".bin", ".onnx", ".gguf")))
    bw = bandwidth_bytes_per_s()
    return {"decode_tokens_per_s": round(tps, 2), "weight_bytes_per_token": weights,
            "measured_bandwidth_gb_s": round(bw / 1e9, 2), "bandwidth_bound_tokens_per_s": round(bw / weights, 2),
            "share_of_bound": round(tps / (bw / weights), 3), "context_length": cfg.get("model", {}).get("context_length")}


def raw_estimate_bytes(fmt: str, config: dict) -> int | None:
    """The raw tool's estimated peak RAM, where phi-edge models it (the onnx-genai builder's float route)."""
    if fmt != "onnx-genai":
        return None
    from phi_edge.exporter.formats.onnx_genai import builder_peak_bytes

    return builder_peak_bytes(config, source_bytes=2, io_bytes=4)


def machine_ram_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from phi_edge.exporter.fixtures import cache_root

    # the bf16 checkpoints (7-26 GiB) are kept for the next run: in the user cache, not the temp folder
    ap.add_argument("--work", type=Path, default=cache_root() / "full-size")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="mini")
    ap.add_argument("--layers", type=int, default=0, help="Decoder layers (default: the shape's own count).")
    ap.add_argument("--formats", default="onnx-genai,openvino")
    ap.add_argument("--skip-raw", action="store_true", help="Do not run the raw tools (report their estimate).")
    ap.add_argument("--keep", action="store_true", help="Keep the artifacts.")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    ck = write_checkpoint(args.work / f"phi3-{args.shape}-{layers}l", layers, shape)
    from phi_edge.exporter.sizing import human, param_counts

    config = json.loads((ck / "config.json").read_text())
    params = param_counts(config).total
    ram = machine_ram_bytes()
    print(f"checkpoint: {ck} ({params / 1e9:.2f}B parameters, "
          f"{sum(p.stat().st_size for p in ck.glob('*.safetensors')) / 2**30:.1f} GiB bf16); machine RAM {human(ram)}")
    results = {}
    for fmt in args.formats.split(","):
        raw_out, our_out = args.work / f"raw-{fmt}", args.work / f"ours-{fmt}"
        for p in (raw_out, our_out, Path(str(raw_out) + "-cache")):
            shutil.rmtree(p, ignore_errors=True)
        estimate = raw_estimate_bytes(fmt, config)
        if fmt not in RAW:
            raw = {"rc": None, "skipped": f"no raw tool for {fmt} here"}
        elif args.skip_raw or (estimate and estimate > ram):
            why = "--skip-raw" if args.skip_raw else f"estimated peak {human(estimate)} > this machine's {human(ram)}"
            raw = {"rc": None, "skipped": why, "estimated_peak_rss_bytes": estimate}
        else:
            raw = measured(RAW[fmt](ck, raw_out))
        # smoke test and tokenizer check included: the whole of what a user runs (issue 15: within 5% of raw)
        ours = measured(["phi-export", str(ck), "--target", OURS[fmt], *OUR_FLAGS.get(fmt, []), "--int4", "-o",
                         str(our_out), "--force"])
        row = {"raw": {k: v for k, v in raw.items() if k != "stderr"}, "ours": {k: v for k, v in ours.items() if k != "stderr"}}
        if raw.get("rc") or ours["rc"]:
            row["errors"] = {"raw": raw["stderr"][-500:] if raw.get("rc") else "", "ours": ours["stderr"][-500:] if ours["rc"] else ""}
        elif "skipped" not in raw:
            row["time_overhead"] = round(ours["wall_s"] / raw["wall_s"] - 1, 4)
            row["memory_overhead"] = round(ours["peak_rss_bytes"] / raw["peak_rss_bytes"] - 1, 4)
        if not ours["rc"] and fmt not in NO_DECODE_HERE:
            row["decode"] = decode_vs_bound(our_out)
        results[fmt] = row
        raw_text = (f"raw skipped ({raw['skipped']})" if "skipped" in raw
                    else f"raw {raw['wall_s']:.0f}s / {raw['peak_rss_bytes'] / 2**30:.2f} GiB")
        ours_text = f"phi-export {ours['wall_s']:.0f}s / {ours['peak_rss_bytes'] / 2**30:.2f} GiB"
        tail = (f" -> time {row['time_overhead']:+.1%}, memory {row['memory_overhead']:+.1%} vs raw"
                if "time_overhead" in row else (f" -> FAILED: {row['errors']}" if "errors" in row else ""))
        print(f"{fmt} ({args.shape}, {layers} layers): {raw_text}; {ours_text}{tail}")
        if "decode" in row:
            d = row["decode"]
            print(f"  decode {d['decode_tokens_per_s']} tokens/s through phi_edge.runtimes; bandwidth bound "
                  f"{d['bandwidth_bound_tokens_per_s']} tokens/s ({d['weight_bytes_per_token'] / 2**30:.2f} GiB per "
                  f"token at {d['measured_bandwidth_gb_s']} GB/s) -> {d['share_of_bound']:.0%} of the bound")
        if not args.keep:
            for p in (raw_out, our_out, Path(str(raw_out) + "-cache")):
                shutil.rmtree(p, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
