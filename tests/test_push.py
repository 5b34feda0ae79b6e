"""``phi-export push`` against a real OpenSSH server on loopback: the "device" is this machine,
reached as root with a throwaway key, where phi-run is installed."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from device import unavailable
from device.sshd import SSHD, LoopbackSSHD
from phi_edge.exporter.cli import main
from phi_edge.exporter.deploy.push import PARTIAL, STAGING_PREFIX, parse_destination, push, verify_on_device
from phi_edge.runtimes.errors import PhiEdgeError
from phi_edge.runtimes.manifest import MANIFEST_NAME, sha256_file


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not SSHD.is_file():
        unavailable(f"{SSHD} is absent (apt-get install -y openssh-server)")
    server = LoopbackSSHD(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def client_home(tmp_path, monkeypatch):
    """This test's own ~/.ssh (known_hosts, no keys) and no ssh-agent: only the test key is offered."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home


@pytest.fixture(scope="module")
def artifact(exported):
    return exported("rpi5", "int4")


def same_files(a: Path, b: Path) -> bool:
    files = lambda p: {f.relative_to(p).as_posix(): sha256_file(f) for f in p.rglob("*") if f.is_file()}  # noqa: E731
    return files(a) == files(b)


def test_destination_forms():
    d = parse_destination("ssh://pi@raspberrypi.local:2222/home/pi/models/phi")
    assert (d.scheme, d.user, d.host, d.port, d.path) == ("ssh", "pi", "raspberrypi.local", 2222, "/home/pi/models/phi")
    d = parse_destination("pi@10.0.0.7:models/phi")
    assert (d.user, d.host, d.port, d.path) == ("pi", "10.0.0.7", None, "models/phi")
    assert parse_destination("ssh://pi@host/~/models/phi").path == "models/phi"
    assert parse_destination("pi@[::1]:/tmp/phi").host == "::1"
    d = parse_destination("adb://emulator-5554/data/local/tmp/phi")
    assert (d.scheme, d.host, d.path) == ("adb", "emulator-5554", "/data/local/tmp/phi")
    for bad in ("out/phi", "ssh://host", "pi@host:", "adb://serial", "ssh://pi@host:notaport/x"):
        with pytest.raises(PhiEdgeError, match="destination"):
            parse_destination(bad)


