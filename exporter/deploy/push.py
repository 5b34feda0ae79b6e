"""``phi-export push ARTIFACT DEST``: copy an artifact folder to a device and check it there.

DEST is ``ssh://user@host[:port]/path``, ``user@host:path`` (SSH, through paramiko),
``adb://SERIAL/path`` (Android, through the adb program) or ``ollama://HOST[:PORT]/NAME`` (a GGUF
artifact into an Ollama server as model NAME, see :mod:`.ollama`). The copy lands in a staging folder beside
DEST and is renamed into place only when every file has arrived with its manifest sha256, so the
device never holds half an artifact under DEST. Files already on the device with the right sha256
are not sent again, a partly sent file continues where it stopped, and a failed copy keeps the
staging folder so that rerunning the command resumes it. Then the device's own
``phi-run DEST --verify --json`` checks every file, loads the artifact and generates.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from phi_edge.runtimes.errors import PhiEdgeError
from phi_edge.runtimes.manifest import MANIFEST_NAME, Manifest, read_manifest, sha256_file

STAGING_PREFIX = ".phi-edge-push-"
OLD_PREFIX = ".phi-edge-old-"
PARTIAL = ".partial"
FORMS = "ssh://user@host[:port]/path, user@host:path, adb://SERIAL/path or ollama://HOST[:PORT]/NAME"
q = shlex.quote

# sha256 on a device without sha256sum: "HASH  NAME" lines like sha256sum's
_PY_SHA256 = ("import hashlib,sys\nfor p in sys.argv[1:]:\n h=hashlib.sha256()\n f=open(p,'rb')\n"
              " for b in iter(lambda:f.read(1<<20),b''):h.update(b)\n print(h.hexdigest()+'  '+p)")


@dataclass
class Destination:
    scheme: str  # "ssh", "adb" or "ollama"
    host: str  # host name, or adb serial ("" for adb's only device)
    path: str  # absolute, or relative to the login's home folder; ollama: the model NAME
    user: str | None = None
    port: int | None = None

    def __str__(self) -> str:
        if self.scheme == "adb":
            return f"adb://{self.host}{self.path}"
        if self.scheme == "ollama":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"ollama://{host}:{self.port or 11434}/{self.path}"
        path = self.path if self.path.startswith("/") else "/~/" + self.path
        return f"ssh://{self.user + '@' if self.user else ''}{self.host}{f':{self.port}' if self.port else ''}{path}"


@dataclass
class _File:
    rel: str
    size: int
    sha256: str
    local: Path


def _split_url(dest: str) -> tuple[urllib.parse.SplitResult, int | None]:
    u = urllib.parse.urlsplit(dest)
    try:
        return u, u.port
    except ValueError:
        raise PhiEdgeError(f"destination '{dest}' has a bad port number") from None


def parse_destination(dest: str) -> Destination:
    bad = PhiEdgeError(f"destination '{dest}' is not one of {FORMS}")
    if dest.startswith("ssh://"):
        u, port = _split_url(dest)
        path = urllib.parse.unquote(u.path)
        path = path[3:] if path.startswith("/~/") else path
        if not u.hostname or path.strip("/") in ("", "~"):
            raise bad
        return Destination("ssh", u.hostname, path, urllib.parse.unquote(u.username) if u.username else None, port)
    if dest.startswith("adb://"):
        serial, slash, path = dest[len("adb://"):].partition("/")
        if not slash or not path.strip("/"):
            raise bad
        return Destination("adb", serial, "/" + path)
    if dest.startswith("ollama://"):
        u, port = _split_url(dest)
        name = urllib.parse.unquote(u.path).strip("/")
        if not u.hostname or u.username or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-/]*(:[A-Za-z0-9_.\-]+)?", name):
            raise PhiEdgeError(f"destination '{dest}' is not ollama://HOST[:PORT]/NAME (NAME: an Ollama model name "
                               f"such as my-phi or my-phi:q4)")
        return Destination("ollama", u.hostname, name, None, port)
    m = re.fullmatch(r"(?:([^@/:]+)@)?(\[[^\]]+\]|[^@/:\[\]]+):(.+)", dest)
    if not m or m.group(3).strip("/") in ("", "~"):
        raise bad
    path = m.group(3)[2:] if m.group(3).startswith("~/") else m.group(3)
    return Destination("ssh", m.group(2).strip("[]"), path, m.group(1))


def open_transport(d: Destination, identity: str | Path | None = None):
    if d.scheme == "adb":
        from .adb import AdbTransport

        return AdbTransport(d.host or None)
    from .ssh import SSHTransport

    return SSHTransport(d.host, d.user, d.port, identity)


def push(artifact: str | Path, dest: str, identity: str | Path | None = None, port: int | None = None,
         remote_phi_run: str = "phi-run", verify: bool = True, on_start: Callable[[int], None] | None = None,
         on_bytes: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Copy the artifact folder to ``dest`` and (``verify``) check it with the device's phi-run.

    ``on_start(bytes_to_send)`` and ``on_bytes(n)`` report progress. Returns the report that
    ``--json`` prints; ``report["device_verify"]["status"]`` is ok, failed or not-installed.
    """
    folder = Path(artifact)
    manifest = read_manifest(folder, verify=True)
    files = [_File(e.path, e.size, e.sha256, folder / e.path) for e in manifest.files]
    mpath = folder / MANIFEST_NAME
    files.append(_File(MANIFEST_NAME, mpath.stat().st_size, sha256_file(mpath), mpath))  # last: marks complete
    d = parse_destination(dest)
    if port is not None:
        if d.scheme != "ssh":
            raise PhiEdgeError("--port is for ssh:// destinations")
        d.port = port
    if d.scheme == "ollama":
        from .ollama import push_ollama

        return push_ollama(folder, manifest, d.host, d.port, d.path, on_start or _ignore, on_bytes or _ignore)
    t = open_transport(d, identity)
    try:
        report = _copy(t, d, files, on_start or _ignore, on_bytes or _ignore)
        report["artifact"] = str(folder)
        report["device_verify"] = device_verify(t, report["remote_path"], manifest, remote_phi_run) if verify else None
        return report
    finally:
        t.close()


