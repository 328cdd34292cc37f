"""Serve the app on its port until SIGTERM or SIGINT: aiohttp's ``run_app``, with the fast path in front."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_runner import GracefulExit

from .app import create_app
from .config import Settings
from .errors import HandlerTimeout, InternalError, MalformedRequest, ProxyError
from .fastpath import FastSite

# glibc's mallopt parameter number for the trim threshold, and the value the proxy sets.
_M_TRIM_THRESHOLD = -1
TRIM_THRESHOLD_BYTES = 4 * 1024 * 1024


def serve(settings: Settings, *, reuse_port: bool, peers_dir: str | None = None) -> None:
    """Run the proxy in this process on a new event loop (uvloop when installed) until a signal stops it; then
    stop as ``run_app`` does, giving requests in flight ``server.shutdown_grace_s``."""
    keep_heap()
    loop = new_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_run(settings, reuse_port, peers_dir))
    try:
        loop.run_until_complete(main)
    except (GracefulExit, KeyboardInterrupt):
        pass
    finally:
        try:
            if not main.done():
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(main)
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def keep_heap() -> bool:
    """Have glibc keep up to ``TRIM_THRESHOLD_BYTES`` of freed memory at the top of the heap instead of giving
    it back to the system at once; whether it was set.

    Each answer read from Redis passes through buffers of its size that are freed at once. With glibc's default
    (128 KiB, adapted upwards only for freed mmapped chunks) the top of the heap is given back and taken again
    over and over, and every answer pays page faults for memory it just had: hits read from Redis ran 15-25 %
    slower. The price is the memory kept: peak RSS about 2 MiB higher under load (1 or 2 MiB kept too little to
    help, 8 MiB helped no more). Left alone where ``MALLOC_TRIM_THRESHOLD_`` is set (the operator's choice) or
    the C library is not glibc.
    """
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


class ProxyRequestHandler(RequestHandler):
    """aiohttp's protocol for one connection, whose own error answers are in OpenAI's error shape.

    aiohttp answers a request its HTTP parser refuses, and a handler that fails outside the proxy's error
    handling, itself: in plain text, and for a parser error quoting the offending bytes of the request (an
    ``Authorization`` header among them). Here the answer says what was wrong and nothing the request held; the
    logging, and the connection closing after the answer, stay aiohttp's.
    """

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        # Logs as aiohttp does (see proxy.app's logger) and refuses when an answer has begun.
        super().handle_error(request, status, exc, message)
        error: ProxyError
        if isinstance(exc, HttpProcessingError):
            reason = exc.message.splitlines()[0].rstrip(": ") if exc.message else ""
            error = MalformedRequest(f"The request is not valid HTTP/1.1{': ' + reason if reason else ''}.")
        elif status == 504:
            error = HandlerTimeout("The proxy took too long to answer.")
        else:
            error = InternalError("The proxy failed to handle this request.")
        answer = error.response()
        answer.set_status(status)
        answer.force_close()
        return answer


class ProxyServer(web.Server):
    """aiohttp's protocol factory, making :class:`ProxyRequestHandler` protocols."""

    def __call__(self) -> RequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """:class:`aiohttp.web.AppRunner` whose connections answer aiohttp's own errors as the proxy does."""

    async def _make_server(self) -> web.Server:
        built = await super()._make_server()
        return ProxyServer(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            **built._kwargs,
        )


def runner_for(app: web.Application, settings: Settings, *, handle_signals: bool = False) -> web.AppRunner:
    """The runner the proxy serves *app* with."""
    server = settings.server
    return ProxyRunner(
        app,
        handle_signals=handle_signals,
        # Each /v1 request leaves its own line (proxy.access); aiohttp's would repeat it without the cache's view.
        access_log=None,
        shutdown_timeout=server.shutdown_grace_s,
        # Also bounds how long a client may take to send its request headers.
        keepalive_timeout=server.client_timeout_s,
    )


def site_for(runner: web.AppRunner, settings: Settings, *, reuse_port: bool = False) -> web.TCPSite:
    """The listening site: the fast path in front of the application unless ``server.fast_path`` is off."""
    server = settings.server
    if server.fast_path:
        return FastSite(
            runner, server.host, server.port, grace_s=server.shutdown_grace_s, backlog=1024, reuse_port=reuse_port
        )
    return web.TCPSite(runner, server.host, server.port, backlog=1024, reuse_port=reuse_port or None)


async def _run(settings: Settings, reuse_port: bool, peers_dir: str | None) -> None:
    runner = runner_for(create_app(settings, peers_dir=peers_dir), settings, handle_signals=True)
    await runner.setup()
    try:
        await site_for(runner, settings, reuse_port=reuse_port).start()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
