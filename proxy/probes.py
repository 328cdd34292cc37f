"""Endpoints for operators: liveness, readiness, and the metrics of the whole process group."""

from __future__ import annotations

import orjson
from aiohttp import web

from .exposition import merge, render
from .state import METRICS, PEERS, READY, SETTINGS, STORE

_JSON = "application/json"
# What /readyz says of Redis, by the cache's state.
_REDIS_STATES = {"ok": "up", "degraded": "down"}
REDIS_DOWN = "Redis is unreachable; serving without the shared cache until it answers again"


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.Response(body=b'{"status":"ok"}', content_type=_JSON)


async def readyz(request: web.Request) -> web.Response:
    """Readiness: ready to serve, 503 only while shutting down. The cache's and Redis's states are reported but
    never make the proxy unready: without Redis it serves from the upstream and its in-process tier."""
    app = request.app
    ready = app[READY].is_set()
    cache = app[STORE].state
    body: dict[str, str] = {"status": "ready" if ready else "stopping", "cache": cache}
    if app[SETTINGS].cache.backend == "redis":
        body["redis"] = _REDIS_STATES.get(cache, cache)
        if body["redis"] == "down":
            body["detail"] = REDIS_DOWN
    return web.Response(status=200 if ready else 503, body=orjson.dumps(body), content_type=_JSON)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Prometheus text exposition of the counters of this process, or of every worker of its process group."""
    app = request.app
    peers = app.get(PEERS)
    snapshots = await peers.gather() if peers is not None else [app[METRICS].snapshot()]
    return web.Response(body=render(merge(snapshots)), headers={"Content-Type": "text/plain; version=0.0.4"})
