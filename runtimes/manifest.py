"""The artifact manifest (``phi-edge.json``): what an exported folder holds and how to run it.

The runtime owns this format because it is what the runtime can load; the exporter fills it in.
A manifest names every file with its size and sha256, so a copied or tampered folder is caught
before a backend ever sees it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ManifestError

MANIFEST_NAME = "phi-edge.json"
SCHEMA_VERSION = 2  # 2: the tokenizer section says exactly which ids encode() adds (prefix_ids, suffix_ids)
FORMATS = ("onnx-genai", "openvino", "mlx", "qnn", "gguf", "coreml")


@dataclass
class FileEntry:
    path: str
    size: int
    sha256: str


@dataclass
class Manifest:
    format: str
    family: str
    target: str
    precision: str
    source: dict[str, Any]
    files: list[FileEntry]
    context_length: int
    stop_token_ids: list[int]
    chat_template: str
    tokenizer: dict[str, Any] = field(default_factory=dict)
    quantization: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    runtime: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        # schema first so a human reading the file sees it at the top
        return {"schema_version": d.pop("schema_version"), **d}

    def write(self, folder: Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema version {version!r} is not supported by this phi-edge "
                f"(it reads version {SCHEMA_VERSION}); "
                + ("re-export the model with this phi-edge (version 1 artifacts could drop the BOS token)"
                   if version == 1 else "upgrade phi-edge or re-export the model")
            )
        missing = [k for k in ("format", "family", "target", "precision", "source", "files",
                               "context_length", "stop_token_ids", "chat_template") if k not in d]
        if missing:
            raise ManifestError(f"manifest is missing {', '.join(missing)}; re-export the model")
        if d["format"] not in FORMATS:
            raise ManifestError(f"manifest names unknown format '{d['format']}'; known: {', '.join(FORMATS)}")
        d = dict(d)
        d["files"] = [FileEntry(**f) for f in d["files"]]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entries(folder: Path) -> list[FileEntry]:
    """Every file under ``folder`` except the manifest itself, sorted, with size and sha256."""
    folder = Path(folder)
    entries = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            rel = p.relative_to(folder).as_posix()
            entries.append(FileEntry(path=rel, size=p.stat().st_size, sha256=sha256_file(p)))
    return entries


def read_manifest(folder: str | Path, verify: bool = False) -> Manifest:
    """Read and check the manifest of an artifact folder.

    Always checks that every listed file is present with its recorded size; ``verify=True`` also
    checks every sha256. Raises :class:`ManifestError` naming the first problem found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"artifact folder '{folder}' does not exist; pass the folder phi-export wrote")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"'{folder}' has no {MANIFEST_NAME}; it is not a phi-edge artifact (export one with phi-export)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); re-export the model") from None
    manifest = Manifest.from_dict(data)
    check_files(folder, manifest, verify=verify)
    return manifest


def check_files(folder: Path, manifest: Manifest, verify: bool = False) -> None:
    for entry in manifest.files:
        p = folder / entry.path
        if not p.is_file():
            raise ManifestError(f"artifact file '{entry.path}' is missing from {folder}; copy the whole folder again")
        size = p.stat().st_size
        if size != entry.size:
            raise ManifestError(
                f"artifact file '{entry.path}' is {size} bytes, manifest says {entry.size}: "
                f"it was altered or copied incompletely; copy the folder again"
            )
        if verify and sha256_file(p) != entry.sha256:
            raise ManifestError(
                f"artifact file '{entry.path}' fails its sha256 check: it was altered or corrupted; "
                f"copy the folder again"
            )
