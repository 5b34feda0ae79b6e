"""OpenAI-compatible HTTP server for one loaded artifact: ``phi-run serve OUT`` (needs ``phi-edge[serve]``).

- ``errors.py``: OpenAI-style error bodies; ``protocol.py``: request bodies in, response bodies out;
- ``scheduler.py``: one generation at a time on the model, a bounded queue, cancellation;
- ``app.py``: the Starlette routes, auth and SSE; ``server.py``: bind policy and uvicorn.
"""

from __future__ import annotations

from .errors import APIError

__all__ = ["APIError", "create_app", "serve"]


def create_app(*args, **kwargs):
    from .app import create_app as make

    return make(*args, **kwargs)


def serve(*args, **kwargs):
    from .server import serve as run

    return run(*args, **kwargs)
