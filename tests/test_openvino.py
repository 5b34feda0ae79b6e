"""The OpenVINO path end to end: optimum-intel export, NNCF compression per device, OpenVINO GenAI
runtime, compared with transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

import phi_edge.exporter
from conftest import assert_matches_reference
from phi_edge.exporter.cli import main as phi_export
from phi_edge.runtimes import load
from phi_edge.runtimes.errors import PhiEdgeError

PROMPT = "Hello world! The Raspberry Pi 5 runs small language models, 2026."
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 70)  # ~700 tokens > 512
CORPUS = Path(phi_edge.exporter.__file__).parent / "data" / "corpus.txt"
DATA_AWARE = {"awq": True, "scale_estimation": True, "gptq": True, "calibration_text": str(CORPUS)}
LOW_BIT = ("i4", "u4", "i8", "u8")


@pytest.mark.parametrize("family,prompt", [("phi3", PROMPT), ("phi3-128k", LONG_PROMPT), ("phimoe", PROMPT)],
                         ids=["phi3", "phi3-128k-past-original-context", "phimoe"])
def test_fp32_greedy_matches_transformers(exported, reference, family, prompt):
    out = exported("intel-cpu", "fp32", family=family)
    rt = load(out)
    assert rt.device == "CPU" and rt.manifest.format == "openvino"
    for name in ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml"):
        assert (out / name).is_file()
    ref = reference(family)
    ids = assert_matches_reference(rt, ref, prompt)
    assert ids[0] == 1  # BOS, as the source tokenizer adds it
    if prompt is LONG_PROMPT:
        assert len(ids) > ref.ckpt.config["original_max_position_embeddings"]  # LongRoPE's long factors


def test_fp32_verify_is_exact(exported, checkpoint):
    run = CliRunner().invoke(phi_export, ["verify", str(exported("intel-cpu", "fp32")), "--against",
                                          str(checkpoint("phi3")), "--json"])
    assert run.exit_code == 0, run.output
    a = json.loads(run.stdout)["against"]
    assert a["tokenizer_agrees"] and a["greedy_tokens_equal"]
    assert a["top1_agreement"] == 1.0 and a["logit_cosine_min"] > 0.99999


@pytest.mark.parametrize("family,target,quant", [("phi3", "intel-cpu", DATA_AWARE), ("phi3-128k", "intel-gpu", {}),
                                                 ("phimoe", "intel-cpu", {})],
                         ids=["phi3-cpu-awq-se-gptq", "phi3-128k-gpu", "phimoe-cpu"])
def test_int4_loads_generates_and_verify_reports(exported, checkpoint, family, target, quant, monkeypatch):
    from optimum.intel.openvino.quantization import OVCalibrationDatasetBuilder

    def no_hub(*args, **kwargs):
        raise AssertionError("calibration data must come from --calibration-text, never from the hub")

    monkeypatch.setattr(OVCalibrationDatasetBuilder, "load_dataset", no_hub)
    monkeypatch.setattr(OVCalibrationDatasetBuilder, "build_from_quantization_config", no_hub)
    out = exported(target, "int4", family=family, **quant)
    m = json.loads((out / "phi-edge.json").read_text())
    q = m["quantization"]
    profile = {"intel-cpu": (128, 0.8), "intel-gpu": (64, 1.0)}[target]
    assert (q["mode"], q["group_size"], q["ratio"], q["backup_precision"]) == ("int4_asym", *profile, "int8_asym")
    assert m["runtime"]["device"] == target.split("-")[1].upper()
    weights = compressed_weights(out)  # asymmetric int4: unsigned weights with zero points
    assert weights and all(w["type"] in ("u4", "u8") and w["zero_point"] for w in weights.values())
    assert any(w["type"] == "u4" for w in weights.values())
    result = load(out, device="CPU").generate("Hello", max_new_tokens=8)
    assert len(result.token_ids) == 8 and result.text
    if quant:  # AWQ, scale estimation and GPTQ ran on the local text (NNCF refuses them without data)
        assert (q["awq"], q["scale_estimation"], q["gptq"], q["calibration_text"]) == (True, True, True, "corpus.txt")
        assert q["calibration_samples"] >= 1
        info = nncf_info(out)
        assert (info["awq"], info["scale_estimation"], info["gptq"]) == ("True", "True", "True")
    loose = ["--min-cosine", "0.5", "--min-top1", "0"]  # random tiny weights quantize badly (phimoe: ~0.77, 23%)
    run = CliRunner().invoke(phi_export, ["verify", str(out), "--against", str(checkpoint(family)), "--device", "CPU",
                                          *loose])
    assert run.exit_code == 0, run.output
    print(run.output)
    assert "checksums  ok" in run.output and "tokenizer  agrees" in run.output
    assert "top-1" in run.output and "cosine" in run.output
    run = CliRunner().invoke(phi_export, ["verify", str(out), "--against", str(checkpoint(family)), "--device", "CPU",
                                          "--json", *loose])
    a = json.loads(run.stdout)["against"]
    assert 0 < a["top1_agreement"] <= 1 and 0.5 < a["logit_cosine_mean"] <= 1.0


def test_npu_artifact_is_symmetric_channelwise_int4(exported):
    """Every decoder weight is int4 with no zero point and one scale per output channel, as the
    Intel NPU plugin needs; NNCF's backup layers (embeddings, lm_head) are symmetric channel-wise int8."""
    from phi_edge.exporter.formats import openvino as ov_export
    from phi_edge.targets import get_target

    out = exported("intel-npu", "int4")
    weights = compressed_weights(out)
    layers = {n: w for n, w in weights.items() if ".layers." in n}
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down in each of the fixture's 2 layers
    for name, w in weights.items():
        assert not w["zero_point"], name
        assert w["scale_shape"] == [w["shape"][0], 1], (name, w)  # one scale per output channel
        assert len(w["shape"]) == 2, (name, w)  # no groups
    assert all(w["type"] == "i4" and w["consumer"] == "MatMul" for w in layers.values())
    backup = {n: w["type"] for n, w in weights.items() if n not in layers}
    assert backup == {"self.model.embed_tokens.weight": "i8", "self.lm_head.weight": "i8"}
    assert not float_matmul_weights(out)  # nothing left uncompressed
    assert nncf_info(out)["mode"] == "int4_sym"
    m = json.loads((out / "phi-edge.json").read_text())
    assert m["runtime"] == {"device": "NPU", "max_prompt_len": 1024, "min_response_len": 128}
    q = m["quantization"]
    assert (q["mode"], q["group_size"], q["ratio"], q["backup_precision"]) == ("int4_sym", -1, 1.0, "int8_sym")
    # the export's own smoke test ran where an NPU is, else on the CPU (the same IR runs there)
    import openvino as ov

    expected = "NPU" if any(d.startswith("NPU") for d in ov.Core().available_devices) else "CPU"
    assert ov_export.smoke_device(get_target("intel-npu")) == expected
    assert load(out, device="CPU").generate("Hello", max_new_tokens=4).token_ids
    from phi_edge.runtimes.openvino import properties

    assert properties(m["runtime"], "NPU") == {"MAX_PROMPT_LEN": 1024, "MIN_RESPONSE_LEN": 128}
    assert properties(m["runtime"], "CPU") == {}


