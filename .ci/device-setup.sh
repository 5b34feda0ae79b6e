#!/usr/bin/env bash
# Device-test prerequisites, called by .ci/run before pytest:
# - Debian's OpenSSH server (tests/test_push.py starts its own sshd on 127.0.0.1 with a throwaway key);
# - user-mode QEMU and debootstrap, then the arm64 harness itself: Debian bookworm's aarch64 userland
#   (with libgomp1) plus the aarch64 wheels of phi-edge[onnx] and of phi-edge[gguf], cached in
#   ~/.cache/phi-edge/arm64 (or $PHI_EDGE_ARM64_CACHE).
# Without these the device tests skip on a developer's machine; with CI=true they fail instead.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}"
fi
python tests/device/arm64.py build
python tests/device/arm64.py build --extra gguf
