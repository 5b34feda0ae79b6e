"""The Android side of ``phi-export push``: the ``adb`` program runs shell commands on the phone
and pushes files to it. adb cannot append, so a partly sent file is sent again whole; files
already on the phone with the right sha256 are still skipped."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

from phi_edge.runtimes.errors import PhiEdgeError

from .ssh import TransportError


class AdbTransport:
    resumes_partial_files = False

    def __init__(self, serial: str | None):
        exe = shutil.which("adb")
        if exe is None:
            raise PhiEdgeError("pushing to adb:// needs the adb program, which is not on PATH; install Android "
                               "platform-tools (Debian/Ubuntu: apt-get install adb) and enable USB debugging "
                               "on the phone")
        self.base = [exe, *(["-s", serial] if serial else [])]
        self.label = f"adb device {serial}" if serial else "the adb device"
        p = self._adb(["get-state"], timeout=30)
        if p.returncode != 0 or p.stdout.strip() != "device":
            detail = (p.stderr or p.stdout).strip().splitlines()
            why = detail[-1] if detail else f"state {p.stdout.strip()}"
            raise PhiEdgeError(f"adb cannot reach {self.label} ({why}); check 'adb devices' and that the phone "
                               f"accepted this computer")

    def _adb(self, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(self.base + args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(f"adb did not answer within {timeout:.0f}s talking to {self.label}") from None

    def run(self, command: str, timeout: float | None = 120) -> tuple[int, str, str]:
        p = self._adb(["shell", command], timeout=timeout)
        return p.returncode, p.stdout, p.stderr

    def upload(self, local: Path, remote: str, offset: int, on_bytes: Callable[[int], None]) -> None:
        p = self._adb(["push", str(local), remote])
        if p.returncode != 0:
            raise TransportError(f"adb push of {local.name} to {self.label} failed: "
                                 f"{(p.stderr or p.stdout).strip()[-300:]}")
        on_bytes(Path(local).stat().st_size)

    def rename(self, src: str, dst: str) -> None:
        from shlex import quote

        rc, _, err = self.run(f"mv -f -- {quote(src)} {quote(dst)}")
        if rc != 0:
            raise TransportError(f"renaming {src} on {self.label} failed: {err.strip()}")

    def close(self) -> None:
        pass
