"""A throwaway OpenSSH server on 127.0.0.1, the "device" for push tests.

It runs Debian's /usr/sbin/sshd with its own config, host key and authorized_keys (a key pair
made here with paramiko), no PAM and no strict modes, so root can log in with the test key only.
Its sessions get a PATH with ``bin`` first, where a ``df`` that can pretend the disk is nearly
full (``server.fake_free_kb(n)``) sits in front of the real one, followed by this Python's bin
folder so that the device's ``phi-run`` is this checkout's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

SSHD = Path("/usr/sbin/sshd")

CONFIG = """\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UseDNS no
Subsystem sftp internal-sftp
SetEnv PATH={root}/bin:{python_bin}:/usr/local/bin:/usr/bin:/bin
"""

FAKE_DF = """\
#!/bin/sh
if [ -f {root}/df-free-kb ]; then
  echo "Filesystem 1024-blocks Used Available Capacity Mounted on"
  echo "fakefs 1048576 1048576 $(cat {root}/df-free-kb) 100% /"
  exit 0
fi
exec {df} "$@"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackSSHD:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.user_key = self.root / "user_key"

    def start(self) -> "LoopbackSSHD":
        import paramiko

        root = self.root
        (root / "bin").mkdir(parents=True, exist_ok=True)
        paramiko.ECDSAKey.generate().write_private_key_file(str(root / "host_key"))
        user = paramiko.ECDSAKey.generate()
        user.write_private_key_file(str(self.user_key))
        (root / "authorized_keys").write_text(f"{user.get_name()} {user.get_base64()} phi-edge-test\n")
        df = root / "bin" / "df"
        df.write_text(FAKE_DF.format(root=root, df=shutil.which("df") or "/bin/df"))
        df.chmod(0o755)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation folder
        log = open(root / "sshd.log", "wb")
        for _ in range(3):  # a port taken between free_port() and sshd's bind: pick another
            self.port = free_port()
            (root / "sshd_config").write_text(CONFIG.format(port=self.port, root=root,
                                                            python_bin=Path(sys.executable).parent))
            self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")],
                                         stdout=log, stderr=subprocess.STDOUT)
            if self._wait_listening():
                return self
            self.stop()
        raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()[-2000:]}")

    def _wait_listening(self, timeout: float = 10) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.1)
        return False

    def dest(self, path: Path | str) -> str:
        return f"ssh://root@127.0.0.1:{self.port}{path}"

    def fake_free_kb(self, kb: int | None) -> None:
        """Make the sessions' ``df`` report ``kb`` KiB free everywhere (None: the real df again)."""
        flag = self.root / "df-free-kb"
        if kb is None:
            flag.unlink(missing_ok=True)
        else:
            flag.write_text(f"{kb}\n")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def client_env(home: Path) -> dict[str, str]:
    """Environment for a client process: its own HOME (known_hosts, no ~/.ssh keys), no agent."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    env["HOME"] = str(home)
    return env
