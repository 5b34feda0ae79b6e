"""An arm64 device on this x86 machine: Debian bookworm's aarch64 userland run by user-mode QEMU
(no binfmt, no chroot), with the aarch64 wheels of a phi-edge extra and phi-edge itself.

    python tests/device/arm64.py build [--extra gguf]                  # sysroot + [onnx] (or [gguf]) wheels, cached
    python tests/device/arm64.py phi-run [--extra gguf] ARTIFACT "Hi"  # phi-run on the arm64 Python
    python tests/device/arm64.py python [--extra gguf] -c "..."        # the arm64 Python itself

The sysroot is debootstrap's download of ``minbase`` + python3.11 + libgomp1 (llama.cpp's OpenMP runtime,
which the aarch64 xllamacpp wheel of phi-edge[gguf] links from the system), unpacked with ``dpkg-deb -x``
(no second stage: nothing is configured or run as root). The wheels are pip's aarch64 builds,
installed with ``--target``. ``qemu-aarch64-static -L SYSROOT`` serves the sysroot's files for
absolute paths, including a ``/proc/cpuinfo`` that describes a Raspberry Pi 5's Cortex-A76 (ONNX
Runtime's CPU detection crashes without one). Everything lives under PHI_EDGE_ARM64_CACHE
(default ``~/.cache/phi-edge/arm64``, outside the checkout so fresh clones reuse it); phi-edge itself is reinstalled from this checkout
on every build.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
PYTHON = "python3.11"
# Debian packages beyond minbase: the Python, and libgomp1 (libgomp.so.1, which xllamacpp's wheels link
# from the system: Raspberry Pi OS and Debian with gcc have it; a minimal image needs apt install libgomp1)
PACKAGES = (PYTHON, "libgomp1")
GLIBC_MINOR = 36  # bookworm's glibc is 2.36: every manylinux_2_x wheel up to it runs
PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(GLIBC_MINOR, 16, -1)]
QEMU_CPU = "cortex-a76"
CPUINFO = """processor\t: {n}
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""


class HarnessUnavailable(Exception):
    """This machine cannot build the arm64 harness (a missing tool, or no package mirror)."""


def cache_dir() -> Path:
    # outside the checkout, so CI's fresh clones on the same machine reuse it
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi-edge" / "arm64"
    return Path(os.environ.get("PHI_EDGE_ARM64_CACHE") or default)


def debian_mirror() -> str:
    """The Debian mirror apt uses here for SUITE (PHI_EDGE_DEBIAN_MIRROR overrides)."""
    if os.environ.get("PHI_EDGE_DEBIAN_MIRROR"):
        return os.environ["PHI_EDGE_DEBIAN_MIRROR"]
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list")),
                 *sorted((apt / "sources.list.d").glob("*.sources"))]:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":  # deb822 stanzas: URIs + Suites
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", "deb").split():
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^\]]*\]", "", line.split("#")[0]).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                    return parts[1]
    raise HarnessUnavailable(f"no Debian {SUITE} mirror in /etc/apt/sources.list(.d); set PHI_EDGE_DEBIAN_MIRROR")


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise HarnessUnavailable(f"{name} is not installed (apt-get install -y {package}; .ci/device-setup.sh does)")
    return path


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-5:])
        raise HarnessUnavailable(f"{what} failed (exit {p.returncode}): {tail[-1200:]}")
    return p


def build_sysroot(cache: Path) -> Path:
    sysroot = cache / "sysroot"
    marker = sysroot / ".complete"
    if marker.is_file() and f"packages: {' '.join(PACKAGES)}" in marker.read_text().splitlines():
        return sysroot
    debootstrap = _tool("debootstrap", "debootstrap")
    dpkg_deb = _tool("dpkg-deb", "dpkg")
    mirror = debian_mirror()
    debs = cache / "debootstrap"
    _run([debootstrap, "--arch=arm64", "--variant=minbase", f"--include={','.join(PACKAGES)}", "--download-only", SUITE,
          str(debs), mirror], f"debootstrap --download-only from {mirror}", timeout=1200)
    partial = cache / "sysroot.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    archives = sorted((debs / "var" / "cache" / "apt" / "archives").glob("*.deb"))
    if not archives:
        raise HarnessUnavailable(f"debootstrap left no .deb files in {debs}")
    for deb in archives:
        _run([dpkg_deb, "-x", str(deb), str(partial)], f"dpkg-deb -x {deb.name}")
    (partial / "proc").mkdir(exist_ok=True)
    (partial / "proc" / "cpuinfo").write_text("\n".join(CPUINFO.format(n=n) for n in range(4)))
    (partial / ".complete").write_text(f"{SUITE} arm64 from {mirror}\npackages: {' '.join(PACKAGES)}\n")
    old = cache / "sysroot.old"  # swapped, then removed: a cached sysroot is never half gone
    shutil.rmtree(old, ignore_errors=True)
    if sysroot.exists():
        sysroot.rename(old)
    partial.rename(sysroot)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(debs, ignore_errors=True)
    return sysroot


