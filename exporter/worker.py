"""Run one step of an export in a spawned worker process, relaying its progress steps and its error.

A large model's files are written in a worker: torch, transformers and the tool's heap (about 1 GiB
before any weight) leave with it, so the artifact check that loads the model afterwards runs in a
process without them, and the export's peak is the larger of the two, not their sum.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
from typing import Any, Callable, Iterator

from phi_edge.runtimes.errors import PhiEdgeError

from . import progress


class RelayedSteps:
    """The worker's side of :class:`~.progress.Steps`: each step's start and end go to the parent,
    which shows them on its own terminal and records their times."""

    enabled = False

    def __init__(self, conn):
        self._conn = conn
        self.times: dict[str, float] = {}
        self.current = ""

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.current = title
        self._conn.send(("start", title))
        yield
        self._conn.send(("end", title))
        self.current = ""

    def note(self, text: str) -> None:
        self._conn.send(("note", text))


def run_in_worker(fn: Callable[..., Any], *args: Any, steps) -> Any:
    """``fn(*args, steps=...)`` in a fresh process (``fn`` must be importable); returns its result or
    raises its exception here. Ctrl-C or an error here stops the worker before returning."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=_worker_main, args=(send, fn, args, progress._OUTER_TEMPDIR), daemon=True)
    worker.start()
    send.close()
    open_steps: list = []
    try:
        while True:
            try:
                kind, value = receive.recv()
            except EOFError:
                worker.join()
                oom = ", killed by the system: out of memory?" if worker.exitcode == -9 else ""
                raise RuntimeError(f"the export's worker process ended without a result (exit code "
                                   f"{worker.exitcode}{oom})") from None
            if kind == "start":
                step = steps.step(value)
                step.__enter__()
                open_steps.append(step)
            elif kind == "end":
                open_steps.pop().__exit__(None, None, None)
            elif kind == "note":
                steps.note(value)
            elif kind == "error":
                raise value
            else:
                return value
    except BaseException as e:
        while open_steps:  # stop their spinners; the innermost stays named as the failing step
            open_steps.pop().__exit__(type(e), e, e.__traceback__)
        raise
    finally:
        receive.close()
        worker.join(timeout=30)
        if worker.is_alive():
            worker.terminate()
            worker.join()


def _worker_main(conn, fn, args, outer_tempdir) -> None:
    progress._OUTER_TEMPDIR = outer_tempdir  # tool logs an error names outlive the private temp folder
    try:
        result = fn(*args, steps=RelayedSteps(conn))
    except BaseException as e:  # noqa: BLE001 - every failure, Ctrl-C included, goes to the parent
        conn.send(("error", _picklable(e)))
    else:
        conn.send(("done", result))
    finally:
        conn.close()


def _picklable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # an exception type that does not pickle: keep its name and message
        return (PhiEdgeError if isinstance(e, PhiEdgeError) else RuntimeError)(f"{type(e).__name__}: {e}")
