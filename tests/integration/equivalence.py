"""Two sites of one proxy application, the fast one and aiohttp's own, and a client that speaks raw HTTP/1.x to
either and keeps every answer as it came off the wire, so that a test can show that no client tells them apart."""

from __future__ import annotations

import asyncio
import difflib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from proxy.fastpath import FastSite
from proxy.serving import runner_for
from proxy.state import SETTINGS
from tests.support import free_port


class SiteFactory(Protocol):
    """Builds a listening site for an app's runner, as ``web.TCPSite(runner, host, port, backlog=...)`` does."""

    def __call__(self, runner: web.AppRunner, host: str, port: int, *, backlog: int = ...) -> web.BaseSite: ...


FAST_SITE: SiteFactory = FastSite
PLAIN_SITE: SiteFactory = web.TCPSite
BOTH_SIDES: Mapping[str, SiteFactory] = {"fast": FAST_SITE, "plain": PLAIN_SITE}

# A request every side answers the same way and that changes no counter: sent after a case's answers, its
# answer shows whether the connection is still open and what the server made of any bytes left over.
PROBE = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
READ_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0

_DATE = re.compile(rb"(?im)^(date:[ \t]*)[^\r\n]*")
_AGE = re.compile(rb"(?im)^(age:[ \t]*)[^\r\n]*")
# proxy.logs.RequestIds: a random per-process prefix and a counter that each request moves on.
_GENERATED_ID = re.compile(rb"(?im)^(x-request-id:[ \t]*)[0-9a-f]{12}-[0-9a-f]+(?=\r\n)")
_CONTENT_LENGTH = re.compile(rb"(?im)^(content-length:[ \t]*)[^\r\n]*")


@dataclass
class Sites:
    """One runner of the app, with a listening site per side; :attr:`ports` by side name."""

    runner: web.AppRunner
    ports: dict[str, int]
    closed: bool = False

    @property
    def app(self) -> web.Application:
        return self.runner.app

    async def close(self) -> None:
        """Shut down as the proxy does on SIGTERM (``runner.cleanup()``); once."""
        if not self.closed:
            self.closed = True
            await self.runner.cleanup()


@asynccontextmanager
async def serve(app: web.Application, sides: Mapping[str, SiteFactory] = BOTH_SIDES) -> AsyncIterator[Sites]:
    """Run *app* behind one ``AppRunner`` set up as ``python -m proxy`` sets it up, with one site per entry of
    *sides* on a free port of ``server.host``."""
    server = app[SETTINGS].server
    runner = runner_for(app, app[SETTINGS])
    await runner.setup()
    sites = Sites(runner, {})
    try:
        for name, factory in sides.items():
            port = free_port()
            await factory(runner, server.host, port, backlog=1024).start()
            sites.ports[name] = port
        yield sites
    finally:
        await sites.close()


@dataclass(frozen=True, slots=True)
class Answer:
    """One answer as sent: *head* is the status line and header lines up to the blank line, *body* the body
    with its framing (chunk sizes included)."""

    head: bytes
    body: bytes = b""

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def header(self, name: str) -> str | None:
        """The first value of header *name*, if present."""
        for line in self.head.split(b"\r\n")[1:]:
            key, colon, value = line.partition(b":")
            if colon and key.decode("latin-1").lower() == name.lower():
                return value.strip().decode("latin-1")
        return None

    def headers(self, name: str) -> list[str]:
        """Every value of header *name*, in order."""
        found = []
        for line in self.head.split(b"\r\n")[1:]:
            key, colon, value = line.partition(b":")
            if colon and key.decode("latin-1").lower() == name.lower():
                found.append(value.strip().decode("latin-1"))
        return found


@dataclass(frozen=True, slots=True)
class Step:
    """Wait *pause_s*, write *data*, then read *answers* answers (interim ``100 Continue`` ones count)."""

    data: bytes
    answers: int = 0
    pause_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Transcript:
    """What one connection got: its answers, and how it ended: ``open`` (the probe was answered, *probe* holds
    the answer), ``closed`` by the server, or ``silent`` (nothing came within the deadline)."""

    answers: tuple[Answer, ...]
    end: str
    probe: Answer | None = None