def test_streaming_stop_tokens_sampling_and_early_stop(exported, monkeypatch):
    import phi_edge.runtimes.openvino as backend

    rt = load(exported("intel-cpu", "fp32"))
    full = rt.generate(PROMPT, max_new_tokens=24)
    result = rt.new_result()
    pieces = list(rt.stream(PROMPT, max_new_tokens=24, result=result))
    assert "".join(pieces) == full.text == result.text and len(pieces) > 1
    assert result.token_ids == full.token_ids and result.timings.time_to_first_token_s > 0
    assert result.timings.decode_tokens_per_s > 0
    # a stop token ends generation in the engine and is not part of the result
    monkeypatch.setattr(rt, "stop_token_ids", frozenset({full.token_ids[5]}))
    stopped = rt.generate(PROMPT, max_new_tokens=24)
    monkeypatch.undo()
    assert stopped.finish_reason == "stop" and stopped.token_ids == full.token_ids[:5]
    # sampling parameters reach the engine: top_k=1 is greedy, a seed repeats, another seed differs
    assert rt.generate(PROMPT, max_new_tokens=12, temperature=1.5, top_k=1, seed=3).token_ids == full.token_ids[:12]
    a = rt.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7).token_ids
    assert a == rt.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_p=0.95, seed=7).token_ids
    assert a != rt.generate(PROMPT, max_new_tokens=16, temperature=1.5, top_p=0.95, seed=8).token_ids
    assert a != full.token_ids[:16]
    # closing the stream early stops the pipeline (StreamingStatus.STOP), it does not run on
    written = []
    original = backend._streamer_class

    def counting(og):
        class Counting(original(og)):
            def write(self, token):
                written.append(token)
                return super().write(token)
        return Counting

    monkeypatch.setattr(backend, "_streamer_class", counting)
    monkeypatch.setattr(rt, "stop_token_ids", frozenset())  # nothing else would end it before 2000 tokens
    stream = rt.stream(PROMPT, max_new_tokens=2000)
    next(stream), next(stream)
    stream.close()  # the engine runs a few tokens ahead of the reader, then sees STOP
    assert 2 <= len(written) < 1000, len(written)
    assert rt.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4).token_ids


