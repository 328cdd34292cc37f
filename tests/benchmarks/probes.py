"""Checks and small clients around the wrk runs: cache warm-up, stream TTFB, the working-set fill, counters."""

from __future__ import annotations

import asyncio
import re
import socket
import statistics
import time
from collections import Counter
from dataclasses import dataclass

from harness import BenchmarkError, request

HIT_WAIT_S = 3.0


@dataclass(frozen=True, slots=True)
class Reply:
    """A response read to its end; ``first_byte_s`` and ``first_event_s`` count from the request's first byte."""

    status: int
    headers: dict[str, str]
    body: bytes
    first_byte_s: float
    first_event_s: float | None


def warm_until_hit(port: int, path: str, body: bytes, expected: bytes) -> bool:
    """Send *body* until the answer carries ``X-Cache: HIT``; return whether the hit's body equals *expected*.

    Raises BenchmarkError on a non-200 or when no hit arrives within a few seconds (the store may write
    after the response, so the second request is not guaranteed to hit).
    """
    deadline = time.perf_counter() + HIT_WAIT_S
    while True:
        status, headers, payload = request(port, "POST", path, body)
        if status != 200:
            raise BenchmarkError(f"POST {path} on port {port} answered {status}: {payload[:300]!r}")
        if headers.get("x-cache") == "HIT":
            return payload == expected
        if time.perf_counter() > deadline:
            raise BenchmarkError(f"POST {path} on port {port} never became a hit (X-Cache: {headers.get('x-cache')})")
        time.sleep(0.01)


def differing_headers(proxy: dict[str, str], other: dict[str, str]) -> list[str]:
    """Names of the response headers that *other* lacks, adds, or sets differently from *proxy*.

    Only the presence of headers whose value changes with the time or the entry (``Date``, ``Age``,
    ``X-Cache-Key``) is compared. Names are expected lower-cased, as ``harness.request`` returns them.
    """
    varying = {"date", "age", "x-cache-key"}
    return sorted(name for name in proxy.keys() | other.keys()
                  if name not in proxy or name not in other or (name not in varying and proxy[name] != other[name]))


def expect_miss(port: int, path: str, body: bytes) -> None:
    """Raise BenchmarkError unless a fresh *body* is answered 200 with ``X-Cache: MISS``."""
    status, headers, payload = request(port, "POST", path, body)
    if status != 200 or headers.get("x-cache") != "MISS":
        raise BenchmarkError(f"fresh body on port {port}: {status} X-Cache={headers.get('x-cache')} {payload[:200]!r}")


def post_timed(port: int, path: str, body: bytes, timeout_s: float = 10.0) -> Reply:
    """POST over a raw socket connected beforehand, timing the first byte and the first ``data:`` event."""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer sk-bench\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    first_byte = first_event = None
    buf = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sock.sendall(head + body)
        while chunk := sock.recv(65536):
            now = time.perf_counter() - started
            buf += chunk
            first_byte = now if first_byte is None else first_byte
            end = buf.find(b"\r\n\r\n")
            if first_event is None and end >= 0 and buf.find(b"data: ", end) >= 0:
                first_event = now
    head_bytes, _, payload = buf.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    if first_byte is None or not lines[0].startswith("HTTP/1.1 "):
        raise BenchmarkError(f"no HTTP response from port {port}")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return Reply(int(lines[0].split()[1]), headers, payload, first_byte, first_event)


def stream_ttfb(direct_port: int, proxy_port: int, bodies: list[tuple[bytes, bytes]]) -> dict[str, float | int]:
    """Median added first-byte and first-event time of streamed misses through the proxy, in milliseconds.

    Each pair of *bodies* is one distinct request for upstream and one for the proxy, sent alternately so
    drift hits both sides alike. Raises BenchmarkError when a stream is not a complete SSE miss.
    """
    byte_direct, byte_proxy, event_direct, event_proxy = [], [], [], []
    for direct_body, proxy_body in bodies:
        direct = post_timed(direct_port, "/v1/chat/completions", direct_body)
        via = post_timed(proxy_port, "/v1/chat/completions", proxy_body)
        for reply, side in ((direct, "upstream"), (via, "proxy")):
            if reply.status != 200 or reply.first_event_s is None or b"data: [DONE]" not in reply.body:
                raise BenchmarkError(f"streamed request via {side} was not a complete stream ({reply.status})")
        if via.headers.get("x-cache") != "MISS":
            raise BenchmarkError(f"streamed request via proxy was not a miss (X-Cache: {via.headers.get('x-cache')})")
        byte_direct.append(direct.first_byte_s)
        byte_proxy.append(via.first_byte_s)
        event_direct.append(direct.first_event_s or 0.0)
        event_proxy.append(via.first_event_s or 0.0)
    ms = 1000.0
    return {
        "samples": len(bodies),
        "first_event_direct_ms": statistics.median(event_direct) * ms,
        "first_event_proxy_ms": statistics.median(event_proxy) * ms,
        "first_event_added_ms": statistics.median(p - d for p, d in zip(event_proxy, event_direct, strict=True)) * ms,
        "first_byte_direct_ms": statistics.median(byte_direct) * ms,
        "first_byte_proxy_ms": statistics.median(byte_proxy) * ms,
        "first_byte_added_ms": statistics.median(p - d for p, d in zip(byte_proxy, byte_direct, strict=True)) * ms,
    }


async def _fill_pass(port: int, bodies: list[bytes], concurrency: int) -> Counter[str]:
    import aiohttp

    outcomes: Counter[str] = Counter()
    todo = iter(bodies)
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}

    async def client(session: aiohttp.ClientSession) -> None:
        for body in todo:
            async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                    headers=headers) as resp:
                await resp.read()
                outcomes["non-200" if resp.status != 200 else resp.headers.get("X-Cache", "none")] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return outcomes


def fill_working_set(port: int, bodies: list[bytes], concurrency: int = 32) -> list[dict[str, int]]:
    """Send every body once, then every body again; return the ``X-Cache`` counts of each pass."""
    return [dict(asyncio.run(_fill_pass(port, bodies, concurrency))) for _ in range(2)]


def redis_dbsize(port: int) -> int:
    """Number of keys in the Redis on *port*, over RESP without a client library."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"DBSIZE\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b":"):
        raise BenchmarkError(f"unexpected DBSIZE reply {reply!r}")
    return int(reply[1:].split(b"\r\n")[0])


def nginx_requests(port: int) -> int:
    """Total requests an nginx has accepted, from its ``stub_status`` page (the probe itself included)."""
    status, _, body = request(port, "GET", "/_status")
    match = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n", body)
    if status != 200 or match is None:
        raise BenchmarkError(f"no stub_status on port {port}")
    return int(match[3])
