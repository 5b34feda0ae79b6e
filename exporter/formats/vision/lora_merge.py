"""Merge a native Phi-4-multimodal checkpoint's PEFT vision LoRA (``vision-lora/``) into its decoder weights.

transformers' convert_phi4_multimodal_weights_to_hf.py splits the hub model's LoRA layers into PEFT
adapter folders: ``vision-lora/`` (r=256, alpha=512) and ``speech-lora/`` (r=320, alpha=640).
onnxruntime-genai's own Phi-4-MM export always runs the vision LoRA in the decoder (its default adapter,
text-only prompts included), so merging W' = W + scale * B @ A gives that same model. The speech LoRA
is left out with the audio tower. Only plain LoRA on Linear weights is merged; anything else is refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from phi_edge.runtimes.errors import PhiEdgeError

from .text_checkpoint import TEXT_KEYS

ADAPTER_DIR = "vision-lora"
IGNORED_DIRS = ("speech-lora",)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's save_pretrained writes it; the conversion script does not
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<half>[AB])\.weight")
# adapter_config.json fields that change the math or the weights' layout: any truthy value is refused
UNSUPPORTED = {
    "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (transposed weights)",
    "rank_pattern": "per-layer ranks (rank_pattern)", "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)", "lora_bias": "a bias on lora_B (lora_bias)",
    "layers_to_transform": "layers_to_transform", "layer_replication": "layer_replication",
    "trainable_token_indices": "trained token rows (trainable_token_indices)",
    "target_parameters": "target_parameters", "use_qalora": "QALoRA", "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA", "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA",
}
FIX = ("merge it with PEFT (PeftModel.merge_and_unload) and export the merged checkpoint without the "
       "vision-lora/ folder")


@dataclass
class VisionLora:
    """A checked vision adapter: base weight name -> (lora_A, lora_B) names in its safetensors file."""
    folder: Path
    rank: int
    alpha: float
    scale: float
    pairs: dict[str, tuple[str, str]] = field(default_factory=dict)
    merged: int = 0

    def merge_into(self, tensors: dict) -> None:
        """W += scale * B @ A (in fp32, cast back to W's dtype) for the targets among one shard's tensors."""
        import torch
        from safetensors import safe_open

        names = [k for k in tensors if k in self.pairs]
        if not names:
            return
        with safe_open(str(self.folder / WEIGHTS_FILE), "pt") as sf:
            for name in names:
                a_key, b_key = self.pairs[name]
                a, b = sf.get_tensor(a_key).float(), sf.get_tensor(b_key).float()
                w = tensors[name]
                tensors[name] = torch.addmm(w.float(), b, a, alpha=self.scale).to(w.dtype)
                self.merged += 1

    def check_complete(self) -> None:
        """After the last shard: every target was merged once."""
        if self.merged != len(self.pairs):
            raise PhiEdgeError(f"merged the vision LoRA into {self.merged} of its {len(self.pairs)} target weights; "
                               f"the checkpoint's shards repeat or miss a weight: download the checkpoint again")


def find(path: Path, weight_files: list[Path]) -> VisionLora | None:
    """The checkpoint's ``vision-lora/`` adapter, checked against its weights (names and shapes read from
    the safetensors headers only); None when it has none."""
    folder = Path(path) / ADAPTER_DIR
    if not folder.is_dir():
        return None
    config = _read_config(folder)
    shapes = _adapter_shapes(folder)
    raw_rank, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(raw_rank) if config.get("use_rslora") else alpha / raw_rank
    lora = VisionLora(folder, raw_rank, alpha, scale)
    halves: dict[str, dict[str, str]] = {}
    for key in shapes:
        m = LORA_KEY.fullmatch(key)
        if not m:
            raise PhiEdgeError(f"{folder / WEIGHTS_FILE} holds {key}, which is not a LoRA lora_A/lora_B weight; "
                               f"phi-edge merges plain LoRA only: {FIX}")
        module = m["module"].removeprefix(PEFT_PREFIX)
        halves.setdefault(module, {})[m["half"]] = key
    if not halves:
        raise PhiEdgeError(f"{folder / WEIGHTS_FILE} holds no LoRA weights; use the adapter that came with this "
                           f"checkpoint or remove the empty vision-lora/ folder")
    base = _checkpoint_shapes(weight_files)
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise PhiEdgeError(f"{folder / WEIGHTS_FILE} has no {missing} weight for {module}; the adapter is "
                               f"incomplete: copy it again from the checkpoint's source")
        if not _targeted(config, module):
            raise PhiEdgeError(f"{folder / WEIGHTS_FILE} has LoRA weights for {module}, which target_modules "
                               f"{config.get('target_modules')!r} does not name (PEFT would not load them); "
                               f"fix target_modules in {CONFIG_FILE} or use the adapter that came with this checkpoint")
        a, b, name = shapes[pair["A"]], shapes[pair["B"]], f"{module}.weight"
        if not name.startswith(TEXT_KEYS):
            raise PhiEdgeError(f"the vision LoRA targets {name}, outside the text decoder; phi-edge merges LoRA into "
                               f"the decoder only: {FIX}")
        if name not in base:
            raise PhiEdgeError(f"the vision LoRA targets {name}, which the checkpoint does not have; is "
                               f"{folder} this checkpoint's adapter? Use the vision-lora/ folder that came with it")
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or (b[0], a[1]) != tuple(base[name]):
            raise PhiEdgeError(f"the vision LoRA for {name} (lora_A {list(a)}, lora_B {list(b)}) does not fit the "
                               f"checkpoint's weight {list(base[name])}; use the vision-lora/ folder that came with "
                               f"this checkpoint")
        if a[0] != raw_rank:
            raise PhiEdgeError(f"the vision LoRA for {name} has rank {a[0]} but {CONFIG_FILE} says r={raw_rank}; "
                               f"set r to the weights' rank (phi-edge does not read rank_pattern)")
        lora.pairs[name] = (pair["A"], pair["B"])
    return lora


def notes(path: Path, lora: VisionLora | None) -> list[str]:
    """The export's notes on the adapters it merged and the ones it left out."""
    out = []
    if lora is not None:
        out.append(f"vision LoRA ({ADAPTER_DIR}/, r={lora.rank}, alpha={lora.alpha:g}, scale {lora.scale:g}) merged "
                   f"into {lora.merged} decoder weights: it is always on, text-only prompts included, as in "
                   f"onnxruntime-genai's own Phi-4-multimodal export (which runs it as its default adapter)")
    for name in IGNORED_DIRS:
        if (Path(path) / name).is_dir():
            out.append(f"{name}/ (the speech LoRA) is not merged: audio is not exported")
    return out


