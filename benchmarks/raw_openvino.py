"""Raw OpenVINO GenAI decode speed on an OpenVINO artifact: the baseline of the OpenVINO
runtime-overhead ratio.

``benchmarks/runtime_overhead.py --format openvino`` divides phi-edge's decode tokens/s by
:func:`raw_decode_tokens_per_s`. The raw loop is a plain ``openvino_genai.LLMPipeline`` greedy
``generate`` on the token ids with the thinnest streamer there is (a ``StreamerBase`` whose
``write`` only notes the time), measured as phi-edge's :class:`~phi_edge.runtimes.Timings`
measures decode: tokens after the first over the time after the first. EOS is ignored so every
run decodes ``n_tokens``. The pipeline gets the same OpenVINO properties phi-edge passes for the
artifact. (With no streamer at all, OpenVINO GenAI 2026.4 decodes markedly slower on this
machine, so that would not be a fair baseline.)

    python benchmarks/raw_openvino.py ARTIFACT [--tokens 128] [--prompt-tokens 64] [--device CPU]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

_pipelines: dict[tuple[str, str], object] = {}


def _pipeline(artifact_dir: str | Path, device: str):
    import openvino_genai as og

    key = (str(artifact_dir), device)
    if key not in _pipelines:
        manifest = json.loads((Path(artifact_dir) / "phi-edge.json").read_text())
        props = dict((manifest.get("runtime", {}).get("properties") or {}).get(device, {}))
        _pipelines[key] = og.LLMPipeline(str(artifact_dir), device, **props)
    return _pipelines[key]


def raw_decode_tokens_per_s(artifact_dir: str | Path, prompt_ids: Sequence[int], n_tokens: int,
                            device: str = "CPU") -> float:
    """Greedy decode tokens/s of OpenVINO GenAI's own loop on ``artifact_dir``."""
    import numpy as np
    import openvino as ov
    import openvino_genai as og

    times: list[float] = []

    class Clock(og.StreamerBase):
        def write(self, token):
            times.append(time.perf_counter())
            return og.StreamingStatus.RUNNING

        def end(self):
            pass

    pipe = _pipeline(artifact_dir, device)
    ids = np.asarray([list(prompt_ids)], dtype=np.int64)
    config = og.GenerationConfig()
    config.max_new_tokens = n_tokens
    config.do_sample = False
    config.ignore_eos = True
    pipe.generate(og.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config, Clock())
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--device", default="CPU")
    args = parser.parse_args()
    prompt = [1] + [1000 + (i * 7919) % 30000 for i in range(args.prompt_tokens - 1)]
    raw_decode_tokens_per_s(args.artifact, prompt, 8, args.device)  # warm-up
    rate = raw_decode_tokens_per_s(args.artifact, prompt, args.tokens, args.device)
    print(f"raw OpenVINO GenAI decode on {args.device}: {rate:.1f} tokens/s "
          f"({args.tokens} tokens, {args.prompt_tokens}-token prompt)")


if __name__ == "__main__":
    main()
