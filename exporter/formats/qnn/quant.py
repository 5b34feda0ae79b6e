"""Calibration and QDQ quantization of the static graphs for the Hexagon NPU (w8a16 / w4a16).

Calibration runs the float graphs on ONNX Runtime's CPU provider through the runtime's own
prefill/decode driver, over a local text, so every input is calibrated with the values it will
see. Quantization is onnxruntime's static QDQ tooling with its QNN configuration: 16-bit
activations, and 8-bit symmetric per-channel or 4-bit symmetric block weights on the MatMuls.

The attention core (rotary embedding, KV cache, scores, mask, softmax, the weighted sum) stays
float, which HTP runs in fp16: onnxruntime-qnn 2.7.0 lowers a MatMul of two 16-bit activations
to 16 x 8 bits (it converts K and V to uint8), which cost more accuracy than all the weight
rounding on our measurements (logit cosine against fp32 0.9989 vs 0.9995).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

from phi_edge.runtimes.errors import PhiEdgeError

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "data" / "calibration.txt"
MAX_PREFILL_SAMPLES = 16
MAX_DECODE_SAMPLES = 32
DECODE_STEPS = 8  # teacher-forced decode steps after each calibration prefill
RANGE_MARGIN = 0.25  # calibrated activation ranges are widened by this share on each open side
# chat turns for the built-in calibration, rendered with the model's own chat template
CALIBRATION_CHATS = [
    [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
     {"role": "user", "content": "What is the capital of Australia?"},
     {"role": "assistant", "content": "The capital of Australia is Canberra."},
     {"role": "user", "content": "And how many people live there?"},
     {"role": "assistant", "content": "About 460,000 people live in Canberra (2021 census)."}],
    [{"role": "user", "content": "Write a Python function that reverses a string."},
     {"role": "assistant", "content": "def reverse(s: str) -> str:\n    return s[::-1]\n\nreverse('edge')  # 'egde'"}],
    [{"role": "user", "content": "Give me three tips for sleeping better."},
     {"role": "assistant", "content": "1. Keep a regular schedule.\n2. Avoid screens an hour before bed.\n"
                                      "3. Keep the bedroom cool, dark and quiet."}],
]


def builtin_text(ckpt) -> str:
    """The built-in calibration text: prose, code, data, several languages, and chat turns in the
    model's own chat template (what an assistant model sees on the device)."""
    from phi_edge.runtimes.chat_template import render_chat

    from ...source_tokenizer import SourceTokenizer, chat_template_of

    text = DEFAULT_TEXT.read_text(encoding="utf-8")
    template = chat_template_of(ckpt.path, ckpt.tokenizer_config())
    if not template:
        return text
    b = SourceTokenizer(ckpt.path).behaviour
    for chat in CALIBRATION_CHATS:
        try:
            text += "\n" + render_chat(template, chat, add_generation_prompt=False, bos_token=b.bos_token or "",
                                        eos_token=b.eos_token or "")
        except PhiEdgeError:  # e.g. a template without a system role: that turn is left out
            text += "\n" + render_chat(template, [m for m in chat if m["role"] != "system"],
                                        add_generation_prompt=False, bos_token=b.bos_token or "",
                                        eos_token=b.eos_token or "")
    return text


def calibration_tokens(ckpt, text_path: str | Path | None) -> tuple[list[int], str]:
    """Token ids of the calibration text (the built-in text unless a file is given), with the special
    tokens the source tokenizer puts before a text (BOS for Phi-3)."""
    from ...source_tokenizer import SourceTokenizer

    path = Path(text_path) if text_path else DEFAULT_TEXT
    try:
        text = path.read_text(encoding="utf-8") if text_path else builtin_text(ckpt)
    except (OSError, UnicodeDecodeError) as e:
        raise PhiEdgeError(f"cannot read the calibration text '{path}' ({e}); pass a UTF-8 text file "
                           f"with --calibration-text") from None
    src = SourceTokenizer(ckpt.path)
    ids = src.encode(text, add_special_tokens=False)
    if len(ids) < 16:
        raise PhiEdgeError(f"the calibration text '{path}' is only {len(ids)} tokens; give at least a paragraph")
    return src.behaviour.prefix + ids, ("built-in text" if not text_path else str(path))


