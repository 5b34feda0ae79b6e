"""What a device install weighs: ``pip install phi-edge[EXTRA]`` on arm64 Linux (a Raspberry Pi 5 or
an Android phone's Linux userland), for each runtime extra.

For each extra, pip resolves the aarch64 wheels of this checkout's phi-edge wheel with that extra
(CPython 3.11, glibc 2.36 as on Debian bookworm / Raspberry Pi OS), downloads them and installs
them into a temporary folder. Prints the download and installed sizes, the biggest packages, and
whether torch or transformers came along (they must not). An extra that has no aarch64 wheels is
reported with pip's own words.

    python benchmarks/device_install_size.py [onnx openvino mlx qnn] [--json]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from device.arm64 import PLATFORMS, build_wheel  # noqa: E402

EXTRAS = ("onnx", "openvino", "mlx", "qnn")
HEAVY = ("torch", "transformers")


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True)


def platform_args() -> list[str]:
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    for p in PLATFORMS:
        args += ["--platform", p]
    return args


def tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def packages(site: Path) -> dict[str, int]:
    """Installed bytes per distribution, from each dist-info's RECORD."""
    sizes = {}
    for info in site.glob("*.dist-info"):
        name = info.name.split("-")[0].lower().replace("_", "-")
        total = 0
        for line in (info / "RECORD").read_text().splitlines():
            path = site / line.split(",")[0]
            if path.is_file():
                total += path.stat().st_size
        sizes[name] = total
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def measure(wheel: Path, extra: str, work: Path) -> dict:
    dl, site = work / f"dl-{extra}", work / f"site-{extra}"
    spec = f"{wheel}[{extra}]"
    p = pip("download", "--quiet", "-d", str(dl), *platform_args(), spec)
    if p.returncode != 0:
        lines = [line for line in p.stderr.strip().splitlines() if line.startswith("ERROR")] or \
            p.stderr.strip().splitlines()[-2:]
        return {"extra": extra, "ok": False, "error": " / ".join(lines)}
    p = pip("install", "--quiet", "--no-index", "--find-links", str(dl), "--target", str(site), "--no-compile",
            *platform_args(), spec)
    if p.returncode != 0:
        return {"extra": extra, "ok": False, "error": p.stderr.strip().splitlines()[-1]}
    pkgs = packages(site)
    return {"extra": extra, "ok": True, "download_bytes": tree_bytes(dl), "installed_bytes": tree_bytes(site),
            "packages": pkgs, "heavy": [h for h in HEAVY if h in pkgs]}


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main(argv: list[str]) -> None:
    as_json = "--json" in argv
    extras = [a for a in argv if not a.startswith("--")] or list(EXTRAS)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        wheel = build_wheel(work / "wheel")
        results = [measure(wheel, extra, work) for extra in extras]
    if as_json:
        print(json.dumps(results, indent=2))
        return
    print("phi-edge device installs on linux aarch64 (CPython 3.11, glibc 2.36):")
    for r in results:
        if not r["ok"]:
            print(f"  phi-edge[{r['extra']}]: no aarch64 install: {r['error']}")
            continue
        top = ", ".join(f"{k} {mib(v)}" for k, v in list(r["packages"].items())[:4])
        heavy = f"; BRINGS {', '.join(r['heavy'])}" if r["heavy"] else "; no torch, no transformers"
        print(f"  phi-edge[{r['extra']}]: {mib(r['installed_bytes'])} installed, {mib(r['download_bytes'])} "
              f"downloaded, {len(r['packages'])} packages ({top}){heavy}")


if __name__ == "__main__":
    main(sys.argv[1:])
