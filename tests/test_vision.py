"""Phi-4-multimodal vision on ONNX Runtime GenAI: each exported part against torch, end-to-end greedy
against transformers' generate, the device-side image processor against transformers', bad input."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow
PROMPT = "<|user|><|image_1|>What is in this picture?<|end|><|assistant|>"


def smooth(h: int, w: int, channels: int = 3) -> np.ndarray:
    """A smooth synthetic photo-like image (uint8 HxWxC)."""
    y, x = np.mgrid[0:h, 0:w]
    planes = [128 + 100 * np.sin(x / 17.0 + k) * np.cos(y / 23.0 - k) for k in range(channels)]
    return np.stack(planes, -1).clip(0, 255).astype(np.uint8)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mm_checkpoint(session_dir):
    from phi_edge.exporter.formats.vision.tiny import write_tiny_phi4mm

    return write_tiny_phi4mm(session_dir / "ckpt" / "phi4mm")


@pytest.fixture(scope="module")
def mm_artifact(session_dir, mm_checkpoint):
    from phi_edge.exporter.export import run_export

    out = session_dir / "artifacts" / "phi4mm-cpu-fp32"
    run_export(str(mm_checkpoint), "cpu", out, precision="fp32", smoke_test=False)
    return out


@pytest.fixture(scope="module")
def mm_runtime(mm_artifact):
    from phi_edge.runtimes import load

    return load(mm_artifact)


@pytest.fixture(scope="module")
def hf_model(mm_checkpoint):
    import torch
    from transformers import Phi4MultimodalForCausalLM

    # eager: transformers 5.5's SDPA path marks the SigLIP attention causal (is_causal=True) and uses that
    # whenever no crop of the batch is padded; SigLIP attends both ways, as the eager path (and our export) do
    return Phi4MultimodalForCausalLM.from_pretrained(str(mm_checkpoint), dtype=torch.float32,
                                                     attn_implementation="eager").eval()


def hf_pixels(image):
    from transformers import Phi4MultimodalImageProcessor

    return Phi4MultimodalImageProcessor()(image, return_tensors="pt")


def hf_greedy(hf_model, rt, result, images: list, n: int) -> tuple[list[int], int]:
    """transformers' greedy continuation of ``result``'s prompt ids on ``images`` (its own image processor), and
    where the artifact's stop tokens cut it; checks the prompt holds as many image tokens as the processor gives."""
    import torch

    batch = hf_pixels(images)
    ids = torch.tensor([result.prompt_token_ids])
    assert int((ids == 200010).sum()) == int(sum(batch["num_img_tokens"]))
    with torch.no_grad():
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                image_pixel_values=batch["image_pixel_values"], image_sizes=batch["image_sizes"],
                                image_attention_mask=batch["image_attention_mask"], max_new_tokens=n,
                                do_sample=False)
    want = out[0, ids.shape[1]:].tolist()
    return want, next((i for i, t in enumerate(want) if t in rt.stop_token_ids), len(want))


def test_artifact_layout_and_config(mm_artifact):
    cfg = json.loads((mm_artifact / "genai_config.json").read_text())["model"]
    assert cfg["type"] == "phi4mm"
    assert cfg["vision"]["filename"] == "vision.onnx" and cfg["embedding"]["filename"] == "embedding.onnx"
    assert cfg["decoder"]["inputs"].get("inputs_embeds") == "inputs_embeds"
    proc = json.loads((mm_artifact / cfg["vision"]["config_filename"]).read_text())
    kinds = [t["operation"]["type"] for t in proc["processor"]["transforms"]]
    assert kinds == ["DecodeImage", "Phi4VisionDynamicPreprocess", "Rescale", "Normalize", "Phi4VisionProcessor"]
    manifest = json.loads((mm_artifact / "phi-edge.json").read_text())
    assert manifest["runtime"]["vision"]["type"] == "phi4mm"
    assert manifest["family"] == "phi4-multimodal"