def test_push_copies_and_verifies_on_device(sshd, artifact, tmp_path):
    device = tmp_path / "device" / "models" / "phi"
    r = CliRunner().invoke(main, ["push", str(artifact), sshd.dest(device), "-i", str(sshd.user_key), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert same_files(artifact, device)
    assert sorted(report["sent"]) == sorted(f.name for f in artifact.iterdir())
    assert report["bytes_sent"] == report["total_bytes"] == sum(f.stat().st_size for f in artifact.iterdir())
    check = report["device_verify"]
    assert check["status"] == "ok", check
    assert check["report"]["checksums"] == "ok" and check["report"]["generated_tokens"] == 8
    assert [p.name for p in device.parent.iterdir()] == ["phi"]  # no staging folder left behind
    # the host key was recorded on first contact (accept-new)
    assert f"[127.0.0.1]:{sshd.port}" in (Path(os.environ["HOME"]) / ".ssh" / "known_hosts").read_text()

    again = CliRunner().invoke(main, ["push", str(artifact), f"root@127.0.0.1:{device}", "-P", str(sshd.port),
                                      "-i", str(sshd.user_key), "--no-verify"])
    assert again.exit_code == 0, again.output
    assert "is up to date: all 9 files have the manifest's sha256" in again.output


def test_interrupted_push_resumes(sshd, artifact, tmp_path):
    device = tmp_path / "device" / "phi"
    staging = device.parent / f"{STAGING_PREFIX}phi"
    big = artifact / "model.onnx.data"
    sent = 0

    def link_drops(n):  # the connection breaks 3 MiB into the transfer, in the middle of model.onnx.data
        nonlocal sent
        sent += n
        if sent >= 3 << 20:
            raise ConnectionResetError("link dropped")

    with pytest.raises(PhiEdgeError, match="link dropped.*rerun the same command to resume"):
        push(artifact, sshd.dest(device), identity=sshd.user_key, on_bytes=link_drops, verify=False)
    assert not device.exists()
    partial = staging / f"model.onnx.data{PARTIAL}"
    kept = partial.stat().st_size
    assert 0 < kept < big.stat().st_size
    done_before = {p.name for p in staging.iterdir() if not p.name.endswith(PARTIAL)}
    assert "model.onnx" in done_before and MANIFEST_NAME not in done_before

    report = push(artifact, sshd.dest(device), identity=sshd.user_key)
    assert report["resumed"] == ["model.onnx.data"]
    assert set(report["skipped"]) == done_before
    on_device_before = kept + sum((artifact / n).stat().st_size for n in done_before)
    assert report["bytes_sent"] == report["total_bytes"] - on_device_before
    assert report["device_verify"]["status"] == "ok", report["device_verify"]
    assert same_files(artifact, device) and not staging.exists()


def test_refuses_when_the_device_is_full(sshd, artifact, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                             capture_output=True).returncode == 0
    if not mounted:  # no mount here: the device's df says 512 KiB are free
        sshd.fake_free_kb(512)
    try:
        with pytest.raises(PhiEdgeError, match=r"not enough free space .* needs 10\.0 MiB more and the device has "
                                               r"(1\.0 MiB|512\.0 KiB) free"):
            push(artifact, sshd.dest(small / "phi"), identity=sshd.user_key)
        assert list(small.iterdir()) == []  # refused before anything was copied
    finally:
        sshd.fake_free_kb(None)
        if mounted:
            subprocess.run(["umount", str(small)], check=True)


def test_tampered_file_is_caught_on_the_device_and_replaced(sshd, artifact, tmp_path):
    device = tmp_path / "device" / "phi"
    push(artifact, sshd.dest(device), identity=sshd.user_key, verify=False)
    data = bytearray((device / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    (device / "model.onnx.data").write_bytes(data)

    check = verify_on_device(sshd.dest(device), identity=sshd.user_key)
    assert check["status"] == "failed" and check["exit_code"] == 1
    assert check["message"] == ("artifact file 'model.onnx.data' fails its sha256 check: it was altered or "
                                "corrupted; copy the folder again")

    report = push(artifact, sshd.dest(device), identity=sshd.user_key)
    assert report["sent"] == ["model.onnx.data"] and len(report["skipped"]) == 8
    assert report["device_verify"]["status"] == "ok"
    assert same_files(artifact, device)


def test_clear_errors(sshd, artifact, tmp_path):
    import paramiko

    dest = sshd.dest(tmp_path / "phi")
    closed = sshd.dest(tmp_path / "phi").replace(f":{sshd.port}/", f":{_closed_port()}/")
    with pytest.raises(PhiEdgeError, match=r"cannot reach 127\.0\.0\.1 port \d+: .*SSH server runs"):
        push(artifact, closed, identity=sshd.user_key)

    stranger = tmp_path / "stranger_key"
    paramiko.ECDSAKey.generate().write_private_key_file(str(stranger))
    with pytest.raises(PhiEdgeError, match=r"SSH authentication as root on 127\.0\.0\.1 port \d+ failed.*ssh-copy-id"):
        push(artifact, dest, identity=stranger)

    occupied = tmp_path / "notes"
    occupied.mkdir()
    (occupied / "todo.txt").write_text("keep me")
    with pytest.raises(PhiEdgeError, match="holds something other than a phi-edge artifact"):
        push(artifact, sshd.dest(occupied), identity=sshd.user_key)
    assert (occupied / "todo.txt").read_text() == "keep me"

    r = CliRunner().invoke(main, ["push", str(artifact), dest, "-i", str(sshd.user_key),
                                  "--remote-phi-run", "/opt/nowhere/phi-run"])
    assert r.exit_code == 1, r.output  # copied, but unchecked: only --no-verify makes that a success
    assert "error: the artifact was copied but not checked on the device" in r.output
    assert "note: phi-run is not installed on the device ('/opt/nowhere/phi-run' was not found)" in r.output
    assert "pip install 'phi-edge[onnx]'" in r.output
    r = CliRunner().invoke(main, ["push", str(artifact), dest, "-i", str(sshd.user_key), "--remote-phi-run", "false"])
    assert r.exit_code == 1 and "error: the check on the device failed: exit status 1" in r.output

    known = Path(os.environ["HOME"]) / ".ssh" / "known_hosts"
    other = paramiko.ECDSAKey.generate()
    known.write_text(f"[127.0.0.1]:{sshd.port} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(PhiEdgeError, match="is not the one recorded in ~/.ssh/known_hosts.*ssh-keygen -R"):
        push(artifact, dest, identity=sshd.user_key)


def test_altered_local_artifact_is_not_pushed(artifact, tmp_path):
    import shutil

    local = tmp_path / "art"
    shutil.copytree(artifact, local)
    data = bytearray((local / "tokenizer.json").read_bytes())
    data[10] ^= 1
    (local / "tokenizer.json").write_bytes(data)
    with pytest.raises(PhiEdgeError, match="'tokenizer.json' fails its sha256 check"):
        push(local, "root@127.0.0.1:/tmp/never")


def test_adb(artifact, tmp_path, monkeypatch):
    """adb:// through a stand-in adb that runs the shell and copies on this machine."""
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PhiEdgeError, match="needs the adb program, which is not on PATH.*apt-get install adb"):
        push(artifact, "adb://R58M123/data/local/tmp/phi")

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "adb").write_text(FAKE_ADB)
    (bin_dir / "adb").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{path}")
    device = tmp_path / "phone" / "phi"
    phi_run = Path(os.sys.executable).parent / "phi-run"
    report = push(artifact, f"adb://R58M123{device}", remote_phi_run=str(phi_run))
    assert report["device_verify"]["status"] == "ok", report["device_verify"]
    assert same_files(artifact, device)
    assert "-s R58M123 push" in (bin_dir / "adb.log").read_text()


FAKE_ADB = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/adb.log"
[ "$1" = "-s" ] && shift 2
case "$1" in
  get-state) echo device ;;
  shell) shift; exec sh -c "$*" ;;
  push) cp "$2" "$3" ;;
  *) echo "fake adb: $1?" >&2; exit 1 ;;
esac
"""


def _closed_port() -> int:
    from device.sshd import free_port

    return free_port()
