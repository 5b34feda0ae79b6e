"""Phi-4-multimodal vision on ONNX Runtime GenAI: each exported part against torch, end-to-end greedy
against transformers' generate, the device-side image processor against transformers', bad input.

The tiny checkpoint carries vision-lora/ and speech-lora/ as the hub's native revision does; the reference is
transformers with the vision adapter loaded through PEFT (the export merges it into the decoder)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
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
def mm_export(session_dir, mm_checkpoint):
    from phi_edge.exporter.export import run_export

    return run_export(str(mm_checkpoint), "cpu", session_dir / "artifacts" / "phi4mm-cpu-fp32", precision="fp32",
                      smoke_test=False)


@pytest.fixture(scope="module")
def mm_artifact(mm_export):
    from pathlib import Path

    return Path(mm_export.output)


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
    model = Phi4MultimodalForCausalLM.from_pretrained(str(mm_checkpoint), dtype=torch.float32,
                                                      attn_implementation="eager").eval()
    # the vision LoRA through PEFT, unmerged, as the hub's model card loads it (the independent reference)
    model.load_adapter(str(mm_checkpoint / "vision-lora"), adapter_name="vision")
    model.set_adapter("vision")
    return model


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


def test_artifact_layout_and_config(mm_artifact, mm_export):
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
    assert manifest["runtime"]["vision"]["vision_lora"] == {"merged": True, "always_on": True, "r": 8, "alpha": 16,
                                                            "scale": 2, "weights": 8}
    assert manifest["runtime"]["vision"]["speech_lora"] == "not merged: audio is not exported"
    notes = " | ".join(mm_export.notes)
    assert "vision LoRA (vision-lora/, r=8, alpha=16, scale 2) merged into 8 decoder weights: it is always on" in notes
    assert "speech-lora/ (the speech LoRA) is not merged: audio is not exported" in notes


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
    """The builder's decoder (model.onnx, inputs_embeds, vision LoRA merged) vs transformers with the LoRA through
    PEFT on the same merged embeddings; without the adapter transformers' logits are far off (the merge counts)."""
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
    mask = torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        want = hf_model(inputs_embeds=embeds, attention_mask=mask).logits
        hf_model.disable_adapters()
        try:
            unmerged = hf_model(inputs_embeds=embeds, attention_mask=mask).logits
        finally:
            hf_model.enable_adapters()
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-3, rtol=0)
    assert float(np.abs(logits - unmerged.numpy()).max()) > 1.0


def _with_adapter(mm_checkpoint, folder, adapter_dir=None):
    """A checkpoint folder sharing ``mm_checkpoint``'s weights (links) with ``adapter_dir`` as its vision-lora/."""
    import shutil

    folder.mkdir()
    for f in mm_checkpoint.iterdir():
        if f.is_file():
            (folder / f.name).symlink_to(f)
    if adapter_dir is not None:
        shutil.copytree(adapter_dir, folder / "vision-lora")
    return folder


