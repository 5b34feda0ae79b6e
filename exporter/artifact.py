"""Atomic artifact folders: build in a staging folder beside the output, move into place when
complete, leave nothing behind on failure or Ctrl-C. Also assembles the manifest."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

from phi_edge.runtimes.errors import PhiEdgeError
from phi_edge.runtimes.manifest import Manifest, file_entries

STAGING_PREFIX = ".phi-edge-staging-"


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PhiEdgeError(f"output '{out}' is a file; choose a folder path with -o")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PhiEdgeError(f"output folder '{out}' exists and is not empty; pass --force to replace it "
                           f"or choose another folder with -o")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the staging folder is removed either way."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def staging(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; on success it becomes ``out``, on failure it is removed."""
    out = Path(out).resolve()
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out.name}-", dir=out.parent))
    try:
        with _sigterm_as_interrupt():
            yield tmp
            if out.exists():
                backup = out.with_name(f"{STAGING_PREFIX}{out.name}-old-{os.getpid()}")
                out.rename(backup)
                tmp.rename(out)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_staging(parent: Path) -> None:
    """Staging folders of exports that were killed outright (SIGKILL, power loss)."""
    for p in parent.glob(f"{STAGING_PREFIX}*"):
        try:
            pid_alive = False
            if "-old-" in p.name:
                pid = int(p.name.rsplit("-", 1)[1])
                pid_alive = _alive(pid)
            if not pid_alive and _age_s(p) > 3600:
                shutil.rmtree(p, ignore_errors=True)
        except (ValueError, OSError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _age_s(p: Path) -> float:
    return _dt.datetime.now().timestamp() - p.stat().st_mtime


def build_manifest(folder: Path, *, ckpt, target, precision: str, fmt: str, context_length: int,
                   quantization: dict[str, Any], runtime: dict[str, Any], tools: dict[str, str],
                   memory: dict[str, Any], tokenizer: dict[str, Any],
                   verification: dict[str, Any] | None = None) -> Manifest:
    """Fill in the manifest for the files now in ``folder`` and write it there. ``tokenizer`` is
    :func:`phi_edge.exporter.source_tokenizer.manifest_entry`: what the source's encode adds."""
    from .source_tokenizer import chat_template_of

    manifest = Manifest(
        format=fmt, family=ckpt.family, target=target.name, precision=precision,
        source={"model": ckpt.source, "path": str(ckpt.path), "revision": ckpt.revision,
                "architecture": ckpt.architecture, "config_sha256": ckpt.config_sha256},
        files=file_entries(folder), context_length=context_length,
        stop_token_ids=stop_token_ids(ckpt, ckpt.generation_config()),
        chat_template=chat_template_of(ckpt.path, ckpt.tokenizer_config()),
        tokenizer={**tokenizer, "files": [f for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
                                          if (folder / f).is_file()]},
        quantization=quantization,
        generation={"max_new_tokens": 256, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                    "repetition_penalty": 1.0},
        memory=memory, runtime=runtime, tools=tools, verification=verification or {},
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    manifest.write(folder)
    return manifest


def stop_token_ids(ckpt, gen_cfg: dict[str, Any]) -> list[int]:
    """``<|end|>`` and ``<|endoftext|>`` (and whatever else generation_config lists as EOS)."""
    ids: list[int] = []
    for src in (gen_cfg.get("eos_token_id"), ckpt.config.get("eos_token_id")):
        if isinstance(src, int):
            src = [src]
        for i in src or []:
            if i not in ids:
                ids.append(int(i))
    vocab = _added_tokens(ckpt.path)
    for name in ("<|end|>", "<|endoftext|>"):
        if name in vocab and vocab[name] not in ids:
            ids.append(vocab[name])
    return ids


def _added_tokens(path: Path) -> dict[str, int]:
    import json

    p = path / "tokenizer.json"
    if not p.is_file():
        return {}
    try:
        return {t["content"]: t["id"] for t in json.loads(p.read_text()).get("added_tokens", [])}
    except (ValueError, KeyError, TypeError):
        return {}