def test_real_phi3_tokenizer_survives_conversion(real_tokenizer, tmp_path):
    """The real Phi-3 vocabulary as openvino-tokenizers models (what LLMPipeline tokenizes with):
    llama.cpp's 47 vectors encode exactly, BOS included, and decode as transformers decodes."""
    import shutil

    import openvino_genai as og
    from conftest import real_tokenizer_vectors
    from transformers import AutoTokenizer

    from phi_edge.exporter.formats.openvino import write_tokenizers

    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    ckpt.mkdir(), out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_tokenizer / f, ckpt / f)
    write_tokenizers(SimpleNamespace(path=ckpt, trust_remote_code=False), out)
    tokenizer, hf = og.Tokenizer(str(out)), AutoTokenizer.from_pretrained(ckpt)
    vectors = real_tokenizer_vectors(real_tokenizer)
    assert len(vectors) == 47
    for text, expected in vectors:
        ids = [int(i) for i in tokenizer.encode(text).input_ids.data[0]]
        assert ids == [1] + expected == hf(text)["input_ids"], text
        assert tokenizer.decode(ids, skip_special_tokens=False) == hf.decode(ids), text


def test_runtime_imports_no_torch(exported):
    check = ("import json, sys\nfrom phi_edge.runtimes import load\n"
             "r = load(sys.argv[1]).generate('Hello', max_new_tokens=6)\n"
             "print(json.dumps({'tokens': r.token_ids, 'heavy': [m for m in ('torch', 'transformers', 'optimum',"
             " 'nncf') if m in sys.modules], 'genai': 'openvino_genai' in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", check, str(exported("intel-cpu", "fp32"))], capture_output=True,
                         text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(report["tokens"]) == 6 and report["genai"]
    assert report["heavy"] == []


