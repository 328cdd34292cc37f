"""Run TensorZero's HTTP gateway in this process until SIGTERM: ``python -m tests.benchmarks.tensorzero_gateway``.

It runs with the peers' virtualenv, where the ``tensorzero`` wheel carries the whole gateway. The wheel starts
it only through a private helper that picks its own port, so the port is written to ``--port-file`` for the
runner to read. Being private, the helper may change in any release; this module is all that would need to.
"""

from __future__ import annotations

import argparse
import importlib
import signal
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.tensorzero_gateway")
    parser.add_argument("--config", type=Path, required=True, help="the gateway's TOML configuration")
    parser.add_argument("--redis", required=True, help="redis:// URL of the exact-match cache")
    parser.add_argument("--port-file", type=Path, required=True, help="where to write the port it listens on")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Blocked before the gateway's threads start, so that they inherit the mask and only sigwait sees the signal.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    module = importlib.import_module("tensorzero.tensorzero")
    gateway = module._start_http_gateway(
        config_file=str(args.config),
        clickhouse_url=None,
        postgres_url=None,
        valkey_url=args.redis,
        async_setup=False,
    )
    port = urlsplit(gateway.base_url).port
    partial = args.port_file.with_suffix(".tmp")
    partial.write_text(f"{port}\n")
    partial.rename(args.port_file)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    gateway.close()


if __name__ == "__main__":
    main()