@dataclass(frozen=True, slots=True)
class Masks:
    """What may differ between two transcripts besides ``Date``: a generated ``X-Request-ID`` always; ``Age``
    when asked; and, for answers whose body is a live reading (``/metrics``), the body and its length."""

    age: bool = False
    volatile_body: bool = False


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer | None:
    """Read one whole answer; ``None`` when the server closed the connection before sending anything.
    *head_only*: the answer to HEAD, which has no body whatever its headers say."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ConnectionError(f"connection closed inside an answer's head: {exc.partial[:200]!r}") from None
        return None
    except ConnectionResetError:
        return None
    answer = Answer(head)
    status = answer.status
    if head_only or status < 200 or status in (204, 304):
        return answer
    if (answer.header("Transfer-Encoding") or "").lower() == "chunked":
        return Answer(head, await _read_chunked(reader))
    length = answer.header("Content-Length")
    if length is not None:
        return Answer(head, await reader.readexactly(int(length)))
    return Answer(head, await reader.read())


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    raw = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        raw += line
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                raw += trailer
            raw += b"\r\n"
            return bytes(raw)
        raw += await reader.readexactly(size + 2)


async def play(port: int, steps: Sequence[Step], *, head_only: bool = False, host: str = "127.0.0.1") -> Transcript:
    """Run *steps* on one new connection, then send :data:`PROBE` and see what becomes of it."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await play_on(reader, writer, steps, head_only=head_only)
    finally:
        await hang_up(writer)


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Close the client's end and wait until it is closed."""
    writer.close()
    with suppress(ConnectionError):
        await writer.wait_closed()


async def play_on(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, steps: Sequence[Step], *, head_only: bool = False
) -> Transcript:
    """:func:`play` on a connection that is already open."""
    answers: list[Answer] = []
    try:
        async with asyncio.timeout(READ_TIMEOUT_S):
            for step in steps:
                if step.pause_s:
                    await asyncio.sleep(step.pause_s)
                try:
                    writer.write(step.data)
                    await writer.drain()
                except ConnectionError:
                    pass  # the server may close early (an error answer); what it sent is still to be read
                for _ in range(step.answers):
                    answer = await read_answer(reader, head_only=head_only)
                    if answer is None:
                        return Transcript(tuple(answers), "closed")
                    answers.append(answer)
    except TimeoutError:
        return Transcript(tuple(answers), "silent")
    return await _probe(reader, writer, answers)


async def _probe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answers: list[Answer]) -> Transcript:
    try:
        writer.write(PROBE)
        await writer.drain()
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            probe = await read_answer(reader)
    except ConnectionError:
        return Transcript(tuple(answers), "closed")
    except TimeoutError:
        return Transcript(tuple(answers), "silent")
    if probe is None:
        return Transcript(tuple(answers), "closed")
    return Transcript(tuple(answers), "open", probe)


def normalized(answer: Answer, masks: Masks = Masks()) -> bytes:
    """*answer* with what may differ between sides replaced by ``*`` (see :class:`Masks`)."""
    head = _DATE.sub(rb"\1*", answer.head)
    head = _GENERATED_ID.sub(rb"\1<generated>", head)
    body = answer.body
    if masks.age:
        head = _AGE.sub(rb"\1*", head)
    if masks.volatile_body:
        head, body = _CONTENT_LENGTH.sub(rb"\1*", head), b"*"
    return head + body


def differences(fast: Transcript, plain: Transcript, masks: Masks = Masks()) -> list[str]:
    """Where the two transcripts differ once masked, as lines of a diff; empty when they are the same."""
    left, right = _lines(fast, masks), _lines(plain, masks)
    if left == right:
        return []
    return [line for line in difflib.unified_diff(left, right, "fast", "plain", lineterm="", n=2)]


def only_age_differs(fast: Transcript, plain: Transcript, masks: Masks = Masks()) -> bool:
    """Whether the transcripts differ, but in nothing more than ``Age``: a clock's second ticked between them."""
    aged = Masks(age=True, volatile_body=masks.volatile_body)
    return bool(differences(fast, plain, masks)) and not differences(fast, plain, aged)


def _lines(transcript: Transcript, masks: Masks) -> list[str]:
    lines = []
    for index, answer in enumerate(transcript.answers):
        lines.append(f"--- answer {index + 1}")
        lines.extend(repr(line) for line in normalized(answer, masks).split(b"\r\n"))
    lines.append(f"--- connection {transcript.end}")
    if transcript.probe is not None:
        lines.extend(repr(line) for line in normalized(transcript.probe).split(b"\r\n"))
    return lines


def request(
    method: str,
    target: str,
    *headers: str,
    body: bytes = b"",
    version: str = "1.1",
    host: str | None = "127.0.0.1",
    length: bool = True,
) -> bytes:
    """One request as bytes: *headers* are whole lines (``"Name: value"``); a ``Content-Length`` is added for
    *body* unless *length* is false."""
    lines = [f"{method} {target} HTTP/{version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(headers)
    if body and length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int) -> bytes:
    """*body* in chunked transfer coding, in chunks of *size* bytes."""
    pieces = [body[start : start + size] for start in range(0, len(body), size)]
    return b"".join(f"{len(piece):x}\r\n".encode() + piece + b"\r\n" for piece in pieces) + b"0\r\n\r\n"
