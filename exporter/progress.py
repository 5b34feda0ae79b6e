"""Progress for long export steps: a rich spinner on a terminal, silence otherwise.

Also keeps the export tools' own chatter (prints, tqdm bars, C++ logs) out of the user's
terminal and out of ``--json`` output: it goes to a log file that a failure quotes from.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from phi_edge.runtimes.errors import PhiEdgeError


class Steps:
    """``with steps.step("Quantizing to int4"): ...`` shows a spinner and the step's time."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.times: dict[str, float] = {}
        self._console = None
        if self.enabled:
            self._con()

    def _con(self):
        if self._console is None:
            from rich.console import Console

            # a private copy of the terminal's stderr: tool_output_to_log() redirects fd 2 itself
            self._console = Console(file=os.fdopen(os.dup(2), "w", buffering=1, closefd=True), force_terminal=True)
        return self._console

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        start = time.perf_counter()
        if self.enabled:
            with self._con().status(f"[bold]{title}[/]…", spinner="dots"):
                yield
            self._con().print(f"[green]✓[/] {title} [dim]({time.perf_counter() - start:.1f}s)[/]")
        else:
            yield
        self.times[title] = round(time.perf_counter() - start, 3)

    def note(self, text: str) -> None:
        if self.enabled:
            self._con().print(text)


@contextlib.contextmanager
def tool_output_to_log(what: str) -> Iterator[Path]:
    """Send everything written to fd 1 and fd 2 while the block runs into a log file.

    On an exception the error says where the log is and quotes its last lines.
    """
    fd, name = tempfile.mkstemp(prefix="phi-edge-", suffix=".log")
    log = Path(name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    # Python-level streams that are not fd 1/2 (pytest's capture, notebooks) need their own redirect.
    # The stream is never closed: a logging handler created inside the block may keep writing to it.
    stream = open(os.dup(fd), "w", buffering=1)
    python_level = [contextlib.redirect_stdout(stream) if _not_fd(sys.stdout, 1) else contextlib.nullcontext(),
                    contextlib.redirect_stderr(stream) if _not_fd(sys.stderr, 2) else contextlib.nullcontext()]
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        with python_level[0], python_level[1]:
            yield log
    except PhiEdgeError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        _restore(saved)
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        detail = " | ".join(line.strip()[:200] for line in tail if line.strip())
        raise PhiEdgeError(f"{what} failed: {type(e).__name__}: {str(e)[:500]}"
                           + (f" (tool log {log}: {detail})" if detail else "")) from e
    finally:
        stream.flush()
        _restore(saved)
        os.close(fd)
        os.close(saved[0])
        os.close(saved[1])
    with contextlib.suppress(OSError):
        log.unlink()


def _not_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() != fd
    except (AttributeError, OSError, ValueError):
        return True


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
