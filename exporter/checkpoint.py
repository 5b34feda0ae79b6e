"""Find a Phi checkpoint (local folder, Hugging Face hub id, or the built-in demo) and validate it
before any heavy work: config, architecture, complete and sane weights, tokenizer."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi_edge.runtimes.errors import PhiEdgeError

DEFAULT_MODEL = "microsoft/Phi-3.5-mini-instruct"
SUPPORTED_ARCHITECTURES = {
    "Phi3ForCausalLM": "Phi-3 / Phi-3.5-mini / Phi-3-medium / Phi-4-mini",
    "PhiMoEForCausalLM": "Phi-3.5-MoE",
    "PhimoeForCausalLM": "Phi-3.5-MoE (as transformers 5 names it)",
    "Phi4MultimodalForCausalLM": "Phi-4-multimodal, transformers' native phi4_multimodal (vision; onnx-genai only)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class CheckpointError(PhiEdgeError):
    pass


@dataclass
class Checkpoint:
    """A validated local checkpoint folder and what we read from it."""

    path: Path
    source: str  # what the user named: a hub id, a folder, or demo[:family]
    config: dict[str, Any]
    config_sha256: str
    architecture: str
    family: str  # phi3 | phi3-128k | phimoe | phi4-mini | phi4-multimodal
    weight_files: list[Path]
    weight_format: str  # safetensors | pytorch
    trust_remote_code: bool = False
    revision: str | None = None

    @property
    def is_moe(self) -> bool:
        return self.family == "phimoe"

    @property
    def max_context(self) -> int:
        return int(self.config.get("max_position_embeddings", 4096))

    @property
    def weights_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.weight_files)

    @property
    def tokenizer_bytes(self) -> int:
        """Bytes of the files every artifact copies from the checkpoint as they are."""
        return sum((self.path / n).stat().st_size for n in TOKENIZER_FILES if (self.path / n).is_file())

    def tokenizer_config(self) -> dict[str, Any]:
        p = self.path / "tokenizer_config.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def generation_config(self) -> dict[str, Any]:
        p = self.path / "generation_config.json"
        return json.loads(p.read_text()) if p.is_file() else {}



def unsupported_architecture(arch: str) -> CheckpointError:
    if arch == "Phi3VForCausalLM":
        return CheckpointError("Phi-3-vision / Phi-3.5-vision (remote-code phi3_v) are not exported by phi-edge yet; "
                               "Phi-4-multimodal (transformers' native phi4_multimodal) exports with vision for the "
                               "onnx-genai targets")
    supported = ", ".join(f"{a} ({what})" for a, what in SUPPORTED_ARCHITECTURES.items())
    return CheckpointError(f"architecture {arch} is not supported; supported are: {supported}")

def rope_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The rope scaling of a config in either spelling: the hub's ``rope_scaling`` or transformers 5's
    ``rope_parameters``; empty for plain rope."""
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    return rope if (rope.get("type") or rope.get("rope_type")) not in (None, "default") else {}


def family_of(config: dict[str, Any]) -> str:
    arch = (config.get("architectures") or [""])[0]
    if arch in ("PhiMoEForCausalLM", "PhimoeForCausalLM") or config.get("model_type") == "phimoe":
        return "phimoe"
    if config.get("model_type") == "phi4_multimodal":
        return "phi4-multimodal"
    if config.get("partial_rotary_factor", 1.0) < 1.0 or config.get("vocab_size", 0) > 100_000:
        return "phi4-mini"
    rope = rope_settings(config)
    if (rope.get("type") or rope.get("rope_type")) in ("longrope", "su"):
        return "phi3-128k"
    return "phi3"


def resolve(model: str | None, revision: str | None = None, allow_pickle: bool = False,
            trust_remote_code: bool = False) -> Checkpoint:
    """Turn what the user named into a validated :class:`Checkpoint`."""
    source = model or DEFAULT_MODEL
    if source == "demo" or source.startswith("demo:"):
        from .fixtures import demo_checkpoint

        family = source.split(":", 1)[1] if ":" in source else "phi3"
        path = demo_checkpoint(family)
    elif Path(source).expanduser().exists():
        path = Path(source).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"'{source}' is a file; pass the checkpoint folder that holds config.json")
    elif _HUB_ID.match(source):
        path = _from_hub(source, revision, allow_pickle, trust_remote_code, defaulted=model is None)
    else:
        raise CheckpointError(
            f"'{source}' is neither a local folder nor a Hugging Face model id (owner/name); "
            f"pass a checkpoint folder, a hub id, or 'demo' for the built-in tiny model"
        )
    return validate(path, source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                    revision=revision)


