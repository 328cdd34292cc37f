"""``python -m proxy`` and the ``llm-cache-proxy`` command: ``serve`` (the default), ``check-config``, and the
commands on the cache in Redis: ``ping``, ``stats``, ``inspect`` and ``purge``."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

from dotenv import load_dotenv

from . import __version__, commands, logs, serving, stats
from .config import ConfigError, Settings
from .keyspace import SHORT_KEY, Keyspace
from .loader import config_path, redact_url, resolve

log = logging.getLogger("proxy")

OPERATOR_COMMANDS = ("ping", "stats", "inspect", "purge")


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Exits 2 with one line per problem on a configuration error."""
    args = _parser().parse_args(argv)
    # Local convenience only: real environment variables always win over .env.
    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
    if args.command == "check-config":
        raise SystemExit(check_config(args.config))
    if args.command in OPERATOR_COMMANDS:
        raise SystemExit(operate(args))
    try:
        settings = resolve(args.config)[0]
        if args.workers is not None and args.workers < 1:
            raise ConfigError("--workers must be at least 1")
    except ConfigError as exc:
        _report(exc)
        raise SystemExit(2) from None
    server = settings.server
    server = replace(
        server, host=args.host or server.host, port=args.port or server.port, workers=args.workers or server.workers
    )
    settings = replace(settings, server=server)
    logs.configure(settings.log_level, settings.log_format)
    _describe(settings)
    if server.workers > 1:
        _supervise(settings)
    else:
        _serve(settings, reuse_port=False)


