"""HTTP clients and checks around the wrk runs: cache warm-up, stream TTFB, the working-set fill, counters."""

from __future__ import annotations

import asyncio
import http.client
import re
import socket
import statistics
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import aiohttp

from .figures import in_rounds
from .processes import BenchmarkError

HIT_WAIT_S = 3.0
CHAT = "/v1/chat/completions"
AUTH = {"Content-Type": "application/json", "Authorization": "Bearer sk-bench"}


@dataclass(frozen=True, slots=True)
class Reply:
    """A response read to its end; ``first_byte_s`` and ``first_event_s`` count from the request's first byte."""

    status: int
    headers: dict[str, str]
    body: bytes
    first_byte_s: float
    first_event_s: float | None


def request(
    port: int, method: str, path: str, body: bytes | None = None, timeout_s: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request on a new connection; return status, lower-cased headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path, body=body, headers=AUTH if body else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _post_counted(port: int, path: str, body: bytes, counter: int | None) -> tuple[int, bytes, str | None]:
    """POST *body*; status, body and cache outcome: ``X-Cache``, or with the port of the fake upstream's nginx as
    *counter* ``HIT`` when upstream saw no request of its own for it (``MISS`` when it saw one, else ``?``)."""
    before = nginx_requests(counter) if counter is not None else 0
    status, headers, payload = request(port, "POST", path, body)
    if counter is None:
        return status, payload, headers.get("x-cache")
    # Each reading of the counter is one request itself.
    reached = nginx_requests(counter) - before - 1
    return status, payload, {0: "HIT", 1: "MISS"}.get(reached, "?")


def warm_until_hit(port: int, path: str, body: bytes, expected: bytes, counter: int | None = None) -> bool:
    """Send *body* until the answer is a hit (``_post_counted``); return whether the hit's body equals *expected*.

    Raises BenchmarkError on a non-200 or when no hit arrives within a few seconds (the store may write
    after the response, so the second request is not guaranteed to hit).
    """
    deadline = time.perf_counter() + HIT_WAIT_S
    while True:
        status, payload, outcome = _post_counted(port, path, body, counter)
        if status != 200:
            raise BenchmarkError(f"POST {path} on port {port} answered {status}: {payload[:300]!r}")
        if outcome == "HIT":
            return payload == expected
        if time.perf_counter() > deadline:
            raise BenchmarkError(f"POST {path} on port {port} never became a hit (X-Cache: {outcome})")
        time.sleep(0.01)


def differing_headers(proxy: Mapping[str, str], other: Mapping[str, str]) -> list[str]:
    """Names of the response headers that *other* lacks, adds, or sets differently from *proxy*.

    Only the presence of headers whose value changes with the time, the entry or the request (``Date``, ``Age``,
    ``X-Cache-Key``, ``X-Request-ID``) is compared. Names are expected lower-cased, as ``request`` returns them.
    """
    varying = {"date", "age", "x-cache-key", "x-request-id"}
    return sorted(
        name
        for name in proxy.keys() | other.keys()
        if name not in proxy or name not in other or (name not in varying and proxy[name] != other[name])
    )


def expect_miss(port: int, path: str, body: bytes, counter: int | None = None) -> None:
    """Raise BenchmarkError unless a fresh *body* is answered 200 as a miss (``_post_counted``)."""
    status, payload, outcome = _post_counted(port, path, body, counter)
    if status != 200 or outcome != "MISS":
        raise BenchmarkError(f"fresh body on port {port}: {status} X-Cache={outcome} {payload[:200]!r}")


def _post_head(port: int, path: str, length: int, keep_alive: bool) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer sk-bench\r\nAccept: text/event-stream\r\nContent-Length: {length}\r\n"
        + ("" if keep_alive else "Connection: close\r\n")
        + "\r\n"
    ).encode()


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body carried so far by the chunked payload *data*, and whether its last (zero-size) chunk arrived.

    A chunk not yet complete is left out. Trailers are not expected: the empty line must follow the last chunk.
    """
    parts: list[bytes] = []
    pos = 0
    while (eol := data.find(b"\r\n", pos)) >= 0:
        size = int(data[pos:eol].split(b";")[0], 16)
        if size == 0:
            return b"".join(parts), data.startswith(b"\r\n", eol + 2)
        end = eol + 2 + size
        if len(data) < end + 2:
            break
        parts.append(data[eol + 2 : end])
        pos = end + 2
    return b"".join(parts), False


def _exchange(sock: socket.socket, port: int, path: str, body: bytes, keep_alive: bool) -> Reply:
    """POST *body* on *sock*, timing the first byte and the first ``data:`` event from the request's first byte;
    read the response to the end of its framing (Content-Length or chunked), or to EOF when it has none."""
    first_byte = first_event = None
    buf = b""
    header_end = -1
    length: int | None = None
    chunked = False
    started = time.perf_counter()
    sock.sendall(_post_head(port, path, len(body), keep_alive) + body)
    while chunk := sock.recv(65536):
        now = time.perf_counter() - started
        buf += chunk
        first_byte = now if first_byte is None else first_byte
        if header_end < 0:
            header_end = buf.find(b"\r\n\r\n")
            if header_end < 0:
                continue
            framing = _headers(buf[:header_end])
            chunked = "chunked" in framing.get("transfer-encoding", "").lower()
            length = int(framing["content-length"]) if "content-length" in framing and not chunked else None
        if first_event is None and buf.find(b"data: ", header_end) >= 0:
            first_event = now
        payload = buf[header_end + 4 :]
        if (length is not None and len(payload) >= length) or (
            chunked and payload.endswith(b"\r\n\r\n") and dechunk(payload)[1]
        ):
            break
    head_bytes, _, payload = buf.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    if first_byte is None or not lines[0].startswith("HTTP/1.1 "):
        raise BenchmarkError(f"no HTTP response from port {port}")
    headers = _headers(head_bytes)
    if keep_alive and headers.get("connection", "").lower() == "close":
        raise BenchmarkError(f"port {port} closed a connection the client meant to keep alive")
    return Reply(
        int(lines[0].split()[1]), headers, dechunk(payload)[0] if chunked else payload, first_byte, first_event
    )


def _headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def post_timed(port: int, path: str, body: bytes, timeout_s: float = 10.0) -> Reply:
    """POST over a raw socket connected beforehand with ``Connection: close``, timing first byte and first event."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _exchange(sock, port, path, body, keep_alive=False)


