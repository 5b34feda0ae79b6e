"""Console output shared by the ``phi-export`` commands: one-line errors, JSON or human reports."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from phi_edge.runtimes.errors import PhiEdgeError


def fail(message: str, code: int = 1):
    """Print ``error: message`` on stderr and exit non-zero."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def emit(data: Any, as_json: bool, human) -> None:
    """``--json``: the data as JSON on stdout; otherwise ``human(data)`` prints it for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human(data)


def run_guarded(fn, *args, **kwargs):
    """Call ``fn``; a :class:`PhiEdgeError` or Ctrl-C becomes a one-line error and an exit code."""
    try:
        return fn(*args, **kwargs)
    except PhiEdgeError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; nothing was written to the output folder", 130)
