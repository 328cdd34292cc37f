"""``python -m proxy``: load ``.env`` and settings, configure logging, serve (optionally in N workers)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace
from urllib.parse import urlsplit

from aiohttp import web
from dotenv import load_dotenv

from . import __version__
from .app import create_app
from .config import ConfigError, Settings, load_settings

log = logging.getLogger("proxy")

ACCESS_LOG_FORMAT = 'remote=%a request="%r" status=%s bytes=%b duration_s=%Tf cache=%{X-Cache}o'


def main(argv: list[str] | None = None) -> None:
    """Console entry point; exits 2 with a one-line message on a configuration error."""
    parser = argparse.ArgumentParser(prog="llm-cache-proxy", description="Caching proxy for OpenAI-compatible APIs.")
    parser.add_argument("--config", help="YAML settings file (default: $PROXY_CONFIG, else ./proxy.yaml if present)")
    parser.add_argument("--host", help="listen address (overrides PROXY_HOST)")
    parser.add_argument("--port", type=int, help="listen port (overrides PROXY_PORT)")
    parser.add_argument("--workers", type=int, help="processes sharing the port via SO_REUSEPORT")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)

    # Local convenience only: real environment variables always win over .env.
    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
    try:
        settings = load_settings(args.config)
        if args.workers is not None and args.workers < 1:
            raise ConfigError("--workers must be at least 1")
    except ConfigError as exc:
        print(f"llm-cache-proxy: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    settings = replace(
        settings,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=args.workers or settings.workers,
    )

    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
    )
    _describe(settings)
    if settings.workers > 1:
        _supervise(settings)
    else:
        _serve(settings, reuse_port=False)


def _describe(settings: Settings) -> None:
    redis_url = urlsplit(settings.redis.url)
    # Host, port and db only: the URL may carry a password.
    redis_at = f"{redis_url.scheme}://{redis_url.hostname}:{redis_url.port or 6379}{redis_url.path}"
    for upstream in settings.upstreams:
        log.info(
            "upstream name=%s base_url=%s models=%s key=%s",
            upstream.name,
            upstream.base_url,
            ",".join(upstream.models),
            "configured" if upstream.api_key else "from-client",
        )
    log.info(
        "listening host=%s port=%d workers=%d cache=%s namespace=%s ttl_s=%d redis=%s client_keys=%d",
        settings.host,
        settings.port,
        settings.workers,
        settings.cache.backend,
        settings.cache.namespace,
        settings.cache.ttl_s,
        redis_at if settings.cache.backend == "redis" else "-",
        len(settings.proxy_api_keys),
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _serve(settings: Settings, *, reuse_port: bool) -> None:
    access_log = logging.getLogger("aiohttp.access") if log.isEnabledFor(logging.DEBUG) else None
    web.run_app(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        reuse_port=reuse_port or None,
        access_log=access_log,
        access_log_format=ACCESS_LOG_FORMAT,
        print=None,
        shutdown_timeout=25,
        backlog=1024,
        loop=_new_loop(),
    )


def _supervise(settings: Settings) -> None:
    """Fork ``settings.workers`` servers on one port (SO_REUSEPORT); stop them all when one dies or on a signal."""
    children: list[int] = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            _serve(settings, reuse_port=True)
            os._exit(0)
        children.append(pid)

    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        children.remove(pid)
        if code and not stopping:
            log.error("worker exited pid=%d status=%d; stopping the others", pid, code)
            status = 1
            forward(signal.SIGTERM, None)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