def test_vision_and_embedding_onnx_match_torch(mm_artifact, hf_model):
    """vision.onnx on transformers' own pixel tensors vs transformers' image embedding; embedding.onnx vs
    the token embedding with the features written at the image tokens: fp32 within 1e-3."""
    import onnxruntime as ort
    import torch
    from PIL import Image

    image_embed = hf_model.model.embed_tokens_extend.image_embed
    vision = ort.InferenceSession(str(mm_artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    embedding = ort.InferenceSession(str(mm_artifact / "embedding.onnx"), providers=["CPUExecutionProvider"])
    for h, w in [(640, 360), (300, 1000), (30, 40)]:  # 2x1 crops with padding, 1x3, one upscaled crop
        batch = hf_pixels(Image.fromarray(smooth(h, w)))
        count = int(batch["num_img_tokens"][0])
        ids = torch.tensor([[17] + [200010] * count + [23, 42]])
        with torch.no_grad():
            base = hf_model.model.embed_tokens(ids)
            want = image_embed(ids, base, batch["image_pixel_values"], image_sizes=batch["image_sizes"],
                               image_attention_mask=batch["image_attention_mask"])
        feats = vision.run(None, {"pixel_values": batch["image_pixel_values"].numpy(),
                                  "image_attention_mask": batch["image_attention_mask"].float().numpy(),
                                  "image_sizes": batch["image_sizes"].numpy()})[0]
        assert feats.shape == (count, hf_model.config.hidden_size)
        np.testing.assert_allclose(feats, want[0, 1:count + 1].numpy(), atol=1e-3, rtol=0)
        merged = embedding.run(None, {"input_ids": ids.numpy(), "image_features": feats})[0]
        np.testing.assert_allclose(merged, want.numpy(), atol=1e-3, rtol=0)
    # three images at once: crops padded to the largest grid, features concatenated in order
    batch = hf_pixels([Image.fromarray(smooth(640, 360)), Image.fromarray(smooth(300, 1000)),
                       Image.fromarray(smooth(30, 40))])
    count = int(sum(batch["num_img_tokens"]))
    ids = torch.full((1, count), 200010)
    with torch.no_grad():
        want = image_embed(ids, hf_model.model.embed_tokens(ids), batch["image_pixel_values"],
                           image_sizes=batch["image_sizes"], image_attention_mask=batch["image_attention_mask"])
    feats = vision.run(None, {"pixel_values": batch["image_pixel_values"].numpy(),
                              "image_attention_mask": batch["image_attention_mask"].float().numpy(),
                              "image_sizes": batch["image_sizes"].numpy()})[0]
    np.testing.assert_allclose(feats, want[0].numpy(), atol=1e-3, rtol=0)
    # a decode step: no image features, plain token embedding
    empty = np.zeros((0, hf_model.config.hidden_size), np.float32)
    step = embedding.run(None, {"input_ids": np.array([[42]]), "image_features": empty})[0]
    np.testing.assert_allclose(step[0, 0], hf_model.model.embed_tokens.weight[42].detach().numpy(), atol=1e-6)


def test_decoder_logits_match_torch(mm_artifact, hf_model):
    """The builder's decoder (model.onnx, inputs_embeds) vs transformers on the same merged embeddings."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(mm_artifact / "model.onnx"), providers=["CPUExecutionProvider"])
    torch.manual_seed(0)
    embeds = hf_model.model.embed_tokens(torch.tensor([[5, 200010, 200010, 9, 31]])).detach()
    embeds[0, 1:3] = torch.randn(2, hf_model.config.hidden_size)  # stand-ins for image features
    feeds = {"inputs_embeds": embeds.numpy(), "attention_mask": np.ones((1, 5), np.int64)}
    cfg = hf_model.config
    kv, hd = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values"):
            feeds[inp.name] = np.zeros((1, kv, 0, hd), np.float32)
    feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}
    logits = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = hf_model(inputs_embeds=embeds, attention_mask=torch.ones(1, 5, dtype=torch.long)).logits
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-3, rtol=0)


def test_generate_with_image_matches_transformers(mm_runtime, hf_model):
    """load(OUT).generate(prompt, images=[img], temperature=0) == transformers' generate, 16 tokens; the
    image as a numpy array, a path, bytes, PIL and an OpenAI data-URL chat part all give the same."""
    from PIL import Image

    array = smooth(640, 360)  # a portrait photo: 2x1 crops, the lower one padded
    result = mm_runtime.generate(PROMPT, images=[array], max_new_tokens=16, temperature=0)
    want, stop = hf_greedy(hf_model, mm_runtime, result, [Image.fromarray(array)], 16)
    assert result.token_ids == want[:stop] and len(result.token_ids) == min(16, stop)

    data = png(array)
    streamed = mm_runtime.new_result()
    pieces = list(mm_runtime.stream(PROMPT, images=[data], max_new_tokens=4, result=streamed))
    assert streamed.token_ids == result.token_ids[:4] and "".join(pieces) == streamed.text
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    chat = mm_runtime.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                         {"type": "text", "text": "What is in this picture?"}]}],
                           max_new_tokens=3)
    assert chat.prompt_token_ids == result.prompt_token_ids and chat.token_ids == result.token_ids[:3]
    # text-only prompts still run through the same artifact
    assert mm_runtime.generate("Hello", max_new_tokens=4).token_ids


def test_two_images_match_transformers(mm_runtime, hf_model):
    from PIL import Image

    first, second = smooth(300, 500), smooth(200, 200, 3)[:, ::-1].copy()
    prompt = "<|user|><|image_1|>and<|image_2|>What differs?<|end|><|assistant|>"
    result = mm_runtime.generate(prompt, images=[first, second], max_new_tokens=8)
    want, stop = hf_greedy(hf_model, mm_runtime, result, [Image.fromarray(first), Image.fromarray(second)], 8)
    assert result.token_ids == want[:stop]


@pytest.mark.parametrize("name,array,mode,exact", [
    ("portrait", smooth(640, 360), None, True),
    ("landscape", smooth(480, 1280), None, True),
    ("noise", np.random.default_rng(0).integers(0, 255, (500, 300, 3), dtype=np.uint8), None, False),
    ("tiny", smooth(12, 20), None, True),
    ("grayscale", smooth(300, 400, 1)[..., 0], "L", True),
    ("alpha", np.dstack([smooth(200, 260), np.linspace(0, 255, 260, dtype=np.uint8)[None].repeat(200, 0)]), "RGBA",
     True),
])
def test_device_processor_pixels_vs_transformers(mm_runtime, name, array, mode, exact, capsys):
    """The device-side tensors (the engine's processor for layout and token counts, phi-edge's pixels) vs
    transformers' image processor on the same file: same crops, masks and counts, pixels within uint8 rounding."""
    from PIL import Image

    data = png(array, mode)
    ids = mm_runtime._prepare_images(PROMPT, [data])
    inputs, mm_runtime._image_inputs = mm_runtime._image_inputs[1], None
    batch = hf_pixels(Image.open(io.BytesIO(data)))
    mine, want = inputs["pixel_values"].as_numpy(), batch["image_pixel_values"].numpy()
    assert mine.shape == want.shape
    assert np.array_equal(inputs["image_attention_mask"].as_numpy(), batch["image_attention_mask"].numpy())
    assert ids.count(200010) == int(batch["num_img_tokens"][0])
    diff = float(np.abs(mine - want).max())
    with capsys.disabled():
        print(f"\n[vision pixels] {name} {array.shape[1]}x{array.shape[0]}: max |diff| {diff:.3g}, "
              f"mean {float(np.abs(mine - want).mean()):.3g}")
    assert diff < (1e-6 if exact else 1.1e-2)


def test_bad_images_give_one_clear_error(mm_runtime, tmp_path):
    from phi_edge.runtimes.errors import ContextLengthError, PhiEdgeError

    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(PhiEdgeError, match="not an image Pillow can read"):
        mm_runtime.generate(PROMPT, images=[corrupt])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(PhiEdgeError, match="not an image"):
        mm_runtime.generate(PROMPT, images=[str(text)])
    with pytest.raises(PhiEdgeError, match="no such file"):
        mm_runtime.generate(PROMPT, images=[tmp_path / "missing.png"])
    with pytest.raises(PhiEdgeError, match="do not match"):
        mm_runtime.generate("<|image_2|>hi", images=[smooth(64, 64)])
    with pytest.raises(PhiEdgeError, match="as text"):
        mm_runtime.generate([1, 2, 3], images=[smooth(64, 64)])
    big = np.full((2688, 2688, 3), 90, np.uint8)  # 36 crops: about 9.6k image tokens, context 8192
    with pytest.raises(ContextLengthError, match="image"):
        mm_runtime.generate(PROMPT, images=[big])
    with pytest.raises(ContextLengthError, match="fewer or smaller images"):  # 5 x 1.9k tokens
        mm_runtime.generate("Compare them.", images=[np.full((1344, 896, 3), 90, np.uint8)] * 5)
    assert mm_runtime._image_inputs is None
    with pytest.raises(PhiEdgeError, match="audio input is not supported"):
        mm_runtime.chat([{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}])
    with pytest.raises(PhiEdgeError, match="not a text or image part"):
        mm_runtime.chat([{"role": "user", "content": [{"type": "video", "video": "x"}]}])


def test_text_only_backend_refuses_images(exported):
    from phi_edge.runtimes import load
    from phi_edge.runtimes.errors import PhiEdgeError

    rt = load(exported("cpu", "fp32"))
    with pytest.raises(PhiEdgeError, match="text-only and takes no images"):
        rt.generate("Hi", images=[smooth(32, 32)])
    with pytest.raises(PhiEdgeError, match="text-only and takes no images"):
        rt.chat([{"role": "user", "content": [{"type": "image", "image": smooth(32, 32)},
                                               {"type": "text", "text": "hi"}]}])


def test_phi_run_image(mm_artifact, tmp_path):
    from click.testing import CliRunner

    from phi_edge.runtimes.cli import main

    photo = tmp_path / "photo.png"
    photo.write_bytes(png(smooth(448, 448)))
    res = CliRunner().invoke(main, [str(mm_artifact), "--image", str(photo), "--json", "-n", "4",
                                    "What is in this picture?"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["prompt_tokens"] > 273
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    res = CliRunner().invoke(main, [str(mm_artifact), "--image", str(bad), "hi"])
    assert res.exit_code == 1 and res.output.strip().startswith("error:") and "Traceback" not in res.output


def test_int4_decoder_runs_with_an_image(mm_checkpoint, tmp_path):
    """rpi5 (int4 text decoder, fp32 vision): the format's export straight into a folder (no manifest, so no
    phi-edge runtime), loaded and stepped by the engine alone: the three models load and run together."""
    import onnxruntime_genai as og

    from phi_edge.exporter.checkpoint import validate
    from phi_edge.exporter.formats import ExportOptions, format_module
    from phi_edge.exporter.progress import Steps
    from phi_edge.targets import get_target

    module = format_module("onnx-genai")
    out = tmp_path / "int4"
    module.export(validate(mm_checkpoint), get_target("rpi5"), ExportOptions(precision="int4", context_length=8192),
                  out, Steps(enabled=False))
    model = og.Model(str(out))
    inputs = model.create_multimodal_processor()(PROMPT, images=og.Images.open_bytes(png(smooth(448, 448))))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(inputs["input_ids"].as_numpy().shape[1]) + 4)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    gen.generate_next_token()
    assert 0 <= int(gen.get_next_tokens()[0]) < 200064


def test_plan_counts_the_vision_parts(mm_checkpoint):
    from phi_edge.exporter.formats import onnx_genai
    from phi_edge.exporter.sizing import param_counts, vision_params
    from phi_edge.targets import get_target

    config = json.loads((mm_checkpoint / "config.json").read_text())
    text_only = {k: v for k, v in config.items() if k != "vision_config"}
    assert param_counts(config).vision == vision_params(config) > 60_000
    target = get_target("rpi5")
    with_vision = onnx_genai.estimate_bytes(config, "int4", {}, target)
    text = onnx_genai.estimate_bytes(text_only, "int4", {}, target)
    table = param_counts(config).embeddings * 2  # stored at fp16 instead of fp32 beside the int4 decoder
    assert with_vision - text == 4 * vision_params(config) - table


def test_other_formats_refuse_with_a_reason(mm_checkpoint):
    from phi_edge.exporter.formats import FORMAT_MODULES
    from phi_edge.exporter.formats.vision import format_refusal

    config = json.loads((mm_checkpoint / "config.json").read_text())
    assert format_refusal(config, "onnx-genai") is None
    assert "transformers <= 4.53" in format_refusal(config, "openvino")
    assert "mlx-vlm" in format_refusal(config, "mlx")
    for fmt in FORMAT_MODULES:
        if fmt != "onnx-genai":
            assert format_refusal(config, fmt).startswith("Phi-4-multimodal exports for onnx-genai targets only")
    assert format_refusal({"model_type": "phi3"}, "gguf") is None


@pytest.mark.parametrize("target", ["intel-cpu", "apple-silicon"])
def test_export_to_another_format_refuses_up_front(mm_checkpoint, tmp_path, target):
    r = subprocess.run([sys.executable, "-m", "phi_edge.exporter.cli", str(mm_checkpoint), "--target", target,
                        "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode != 0 and not (tmp_path / "out").exists()
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "onnx-genai targets only" in lines[0], r.stderr