def _segments(ids: list[int], length: int) -> Iterator[list[int]]:
    step = max(length // 2, 1)
    for start in range(0, max(len(ids) - length, 0) + 1, step):
        yield ids[start:start + length]


def calibration_feeds(graph: str, float_graphs: dict[str, Path], ids: list[int], chunk: int, context: int,
                      kv_shape: tuple[int, ...], num_layers: int, mask_value: float,
                      sliding_window: int = 0) -> Iterator[dict[str, Any]]:
    """Feed dicts of ``graph`` ("prefill" or "decode") as the float model sees them on ``ids``:
    overlapping windows, each prefilled chunk by chunk, then a few decode steps."""
    import onnxruntime as ort

    from phi_edge.runtimes.qnn import StaticModel

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sessions = {k: ort.InferenceSession(str(p), sess_options=so, providers=["CPUExecutionProvider"])
                for k, p in float_graphs.items()}
    got: list[dict[str, Any]] = []

    def record(name: str, feeds: dict[str, Any]) -> None:
        if name == graph:
            got.append({k: v.copy() for k, v in feeds.items()})  # the cache arrays change in place

    model = StaticModel(prefill=lambda f: sessions["prefill"].run(None, f),
                        decode=lambda f: sessions["decode"].run(None, f), chunk=chunk, context=context,
                        kv_shape=kv_shape, num_layers=num_layers, mask_value=mask_value,
                        sliding_window=sliding_window, record=record)
    limit = MAX_PREFILL_SAMPLES if graph == "prefill" else MAX_DECODE_SAMPLES
    window = min(context - DECODE_STEPS, 3 * chunk)
    yielded = 0
    for segment in _segments(ids, window + DECODE_STEPS):
        prompt, follow = segment[:window], segment[window:]
        model.reset()
        for i in range(0, len(prompt), chunk):
            model.prefill(prompt[i:i + chunk])
            yield from got
            yielded += len(got)
            got.clear()
        if graph == "decode":
            for t in follow:
                model.decode(t)
                yield from got
                yielded += len(got)
                got.clear()
        if yielded >= limit:
            return


class _Reader:
    """onnxruntime's CalibrationDataReader (anything with get_next) over a generator of feed dicts."""

    def __init__(self, feeds: Iterator[dict[str, Any]]):
        self._feeds = iter(feeds)
        self._next = None
        self.count = 0

    def peek(self):
        if self._next is None:
            self._next = next(self._feeds, None)
        return self._next

    def get_next(self):
        feed = self.peek()
        self._next = None
        self.count += feed is not None
        return feed

    def __iter__(self):
        return self

    def __next__(self):
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed


def calibrate(float_model: Path, feeds: Iterator[dict[str, Any]], op_types: list[str], work: Path,
              margin: float = RANGE_MARGIN):
    """Activation ranges (onnxruntime's MinMax calibrator) widened by ``margin`` of each range on
    every side that is not pinned at zero: 16-bit activations lose almost nothing to the wider
    range, while a value past a calibrated edge is clipped outright (text unlike the calibration
    text, e.g. the model's own continuations, reaches past it)."""
    import numpy as np
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, create_calibrator

    (work / "calibration").mkdir(exist_ok=True)
    calibrator = create_calibrator(float_model, op_types, augmented_model_path=str(work / "calibration" / "aug.onnx"),
                                   calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
    count = 0
    while True:  # a few samples at a time: each call merges its ranges, so memory stays bounded
        reader = _Reader(itertools.islice(feeds, 2))
        if count and reader.peek() is None:
            break
        calibrator.collect_data(reader)
        count += reader.count
    ranges = calibrator.compute_data()
    del calibrator
    widened = {}
    for name, data in ranges.items():
        lo, hi = (np.asarray(v) for v in data.range_value)
        pad = (hi - lo) * margin
        widened[name] = TensorData(lowest=np.where(lo == 0, lo, lo - pad).astype(lo.dtype),
                                   highest=np.where(hi == 0, hi, hi + pad).astype(hi.dtype))
    return TensorsData(CalibrationMethod.MinMax, widened), count


def float_region(model) -> list[str]:
    """Nodes that stay float (fp16 on HTP): everything downstream of the graph inputs other than
    the token ids (positions, attention bias, KV cache) up to the next MatMul with a weight, i.e.
    the rotary tables, the cache concatenation and the whole attention core up to o_proj."""
    initializers = {i.name for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    region: set[str] = set()
    todo = [i.name for i in model.graph.input if i.name != "input_ids"]
    while todo:
        for node in consumers.get(todo.pop(), []):
            if node.name in region or (node.op_type == "MatMul" and node.input[1] in initializers):
                continue
            region.add(node.name)
            todo.extend(node.output)
    return sorted(region)


def quantize_graph(float_model: Path, out: Path, feeds: Iterator[dict[str, Any]], precision: str,
                   block_size: int) -> dict[str, Any]:
    """Write the QDQ model of ``float_model`` to ``out``; returns what was used."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    weight_type = QuantType.QInt8 if precision == "int8" else QuantType.QInt4
    config = get_qnn_qdq_config(str(float_model), None, activation_type=QuantType.QUInt16,
                                weight_type=weight_type, weight_symmetric=True, per_channel=False)
    model = onnx.load(str(float_model), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    weights = [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    overrides = config.extra_options["TensorQuantOverrides"]
    if precision == "int8":  # per output channel: MatMul weights are [in, out]
        for name in weights:
            overrides[name] = [{"quant_type": weight_type, "symmetric": True, "axis": 1}]
    else:  # blocks of block_size along the input dimension, one scale per block and output channel
        for name in weights:
            overrides.pop(name, None)
        config.extra_options["BlockSize"] = int(block_size)
    keep_float = float_region(model)
    work = Path(out).parent
    ranges, samples = calibrate(float_model, feeds, config.op_types_to_quantize, work)
    cache = work / f"{Path(out).stem}.calibration.json"
    save_tensors_data(ranges, cache)
    quantize_static(str(float_model), str(out), None, quant_format=config.quant_format,
                    op_types_to_quantize=config.op_types_to_quantize, per_channel=config.per_channel,
                    activation_type=config.activation_type, weight_type=config.weight_type,
                    nodes_to_exclude=keep_float, use_external_data_format=True,
                    calibrate_method=config.calibrate_method, extra_options=config.extra_options,
                    calibration_cache_path=cache)
    cache.unlink()
    return {"calibration_samples": samples, "matmul_weights": len(weights), "float_nodes": len(keep_float)}