def manifest_entry(path: Path, lora: VisionLora | None) -> dict:
    """What the manifest's ``runtime.vision`` records about the adapters."""
    entry: dict = {}
    if lora is not None:
        entry["vision_lora"] = {"merged": True, "always_on": True, "r": lora.rank, "alpha": lora.alpha,
                                "scale": lora.scale, "weights": lora.merged}
    for name in IGNORED_DIRS:
        if (Path(path) / name).is_dir():
            entry[name.replace("-", "_")] = "not merged: audio is not exported"
    return entry


def _read_config(folder: Path) -> dict:
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / needed).is_file():
            raise PhiEdgeError(f"{folder} has no {needed}; a PEFT adapter folder needs both {CONFIG_FILE} and "
                               f"{WEIGHTS_FILE} (transformers' convert_phi4_multimodal_weights_to_hf.py writes "
                               f"them): copy the adapter again, or remove the folder if its weights are merged")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise PhiEdgeError(f"{folder / CONFIG_FILE} is not valid JSON ({e}); copy the adapter again") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise PhiEdgeError(f"{folder / CONFIG_FILE} is a {config.get('peft_type') if isinstance(config, dict) else '?'}"
                           f" adapter, not LoRA; phi-edge merges LoRA adapters only: merge it with PEFT and export "
                           f"the merged checkpoint without the vision-lora/ folder")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise PhiEdgeError(f"{folder / CONFIG_FILE} uses {what} ({key}={config[key]!r}), which phi-edge's LoRA "
                               f"merge does not support; {FIX}")
    if config.get("bias", "none") != "none":
        raise PhiEdgeError(f"{folder / CONFIG_FILE} trains biases (bias={config['bias']!r}), which phi-edge's LoRA "
                           f"merge does not support; {FIX}")
    return config


def _adapter_shapes(folder: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    try:
        with safe_open(str(folder / WEIGHTS_FILE), "pt") as sf:
            return {k: list(sf.get_slice(k).get_shape()) for k in sf.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise PhiEdgeError(f"{folder / WEIGHTS_FILE} is not a readable safetensors file ({e}); copy the adapter "
                           f"again") from None


def _checkpoint_shapes(weight_files: list[Path]) -> dict[str, list[int]]:
    from safetensors import safe_open

    shapes = {}
    for f in weight_files:
        with safe_open(str(f), "pt") as sf:
            shapes.update({k: list(sf.get_slice(k).get_shape()) for k in sf.keys()})
    return shapes


def _targeted(config: dict, module: str) -> bool:
    """PEFT's own rule: a string target_modules is a regex the module name must fully match, a list names
    modules by their last parts; exclude_modules the same way."""
    def named(spec) -> bool:
        if spec == "all-linear":  # every Linear but the output layer
            return module != "lm_head"
        if isinstance(spec, str):
            return re.fullmatch(spec, module) is not None
        return any(module == s or module.endswith(f".{s}") for s in spec or ())

    return named(config.get("target_modules")) and not named(config.get("exclude_modules"))