def _report(error: ConfigError) -> None:
    for problem in str(error).splitlines():
        print(f"llm-cache-proxy: configuration error: {problem}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML settings file (default: $PROXY_CONFIG, else ./proxy.yaml if present)")
    serving = argparse.ArgumentParser(add_help=False)
    serving.add_argument("--host", help="listen address (overrides PROXY_HOST)")
    serving.add_argument("--port", type=int, help="listen port (overrides PROXY_PORT)")
    serving.add_argument("--workers", type=int, help="processes sharing the port via SO_REUSEPORT")
    parser = argparse.ArgumentParser(
        prog="llm-cache-proxy",
        description="Caching proxy for OpenAI-compatible APIs. Without a command, serves.",
        parents=[common, serving],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    commands.add_parser("serve", parents=[common, serving], help="serve (the default)")
    commands.add_parser(
        "check-config", parents=[common], help="validate the settings and print them with secrets redacted"
    )
    _add_operator_commands(commands, common)
    return parser


def _add_operator_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    redis_common = argparse.ArgumentParser(add_help=False, parents=[common])
    redis_common.add_argument(
        "--timeout", type=float, default=5.0, metavar="S", help="deadline of each Redis round trip (default 5)"
    )
    commands.add_parser("ping", parents=[redis_common], help="check that Redis answers, and how fast")
    stats_parser = commands.add_parser("stats", parents=[redis_common], help="what the cache holds, per route")
    stats_parser.add_argument("--json", action="store_true", help="print one JSON object")
    stats_parser.add_argument("--metrics-url", help="a replica's /metrics URL, to show its hit rate")
    inspect = commands.add_parser("inspect", parents=[redis_common], help="show one entry by its X-Cache-Key")
    inspect.add_argument("tag", type=_short_key, metavar="X-Cache-Key")
    inspect.add_argument("--extend", type=int, metavar="N", help="keep the entry fresh N seconds longer")
    inspect.add_argument("--json", action="store_true", help="print one JSON object per entry")
    purge = commands.add_parser("purge", parents=[redis_common], help="empty the namespace, or remove one entry")
    purge.add_argument("--key", type=_short_key, metavar="X-Cache-Key", help="remove only this entry")
    purge.add_argument("--namespace", help="a client key's namespace instead of cache.namespace")


def _short_key(text: str) -> str:
    if not SHORT_KEY.fullmatch(text.lower()):
        raise argparse.ArgumentTypeError("an X-Cache-Key is 16 hexadecimal digits")
    return text.lower()


def operate(args: argparse.Namespace) -> int:
    """Run an operator command: 0 done, 1 a failure it names (Redis unreachable, no such entry), 2 the
    configuration is invalid or keeps the cache out of Redis, 130 interrupted."""
    try:
        settings = resolve(args.config)[0]
    except ConfigError as exc:
        _report(exc)
        return 2
    if settings.cache.backend != "redis":
        commands.fail(f"cache.backend is {settings.cache.backend}: there is no cache in Redis to work on")
        return 2
    if args.command == "ping":
        work: Callable[[Keyspace], Awaitable[int]] = commands.ping
    elif args.command == "stats":
        work = partial(stats.stats, as_json=args.json, metrics_url=args.metrics_url)
    elif args.command == "inspect":
        if args.extend is not None and args.extend < 1:
            commands.fail("--extend takes a number of seconds, at least 1")
            return 2
        work = partial(commands.inspect, tag=args.tag, extend_s=args.extend, as_json=args.json)
    elif args.key:
        work = partial(commands.purge_key, tag=args.key)
    else:
        namespace = args.namespace or settings.cache.namespace
        if namespace not in settings.namespaces:
            commands.fail(f"namespace {namespace} is neither cache.namespace nor a client key's own")
            return 2
        work = partial(commands.purge, namespace=namespace)
    try:
        return commands.run(settings, work, args.timeout)
    except KeyboardInterrupt:
        commands.fail("interrupted")
        return 130


def check_config(config_file: str | None) -> int:
    """Print every resolved setting with its source, secrets redacted; 0 when valid, else 2 and each problem."""
    path = config_path(config_file, os.environ)
    try:
        settings, resolved = resolve(config_file)
    except ConfigError as exc:
        _report(exc)
        return 2
    print(f"# settings file: {path or 'none'}")
    width = max(len(r.setting.key) for r in resolved)
    for item in resolved:
        via = f" ({item.setting.env})" if item.source == "environment" else ""
        print(f"{item.setting.key:<{width}} = {item.shown()}  # {item.source}{via}")
    for index, upstream in enumerate(settings.upstreams):
        key = "configured" if upstream.api_key else "from the client"
        print(
            f"upstreams[{index}] = {upstream.name} {upstream.base_url} models={','.join(upstream.models)} "
            f"key={key} auth_header={upstream.auth_header} connect_timeout_s={upstream.connect_timeout_s:g}"
        )
    return 0


def _describe(settings: Settings) -> None:
    for upstream in settings.upstreams:
        log.info(
            "upstream name=%s base_url=%s models=%s key=%s",
            upstream.name,
            upstream.base_url,
            ",".join(upstream.models),
            "configured" if upstream.api_key else "from-client",
        )
    server, cache = settings.server, settings.cache
    log.info(
        "listening host=%s port=%d workers=%d cache=%s namespace=%s ttl_s=%d redis=%s client_keys=%d",
        server.host,
        server.port,
        server.workers,
        cache.backend,
        cache.namespace,
        cache.ttl_s,
        redact_url(settings.redis.url) if cache.backend == "redis" else "-",
        len(settings.auth.proxy_api_keys),
    )


def _serve(settings: Settings, *, reuse_port: bool, peers_dir: str | None = None) -> None:
    serving.serve(settings, reuse_port=reuse_port, peers_dir=peers_dir)


def _supervise(settings: Settings) -> None:
    """Fork ``server.workers`` servers on one port (SO_REUSEPORT); stop them all when one dies or on a signal.
    The workers share their metrics through sockets in a directory only this user can enter."""
    peers_dir = tempfile.mkdtemp(prefix="llm-cache-proxy-")
    try:
        _run_workers(settings, peers_dir)
    finally:
        shutil.rmtree(peers_dir, ignore_errors=True)


def _run_workers(settings: Settings, peers_dir: str) -> None:
    children: list[int] = []
    for _ in range(settings.server.workers):
        pid = os.fork()
        if pid == 0:
            status = 0
            try:
                _serve(settings, reuse_port=True, peers_dir=peers_dir)
            except BaseException:
                log.exception("worker failed")
                status = 1
            # Never back into the supervisor's code: it would fork again, and remove the shared directory.
            os._exit(status)
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
