"""Raw mlx-lm decode speed on an MLX artifact: the baseline of the MLX runtime-overhead ratio.

``benchmarks/runtime_overhead.py --format mlx`` divides phi-edge's decode tokens/s by
:func:`raw_decode_tokens_per_s`. The raw loop is plain ``mlx_lm.load`` + ``mlx_lm.stream_generate``,
greedy, measured as phi-edge's :class:`~phi_edge.runtimes.Timings` measures decode: tokens after
the first over the time after the first. It decodes exactly ``n_tokens`` (EOS ignored), as the
overhead benchmark makes phi-edge do too.

    python benchmarks/raw_mlx.py ARTIFACT [--tokens 128] [--prompt-tokens 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Sequence


def raw_decode_tokens_per_s(artifact_dir: str | Path, prompt_ids: Sequence[int], n_tokens: int) -> float:
    """Greedy decode tokens/s of mlx-lm's own loop on ``artifact_dir`` (one warm-up run first)."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = load(str(artifact_dir))
    tokenizer.eos_token_ids = []
    prompt = mx.array(list(prompt_ids))
    greedy = make_sampler(temp=0.0)
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=4, sampler=greedy):
        pass
    first = last = 0.0
    count = 0
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=n_tokens, sampler=greedy):
        last = time.perf_counter()
        if count == 0:
            first = last
        count += 1
    return (count - 1) / (last - first) if count > 1 and last > first else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    args = parser.parse_args()
    prompt = [1] + [1000 + (i * 7919) % 30000 for i in range(args.prompt_tokens - 1)]
    rate = raw_decode_tokens_per_s(args.artifact, prompt, args.tokens)
    print(f"raw mlx-lm decode: {rate:.1f} tokens/s ({args.tokens} tokens, {args.prompt_tokens}-token prompt)")


if __name__ == "__main__":
    main()
