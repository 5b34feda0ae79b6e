"""Commands leave nothing behind and send nothing anywhere.

- No litter: after any command, success or failure, the temp folder holds nothing but a log that
  the printed error names (``tool_output_to_log`` and ``private_tempdir`` in exporter/progress.py).
- No telemetry: an export opens no network connection (exporter/offline.py turns the tools'
  telemetry off). Each command runs in a subprocess whose Python installs an audit hook before
  anything else is imported, and, where strace works, under ``strace -f`` too, which also sees the
  C++ libraries' own sockets (onnxruntime's telemetry client) that no Python hook can.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from phi_edge.exporter.progress import private_tempdir, tool_output_to_log
from phi_edge.runtimes.errors import PhiEdgeError

EXPORT = "phi_edge.exporter.cli:main"
RUN = "phi_edge.runtimes.cli:main"

# Installs the hook, then calls the console script's function, as the installed script would.
WRAPPER = r"""
import json, os, socket, sys
LOG = os.environ["PHI_EDGE_TEST_NET_LOG"]
NAMES = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex", "socket.gethostbyaddr",
         "socket.getnameinfo", "http.client.connect", "urllib.Request", "ftplib.connect", "smtplib.connect"}
SENDS = {"socket.connect", "socket.connect_ex", "socket.sendto", "socket.sendmsg"}
def hook(event, args):
    if event in SENDS:
        family = getattr(args[0], "family", None)
        if family == socket.AF_UNIX or isinstance(args[1], (str, bytes)):
            return  # a local socket file
    elif event not in NAMES:
        return
    with open(LOG, "a") as f:
        f.write(json.dumps([event, repr(args[1:] if event in SENDS else args)[:300]]) + "\n")
