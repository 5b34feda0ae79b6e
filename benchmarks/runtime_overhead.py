"""Decode speed through phi_edge.runtimes vs the backend called directly, on the same artifact.

    python benchmarks/runtime_overhead.py [--format onnx-genai|openvino|mlx] [--tokens 128] [--repeats 5]

Builds a small-but-real-sized Phi-3-shaped checkpoint (so a decode step costs what it does in
practice, not microseconds), exports it for the format, then measures greedy decode tokens/s of
``load(artifact).generate()`` and of the raw engine loop (``benchmarks/raw_<format>.py``) in
alternation, and prints the median ratio. Target: >= 0.98.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGETS = {"onnx-genai": ("cpu", "int4"), "openvino": ("intel-cpu", "int4"), "mlx": ("apple-silicon", "int4")}
# ~120M parameters: a few ms per decode step on 2 cores, like a real model's per-token cost shape
BENCH_CONFIG = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8,
                "num_attention_heads": 12, "num_key_value_heads": 12}


def raw_module(fmt: str):
    path = HERE / f"raw_{fmt.replace('-', '_')}.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_artifact(fmt: str, work: Path) -> Path:
    from phi_edge.exporter import fixtures
    from phi_edge.exporter.export import run_export

    original = fixtures.family_config

    def bigger(family: str) -> dict:
        return {**original(family), **BENCH_CONFIG}

    fixtures.family_config = bigger
    try:
        ckpt = fixtures.write_checkpoint(work / "ckpt", "phi3")
    finally:
        fixtures.family_config = original
    target, precision = TARGETS[fmt]
    if fmt == "mlx":
        import mlx.core as mx

        if not mx.is_available(mx.gpu):  # MLX's CPU build runs float16 (quantized) matmuls very slowly
            precision = "fp32"
    out = work / f"artifact-{fmt}"
    run_export(str(ckpt), target, out, precision=precision, context_length=1024, smoke_test=False)
    return out


def ours_tokens_per_s(rt, prompt_ids: list[int], n: int) -> float:
    r = rt.generate(prompt_ids, max_new_tokens=n, temperature=0)
    return r.timings.decode_tokens_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="onnx-genai", choices=sorted(TARGETS))
    ap.add_argument("--artifact", type=Path, help="Use this artifact instead of building one.")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from phi_edge.runtimes import load

    raw = raw_module(args.format)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or build_artifact(args.format, Path(tmp))
        rt = load(artifact)
        prompt_ids = rt.encode("The Raspberry Pi 5 is a small computer that can run language models")
        # the engine must not stop early, so both loops decode the same number of tokens
        rt.stop_token_ids = frozenset()
        ours_tokens_per_s(rt, prompt_ids, 16)  # warm-up
        raw.raw_decode_tokens_per_s(artifact, prompt_ids, 16)
        ours, theirs = [], []
        for _ in range(args.repeats):
            theirs.append(raw.raw_decode_tokens_per_s(artifact, prompt_ids, args.tokens))
            ours.append(ours_tokens_per_s(rt, prompt_ids, args.tokens))
    ratio = statistics.median(ours) / statistics.median(theirs)
    result = {"format": args.format, "tokens": args.tokens, "repeats": args.repeats,
              "phi_edge_tokens_per_s": [round(x, 2) for x in ours],
              "raw_tokens_per_s": [round(x, 2) for x in theirs],
              "median_phi_edge": round(statistics.median(ours), 2), "median_raw": round(statistics.median(theirs), 2),
              "ratio": round(ratio, 4), "target": 0.98, "meets_target": ratio >= 0.98}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.format}: phi_edge.runtimes {result['median_phi_edge']} tokens/s, raw engine "
              f"{result['median_raw']} tokens/s -> ratio {result['ratio']} (target >= 0.98: "
              f"{'met' if result['meets_target'] else 'NOT met'})")
    sys.exit(0)


if __name__ == "__main__":
    main()
