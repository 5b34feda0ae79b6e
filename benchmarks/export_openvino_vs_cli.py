"""Export cost of ``phi-export --target intel-*`` vs ``optimum-cli export openvino`` with the same settings.

    python benchmarks/export_openvino_vs_cli.py [--target intel-cpu] [--precision int4] [--repeats 3]
                                                [--checkpoint DIR] [--json]

Both run as fresh processes on the same checkpoint (by default a ~120M-parameter Phi-3-shaped one,
so conversion and compression, not imports, dominate), alternating, and each one's wall time, CPU
time (user + system: steadier than wall time on a busy machine) and peak RSS (``wait4``'s
``ru_maxrss``) are taken. phi-export runs without its post-export smoke test (``--no-smoke-test``),
since optimum-cli has none; it still checks the checkpoint, writes the manifest with every file's
sha256 and converts the tokenizer, as optimum-cli also does. Target: phi-export within 5% of
optimum-cli on each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK = "text-generation-with-past"


def build_checkpoint(work: Path) -> Path:
    """A Phi-3-shaped checkpoint the size runtime_overhead.py benchmarks with."""
    sys.path.insert(0, str(HERE))
    from runtime_overhead import BENCH_CONFIG

    from phi_edge.exporter import fixtures

    original = fixtures.family_config
    fixtures.family_config = lambda family: {**original(family), **BENCH_CONFIG}
    try:
        return fixtures.write_checkpoint(work / "ckpt", "phi3")
    finally:
        fixtures.family_config = original


def cli_flags(target_name: str, precision: str) -> list[str]:
    """optimum-cli's flags for what phi-export does for ``target_name`` at ``precision``."""
    from phi_edge.exporter.formats import ExportOptions, merged_quant
    from phi_edge.exporter.formats.openvino import settings
    from phi_edge.targets import get_target

    flags = ["--weight-format", precision]
    if precision not in ("int4", "int8"):
        return flags
    s = settings(precision, merged_quant(get_target(target_name), ExportOptions(precision=precision)))
    if s["symmetric"]:
        flags.append("--sym")
    if precision == "int4":
        flags += ["--group-size", str(s["group_size"]), "--ratio", str(s["ratio"]),
                  "--backup-precision", s["backup_precision"], "--group-size-fallback", "adjust"]
    return flags


def measure(cmd: list[str]) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of ``cmd`` run to completion."""
    with open(os.devnull, "wb") as null, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, null.fileno(), 1),
                                                                     (os.POSIX_SPAWN_DUP2, err.fileno(), 2)])
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{err.read().decode(errors='replace')[-2000:]}")
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="intel-cpu", choices=["intel-cpu", "intel-gpu", "intel-npu"])
    ap.add_argument("--precision", default="int4", choices=["fp32", "fp16", "int8", "int4"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", type=Path, help="Export this checkpoint instead of building one.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    phi_export = shutil.which("phi-export") or "phi-export"
    optimum_cli = shutil.which("optimum-cli") or "optimum-cli"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = args.checkpoint or build_checkpoint(work)
        flags = cli_flags(args.target, args.precision)
        ours_cmd = [phi_export, str(ckpt), "--target", args.target, "--precision", args.precision, "--no-smoke-test",
                    "--force", "-o", str(work / "ours")]
        cli_cmd = [optimum_cli, "export", "openvino", "-m", str(ckpt), "--task", TASK, *flags, str(work / "cli")]
        ours, cli = [], []
        for _ in range(args.repeats):
            cli.append(measure(cli_cmd))
            shutil.rmtree(work / "cli", ignore_errors=True)
            ours.append(measure(ours_cmd))

    def med(runs: list[dict], key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    keys = ("wall_s", "cpu_s", "peak_rss_mib")
    result = {"target": args.target, "precision": args.precision, "repeats": args.repeats,
              "optimum_cli_flags": flags,
              "phi_export": {**{k: med(ours, k) for k in keys}, "runs": ours},
              "optimum_cli": {**{k: med(cli, k) for k in keys}, "runs": cli}}
    for k, name in zip(keys, ("wall_ratio", "cpu_ratio", "rss_ratio")):
        result[name] = round(result["phi_export"][k] / result["optimum_cli"][k], 4)
    result["within_5_percent"] = all(result[k] <= 1.05 for k in ("wall_ratio", "cpu_ratio", "rss_ratio"))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    o, c = result["phi_export"], result["optimum_cli"]
    print(f"{args.target} {args.precision} (optimum-cli {' '.join(flags)}), median of {args.repeats}:")
    print(f"  phi-export   {o['wall_s']:.1f} s wall, {o['cpu_s']:.1f} s CPU, peak RSS {o['peak_rss_mib']:.0f} MiB")
    print(f"  optimum-cli  {c['wall_s']:.1f} s wall, {c['cpu_s']:.1f} s CPU, peak RSS {c['peak_rss_mib']:.0f} MiB")
    print(f"  ratio        wall {result['wall_ratio']:.3f}, CPU {result['cpu_ratio']:.3f}, "
          f"RSS {result['rss_ratio']:.3f} (target <= 1.05: {'met' if result['within_5_percent'] else 'NOT met'})")


if __name__ == "__main__":
    main()
