"""``phi-run serve``: the bind policy (loopback unless a key or --no-auth) and the uvicorn server."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from ..errors import PhiEdgeError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, no_auth: bool) -> None:
    if api_key is not None and not api_key.strip():
        raise PhiEdgeError("--api-key is empty; pass a key, or leave it out on loopback")
    if api_key and no_auth:
        raise PhiEdgeError("--api-key and --no-auth contradict each other; pass one")
    if not is_loopback(host) and not api_key and not no_auth:
        raise PhiEdgeError(f"--host {host} exposes the model beyond this machine: pass --api-key KEY (or set "
                           f"PHI_EDGE_API_KEY), or --no-auth to serve without one")


def serve(artifact: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          no_auth: bool = False, device: str | None = None, max_queue: int = 16, model_id: str | None = None,
          log_level: str = "info") -> None:
    """Load ``artifact`` and serve it until interrupted."""
    check_bind(host, api_key, no_auth)
    try:
        import uvicorn

        from .app import create_app
    except ImportError as e:
        raise PhiEdgeError(f"phi-run serve needs {e.name}, which is not installed; install it with: "
                           f"pip install 'phi-edge[serve]'") from None
    from .. import load

    runtime = load(artifact, device=device)
    name = model_id or Path(artifact).resolve().name
    app = create_app(runtime, name, api_key=api_key or None, max_queue=max_queue)
    logging.getLogger("phi_edge.serve").info("serving %s on http://%s:%d/v1", name, host, port)
    # uvicorn's access log writes the request line only, never headers: the key is not logged
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            server_header=False)
    try:
        uvicorn.Server(config).run()
    finally:
        app.state.scheduler.close()
