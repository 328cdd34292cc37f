"""Endpoints for operators: liveness, readiness and metrics."""

from __future__ import annotations

import orjson
from aiohttp import web

from .state import METRICS, READY, STORE

_JSON = "application/json"


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: ready to serve. The cache's state is reported but never makes the proxy unready."""
    ready = request.app[READY].is_set()
    body = orjson.dumps({"status": "ready" if ready else "stopping", "cache": request.app[STORE].state})
    return web.Response(status=200 if ready else 503, body=body, content_type=_JSON)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's counters."""
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": "text/plain; version=0.0.4"})
