"""One generation at a time on the model, a bounded queue in front of it, and cancellation.

Every call into the runtime runs on one worker thread (engines are not reentrant, and the server's
thread count stays fixed). A stream is driven one piece at a time, so closing it between pieces
stops the engine at once: ``Runtime.stream()`` closes its token generator when it is closed.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable

import anyio

from .errors import APIError

_DONE = object()


class Scheduler:
    def __init__(self, runtime, max_queue: int = 16):
        self.runtime = runtime
        self.capacity = 1 + max(0, int(max_queue))  # the running generation + those waiting
        self.admitted = 0
        self.pieces_sent = 0  # text pieces generated since start (the tests watch a cancelled stream stop)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phi-edge-generate")
        self._lock: asyncio.Lock | None = None
        self._mean_s = 1.0  # running mean of a generation's duration, for Retry-After

    def admit(self) -> None:
        """Take a place in the queue, or answer 429 with a Retry-After estimate."""
        if self.admitted >= self.capacity:
            wait = max(1, math.ceil(self._mean_s * self.admitted))
            raise APIError(429, f"the server is busy: {self.admitted} requests are running or queued "
                                f"(limit {self.capacity}); retry after {wait}s", type="requests",
                           code="rate_limit_exceeded", headers={"Retry-After": str(wait)})
        self.admitted += 1

    def release(self) -> None:
        self.admitted -= 1

    async def call(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on the runtime's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def run(self, prompt_ids: list[int], sampling: dict[str, Any], result,
                  images: tuple[str, list] | None = None) -> AsyncIterator[str]:
        """Text pieces of one generation, after the ones queued before it; ``result`` fills in. With
        ``images`` (the prompt text, the images) the runtime prepares them here, in the same worker-thread
        step that starts the generation, so no other request's images can come between."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            start = time.perf_counter()
            if images is not None:
                pieces = self.runtime.stream(images[0], images=images[1], result=result, **sampling)
            else:
                pieces = self.runtime.stream(prompt_ids, result=result, **sampling)
            try:
                while True:
                    piece = await self.call(next, pieces, _DONE)
                    if piece is _DONE:
                        break
                    self.pieces_sent += 1
                    yield piece
            finally:
                with anyio.CancelScope(shield=True):  # runs after the piece in flight, on the same thread
                    await self.call(pieces.close)
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - start)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