def verify_on_device(dest: str, identity: str | Path | None = None, port: int | None = None,
                     remote_phi_run: str = "phi-run", manifest: Manifest | None = None) -> dict[str, Any]:
    """Run the device's ``phi-run DEST --verify --json`` on an artifact already there."""
    d = parse_destination(dest)
    d.port = port or d.port
    t = open_transport(d, identity)
    try:
        return device_verify(t, _remote_path(t, d.path), manifest, remote_phi_run)
    finally:
        t.close()


def _copy(t, d: Destination, files: list[_File], on_start, on_bytes) -> dict[str, Any]:
    start = time.perf_counter()
    target = _remote_path(t, d.path)
    parent, name = posixpath.split(target)
    staging = f"{parent}/{STAGING_PREFIX}{name}"
    where = f"{t.label}:{target}"
    state, at_target, at_staging, free = _survey(t, target, staging)
    if state == "file":
        raise PhiEdgeError(f"{where} is a file; pass a folder path for the artifact")
    if state == "other":
        raise PhiEdgeError(f"{where} is a folder that holds something other than a phi-edge artifact; push replaces "
                           f"the folder it copies to, so pass a new or empty folder")
    report: dict[str, Any] = {"destination": str(d), "remote_path": target, "files": len(files),
                              "total_bytes": sum(f.size for f in files), "sent": [], "resumed": [], "skipped": [],
                              "bytes_sent": 0, "up_to_date": False}
    # complete copies: the right size, then the right sha256 (one hashing pass over both folders)
    sized = [f"{target}/{f.rel}" for f in files if at_target.get(f.rel) == f.size]
    sized += [f"{staging}/{f.rel}" for f in files if at_staging.get(f.rel) == f.size]
    hashes = _hashes(t, sized)
    in_target = {f.rel for f in files if hashes.get(f"{target}/{f.rel}") == f.sha256}
    if len(in_target) == len(files):
        if at_staging:
            _sh(t, f"rm -rf {q(staging)}")  # an interrupted push of some other version, now moot
        report.update(skipped=[f.rel for f in files], up_to_date=True, seconds=round(time.perf_counter() - start, 3))
        return report
    in_staging = {f.rel for f in files if hashes.get(f"{staging}/{f.rel}") == f.sha256}
    todo = [f for f in files if f.rel not in in_staging and f.rel not in in_target]
    offsets = {}
    for f in todo:
        have = at_staging.get(f.rel + PARTIAL, 0) if t.resumes_partial_files else 0
        offsets[f.rel] = have if have <= f.size else 0
    need = sum(f.size - offsets[f.rel] for f in todo)
    if free is not None and free < need:
        from ..sizing import human

        raise PhiEdgeError(f"not enough free space for the artifact at {where}: it needs {human(need)} more and "
                           f"the device has {human(free)} free there; free some space or choose another folder")
    _sh(t, _prepare_script(staging, target, files, at_staging, in_target - in_staging, todo))
    report["skipped"] = [f.rel for f in files if f not in todo]

    def counted(n: int) -> None:
        report["bytes_sent"] += n
        on_bytes(n)

    def send(f: _File, offset: int) -> None:
        try:
            t.upload(f.local, f"{staging}/{f.rel}{PARTIAL}", offset, counted)
            t.rename(f"{staging}/{f.rel}{PARTIAL}", f"{staging}/{f.rel}")
        except PhiEdgeError as e:
            done = len(files) - len(todo) + todo.index(f)
            raise PhiEdgeError(f"{e}; the copy stopped with {done} of {len(files)} files on the device (kept in "
                               f"{staging}); rerun the same command to resume") from None

    on_start(need)
    for f in todo:
        send(f, offsets[f.rel])
        (report["resumed"] if offsets[f.rel] else report["sent"]).append(f.rel)
    arrived = _hashes(t, [f"{staging}/{f.rel}" for f in todo])
    for f in todo:
        path = f"{staging}/{f.rel}"
        if arrived.get(path) != f.sha256 and offsets[f.rel]:  # the partial bytes were not this file's: again
            send(f, 0)
            arrived.update(_hashes(t, [path]))
        if arrived.get(path) != f.sha256:
            raise PhiEdgeError(f"'{f.rel}' arrived on {where} with another sha256 than the manifest's: the "
                               f"connection or the device's storage corrupts data; rerun to send it again")
    _sh(t, _swap_script(staging, target))
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def device_verify(t, remote_path: str, manifest: Manifest | None, remote_phi_run: str = "phi-run") -> dict[str, Any]:
    """``phi-run REMOTE_PATH --verify --json`` on the device: status ok, failed or not-installed."""
    command = f"{remote_phi_run} {q(remote_path)} --verify --json"
    # pip's --user scripts, which non-login SSH shells leave off PATH
    rc, out, err = t.run(f'PATH="$PATH:$HOME/.local/bin"; {command}', timeout=1800)
    result: dict[str, Any] = {"command": command, "exit_code": rc}
    if rc == 127:
        from phi_edge.runtimes import BACKENDS

        extra = BACKENDS.get(manifest.format, ("", "onnx"))[1] if manifest else "onnx"
        return {**result, "status": "not-installed",
                "message": f"phi-run is not installed on the device ('{remote_phi_run}' was not found), so the copy "
                           f"was not run there; install it on the device with: pip install 'phi-edge[{extra}]', "
                           f"or name it with --remote-phi-run"}
    if rc == 0:
        try:
            return {**result, "status": "ok", "report": json.loads(out)}
        except ValueError:
            return {**result, "status": "failed", "message": f"phi-run printed no JSON report: {out.strip()[-300:]}"}
    lines = (err.strip() or out.strip() or f"exit status {rc}").splitlines()
    return {**result, "status": "failed", "message": lines[-1].removeprefix("error: ")}