sys.addaudithook(hook)
target = sys.argv[1]
sys.argv = [target.split(":")[0].rsplit(".", 2)[-2]] + sys.argv[2:]
import importlib
module, func = target.split(":")
sys.exit(getattr(importlib.import_module(module), func)())
"""

# Variables that would turn telemetry off on their own and so hide a broken opt-out.
MASKING = ("CI", "TF_BUILD", "JENKINS_URL", "NNCF_CI", "NNCF_DEV", "ORT_DISABLE_TELEMETRY",
           "HF_HUB_DISABLE_TELEMETRY", "DISABLE_TELEMETRY", "DO_NOT_TRACK", "HF_HUB_OFFLINE",
           "TRANSFORMERS_OFFLINE", "PHI_EDGE_ALLOW_TELEMETRY", "TORCHINDUCTOR_CACHE_DIR")
# What the tools leave in $TMPDIR that no option turns off; gone once the command runs inside
# progress.private_tempdir(): torch's torchinductor_<user>/ (made when torch._dynamo is first
# imported) and MLX's CPU kernel JIT cache mlx/<version>/cpu/*.so (made by mx.compile'd functions)
PRIVATE_TEMPDIR_LITTER = re.compile(r"^(torchinductor_.+|mlx)$")


def _strace_works() -> bool:
    if not shutil.which("strace"):
        return False
    try:
        probe = subprocess.run(["strace", "-f", "-o", os.devnull, "true"], capture_output=True, timeout=30)
        return probe.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


STRACE = _strace_works()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    litter: list[str]  # names left in the temp folder
    network: list[str]  # network events seen by the audit hook or strace
    tmp: Path
    entry: str = ""  # the console script's module

    def named(self, name: str) -> bool:
        """The output names the file ``name`` of the temp folder by its full path."""
        path = str(self.tmp / name)
        return path in self.stderr or path in self.stdout


def run_command(entry: str, args: list[str], workdir: Path, strace: bool = False, timeout: int = 900) -> Result:
    tmp = workdir / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    netlog = workdir / "net.jsonl"
    netlog.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in MASKING}
    from phi_edge.exporter.fixtures import cache_root

    env.update(TMPDIR=str(tmp), PHI_EDGE_TEST_NET_LOG=str(netlog), PHI_EDGE_CACHE=str(cache_root()))
    cmd = [sys.executable, "-c", WRAPPER, entry, *args]
    trace = workdir / "strace.txt"
    if strace:
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg", "-e", "signal=none", "-o", str(trace), *cmd]
    p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    network = netlog.read_text().splitlines() if netlog.exists() else []
    if strace and trace.exists():
        for line in trace.read_text().splitlines():
            if re.search(r"sa_family=AF_INET6?\b", line):  # an IP socket (AF_UNIX and netlink are local)
                network.append("strace: " + line.strip()[:300])
    return Result(p.returncode, p.stdout, p.stderr, sorted(os.listdir(tmp)), network, tmp, entry)


def assert_clean(r: Result, allow_named_log: bool = False) -> None:
    litter = list(r.litter)
    if allow_named_log:
        litter = [n for n in litter if not (n.startswith("phi-edge-") and n.endswith(".log") and r.named(n))]
    if litter and "runtimes" in r.entry and all(PRIVATE_TEMPDIR_LITTER.match(n) for n in litter):
        pytest.xfail(f"the engines' {litter} left in the temp folder: phi-run does not run inside a private "
                     f"temp folder yet (phi-export does)")
    assert not litter, f"left in the temp folder: {litter}\nstderr: {r.stderr[-2000:]}"


def assert_offline(r: Result) -> None:
    assert not r.network, "network activity:\n" + "\n".join(r.network[:20])
    # onnxruntime's telemetry client uploads in the background, often after a short command has
    # exited; the session file it writes into $TMPDIR shows it ran
    assert ".ses" not in r.litter, "onnxruntime's telemetry ran: its .ses session file is in the temp folder"


# --- tool_output_to_log and private_tempdir, in process ---------------------------------------------------

@pytest.fixture
def temp_folder(tmp_path, monkeypatch):
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_log_removed_on_success(temp_folder):
    with tool_output_to_log("step") as log:
        print("chatter")
        assert log.parent == temp_folder
    assert not list(temp_folder.iterdir())


@pytest.mark.parametrize("error", [PhiEdgeError("refused: bad option"), KeyboardInterrupt(), SystemExit(2)])
def test_log_removed_when_the_error_does_not_name_it(temp_folder, error):
    with pytest.raises(type(error)):
        with tool_output_to_log("step"):
            print("chatter")
            raise error
    assert not list(temp_folder.iterdir())


def test_log_kept_when_the_error_names_it(temp_folder):
    with pytest.raises(PhiEdgeError) as info:
        with tool_output_to_log("step"):
            print("the tool said why", flush=True)
            raise ValueError("boom")
    logs = list(temp_folder.iterdir())
    assert len(logs) == 1 and str(logs[0]) in str(info.value)
    assert "the tool said why" in logs[0].read_text()


def test_empty_log_not_named_and_removed(temp_folder):
    with pytest.raises(PhiEdgeError) as info:
        with tool_output_to_log("step"):
            raise ValueError("boom")
    assert "tool log" not in str(info.value)
    assert not list(temp_folder.iterdir())


def test_nested_logs_keep_only_the_named_one(temp_folder):
    with pytest.raises(PhiEdgeError) as info:
        with tool_output_to_log("outer"):
            with tool_output_to_log("inner"):
                print("inner chatter", flush=True)
                raise RuntimeError("boom")
    logs = list(temp_folder.iterdir())
    assert len(logs) == 1 and str(logs[0]) in str(info.value)


def test_private_tempdir_removes_what_tools_leave(temp_folder, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    before = os.environ.get("TMPDIR")
    with pytest.raises(PhiEdgeError) as info:
        with private_tempdir() as private:
            assert tempfile.gettempdir() == str(private) == os.environ["TMPDIR"]
            assert private.parent == temp_folder
            (Path(tempfile.mkdtemp()) / "junk").write_text("x")
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(private / "torchinductor_me")  # as torch does
            with tool_output_to_log("step"):
                print("why", flush=True)
                raise ValueError("boom")
    assert os.environ.get("TMPDIR") == before and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    left = list(temp_folder.iterdir())
    assert len(left) == 1 and left[0].name.endswith(".log") and str(left[0]) in str(info.value)


# --- commands in subprocesses -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fp32_export(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fp32")
    r = run_command(EXPORT, ["demo", "--target", "cpu", "--precision", "fp32", "-o", "out"], workdir, strace=STRACE)
    return workdir, r


@pytest.mark.slow
def test_fp32_export_leaves_nothing_and_stays_offline(fp32_export):
    _, r = fp32_export
    assert r.returncode == 0, r.stderr
    assert_offline(r)
    assert_clean(r)


@pytest.mark.slow
def test_verify_leaves_nothing_and_stays_offline(fp32_export, tmp_path):
    workdir, exported = fp32_export
    assert exported.returncode == 0, exported.stderr
    r = run_command(EXPORT, ["verify", str(workdir / "out")], tmp_path, strace=STRACE)
    assert r.returncode == 0, r.stderr
    assert_offline(r)
    assert_clean(r)


@pytest.mark.slow
def test_eval_leaves_nothing_and_stays_offline(fp32_export, tmp_path):
    workdir, exported = fp32_export
    assert exported.returncode == 0, exported.stderr
    r = run_command(EXPORT, ["eval", str(workdir / "out"), "--against", "demo", "--max-tokens", "256"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert_offline(r)
    assert_clean(r)


def runtime_gap(r: Result) -> None:
    """phi-run imports only phi_edge.runtimes, never exporter/offline.py: the engines' telemetry
    (onnxruntime's 1DS client and its .ses file, openvino.tools.ovc's import event to Google Analytics)
    and their temp caches (MLX's kernel JIT cache) are not turned off there yet."""
    found = ([f"{len(r.network)} network event(s), first {r.network[0][:160]}"] if r.network else []) + (
        [f"left {r.litter} in the temp folder"] if r.litter else [])
    if found:
        pytest.xfail("phi-run does not opt out of the engines' telemetry and temp caches yet: " + "; ".join(found))


@pytest.mark.slow
def test_phi_run_onnx_leaves_nothing_and_stays_offline(fp32_export, tmp_path):
    workdir, exported = fp32_export
    assert exported.returncode == 0, exported.stderr
    r = run_command(RUN, [str(workdir / "out"), "Hello", "--max-new-tokens", "4"], tmp_path, strace=STRACE)
    assert r.returncode == 0, r.stderr
    runtime_gap(r)
    assert_offline(r)
    assert_clean(r)


@pytest.mark.slow
def test_int4_onnx_export_leaves_nothing(tmp_path):
    r = run_command(EXPORT, ["demo", "--target", "rpi5", "--int4", "-o", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert_offline(r)
    assert_clean(r)


@pytest.fixture(scope="module")
def openvino_export(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("openvino")
    r = run_command(EXPORT, ["demo", "--target", "intel-cpu", "--int4", "-o", "out"], workdir, strace=STRACE)
    return workdir, r


@pytest.mark.slow
def test_openvino_int4_export_sends_no_telemetry(openvino_export):
    _, r = openvino_export
    assert r.returncode == 0, r.stderr
    assert_offline(r)
    assert_clean(r)


@pytest.mark.slow
def test_phi_run_openvino_sends_no_telemetry(openvino_export, tmp_path):
    workdir, exported = openvino_export
    assert exported.returncode == 0, exported.stderr
    r = run_command(RUN, [str(workdir / "out"), "Hello", "--max-new-tokens", "4"], tmp_path)
    assert r.returncode == 0, r.stderr
    runtime_gap(r)
    assert_offline(r)
    assert_clean(r)


@pytest.mark.slow
def test_mlx_export_leaves_nothing_and_stays_offline(tmp_path):
    pytest.importorskip("mlx_lm")
    r = run_command(EXPORT, ["demo", "--target", "apple-silicon", "--int4", "-o", "out"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert_offline(r)
    assert_clean(r)


@pytest.mark.slow
def test_refused_export_leaves_at_most_the_named_log(tmp_path):
    r = run_command(EXPORT, ["demo", "--target", "cpu", "--int4", "--block-size", "7", "-o", "out"], tmp_path)
    assert r.returncode != 0 and "block-size" in r.stderr
    assert not (tmp_path / "out").exists()
    assert_offline(r)
    assert_clean(r, allow_named_log=True)


def test_refused_output_folder_and_plan_leave_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    refused = run_command(EXPORT, ["demo", "--target", "cpu", "--precision", "fp32", "-o", "out"], tmp_path)
    assert refused.returncode != 0
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"
    planned = run_command(EXPORT, ["plan", "demo", "--target", "rpi5"], tmp_path)
    assert planned.returncode == 0, planned.stderr
    for r in (refused, planned):
        assert_offline(r)
        assert_clean(r, allow_named_log=True)


@pytest.mark.slow
def test_demo_checkpoint_leaves_nothing(tmp_path):
    r = run_command(EXPORT, ["demo-checkpoint", "ckpt", "--family", "phi3"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert_offline(r)
    assert_clean(r)


def test_telemetry_opt_outs_are_set():
    import importlib

    importlib.import_module("phi_edge.exporter")  # importing it opts out
    from phi_edge.runtimes import offline

    if os.environ.get(offline.ALLOW_VARIABLE):
        pytest.skip(f"{offline.ALLOW_VARIABLE} is set")
    for key, value in offline.ENVIRONMENT.items():
        assert os.environ[key] == value
    if sys.modules.get("openvino_telemetry") is not None:  # imported before phi_edge.exporter: consent withdrawn
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker

        assert OptInChecker().check(False, False) == ConsentCheckResult.DECLINED
