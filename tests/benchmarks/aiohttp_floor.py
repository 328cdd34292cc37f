"""The aiohttp floor: a bare aiohttp app that answers each POST with the bytes of the proxy's cache hit.

``python aiohttp_floor.py --port P``. It reads the request body, then returns from memory the body and headers
the proxy sends for the same request once it is cached: a chat completion, its recorded SSE stream, or an
embeddings list. What it costs per request is aiohttp's own share of a hit, with none of the proxy's logic.

``python aiohttp_floor.py --port P --relay-to U``: the floor of a miss instead. Each POST body goes to
``http://127.0.0.1:U`` over one pooled ClientSession and the answer is streamed back chunk by chunk as it
arrives, with no cache, key or header filtering.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import AsyncIterator

import aiohttp
import nginx_conf
import openai_shapes
import uvloop
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)

# The content types the fake upstream's nginx sends (charset utf-8), which the proxy stores with an entry.
JSON_TYPE = "application/json; charset=utf-8"
SSE_TYPE = "text/event-stream; charset=utf-8"
# The proxy's own hit headers; the key and age vary per entry, so these stand-ins only match their lengths.
HIT_HEADERS = {"X-Cache": "HIT", "X-Cache-Key": "0" * 16, "Age": "0"}
# The same test as the fake upstream's nginx map.
STREAM = re.compile(rb'"stream"\s*:\s*true')


def _reply(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    return body, {"Content-Type": content_type, **nginx_conf.OPENAI_HEADERS, **HIT_HEADERS}


# (path, is the body a streamed request) -> response body and headers.
REPLIES = {
    ("/v1/chat/completions", False): _reply(openai_shapes.chat_completion(), JSON_TYPE),
    ("/v1/chat/completions", True): _reply(b"".join(openai_shapes.chat_chunks()), SSE_TYPE),
    ("/v1/embeddings", False): _reply(openai_shapes.embeddings(), JSON_TYPE),
}


async def hit(request: web.Request) -> web.Response:
    """The cached answer for the request's path and body; 404 for a path the proxy's benchmark never hits."""
    raw = await request.read()
    reply = REPLIES.get((request.path, STREAM.search(raw) is not None))
    if reply is None:
        raise web.HTTPNotFound()
    body, headers = reply
    return web.Response(body=body, headers=headers)


async def relay(request: web.Request) -> web.StreamResponse:
    """Forward the body upstream and stream the answer back as it arrives, marked ``X-Cache: MISS``."""
    raw = await request.read()
    headers = {"Content-Type": "application/json", "Authorization": request.headers.get("Authorization", "")}
    async with request.app[SESSION].post(request.app[UPSTREAM] + request.path, data=raw, headers=headers) as answer:
        resp = web.StreamResponse(
            status=answer.status,
            headers={"Content-Type": answer.headers.get("Content-Type", JSON_TYPE), "X-Cache": "MISS"},
        )
        await resp.prepare(request)
        async for chunk in answer.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
    yield
    await app[SESSION].close()


def create_app(relay_to: int | None = None) -> web.Application:
    """One route, no middleware, the proxy's default body size limit; a relay to *relay_to* when given."""
    app = web.Application(client_max_size=32 * 1024 * 1024)
    if relay_to is None:
        app.router.add_post("/v1/{rest:.+}", hit)
        return app
    app[UPSTREAM] = f"http://127.0.0.1:{relay_to}"
    app.cleanup_ctx.append(_session_ctx)
    app.router.add_post("/v1/{rest:.+}", relay)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--relay-to", type=int, help="relay every POST to this port instead of answering a hit")
    args = parser.parse_args()
    # The proxy's own run_app settings at its default log level: no access log, uvloop, backlog 1024.
    web.run_app(
        create_app(args.relay_to),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        backlog=1024,
        shutdown_timeout=1.0,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