# ---- shell on the device ------------------------------------------------------------------------

def _sh(t, command: str) -> str:
    rc, out, err = t.run(command)
    if rc != 0:
        raise PhiEdgeError(f"on {t.label}, '{command[:200]}' failed: {(err or out).strip()[-300:]}")
    return out


def _remote_path(t, path: str) -> str:
    if not path.startswith("/"):
        home = _sh(t, 'printf %s "$HOME"').strip()
        if not home.startswith("/"):
            raise PhiEdgeError(f"{t.label} reports no home folder; give DEST an absolute path")
        path = posixpath.join(home, path)
    path = posixpath.normpath(path)
    if path == "/":
        raise PhiEdgeError("DEST cannot be the device's root folder; name a folder for the artifact")
    return path


def _survey(t, target: str, staging: str) -> tuple[str, dict[str, int], dict[str, int], int | None]:
    """One round trip: what DEST is (none, empty, artifact, other, file), the files (with sizes) of
    DEST when it is an artifact and of the staging folder, and the free bytes where they go."""
    T, S, P = q(target), q(staging), q(posixpath.dirname(target))
    out = _sh(t, f"""if [ -f {T}/{MANIFEST_NAME} ]; then echo "state artifact"
  (cd {T} && find . -type f -exec stat -c 'T %s %n' {{}} +)
elif [ -d {T} ]; then if [ -z "$(ls -A {T})" ]; then echo "state empty"; else echo "state other"; fi
elif [ -e {T} ]; then echo "state file"; else echo "state none"; fi
mkdir -p {P} || exit 1
if [ -d {S} ]; then (cd {S} && find . -type f -exec stat -c 'S %s %n' {{}} +); fi
echo "df $(df -Pk {P} 2>/dev/null | tail -n 1)"
""")
    state, free = "", None
    found: dict[str, dict[str, int]] = {"T": {}, "S": {}}
    for line in out.splitlines():
        tag, _, rest = line.partition(" ")
        if tag == "state":
            state = rest.strip()
        elif tag in found:
            size, _, name = rest.partition(" ")
            if size.isdigit() and name.startswith("./"):
                found[tag][name[2:]] = int(size)
        elif tag == "df":
            fields = rest.split()
            free = int(fields[3]) * 1024 if len(fields) > 3 and fields[3].isdigit() else None
    return state, found["T"], found["S"], free