def test_peft_saved_adapter_merges_as_peft_does(mm_checkpoint, tmp_path):
    """An adapter written by PEFT's own save_pretrained (base_model.model.-prefixed keys, rsLoRA, a list of
    target modules) merges to PEFT's merge_and_unload weights."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import Phi4MultimodalForCausalLM

    from phi_edge.exporter.formats.vision import lora_merge

    model = Phi4MultimodalForCausalLM.from_pretrained(str(mm_checkpoint), dtype=torch.float32)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, use_rslora=True, init_lora_weights=False,
                                                  target_modules=["layers.0.self_attn.qkv_proj", "1.mlp.down_proj"]))
    peft_model.save_pretrained(tmp_path / "saved")
    keys = list(load_file(tmp_path / "saved" / "adapter_model.safetensors"))
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    want = peft_model.merge_and_unload().state_dict()

    ckpt = _with_adapter(mm_checkpoint, tmp_path / "ckpt", tmp_path / "saved")
    lora = lora_merge.find(ckpt, sorted(ckpt.glob("*.safetensors")))
    assert lora.scale == 12 / 2 and len(lora.pairs) == 2  # alpha / sqrt(r)
    tensors = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()
               if k.startswith("model.layers.")}
    lora.merge_into(tensors)
    assert lora.merged == 2
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, want[name], atol=1e-5, rtol=0)


def _edit_adapter(src, dst, config=None, drop=None, rename=None):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if drop or rename:
        tensors = load_file(dst / "adapter_model.safetensors")
        tensors = {rename.get(k, k) if rename else k: v for k, v in tensors.items() if k != drop}
        save_file(tensors, str(dst / "adapter_model.safetensors"))


VISION_PROJ = "model.embed_tokens_extend.image_embed.img_projection_down"


@pytest.mark.parametrize("edit,message", [
    ({"drop_file": True}, "has no adapter_model.safetensors"),
    ({"config": {"use_dora": True}}, "uses DoRA"),
    ({"config": {"bias": "all"}}, "trains biases"),
    ({"config": {"rank_pattern": {"qkv_proj": 4}}}, "per-layer ranks"),
    ({"config": {"r": 16}}, "says r=16"),
    ({"drop": "model.layers.1.mlp.down_proj.lora_B.weight"}, "no lora_B weight for model.layers.1.mlp.down_proj"),
    ({"rename": {"model.layers.1.mlp.down_proj.lora_A.weight": "model.layers.7.mlp.down_proj.lora_A.weight",
                 "model.layers.1.mlp.down_proj.lora_B.weight": "model.layers.7.mlp.down_proj.lora_B.weight"}},
     "targets model.layers.7.mlp.down_proj.weight, which the checkpoint does not have"),
    ({"rename": {"model.layers.0.mlp.down_proj.lora_A.weight": "model.layers.0.mlp.gate_up_proj.lora_A.weight",
                 "model.layers.0.mlp.gate_up_proj.lora_A.weight": "model.layers.0.mlp.down_proj.lora_A.weight"}},
     "does not fit the checkpoint's weight"),
    ({"config": {"target_modules": ["qkv_proj"]}}, "which target_modules ['qkv_proj'] does not name"),
    ({"config": {"target_modules": ".*"}, "rename": {  # a LoRA on the vision tower's projection
        f"model.layers.0.self_attn.o_proj.lora_{h}.weight": f"{VISION_PROJ}.lora_{h}.weight" for h in "AB"}},
     "outside the text decoder"),
])
def test_malformed_vision_lora_is_refused(mm_checkpoint, tmp_path, edit, message):
    from phi_edge.exporter.formats.vision import lora_merge
    from phi_edge.runtimes.errors import PhiEdgeError

    ckpt = _with_adapter(mm_checkpoint, tmp_path / "ckpt")
    _edit_adapter(mm_checkpoint / "vision-lora", ckpt / "vision-lora", edit.get("config"), edit.get("drop"),
                  edit.get("rename"))
    if edit.get("drop_file"):
        (ckpt / "vision-lora" / "adapter_model.safetensors").unlink()
    with pytest.raises(PhiEdgeError, match=re.escape(message)) as err:
        lora_merge.find(ckpt, sorted(ckpt.glob("*.safetensors")))
    assert "\n" not in str(err.value)


def test_malformed_vision_lora_export_leaves_nothing(mm_checkpoint, tmp_path):
    from phi_edge.exporter.export import run_export
    from phi_edge.runtimes.errors import PhiEdgeError

    ckpt = _with_adapter(mm_checkpoint, tmp_path / "ckpt")
    _edit_adapter(mm_checkpoint / "vision-lora", ckpt / "vision-lora", {"use_dora": True})
    with pytest.raises(PhiEdgeError, match="merge it with PEFT"):
        run_export(str(ckpt), "cpu", tmp_path / "out", precision="fp32", smoke_test=False)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


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


@contextlib.contextmanager
def _serving(runtime, name: str):
    """``phi-run serve``'s app for an already loaded runtime, on uvicorn on a free 127.0.0.1 port, in a thread."""
    import socket
    import threading
    import time

    import uvicorn

    from phi_edge.runtimes.serve import create_app

    app = create_app(runtime, name)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(15)
        app.state.scheduler.close()
        sock.close()


def test_serve_takes_image_parts(mm_runtime, exported):
    """phi-run serve's app with the official openai client: image_url data: URLs answer as rt.chat does
    (streamed and not; a photo-sized body over the 1 MiB text limit is taken); other URLs, a bad image and
    a text-only artifact answer one clear 400."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from phi_edge.runtimes import load

    def user(data: bytes, text: str = "What is in this picture?") -> list[dict]:
        url = "data:image/png;base64," + base64.b64encode(data).decode()
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": text}]}]

    messages = user(png(smooth(640, 360)))
    want = mm_runtime.chat(messages, max_new_tokens=8, temperature=0)
    photo = png(np.random.default_rng(1).integers(0, 255, (448, 448, 4), dtype=np.uint8), "RGBA")
    assert len(photo) * 4 / 3 > 1 << 20  # over the text-only body limit as base64; one crop
    with _serving(mm_runtime, "phi4mm") as url:
        client = openai.OpenAI(base_url=url, api_key="unused-on-loopback", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="phi4mm", messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == want.text and want.text
        assert r.usage.prompt_tokens == len(want.prompt_token_ids) > 273
        chunks = client.chat.completions.create(model="phi4mm", messages=messages, max_tokens=8, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
        r = client.chat.completions.create(model="phi4mm", messages=user(photo), max_tokens=1, temperature=0)
        assert r.usage.completion_tokens == 1 and r.usage.prompt_tokens > 273
        file_part = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]
        with pytest.raises(openai.BadRequestError, match="must be a base64 data: URL"):
            client.chat.completions.create(model="phi4mm", messages=file_part)
        with pytest.raises(openai.BadRequestError, match="not an image Pillow can read"):
            client.chat.completions.create(model="phi4mm", messages=user(b"garbage"))
        assert client.chat.completions.create(model="phi4mm", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2).choices[0].message.content is not None
    with _serving(load(exported("cpu", "fp32")), "text") as url:
        client = openai.OpenAI(base_url=url, api_key="unused-on-loopback", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="text-only model and takes no images") as err:
            client.chat.completions.create(model="text", messages=user(png(smooth(32, 32))))
        assert err.value.status_code == 400 and err.value.code == "image_input_not_supported"
