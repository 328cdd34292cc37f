"""The fast path's request reader takes only one strict shape of request, and writes hits as aiohttp would."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.http import HttpVersion
from aiohttp.http_writer import _serialize_headers
from aiohttp.test_utils import make_mocked_request
from hypothesis import given
from hypothesis import strategies as st

from proxy.entry import CacheEntry, replay_headers
from proxy.wire import FOREIGN, INCOMPLETE, MAX_HEAD_BYTES, Head, Replay, head_end, read_head, replayable

BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
LIMIT = 1 << 20


def _request(
    *fields: str, line: str = "POST /v1/chat/completions HTTP/1.1", body: bytes = BODY, length: bool = True
) -> bytearray:
    head = [line, "Host: localhost", *fields]
    if length:
        head.append(f"Content-Length: {len(body)}")
    return bytearray("\r\n".join(head).encode() + b"\r\n\r\n" + body)


def _judged(buf: bytearray) -> Head | str:
    """What the fast path makes of *buf*: the head of the request at its start, or INCOMPLETE or FOREIGN."""
    end = head_end(buf)
    if not isinstance(end, int):
        return end
    return read_head(bytes(buf[:end]), LIMIT) or FOREIGN


def _taken(buf: bytearray) -> Head:
    head = _judged(buf)
    assert isinstance(head, Head), head
    return head


def test_request_is_taken_with_route_query_and_headers_when_it_has_the_one_shape() -> None:
    buf = _request("Authorization: Bearer sk-1", "X-Trace:  a b  ", line="POST /v1/embeddings?api-version=1 HTTP/1.1")
    head = _taken(buf + b"POST /v1/next")
    assert (head.route, head.path, head.query, head.minor) == ("embeddings", "/v1/embeddings", "api-version=1", 1)
    assert head.headers["authorization"] == "Bearer sk-1"
    assert head.headers["X-Trace"] == "a b"
    assert head_end(buf) == len(buf) - len(BODY) - 4
    assert head.length == len(BODY)
    assert head.keep_alive


@pytest.mark.parametrize(
    ("fields", "line", "keep_alive"),
    [
        ((), "POST /v1/chat/completions HTTP/1.1", True),
        (("Connection: close",), "POST /v1/chat/completions HTTP/1.1", False),
        (("Connection: Keep-Alive",), "POST /v1/chat/completions HTTP/1.1", True),
        ((), "POST /v1/chat/completions HTTP/1.0", False),
        (("Connection: keep-alive",), "POST /v1/chat/completions HTTP/1.0", True),
    ],
)
def test_keep_alive_follows_version_and_connection_when_taken(
    fields: tuple[str, ...], line: str, keep_alive: bool
) -> None:
    assert _taken(_request(*fields, line=line)).keep_alive is keep_alive


def test_head_is_taken_when_its_body_is_still_arriving() -> None:
    buf = _request()
    assert _taken(buf[: len(buf) - 10]).length == len(BODY)


@pytest.mark.parametrize("cut", [1, 5, 9, 20, 40, 60])
def test_head_is_incomplete_when_it_stops_midway(cut: int) -> None:
    assert _judged(_request()[:cut]) is INCOMPLETE


@pytest.mark.parametrize(
    "buf",
    [
        _request(line="GET /v1/chat/completions HTTP/1.1"),
        _request(line="post /v1/chat/completions HTTP/1.1"),
        _request(line="HEAD /v1/chat/completions HTTP/1.1"),
        _request(line="POST /v1/models HTTP/1.1"),
        _request(line="POST /v1/chat%2Fcompletions HTTP/1.1"),
        _request(line="POST /v1//chat/completions HTTP/1.1"),
        _request(line="POST /v1/chat/completions/ HTTP/1.1"),
        _request(line="POST /v1/chat/completions?a=%2F HTTP/1.1"),
        _request(line="POST /v1/chat/completions#x HTTP/1.1"),
        _request(line="POST http://localhost/v1/chat/completions HTTP/1.1"),
        _request(line="POST /v1/chat/completions HTTP/2.0"),
        _request(line="POST  /v1/chat/completions HTTP/1.1"),
        _request("Transfer-Encoding: chunked"),
        _request("Transfer-Encoding: chunked", length=False),
        _request("Content-Length: 3"),
        _request(f"Content-Length: {len(BODY)}"),
        _request(length=False),
        _request("Content-Length: +5", length=False),
        _request("Expect: 100-continue"),
        _request("Upgrade: websocket", "Connection: upgrade"),
        _request("Connection: keep-alive, close"),
        _request("Connection: close", "Connection: close"),
        _request("Content-Encoding: gzip"),
        _request("Origin: https://example.com"),
        _request("Sec-Fetch-Site: cross-site"),
        _request("Host: other"),
        _request("X-Folded: a", " b"),
        _request("X-Bad: a\x01b"),
        _request("X-Bad: caf\u00e9"),
        _request("Bad Name: a"),
        _request("X-Empty-Name", ":a"),
        bytearray(b"POST /v1/chat/completions HTTP/1.1\nHost: x\nContent-Length: 2\n\n{}"),
        bytearray(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\nContent"),
        bytearray(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\rContent"),
        bytearray(b"GET / HTTP/1.1\r\n"),
        bytearray(b"PUT"),
        bytearray(b"POST /v1/" + b"a" * MAX_HEAD_BYTES),
        _request(body=b"x" * (LIMIT + 1)),
    ],
    ids=lambda buf: bytes(buf[:60]).decode("latin-1"),
)
def test_request_is_foreign_when_anything_is_unusual(buf: bytearray) -> None:
    assert _judged(buf) is FOREIGN


def test_http_1_0_request_without_host_is_taken_when_1_1_would_not_be() -> None:
    raw = f"POST /v1/embeddings HTTP/1.{{}}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode() + BODY
    assert isinstance(_judged(bytearray(raw.replace(b"{}", b"0"))), Head)
    assert _judged(bytearray(raw.replace(b"{}", b"1"))) is FOREIGN


@given(st.binary(max_size=300))
def test_reader_never_raises_when_given_any_bytes(data: bytes) -> None:
    result = _judged(bytearray(data))
    assert result in (INCOMPLETE, FOREIGN) or isinstance(result, Head)


@given(st.binary(max_size=200))
def test_reader_never_raises_when_a_valid_start_is_followed_by_any_bytes(data: bytes) -> None:
    result = _judged(bytearray(b"POST /v1/chat/completions HTTP/1.1\r\n" + data))
    if isinstance(result, Head):
        assert all("\r" not in v and "\n" not in v for v in result.headers.values())


def _entry(**overrides: object) -> CacheEntry:
    values: dict[str, object] = {
        "status": 200,
        "headers": (("Content-Type", "application/json"), ("x-request-id", "req_1"), ("openai-model", "m")),
        "body": b'{"ok":true}',
        "is_stream": False,
        "stored_at": 1000.0,
        "expires_at": 5000.0,
    }
    values.update(overrides)
    return CacheEntry(**values)  # type: ignore[arg-type]


async def _aiohttp_bytes(
    entry: CacheEntry, version: str, connection: str | None, request_id: str, *, keep_alive: bool = True
) -> bytes:
    """What aiohttp writes for the application's replay of *entry* with this request id."""
    headers = {"Connection": connection} if connection else {}
    written: list[bytes] = []

    class Writer:
        buffer_size = 0
        output_size = 0
        length: int | None = None

        def enable_chunking(self) -> None: ...

        async def write_headers(self, status_line: str, headers: object) -> None:
            written.append(_serialize_headers(status_line, headers))

        def send_headers(self) -> None: ...

        async def write(self, data: bytes) -> None:
            written.append(bytes(data))

        async def write_eof(self, data: bytes = b"") -> None:
            written.append(bytes(data))

        async def drain(self) -> None: ...

    major, minor = version.split(".")
    request = make_mocked_request(
        "POST",
        "/v1/chat/completions",
        headers=headers,
        version=HttpVersion(int(major), int(minor)),
        writer=Writer(),
        closing=not keep_alive,
    )
    response = web.Response(status=entry.status, body=entry.body, headers=replay_headers(entry, "abcd", 1000.0, "HIT"))
    response.headers["X-Request-ID"] = request_id
    await response.prepare(request)
    await response.write_eof()
    return b"".join(written)


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    # An HTTP/1.0 keep-alive cannot be mocked (aiohttp's mocked request closes every 1.0 connection): the
    # equivalence suite sends one to both servers.
    [("1.1", None, True), ("1.1", "close", False), ("1.0", None, False)],
)
async def test_replay_bytes_match_aiohttp_when_written_for_any_version(
    version: str, connection: str | None, keep_alive: bool
) -> None:
    entry = _entry()
    expected = await _aiohttp_bytes(entry, version, connection, "rid-1", keep_alive=keep_alive)
    written = Replay(entry, "abcd").bytes_for(int(version[-1]), keep_alive, 0, "rid-1")
    assert _without_date(written) == _without_date(expected)


async def test_replay_adds_octet_stream_as_aiohttp_does_when_the_entry_has_no_content_type() -> None:
    entry = _entry(headers=())
    expected = await _aiohttp_bytes(entry, "1.1", None, "r")
    written = Replay(entry, "abcd").bytes_for(1, True, 0, "r")
    assert b"Content-Type: application/octet-stream\r\n" in written
    assert _without_date(written) == _without_date(expected)


def _without_date(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n") if not line.startswith(b"Date: "))


def test_entry_is_not_replayable_when_its_status_has_no_body_or_is_not_success() -> None:
    assert replayable(_entry())
    assert not replayable(_entry(status=204))
    assert not replayable(_entry(status=304))
    assert not replayable(_entry(status=500))
