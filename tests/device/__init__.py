"""Test harnesses that stand in for a device on this machine: an OpenSSH server on loopback
(sshd.py) and an arm64 Debian userland under user-mode QEMU (arm64.py)."""

from __future__ import annotations

import os


def unavailable(reason: str):
    """Skip a device test whose harness this machine lacks; in CI (CI=true), where
    .ci/device-setup.sh has installed everything, a missing harness is a failure instead."""
    import pytest

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI runs .ci/device-setup.sh first, so this must be available)")
    pytest.skip(reason)
