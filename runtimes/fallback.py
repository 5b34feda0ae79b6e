"""Local artifact or endpoint: ``load(folder, fallback=url, model=...)`` picks the artifact when it loads
and its manifest's RAM estimate fits the memory available now, the endpoint otherwise."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from .errors import PhiEdgeError
from .manifest import read_manifest


def available_ram_bytes() -> int | None:
    """Memory available to a new process now: psutil, else /proc/meminfo, else sysconf; None if unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def load_with_fallback(path: str | Path, load_local: Callable[[], Any], open_remote: Callable[[], Any]):
    """The local runtime when it fits and loads, else the remote one; ``.source`` says which answers and
    ``.fallback_reason`` why the endpoint was chosen (None for the local artifact)."""
    reason = None
    try:
        manifest = read_manifest(path)
        need = int(manifest.memory.get("estimated_runtime_bytes") or 0)
        have = available_ram_bytes()
        if need and have is not None and need > have:
            reason = (f"the artifact needs about {need / 2**20:.0f} MiB of RAM and {have / 2**20:.0f} MiB "
                      f"are available")
        else:
            runtime = load_local()
            runtime.source, runtime.fallback_reason = "local", None
            return runtime
    except (PhiEdgeError, OSError, ImportError, MemoryError) as e:
        reason = f"the local artifact did not load: {e}"
    runtime = open_remote()
    runtime.fallback_reason = reason
    return runtime
