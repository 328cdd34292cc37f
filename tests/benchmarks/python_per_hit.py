"""The Python work of one in-process hit on the fast path, without the system calls around it.

``python -m tests.benchmarks.python_per_hit`` feeds the benchmark's chat request, whole, to one fast-path connection
over and over and divides the process's CPU time by the answers written to a transport that only counts them. What
a hit costs under wrk (the benchmark's "CPU per request") minus this is what reading, writing and polling cost the
process: the part nginx pays as well.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from proxy.app import create_app
from proxy.entry import CacheEntry
from proxy.fastpath import FastConnection, Front
from proxy.loader import load_settings
from proxy.serving import runner_for
from proxy.state import KEYER, STORE

from . import shapes
from .servers import CHAT, JSON_TYPE

WARM_HITS = 1000


class CountingTransport:
    """Just enough of a transport for the fast path: it counts the answers written."""

    def __init__(self) -> None:
        self.answers = 0

    def writelines(self, chunks: Iterable[bytes]) -> None:
        self.answers += 1

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def chat_request() -> bytes:
    """The benchmark's chat request as ``lua/common.lua`` sends it."""
    body = shapes.request_body("chat")
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-bench\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def measure(hits: int) -> float:
    """Microseconds of process CPU time per hit, over *hits* hits after a warm-up."""
    env = {"UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", "CACHE_BACKEND": "memory", "PROXY_HOST": "127.0.0.1"}
    settings = load_settings(None, env)
    app = create_app(settings, log_stream=io.StringIO())
    runner = runner_for(app, settings)
    await runner.setup()
    try:
        front = Front(runner)
        request = chat_request()
        end = request.index(b"\r\n\r\n")
        admission = front.admission(request[:end])
        assert admission is not None, "the chat request is not of the fast path's shape"
        head, client = admission
        keyed = app[KEYER].key(head.route, request[end + 4 :], head.query, head.headers, client)
        assert keyed.key is not None
        answer = shapes.chat_completion()
        now = time.time()
        headers = (("Content-Type", JSON_TYPE), *shapes.OPENAI_HEADERS.items())
        usage = orjson.loads(answer)["usage"]
        app[STORE].put(keyed.key, CacheEntry(200, headers, answer, False, now, now + 3600, usage))
        connection = FastConnection(front)
        transport = CountingTransport()
        connection.connection_made(transport)  # type: ignore[arg-type]
        for _ in range(WARM_HITS):
            connection.data_received(request)
        started = time.process_time()
        for _ in range(hits):
            connection.data_received(request)
        spent = time.process_time() - started
        if transport.answers != WARM_HITS + hits:
            raise RuntimeError(f"{transport.answers} answers to {WARM_HITS + hits} requests: not all were hits")
        connection.connection_lost(None)
        return spent / hits * 1e6
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.python_per_hit", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--hits", type=int, default=100_000)
    args = parser.parse_args(argv)
    print(f"fast path, in-process chat hit: {asyncio.run(measure(args.hits)):.2f} µs of Python per hit")


if __name__ == "__main__":
    main()
