"""The HTTP/1.x requests the fast path answers itself, read strictly from raw bytes, and its answers' bytes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from operator import itemgetter

from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict

from .entry import CacheEntry, replay_headers
from .policy import CACHEABLE_ROUTES

# The one request shape taken: POST to a cacheable route in origin form, the query made only of characters that
# need no decoding, HTTP/1.0 or 1.1, CRLF line ends. Anything else is the application's to answer.
_PREFIX = b"POST /v1/"
_REQUEST_LINE = re.compile(
    rb"POST (/v1/("
    + "|".join(re.escape(route) for route in sorted(CACHEABLE_ROUTES)).encode()
    + rb"))(?:\?([A-Za-z0-9._~!$&'()*+,;=:@/?-]*))? HTTP/1\.([01])\r\n"
)
# Header fields with a token name, visible ASCII values (spaces and tabs inside), no folding, CRLF line ends.
_FIELDS = re.compile(rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[ \t]*(?:[!-~](?:[ \t!-~]*[!-~])?)?[ \t]*\r\n)*")
_LENGTH = re.compile(r"[0-9]{1,9}")
# Headers that ask for what only the application does: other framing, interim answers, protocol switches,
# encoded bodies, browsers (CORS or a refusal).
_FOREIGN = ("Transfer-Encoding", "Expect", "Upgrade", "Content-Encoding", "Origin", "Sec-Fetch-Site")
# Within aiohttp's own limits (8190 bytes per line), so that whatever the application would refuse is its own.
MAX_HEAD_BYTES = 8190
MAX_FIELDS = 64

INCOMPLETE = "incomplete"
FOREIGN = "foreign"


@dataclass(frozen=True, slots=True)
class Head:
    """A request head of the one shape taken: the target's *path*, *route* and *query*, the HTTP minor version,
    the header fields, whether the connection stays open after the answer, and the body's length."""

    path: str
    route: str
    query: str
    minor: int
    headers: CIMultiDict[str]
    keep_alive: bool
    length: int


def head_end(buf: bytearray) -> int | str:
    """Where the head at the start of *buf* ends (the index of its final CRLF CRLF, excluded), :data:`INCOMPLETE`
    while it may still become one of the shape taken, or :data:`FOREIGN`."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
    if end >= 0:
        return end
    return _incomplete_or_foreign(buf)


def read_head(head: bytes, max_body_bytes: int) -> Head | None:
    """*head* (a request head without its final CRLF CRLF) as a :class:`Head`, or ``None`` for anything not of
    the one shape taken here (see the module's patterns), a body above *max_body_bytes* included."""
    line = _REQUEST_LINE.match(head)
    if line is None:
        return None
    fields_start = line.end()
    if fields_start >= len(head) or _FIELDS.fullmatch(head + b"\r\n", fields_start) is None:
        return None
    lines = head[fields_start:].split(b"\r\n")
    if len(lines) > MAX_FIELDS:
        return None
    pairs = []
    for raw in lines:
        name, _, value = raw.partition(b":")
        pairs.append((name.decode("ascii"), value.strip(b" \t").decode("ascii")))
    headers = CIMultiDict(pairs)
    minor = line[4][0] - 48
    keep_alive = _keep_alive(headers, minor)
    length = _length(headers, max_body_bytes)
    if keep_alive is None or length is None or any(name in headers for name in _FOREIGN):
        return None
    if len(headers.getall("Host", ())) > 1 or (minor and "Host" not in headers):
        return None
    query = line[3]
    return Head(
        line[1].decode("ascii"),
        line[2].decode("ascii"),
        query.decode("ascii") if query is not None else "",
        minor,
        headers,
        keep_alive,
        length,
    )


def _incomplete_or_foreign(buf: bytearray) -> str:
    start = bytes(buf[: len(_PREFIX)])
    if not _PREFIX.startswith(start) or len(buf) > MAX_HEAD_BYTES:
        return FOREIGN
    # A line ended by LF alone, or a CR inside a line: never completes as CRLF CRLF, and is not ours.
    crlf = buf.count(b"\r\n")
    if buf.count(b"\n") != crlf or buf.count(b"\r") - crlf > buf.endswith(b"\r"):
        return FOREIGN
    return INCOMPLETE


def _keep_alive(headers: CIMultiDict[str], minor: int) -> bool | None:
    values = headers.getall("Connection", ())
    if not values:
        return minor == 1
    if len(values) > 1:
        return None
    value = values[0].lower()
    if value == "close":
        return False
    return True if value == "keep-alive" else None


def _length(headers: CIMultiDict[str], max_body_bytes: int) -> int | None:
    values = headers.getall("Content-Length", ())
    if len(values) != 1 or not _LENGTH.fullmatch(values[0]):
        return None
    length = int(values[0])
    return length if 0 < length <= max_body_bytes else None


# Placeholders for what changes per answer; NUL never occurs in a header, so they cannot collide.
_AGE, _REQUEST_ID, _DATE = "\x00age\x00", "\x00id\x00", "\x00date\x00"
_SLOT = re.compile(rb"\x00(age|id|date)\x00")
_CONNECTION = {
    (0, False): b"",
    (0, True): b"Connection: keep-alive\r\n",
    (1, False): b"Connection: close\r\n",
    (1, True): b"",
}


class Replay:
    """An entry's answer as bytes, but for what changes per answer: the status line's HTTP version, ``Age``,
    ``X-Request-ID``, ``Date`` and ``Connection``. The header fields and their order are those aiohttp writes
    for :func:`~proxy.handlers.serve_hit`'s response (``Content-Length``, then ``Content-Type`` if absent,
    ``Date``, ``Server``, then ``Connection`` where the version and keep-alive call for it)."""

    __slots__ = ("_formats", "_pick", "_status", "_template", "body", "entry", "tag")

    def __init__(self, entry: CacheEntry, tag: str) -> None:
        self.entry, self.tag, self.body = entry, tag, entry.body
        headers = replay_headers(entry, tag, 0.0, "HIT")
        headers["Age"] = _AGE
        headers["X-Request-ID"] = _REQUEST_ID
        headers.setdefault("Content-Length", str(len(entry.body)))
        if entry.body:
            headers.setdefault("Content-Type", "application/octet-stream")
        headers.setdefault("Date", _DATE)
        headers.setdefault("Server", SERVER_SOFTWARE)
        fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items()).encode("utf-8")
        # A %-format per version and keep-alive (made when first needed), its placeholders in slot order.
        parts = _SLOT.split(fields.replace(b"%", b"%%"))
        # Age and X-Request-ID are always there, so itemgetter always gives a tuple.
        self._pick = itemgetter(*(("age", "id", "date").index(name.decode()) for name in parts[1::2]))
        self._template = b"%s".join(parts[0::2])
        self._status = f" {entry.status} {_reason(entry.status)}\r\n".encode()
        self._formats: dict[tuple[int, bool], bytes] = {}

    @property
    def size(self) -> int:
        """Bytes it holds beside the entry's own."""
        return 3 * len(self._template)

    def head_for(self, minor: int, keep_alive: bool, age: int, request_id: str) -> bytes:
        """The answer's status line and headers for an HTTP/1.<*minor*> request; :attr:`body` follows them."""
        values = (str(age).encode(), request_id.encode(), rfc822_formatted_time().encode())
        form = self._formats.get((minor, keep_alive))
        if form is None:
            version = b"HTTP/1.1" if minor else b"HTTP/1.0"
            form = version + self._status + self._template + _CONNECTION[(minor, keep_alive)] + b"\r\n"
            self._formats[(minor, keep_alive)] = form
        answer: bytes = form % self._pick(values)
        return answer

    def bytes_for(self, minor: int, keep_alive: bool, age: int, request_id: str) -> bytes:
        """The whole answer to an HTTP/1.<*minor*> request."""
        return self.head_for(minor, keep_alive, age, request_id) + self.body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


