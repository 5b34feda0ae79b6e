"""The SSH side of ``phi-export push``: one paramiko connection that runs shell commands on the
device and writes files over SFTP, with connection failures turned into one-line errors.

Authentication is by key only: the user's ssh-agent, their ~/.ssh keys, or ``--identity FILE``;
~/.ssh/config's HostName, User, Port and IdentityFile apply as they do for ``ssh``. A host seen for
the first time is trusted and recorded in ~/.ssh/known_hosts (OpenSSH's ``accept-new``); a host
whose key changed is refused.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from phi_edge.runtimes.errors import PhiEdgeError

CHUNK = 1 << 20
CONNECT_TIMEOUT_S = 15


class TransportError(PhiEdgeError):
    """The connection to the device broke or a write on it failed mid-copy."""


class SSHTransport:
    resumes_partial_files = True

    def __init__(self, host: str, user: str | None = None, port: int | None = None,
                 identity: str | Path | None = None):
        paramiko = _paramiko()
        cfg = _ssh_config(host)
        self.host = cfg.get("hostname", host)
        self.user = user or cfg.get("user") or _local_user()
        self.port = int(port or cfg.get("port") or 22)
        if identity:
            keys = [_load_key(paramiko, Path(identity).expanduser())]
        else:  # ~/.ssh/config's IdentityFile, where it names readable keys
            keys = [k for k in (_load_key(paramiko, Path(p).expanduser(), strict=False)
                                for p in cfg.get("identityfile", [])) if k is not None]
        self.label = f"{self.user}@{self.host}:{self.port}"
        self.client = paramiko.SSHClient()
        known = Path("~/.ssh/known_hosts").expanduser()
        try:
            known.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            known.touch(mode=0o600, exist_ok=True)
            self.client.load_host_keys(str(known))
        except OSError:
            pass  # a read-only home: the first-seen key is then trusted for this run only
        self.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        self._connect(paramiko, keys)
        self._sftp = None

    def _connect(self, paramiko, keys) -> None:
        where = f"{self.host} port {self.port}"
        try:
            self.client.connect(self.host, port=self.port, username=self.user, pkey=keys[0] if keys else None,
                                look_for_keys=not keys, timeout=CONNECT_TIMEOUT_S,
                                banner_timeout=CONNECT_TIMEOUT_S, auth_timeout=CONNECT_TIMEOUT_S)
        except paramiko.PasswordRequiredException:
            raise PhiEdgeError(f"the SSH key for {self.label} is protected by a passphrase; add it to your agent "
                               f"with 'ssh-add KEYFILE' and rerun") from None
        except paramiko.AuthenticationException:
            raise PhiEdgeError(f"SSH authentication as {self.user} on {where} failed: no key of yours is accepted "
                               f"(passwords are not used); install your public key on the device with "
                               f"'ssh-copy-id -p {self.port} {self.user}@{self.host}', "
                               f"or pass --identity FILE") from None
        except paramiko.BadHostKeyException:
            entry = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
            raise PhiEdgeError(f"the host key of {where} is not the one recorded in ~/.ssh/known_hosts; if the "
                               f"device was reinstalled, remove the old key with \"ssh-keygen -R '{entry}'\" "
                               f"and rerun") from None
        except socket.gaierror as e:
            raise PhiEdgeError(f"cannot resolve the device's host name '{self.host}' ({e.strerror}); "
                               f"check the name or use its IP address") from None
        except (socket.timeout, TimeoutError):
            raise PhiEdgeError(f"cannot reach {where}: no answer in {CONNECT_TIMEOUT_S}s; check that the device is "
                               f"on this network and the address is right") from None
        except paramiko.SSHException as e:
            raise PhiEdgeError(f"cannot open an SSH session with {where}: {e}; check that it is an SSH server "
                               f"(--port)") from None
        except OSError as e:
            raise PhiEdgeError(f"cannot reach {where}: {e.strerror or e}; check that the device is on, the "
                               f"address and --port are right and its SSH server runs") from None

    @property
    def sftp(self):
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except Exception as e:
                raise PhiEdgeError(f"{self.label} does not offer SFTP ({e}); enable the sftp subsystem in the "
                                   f"device's sshd_config") from None
        return self._sftp

    def run(self, command: str, timeout: float | None = 120) -> tuple[int, str, str]:
        """Run ``command`` in the device's shell: (exit status, stdout, stderr)."""
        try:
            _, out, err = self.client.exec_command(command, timeout=timeout)
            stdout = out.read().decode(errors="replace")
            stderr = err.read().decode(errors="replace")
            return out.channel.recv_exit_status(), stdout, stderr
        except (OSError, EOFError, _paramiko().SSHException) as e:
            raise TransportError(f"the connection to {self.label} broke ({_why(e)})") from None

    def upload(self, local: Path, remote: str, offset: int, on_bytes: Callable[[int], None]) -> None:
        """Write ``local`` to ``remote``, continuing at byte ``offset`` of a partial copy."""
        try:
            with open(local, "rb") as src, self.sftp.open(remote, "r+b" if offset else "wb") as dst:
                dst.set_pipelined(True)
                src.seek(offset)
                dst.seek(offset)
                while block := src.read(CHUNK):
                    dst.write(block)
                    on_bytes(len(block))
        except (OSError, EOFError, _paramiko().SSHException) as e:
            raise TransportError(f"writing {remote} on {self.label} failed ({_why(e)})") from None

    def rename(self, src: str, dst: str) -> None:
        try:
            self.sftp.posix_rename(src, dst)
        except (OSError, EOFError, _paramiko().SSHException) as e:
            raise TransportError(f"renaming {src} on {self.label} failed ({_why(e)})") from None

    def close(self) -> None:
        self.client.close()


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _paramiko():
    try:
        import paramiko
    except ImportError:
        raise PhiEdgeError("pushing over SSH needs paramiko; install it with: pip install 'phi-edge[device]'") from None
    return paramiko


def _load_key(paramiko, path: Path, strict: bool = True):
    """The private key in ``path`` (any type paramiko reads), or a one-line error."""
    try:
        return paramiko.PKey.from_path(path)
    except paramiko.PasswordRequiredException:
        if not strict:
            return None
        raise PhiEdgeError(f"the SSH key {path} is protected by a passphrase; add it to your agent with "
                           f"'ssh-add {path}' and leave out --identity") from None
    except (OSError, paramiko.SSHException, ValueError) as e:
        if not strict:
            return None
        raise PhiEdgeError(f"cannot read the SSH key {path}: {getattr(e, 'strerror', None) or e}") from None


def _ssh_config(host: str) -> dict:
    path = Path("~/.ssh/config").expanduser()
    if not path.is_file():
        return {}
    try:
        return dict(_paramiko().SSHConfig.from_path(str(path)).lookup(host))
    except Exception:  # a config paramiko cannot parse: ssh's own defaults then
        return {}


def _local_user() -> str:
    import getpass

    return getpass.getuser()