def requirements(extra: str) -> list[str]:
    """What ``pip install phi-edge[extra]`` installs besides phi-edge: the core deps + the extra's."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    if extra not in extras:
        raise ValueError(f"no extra '{extra}' in pyproject.toml (it has {', '.join(extras)})")
    return list(project["dependencies"]) + list(extras[extra])


def pip_target_args(target: Path) -> list[str]:
    args = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
            "--timeout", "60", "--target", str(target), "--only-binary=:all:", "--python-version", "3.11",
            "--implementation", "cp", "--abi", "cp311"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def install_wheels(cache: Path, extra: str = "onnx") -> Path:
    reqs = requirements(extra)
    key = hashlib.sha256("\n".join(reqs + PLATFORMS).encode()).hexdigest()
    site = cache / f"site-{extra}"
    if (site / ".complete").is_file() and (site / ".complete").read_text() == key:
        return site
    partial = cache / f"site-{extra}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    _run(pip_target_args(partial) + reqs, f"pip install of the aarch64 wheels for phi-edge[{extra}]", timeout=1800)
    (partial / ".complete").write_text(key)
    shutil.rmtree(site, ignore_errors=True)
    partial.rename(site)
    return site


def build_wheel(out: Path) -> Path:
    """phi-edge's own wheel, built from this checkout."""
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
          str(REPO)], "pip wheel of phi-edge", timeout=600)
    return next(out.glob("phi_edge-*.whl"))


def install_phi_edge(cache: Path) -> Path:
    target = cache / "phi-edge"
    shutil.rmtree(target, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = build_wheel(Path(tmp))
        _run(pip_target_args(target) + ["--no-deps", str(wheel)], "pip install of the phi-edge wheel")
    return target


@dataclass
class Arm64:
    """Runs this sysroot's Python under QEMU with phi-edge and an extra's wheels on its path."""

    qemu: str
    sysroot: Path
    paths: list[Path]
    home: Path

    def command(self, *args: str) -> list[str]:
        return [self.qemu, "-cpu", QEMU_CPU, "-L", str(self.sysroot), str(self.sysroot / "usr" / "bin" / PYTHON),
                *args]

    def env(self) -> dict[str, str]:
        return {"PATH": "/usr/bin:/bin", "HOME": str(self.home), "LANG": "C.UTF-8", "PYTHONNOUSERSITE": "1",
                "PYTHONPATH": os.pathsep.join(str(p) for p in self.paths)}

    def python(self, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(self.command(*args), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"arm64 python {' '.join(args)[:200]} exited {p.returncode}:\n{p.stderr[-3000:]}")
        return p

    def phi_run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.python("-m", "phi_edge.runtimes.cli", *args, **kw)


_INSTALLED: dict[Path, Path] = {}


def build(cache: Path | None = None, extra: str = "onnx") -> Arm64:
    """Build (or reuse) the sysroot and the extra's wheels, reinstall phi-edge, return the runner."""
    if platform.system() != "Linux":
        raise HarnessUnavailable("the arm64 harness needs Linux (user-mode QEMU)")
    cache = cache or cache_dir()
    qemu = _tool("qemu-aarch64-static", "qemu-user-static")
    cache.mkdir(parents=True, exist_ok=True)
    sysroot = build_sysroot(cache)
    site = install_wheels(cache, extra)
    if cache not in _INSTALLED:  # once per process: the onnx and the gguf harness share phi-edge
        _INSTALLED[cache] = install_phi_edge(cache)
    own = _INSTALLED[cache]
    home = cache / "home"
    home.mkdir(exist_ok=True)
    return Arm64(qemu=qemu, sysroot=sysroot, paths=[own, site], home=home)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("build", "phi-run", "python"):
        print(__doc__)
        return 2
    command, args, extra = argv[0], argv[1:], "onnx"
    if args[:1] == ["--extra"] and len(args) > 1:
        extra, args = args[1], args[2:]
    try:
        arm64 = build(extra=extra)
    except (HarnessUnavailable, ValueError) as e:
        print(f"arm64 harness unavailable: {e}", file=sys.stderr)
        return 1
    if command == "build":
        print(f"arm64 harness ready in {cache_dir()}: {arm64.sysroot} + {', '.join(str(p) for p in arm64.paths)}")
        return 0
    cmd = arm64.command("-m", "phi_edge.runtimes.cli", *args) if command == "phi-run" else arm64.command(*args)
    return subprocess.run(cmd, env=arm64.env()).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
