"""The ``phi-export push`` command: argument parsing, a progress bar and the report around
:func:`phi_edge.exporter.deploy.push.push`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from phi_edge.runtimes.errors import PhiEdgeError

from ..console import emit, fail
from .push import push


@click.command("push")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("dest")
@click.option("-i", "--identity", type=click.Path(dir_okay=False, path_type=Path),
              help="SSH private key (default: your ssh-agent, ~/.ssh/config and ~/.ssh keys).")
@click.option("-P", "--port", type=int, help="SSH port (default: DEST's, ~/.ssh/config's, or 22).")
@click.option("--remote-phi-run", default="phi-run", show_default=True,
              help="How to run phi-run on the device, e.g. ~/venv/bin/phi-run.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run 'phi-run DEST --verify --json' on the device after the copy.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report.")
def push_cmd(artifact, dest, identity, port, remote_phi_run, verify, as_json):
    """Copy ARTIFACT to a device and check it there with phi-run.

    \b
      phi-export push out pi@raspberrypi.local:models/phi
      phi-export push out ssh://pi@10.0.0.7:2222/home/pi/models/phi -i ~/.ssh/pi_key
      phi-export push out adb://SERIAL/data/local/tmp/phi
      phi-export push out ollama://localhost:11434/my-phi     (a --target ollama artifact)

    Files already there with the same sha256 are skipped and an interrupted copy resumes when the
    command is run again. Keys only: your agent, ~/.ssh keys or --identity; never a password.
    """
    show = sys.stderr.isatty() and not as_json
    progress = task = None
    if show:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, \
            TransferSpeedColumn

        from rich.console import Console

        progress = Progress(TextColumn("[bold]Copying[/]"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=Console(stderr=True), transient=True)

    def on_start(total: int) -> None:
        nonlocal task
        if progress is not None:
            progress.start()
            task = progress.add_task("copy", total=total)

    def on_bytes(n: int) -> None:
        if progress is not None and task is not None:
            progress.advance(task, n)

    try:
        report = push(artifact, dest, identity=identity, port=port, remote_phi_run=remote_phi_run, verify=verify,
                      on_start=on_start, on_bytes=on_bytes)
    except PhiEdgeError as e:
        fail(str(e))
    except KeyboardInterrupt:
        if dest.startswith("ollama://"):
            fail("interrupted; Ollama keeps no partial model: rerun the same command to push again", 130)
        fail("interrupted; the files sent so far stay on the device: rerun the same command to resume", 130)
    finally:
        if progress is not None:
            progress.stop()
    emit(report, as_json, _print_push)
    status = report["device_verify"]["status"] if report["device_verify"] else None
    if status == "failed":
        if not as_json:
            click.echo(f"error: the check on the device failed: {report['device_verify']['message']}", err=True)
        sys.exit(1)
    if status == "not-installed":  # copied, but nothing checked it: not a success unless --no-verify
        if not as_json:
            click.echo("error: the artifact was copied but not checked on the device; install phi-run there "
                       "(see the note) or pass --no-verify", err=True)
        sys.exit(1)


def _print_push(r: dict[str, Any]) -> None:
    from ..sizing import human

    if r.get("ollama"):
        sent = f"sent {human(r['bytes_sent'])}" if r["blob"] == "sent" else "the GGUF blob was already there"
        click.echo(f"Created {r['destination']} ({sent}; {r['digest'][:19]}...) in {r['seconds']:.1f}s; Ollama shows "
                   f"it: run it with 'ollama run {r['model']}'")
        return
    if r["up_to_date"]:
        click.echo(f"{r['destination']} is up to date: all {r['files']} files have the manifest's sha256")
    else:
        extra = [f"{len(r['resumed'])} resumed"] if r["resumed"] else []
        extra += [f"{len(r['skipped'])} already there"] if r["skipped"] else []
        click.echo(f"Copied {len(r['sent']) + len(r['resumed'])} of {r['files']} files ({human(r['bytes_sent'])}"
                   f"{', ' + ', '.join(extra) if extra else ''}) to {r['destination']} in {r['seconds']:.1f}s")
    v = r["device_verify"]
    if v is None:
        return
    if v["status"] == "ok":
        d = v["report"]
        click.echo(f"On the device: {d['files']} files match their sha256; {d['format']} loaded on {d['device']} in "
                   f"{d['load_s']:.2f}s; generated {d['generated_tokens']} tokens at {d['decode_tokens_per_s']} "
                   f"tokens/s: {d['text']!r}")
    elif v["status"] == "not-installed":
        click.echo(f"note: {v['message']}")