def read_config(model: str | None, revision: str | None = None) -> tuple[str, dict[str, Any], int]:
    """(source, config, bytes of tokenizer files) without touching the weights: what ``plan`` needs.
    For a hub id only config.json (and the tokenizer files' sizes) are fetched."""
    source = model or DEFAULT_MODEL
    if source == "demo" or source.startswith("demo:") or Path(source).expanduser().exists():
        if source.startswith("demo"):
            from .fixtures import demo_checkpoint

            path = demo_checkpoint(source.split(":", 1)[1] if ":" in source else "phi3")
        else:
            path = Path(source).expanduser()
        cfg = path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"'{path}' has no config.json; pass the folder of a Hugging Face checkpoint")
        try:
            config = json.loads(cfg.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg} is not valid JSON ({e}); re-download the checkpoint") from None
        tok = sum((path / n).stat().st_size for n in TOKENIZER_FILES if (path / n).is_file())
    elif _HUB_ID.match(source):
        path = _from_hub(source, revision, False, False, defaulted=model is None, patterns=["config.json"])
        config = json.loads((path / "config.json").read_text())
        tok = 2 * 1024**2  # tokenizer files of a Phi model: about 2 MiB
    else:
        raise CheckpointError(
            f"'{source}' is neither a local folder nor a Hugging Face model id (owner/name); "
            f"pass a checkpoint folder, a hub id, or 'demo' for the built-in tiny model"
        )
    arch = (config.get("architectures") or ["(none)"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(arch)
    return source, config, tok


# never used by an export: Phi-4-multimodal's audio adapter (audio is not exported; ~0.9 GB)
HUB_SKIPPED = ["speech-lora/*"]


def _from_hub(repo: str, revision: str | None, allow_pickle: bool, trust_remote_code: bool,
              defaulted: bool, patterns: list[str] | None = None) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError("loading from the Hugging Face hub needs huggingface_hub: "
                              "pip install 'phi-edge[export]', or pass a local folder") from None
    patterns = patterns or ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
    if allow_pickle:
        patterns.append("*.bin")
    if trust_remote_code:
        patterns.append("*.py")
    try:  # the local cache first: works offline and costs nothing
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=HUB_SKIPPED,
                                      local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns, ignore_patterns=HUB_SKIPPED))
    except Exception as e:
        named = "no model was named, so the default " if defaulted else ""
        kind = type(e).__name__
        hint = ("pass a local checkpoint folder (phi-export ./Phi-3.5-mini-instruct ...) or try the built-in "
                "tiny model (phi-export demo ...)")
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            raise CheckpointError(f"{named}'{repo}' was not found on the Hugging Face hub or needs a login "
                                  f"(huggingface-cli login); {hint}") from None
        raise CheckpointError(
            f"{named}'{repo}' is not in the local Hugging Face cache and the hub cannot be reached "
            f"(offline? {kind}); {hint}"
        ) from None


def validate(path: Path, source: str | None = None, allow_pickle: bool = False,
             trust_remote_code: bool = False, revision: str | None = None) -> Checkpoint:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{path}' has no config.json; pass the folder of a Hugging Face checkpoint")
    raw = cfg_path.read_bytes()
    try:
        config = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-download the checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} does not hold a JSON object; re-download the checkpoint")
    arch = (config.get("architectures") or ["(none)"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise unsupported_architecture(arch)
    if config.get("auto_map") and trust_remote_code:
        pass  # the user asked for the repository's own code
    weights, fmt = _weights(path, allow_pickle)
    if not any((path / n).is_file() for n in ("tokenizer.json", "tokenizer.model")):
        raise CheckpointError(f"'{path}' has no tokenizer (tokenizer.json or tokenizer.model); "
                              f"copy the tokenizer files from the original repository into it")
    return Checkpoint(path=path, source=source or str(path), config=config,
                      config_sha256=hashlib.sha256(raw).hexdigest(), architecture=arch,
                      family=family_of(config), weight_files=weights, weight_format=fmt,
                      trust_remote_code=trust_remote_code, revision=revision)


def _weights(path: Path, allow_pickle: bool) -> tuple[list[Path], str]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-download the checkpoint") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"weight shard {missing[0]} named in model.safetensors.index.json is missing "
                                  f"from '{path}' ({len(missing)} of {len(shards)} missing); "
                                  f"finish the download or re-download the checkpoint")
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if files:
        for f in files:
            check_safetensors(f)
        return files, "safetensors"
    pickles = sorted(path.glob("pytorch_model*.bin"))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(
                f"'{path}' has only pickle weights (.bin), which can run arbitrary code when loaded; "
                f"convert them to safetensors, or pass --allow-pickle if you trust this checkpoint")
        return pickles, "pytorch"
    raise CheckpointError(f"'{path}' has no weights (*.safetensors); finish the download or pass another folder")


def check_safetensors(f: Path) -> None:
    """The file's header parses and its tensors end exactly where the file does."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n <= 0 or 8 + n > size:
                raise ValueError("header length exceeds the file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"weight file {f.name} is not a valid safetensors file ({e}); "
                              f"it is probably truncated: re-download it") from None
    if 8 + n + end != size:
        raise CheckpointError(f"weight file {f.name} is {size} bytes but its header needs {8 + n + end}: "
                              f"it is truncated or corrupted; re-download it")
