"""A fake OpenAI API on aiohttp whose streams wait before the first event, for time-to-first-byte runs.

``python fake_upstream.py --port P [--first-event-delay-ms 20] [--rest-delay-ms 10]``. Any POST body is
accepted; a chat body with ``"stream": true`` gets SSE, the headers at once, the first event after the delay and
the remaining events after a second pause (a proxy that held the stream back would show that pause).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import openai_shapes
import uvloop
from aiohttp import web

FIRST_EVENT_DELAY_S = web.AppKey("first_event_delay_s", float)
REST_DELAY_S = web.AppKey("rest_delay_s", float)

CHAT = openai_shapes.chat_completion()
CHUNKS = openai_shapes.chat_chunks()
COMPLETION = openai_shapes.completion()
EMBEDDINGS = openai_shapes.embeddings()


def _is_stream(raw: bytes) -> bool:
    try:
        body: Any = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("stream") is True


async def chat(request: web.Request) -> web.StreamResponse:
    """A chat completion, streamed when the body asks for it."""
    if not _is_stream(await request.read()):
        return web.Response(body=CHAT, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    await asyncio.sleep(request.app[FIRST_EVENT_DELAY_S])
    await resp.write(CHUNKS[0])
    await asyncio.sleep(request.app[REST_DELAY_S])
    await resp.write(b"".join(CHUNKS[1:]))
    await resp.write_eof()
    return resp


async def completions(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=COMPLETION, content_type="application/json")


async def embeddings(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=EMBEDDINGS, content_type="application/json")


def create_app(first_event_delay_s: float, rest_delay_s: float) -> web.Application:
    """The fake API under ``/v1``, as the proxy's ``UPSTREAM_BASE_URL`` expects it."""
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[FIRST_EVENT_DELAY_S] = first_event_delay_s
    app[REST_DELAY_S] = rest_delay_s
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--first-event-delay-ms", type=float, default=20.0)
    parser.add_argument("--rest-delay-ms", type=float, default=10.0)
    args = parser.parse_args()
    app = create_app(args.first_event_delay_ms / 1000.0, args.rest_delay_ms / 1000.0)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
        shutdown_timeout=1.0,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