def test_clear_errors(exported, checkpoint, tmp_path):
    from phi_edge.exporter.formats import openvino as ov_export
    from phi_edge.exporter.export import run_export

    ckpt = str(checkpoint("phi3"))
    out = tmp_path / "x"
    cases = [
        ("intel-cpu", "int4", {"awq": True}, r"--awq needs calibration data: pass --calibration-text"),
        ("intel-cpu", "int4", {"scale_estimation": True, "gptq": True},
         r"--scale-estimation, --gptq need calibration data: pass --calibration-text"),
        ("intel-cpu", "fp32", {"group_size": 64}, r"--group-size applies only to --precision int4 or int8, not fp32"),
        ("intel-cpu", "int8", {"ratio": 0.5}, r"--ratio applies only to --precision int4"),
        ("intel-gpu", "int4", {"calibration_text": str(CORPUS)}, r"--calibration-text is used by --awq"),
        ("intel-cpu", "int4", {"ratio": 1.5}, r"--ratio .* must be in \(0, 1\]"),
        ("intel-npu", "int4", {"symmetric": False}, r"Intel NPU runs symmetric int4 weights only; drop --asym"),
        ("intel-cpu", "int4", {"block_size": 32}, r"--block-size does not apply to target 'intel-cpu'"),
    ]
    for target, precision, quant, message in cases:
        with pytest.raises(PhiEdgeError, match=message):
            run_export(ckpt, target, out, precision=precision, quant=quant)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(PhiEdgeError, match="--calibration-text file .* is empty"):
        run_export(ckpt, "intel-cpu", out, precision="int4", quant={"awq": True, "calibration_text": str(empty)})
    with pytest.raises(PhiEdgeError, match="Phi-3.5-MoE does not run on target 'intel-npu'"):
        run_export(str(checkpoint("phimoe")), "intel-npu", out, precision="int4")
    assert not out.exists()
    # an architecture optimum-intel cannot export: our one-line error, before any heavy work
    small = SimpleNamespace(config={"model_type": "phi3small"}, architecture="Phi3SmallForCausalLM")
    with pytest.raises(PhiEdgeError, match="optimum-intel has no OpenVINO export for model_type 'phi3small'"):
        ov_export.check_architecture(small)
    # a device this machine lacks: the error lists the ones it has
    import openvino as ov

    available = ov.Core().available_devices
    missing = next(d for d in ("NPU", "GPU") if not any(a.startswith(d) for a in available))
    with pytest.raises(PhiEdgeError, match=rf"device '{missing}' is not present on this machine; available: CPU"):
        load(exported("intel-cpu", "fp32"), device=missing)


# ---- reading the IR -----------------------------------------------------------------------------

def _consumer(node):
    (target,) = node.output(0).get_target_inputs()
    return target


def compressed_weights(folder: Path) -> dict[str, dict]:
    """Every low-bit weight constant in the IR: its type, shape, zero point, scale shape, consumer.

    NNCF's pattern: weight -> Convert -> [Subtract zero point] -> Multiply scale -> [Reshape] ->
    Convert -> MatMul/Gather. Zero-point constants (the Subtract's second input) are not weights."""
    import openvino as ov

    model = ov.Core().read_model(str(folder / "openvino_model.xml"))
    found = {}
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() not in LOW_BIT:
            continue
        convert = _consumer(op).get_node()
        step = _consumer(convert)
        if step.get_node().get_type_name() == "Subtract" and step.get_index() == 1:
            continue  # a zero point
        node, zero_point = step.get_node(), False
        if node.get_type_name() == "Subtract":
            zero_point, node = True, _consumer(node).get_node()
        assert node.get_type_name() == "Multiply", op.get_friendly_name()
        scale = node.input_value(1).get_node()
        while scale.get_type_name() == "Convert":
            scale = scale.input_value(0).get_node()
        while node.get_type_name() not in ("MatMul", "Gather"):
            node = _consumer(node).get_node()
        found[op.get_friendly_name()] = {"type": op.get_element_type().get_type_name(), "shape": list(op.shape),
                                         "zero_point": zero_point, "scale_shape": list(scale.shape),
                                         "consumer": node.get_type_name()}
    return found


def float_matmul_weights(folder: Path) -> list[str]:
    """MatMuls whose weight is a plain float matrix (the rotary inv_freq product is not a weight)."""
    import openvino as ov

    model = ov.Core().read_model(str(folder / "openvino_model.xml"))
    names = []
    for op in model.get_ops():
        if op.get_type_name() == "MatMul":
            src = op.input_value(1).get_node()
            while src.get_type_name() == "Convert":
                src = src.input_value(0).get_node()
            if src.get_type_name() == "Constant" and src.get_element_type().is_real() and len(src.shape) == 2:
                names.append(op.get_friendly_name())
    return names


def nncf_info(folder: Path) -> dict[str, str]:
    """NNCF's record of the weight compression it applied, from the IR's rt_info."""
    import openvino as ov

    model = ov.Core().read_model(str(folder / "openvino_model.xml"))
    keys = ("mode", "group_size", "ratio", "awq", "scale_estimation", "gptq", "backup_mode")
    return {k: model.get_rt_info(["nncf", "weight_compression", k]).astype(str) for k in keys}
