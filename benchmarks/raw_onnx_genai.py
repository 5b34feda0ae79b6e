"""The onnxruntime-genai decode loop written directly against the engine (the baseline)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

_models = {}


def raw_decode_tokens_per_s(artifact_dir: Path, prompt_ids: list[int], n_tokens: int) -> float:
    import onnxruntime_genai as og

    key = str(artifact_dir)
    if key not in _models:
        model = og.Model(key)
        _models[key] = (model, og.Tokenizer(model))
    model, tokenizer = _models[key]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n_tokens, do_sample=False)
    gen = og.Generator(model, params)
    stream = tokenizer.create_stream()
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    count, first = 0, 0.0
    while not gen.is_done():
        gen.generate_next_token()
        stream.decode(int(gen.get_next_tokens()[0]))
        count += 1
        if count == 1:
            first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - first)
