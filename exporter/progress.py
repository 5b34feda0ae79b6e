"""Progress for long export steps: a rich spinner on a terminal, silence otherwise.

Also keeps the export tools' own chatter (prints, tqdm bars, C++ logs) out of the user's
terminal and out of ``--json`` output: it goes to a log file that a failure quotes from, and
``private_tempdir()`` gives a command a temp folder of its own, so tools that leave files in
the temp folder leave them nowhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
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
        self.current = ""  # the step running now (named when a tool fails)
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
        self.current = title
        if self.enabled:
            with self._con().status(f"[bold]{title}[/]…", spinner="dots"):
                yield
            self._con().print(f"[green]✓[/] {title} [dim]({time.perf_counter() - start:.1f}s)[/]")
        else:
            yield
        self.times[title] = round(time.perf_counter() - start, 3)
        self.current = ""  # finished: a failure after this is in no step

    def note(self, text: str) -> None:
        if self.enabled:
            self._con().print(text)


# The temp folder that was current before private_tempdir() took over: a log that an error names
# must outlive the private folder, so it is written here.
_OUTER_TEMPDIR: str | None = None


@contextlib.contextmanager
def private_tempdir(prefix: str = "phi-edge-tmp-") -> Iterator[Path]:
    """Point ``tempfile`` and ``$TMPDIR`` (child processes and C libraries too) at a fresh folder for
    the block, and remove it afterwards, success or failure.

    Export tools leave files in the temp folder that no option turns off (torch creates
    ``torchinductor_<user>/`` when ``torch._dynamo`` is first imported; MLX's CPU backend keeps the
    kernels it compiles in ``mlx/<version>/cpu/``); inside this block they land in the private
    folder. Logs of :func:`tool_output_to_log` are still written to the outer temp folder, so a log
    that an error names survives the block. Meant to span a whole command (torch keeps the cache
    folder it chose for the rest of the process).
    """
    global _OUTER_TEMPDIR
    outer = tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=outer))
    saved_env = {key: os.environ.get(key) for key in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    saved_tempdir, saved_outer = tempfile.tempdir, _OUTER_TEMPDIR
    _OUTER_TEMPDIR = saved_outer or outer
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = str(path)
    try:
        yield path
    finally:
        tempfile.tempdir = saved_tempdir
        _OUTER_TEMPDIR = saved_outer
        # torch writes the cache dir it picked (inside the private folder) into the environment
        now = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if now is not None and now != saved_env["TORCHINDUCTOR_CACHE_DIR"] and not _inside(now, path):
            saved_env.pop("TORCHINDUCTOR_CACHE_DIR")  # set to somewhere else on purpose: leave it
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(path, ignore_errors=True)


def _inside(child: str, parent: Path) -> bool:
    try:
        return Path(child).resolve().is_relative_to(parent.resolve())
    except OSError:
        return False


@contextlib.contextmanager
def tool_output_to_log(what: str, step=None, hint: str = "") -> Iterator[Path]:
    """Send everything written to fd 1 and fd 2 while the block runs into a log file.

    An unexpected exception from a tool becomes one :class:`PhiEdgeError` naming ``what`` failed, the
    step it was in (``step()``, if given), the exception, ``hint`` (what to try) and the log.

    On an exception the error says where the log is and quotes its last lines. The log is removed
    when the block ends, except when the error raised out of it names the log (so the user can
    read it): success, Ctrl-C and an error that does not name it leave nothing behind.
    """
    fd, name = tempfile.mkstemp(prefix="phi-edge-", suffix=".log", dir=_OUTER_TEMPDIR)
    log = Path(name)
    keep = False
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
    except PhiEdgeError as e:
        keep = str(log) in str(e)
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        _restore(saved)
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        detail = " | ".join(line.strip()[:200] for line in tail if line.strip())
        keep = bool(detail)
        where = step() if step else ""
        raise PhiEdgeError(f"{what} failed" + (f" while {where[0].lower() + where[1:]}" if where else "")
                           + f": {type(e).__name__}: {str(e)[:500]}" + (f"; {hint}" if hint else "")
                           + (f" (tool log {log}: {detail})" if detail else "")) from e
    finally:
        stream.flush()
        _restore(saved)
        os.close(fd)
        os.close(saved[0])
        os.close(saved[1])
        if not keep:
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