def replayable(entry: CacheEntry) -> bool:
    """Whether the fast path writes *entry*'s answer the way the application would: a status whose answer has a
    body, and header values that aiohttp would write as they are."""
    if not 200 <= entry.status < 300 or entry.status in (204, 205):
        return False
    return all("\r" not in name + value and "\n" not in name + value for name, value in entry.headers)


class AnswerFramer:
    """Follows the bytes of one HTTP/1.1 response as they are written, to tell when it has been written whole:
    its head, then a ``Content-Length`` body, a chunked body to its last chunk and trailer, or no body (1xx,
    204, 304). A response delimited by closing the connection never completes."""

    __slots__ = ("_left", "_pending", "_state")

    def __init__(self) -> None:
        self._state = "head"
        self._pending = b""
        self._left = 0

    @property
    def complete(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> bool:
        """Take the next bytes written; whether the response is now complete."""
        while data and self._state != "done":
            if self._state in ("body", "data"):
                taken = min(self._left, len(data))
                self._left -= taken
                data = data[taken:]
                if not self._left:
                    self._state = "done" if self._state == "body" else "size"
                continue
            if self._state == "close":
                return False
            data = self._line_state(self._pending + data)
        return self._state == "done"

    def _line_state(self, data: bytes) -> bytes:
        """Advance through a head, a chunk-size line or a trailer line in *data*; what follows it."""
        terminator = b"\r\n\r\n" if self._state == "head" else b"\r\n"
        end = data.find(terminator)
        if end < 0:
            self._pending = data
            return b""
        self._pending = b""
        line, rest = data[:end], data[end + len(terminator) :]
        if self._state == "head":
            self._read_head(line)
        elif self._state == "size":
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            self._state, self._left = ("trailer", 0) if size == 0 else ("data", size + 2)
        elif not line:
            self._state = "done"
        return rest

    def _read_head(self, head: bytes) -> None:
        status_line, _, fields = head.partition(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        if 100 <= status < 200:
            return
        if status in (204, 304):
            self._state = "done"
            return
        length: int | None = None
        for field in fields.split(b"\r\n"):
            name, _, value = field.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self._state = "size"
                return
            if name == b"content-length":
                length = int(value.strip())
        if length is None:
            self._state = "close"
        else:
            self._state, self._left = ("body", length) if length else ("done", 0)