class KeptAlive:
    """One persistent HTTP/1.1 connection to a port on 127.0.0.1, for timed POSTs one after another."""

    def __init__(self, port: int, timeout_s: float = 10.0) -> None:
        self.port = port
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def post(self, path: str, body: bytes) -> Reply:
        return _exchange(self._sock, self.port, path, body, keep_alive=True)

    def close(self) -> None:
        self._sock.close()


def _timings(side: str, reply: Reply, is_upstream: bool) -> tuple[float, float]:
    """First byte and first event of a complete streamed miss; BenchmarkError for anything else."""
    if reply.status != 200 or reply.first_event_s is None or b"data: [DONE]" not in reply.body:
        raise BenchmarkError(f"streamed request via {side} was not a complete stream ({reply.status})")
    # A proxy with CACHE_BACKEND=off stores nothing and says BYPASS; either way the answer came from upstream.
    if not is_upstream and reply.headers.get("x-cache") not in ("MISS", "BYPASS"):
        raise BenchmarkError(f"streamed request via {side} was not a miss (X-Cache: {reply.headers.get('x-cache')})")
    return reply.first_byte_s, reply.first_event_s


def _medians_ms(times: Mapping[str, Sequence[tuple[float, float]]], base: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for side, pairs in times.items():
        out[side] = {}
        for index, key in enumerate(("first_byte", "first_event")):
            out[side][f"{key}_ms"] = statistics.median(pair[index] for pair in pairs) * 1000.0
            if side != base:
                added = (mine[index] - theirs[index] for mine, theirs in zip(pairs, times[base], strict=True))
                out[side][f"{key}_added_ms"] = statistics.median(added) * 1000.0
    return out


def stream_ttfb(
    ports: Mapping[str, int], bodies: Sequence[Mapping[str, bytes]], kept_alive: bool, warm: int = 3
) -> dict[str, dict[str, float]]:
    """Median first-byte and first-event times of streamed misses per side, in milliseconds; for every side but
    the first (upstream itself), also the median of its per-round differences to the first (``*_added_ms``).

    *ports* maps side -> port, upstream first. Each item of *bodies* is one round, a distinct body per side; the
    sides take turns in an order that rotates each round, so drift hits all alike. Each request opens a new
    connection, or with *kept_alive* each side has one connection for every round. The first *warm* rounds warm
    connections, imports and pools and are not counted. Raises BenchmarkError when a stream is not a complete
    SSE miss.
    """
    sides = list(ports)
    conns = {side: KeptAlive(port) for side, port in ports.items()} if kept_alive else {}

    def measure(side: str, round_index: int) -> tuple[float, float]:
        body = bodies[round_index][side]
        reply = conns[side].post(CHAT, body) if kept_alive else post_timed(ports[side], CHAT, body)
        return _timings(side, reply, is_upstream=side == sides[0])

    try:
        times = in_rounds(sides, len(bodies), measure)
    finally:
        for conn in conns.values():
            conn.close()
    return _medians_ms({side: pairs[warm:] for side, pairs in times.items()}, sides[0])


async def _fill_pass(port: int, bodies: Sequence[bytes], concurrency: int) -> Counter[str]:
    outcomes: Counter[str] = Counter()
    todo = iter(bodies)

    async def client(session: aiohttp.ClientSession) -> None:
        for body in todo:
            async with session.post(f"http://127.0.0.1:{port}{CHAT}", data=body, headers=AUTH) as resp:
                await resp.read()
                outcomes["non-200" if resp.status != 200 else resp.headers.get("X-Cache", "none")] += 1

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return outcomes


def fill_working_set(port: int, bodies: Sequence[bytes], concurrency: int = 32) -> list[dict[str, int]]:
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


def keyspace_hits(reply: bytes) -> int:
    """``keyspace_hits`` from the RESP reply to ``INFO stats``; BenchmarkError when the reply has none."""
    match = re.search(rb"^keyspace_hits:(\d+)\r?$", reply, re.M)
    if not reply.startswith(b"$") or match is None:
        raise BenchmarkError(f"no keyspace_hits in the INFO reply {reply[:64]!r}")
    return int(match[1])


def redis_keyspace_hits(port: int) -> int:
    """Keys that reads found in the Redis on *port* since it started (``keyspace_hits`` of ``INFO stats``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO stats\r\n")
        reply = sock.recv(65536)
        size = int(reply[1 : reply.find(b"\r\n")]) if reply.startswith(b"$") else 0
        # "$<size>\r\n<text>\r\n": the text may come in more than one read.
        while len(reply) < len(str(size)) + size + 5 and (more := sock.recv(65536)):
            reply += more
    return keyspace_hits(reply)


def nginx_requests(port: int) -> int:
    """Total requests an nginx has accepted, from its ``stub_status`` page (the probe itself included)."""
    status, _, body = request(port, "GET", "/_status")
    match = re.search(rb"\n\s*(\d+)\s+(\d+)\s+(\d+)\s*\n", body)
    if status != 200 or match is None:
        raise BenchmarkError(f"no stub_status on port {port}")
    return int(match[3])