def _hashes(t, paths: list[str]) -> dict[str, str]:
    """sha256 of each of ``paths`` on the device (sha256sum, else python3)."""
    if not paths:
        return {}
    args = " ".join(q(p) for p in paths)
    rc, out, err = t.run(f"sha256sum {args}", timeout=1800)
    if rc == 127:
        rc, out, err = t.run(f"python3 -c {q(_PY_SHA256)} {args}", timeout=1800)
        if rc == 127:
            raise PhiEdgeError(f"{t.label} has neither sha256sum nor python3 to check the copied files with")
    hashes = {}
    for line in out.splitlines():
        digest, _, name = line.partition("  ")
        hashes[name.lstrip("*")] = digest.lstrip("\\")
    return hashes


def _prepare_script(staging: str, target: str, files: list[_File], at_staging: dict[str, int], reuse: set[str],
                    todo: list[_File]) -> str:
    """Make the staging folder hold this artifact's files only (leftovers of another version go),
    with DEST's unchanged files hard-linked in (copied where links fail)."""
    keep = {f.rel for f in files} | {f.rel + PARTIAL for f in todo}
    dirs = {staging} | {posixpath.dirname(f"{staging}/{f.rel}") for f in files}
    lines = ["set -e", "mkdir -p " + " ".join(q(x) for x in sorted(dirs))]
    extras = [q(f"{staging}/{rel}") for rel in at_staging if rel not in keep]
    if extras:
        lines.append("rm -f " + " ".join(extras))
    for rel in sorted(reuse):
        src, dst = q(f"{target}/{rel}"), q(f"{staging}/{rel}")
        lines.append(f"ln -f {src} {dst} 2>/dev/null || cp -f {src} {dst}")
    return "\n".join(lines)


def _swap_script(staging: str, target: str) -> str:
    parent, name = posixpath.split(target)
    old = q(f"{parent}/{OLD_PREFIX}{name}")
    return (f"rm -rf {old} && if [ -e {q(target)} ]; then mv {q(target)} {old}; fi && "
            f"mv {q(staging)} {q(target)} && rm -rf {old}")


def _ignore(_n: int) -> None:
    pass
