"""aiohttp servers the runner starts beside the proxy: the hit floor, the miss relay, a slow-to-stream upstream.

``python -m tests.benchmarks.servers floor --port P`` answers each POST with the bytes and headers of the proxy's
hit for it, read from memory: what a hit costs in aiohttp alone, with none of the proxy's logic.
``relay --port P --to U`` forwards each POST body to port U over one pooled ClientSession and streams the answer
back as it arrives, with no key, cache lookup, header filtering or recording: the floor of a miss.
``upstream --port P`` is a fake OpenAI API whose streams send the headers at once, the first event after
``--first-event-delay-ms`` and the rest after ``--rest-delay-ms`` (a proxy that held the stream back shows that pause).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import uvloop
from aiohttp import web

from . import shapes

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)
FIRST_EVENT_DELAY_S = web.AppKey("first_event_delay_s", float)
REST_DELAY_S = web.AppKey("rest_delay_s", float)

# The content types the fake upstream's nginx sends (charset utf-8), which the proxy stores with an entry.
JSON_TYPE = "application/json; charset=utf-8"
SSE_TYPE = "text/event-stream; charset=utf-8"
# The proxy's own hit headers; the key and age vary per entry, so these stand-ins only match their lengths.
HIT_HEADERS = {"X-Cache": "HIT", "X-Cache-Key": "0" * 16, "Age": "0"}
# The same test as the fake upstream's nginx map.
STREAM = re.compile(rb'"stream"\s*:\s*true')
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
# Built once: a server that rendered its answer per request would measure JSON encoding, not HTTP.
BODIES = {
    "chat": shapes.chat_completion(),
    "completion": shapes.completion(),
    "embeddings": shapes.embeddings(),
}
CHUNKS = shapes.chat_chunks()


def _hit_reply(body: bytes, content_type: str) -> tuple[bytes, dict[str, str]]:
    return body, {"Content-Type": content_type, **shapes.OPENAI_HEADERS, **HIT_HEADERS}


# (path, is the body a streamed request) -> response body and headers.
HIT_REPLIES = {
    (CHAT, False): _hit_reply(BODIES["chat"], JSON_TYPE),
    (CHAT, True): _hit_reply(b"".join(CHUNKS), SSE_TYPE),
    (EMBEDDINGS, False): _hit_reply(BODIES["embeddings"], JSON_TYPE),
}


async def hit(request: web.Request) -> web.Response:
    """The cached answer for the request's path and body; 404 for a path the benchmark never hits."""
    raw = await request.read()
    reply = HIT_REPLIES.get((request.path, STREAM.search(raw) is not None))
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


def _is_stream(raw: bytes) -> bool:
    try:
        body: Any = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


async def slow_chat(request: web.Request) -> web.StreamResponse:
    """A chat completion; streamed when the body asks for it, with a pause before the first and second event."""
    if not _is_stream(await request.read()):
        return web.Response(body=BODIES["chat"], content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": SSE_TYPE})
    await resp.prepare(request)
    await asyncio.sleep(request.app[FIRST_EVENT_DELAY_S])
    await resp.write(CHUNKS[0])
    await asyncio.sleep(request.app[REST_DELAY_S])
    await resp.write(b"".join(CHUNKS[1:]))
    await resp.write_eof()
    return resp


async def fixed(request: web.Request) -> web.Response:
    """The fixed completion or embeddings body for the request's path."""
    await request.read()
    body = BODIES["embeddings"] if request.path == EMBEDDINGS else BODIES["completion"]
    return web.Response(body=body, content_type="application/json")


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=30))
    yield
    await app[SESSION].close()


def create_app(args: argparse.Namespace) -> web.Application:
    """The app *args* asks for; the floor and relay have one route and no middleware, as lean as aiohttp gets."""
    app = web.Application(client_max_size=32 * 1024 * 1024)
    if args.kind == "floor":
        app.router.add_post("/v1/{rest:.+}", hit)
    elif args.kind == "relay":
        app[UPSTREAM] = f"http://127.0.0.1:{args.to}"
        app.cleanup_ctx.append(_session_ctx)
        app.router.add_post("/v1/{rest:.+}", relay)
    else:
        app[FIRST_EVENT_DELAY_S] = args.first_event_delay_ms / 1000.0
        app[REST_DELAY_S] = args.rest_delay_ms / 1000.0
        app.router.add_post(CHAT, slow_chat)
        app.router.add_post("/v1/completions", fixed)
        app.router.add_post(EMBEDDINGS, fixed)
    return app


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.servers", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("floor", "relay", "upstream"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--to", type=int, help="relay: the upstream port")
    parser.add_argument("--first-event-delay-ms", type=float, default=20.0)
    parser.add_argument("--rest-delay-ms", type=float, default=10.0)
    args = parser.parse_args(argv)
    if args.kind == "relay" and args.to is None:
        parser.error("relay needs --to PORT")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # The proxy's own run_app settings at its default log level: no access log, uvloop, backlog 1024.
    web.run_app(
        create_app(args),
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
