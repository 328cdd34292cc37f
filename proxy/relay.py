"""Flights: one upstream exchange relayed live to every client that asked the same question at once."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import aiohttp
from aiohttp import web

from .errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from .sse import SseRecorder
from .upstream import relay_headers

log = logging.getLogger(__name__)

Opener = Callable[[], Awaitable[aiohttp.ClientResponse]]


class Flight:
    """One upstream call whose response is recorded chunk by chunk and shared by its consumers.

    A background task reads the upstream; each consumer (:meth:`respond`) writes what has arrived so far and
    then follows live, so a client that joins late still gets every byte, and a stream reaches every client
    as it arrives. The task is cancelled when the last consumer leaves before the upstream finished: nobody
    is left to pay for. *on_complete* runs once the upstream finished cleanly.
    """

    def __init__(
        self,
        key: str | None,
        on_complete: Callable[[Flight], None] | None = None,
        on_close: Callable[[Flight], None] | None = None,
    ) -> None:
        self.key = key
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.is_stream = False
        self.chunks: list[bytes] = []
        self.recorder: SseRecorder | None = None
        self.started = False
        self.finished = False
        self.complete = False
        self.error: ProxyError | None = None
        self.consumers = 0
        self._on_complete = on_complete
        self._on_close = on_close
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def started_by(self, opener: Opener) -> Flight:
        """Begin the upstream call in the background; returns ``self``."""
        self._task = asyncio.get_running_loop().create_task(self._drive(opener))
        return self

    def body(self) -> bytes:
        """The whole body received so far. A finished plain response is joined once, for every consumer and
        the store; a stream keeps its chunks, which consumers still follow by index."""
        if self.finished and not self.is_stream and len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return b"".join(self.chunks)

    async def _drive(self, opener: Opener) -> None:
        try:
            try:
                response = await opener()
            except ProxyError as exc:
                self.error = exc
                return
            try:
                self.status = response.status
                self.headers = relay_headers(response.headers)
                self.is_stream = response.content_type == "text/event-stream"
                if self.is_stream:
                    self.recorder = SseRecorder()
                self.started = True
                self._notify()
                async for chunk in response.content.iter_any():
                    if self.recorder is not None:
                        self.recorder.feed(chunk)
                    self.chunks.append(chunk)
                    self._notify()
                self.complete = True
            except (aiohttp.ClientError, TimeoutError) as exc:
                # Consumers see a truncated response; nothing is stored.
                log.warning("upstream broke off mid-response status=%s error=%r", self.status, exc)
                self.error = (
                    UpstreamTimeout("upstream went silent mid-response")
                    if isinstance(exc, TimeoutError)
                    else UpstreamUnreachable("upstream response broke off")
                )
            finally:
                if self.complete:
                    response.release()
                else:
                    response.close()
        finally:
            self.finished = True
            self._notify()
            if self._on_close is not None:
                self._on_close(self)
        if self.complete and self._on_complete is not None:
            self._on_complete(self)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _wait(self) -> None:
        await self._changed.wait()

    async def respond(self, request: web.Request, extra_headers: Iterable[tuple[str, str]]) -> web.StreamResponse:
        """Answer one client from this flight; raise the flight's :class:`ProxyError` if it never started."""
        self.consumers += 1
        try:
            while not self.started and not self.finished:
                await self._wait()
            if not self.started:
                raise self.error or UpstreamUnreachable("upstream call was abandoned")
            if not self.is_stream:
                while not self.finished:
                    await self._wait()
                if not self.complete:
                    raise self.error or UpstreamUnreachable("upstream response broke off")
                response = web.Response(status=self.status, body=self.body())
                _set_headers(response, self.headers, extra_headers)
                return response
            return await self._stream(request, extra_headers)
        finally:
            self.consumers -= 1
            if self.consumers == 0 and not self.finished and self._task is not None:
                self._task.cancel()
                # Forget it now, not when the task unwinds: a request arriving meanwhile must start afresh.
                if self._on_close is not None:
                    self._on_close(self)

    async def _stream(self, request: web.Request, extra_headers: Iterable[tuple[str, str]]) -> web.StreamResponse:
        response = web.StreamResponse(status=self.status)
        _set_headers(response, self.headers, extra_headers)
        await response.prepare(request)
        sent = 0
        while True:
            if sent < len(self.chunks):
                upto = len(self.chunks)
                pending = self.chunks[sent] if upto - sent == 1 else b"".join(self.chunks[sent:upto])
                sent = upto
                await response.write(pending)
                continue
            if self.finished:
                break
            await self._wait()
        if not self.complete:
            # Closing without the chunked terminator tells the client the stream is truncated.
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


def _set_headers(
    response: web.StreamResponse, headers: Iterable[tuple[str, str]], extra_headers: Iterable[tuple[str, str]]
) -> None:
    out = response.headers
    for name, value in headers:
        out.add(name, value)
    for name, value in extra_headers:
        out[name] = value


class Flights:
    """The flights in progress, by cache key: identical concurrent requests share one upstream call."""

    def __init__(self) -> None:
        self._by_key: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._by_key)

    def join(self, key: str, opener: Opener, on_complete: Callable[[Flight], None]) -> tuple[Flight, bool]:
        """The flight for *key*, started with *opener* when none is in progress; the bool is ``True``
        for the client that started it."""
        flight = self._by_key.get(key)
        if flight is not None and not flight.finished:
            return flight, False
        flight = Flight(key, on_complete, self._forget)
        self._by_key[key] = flight
        return flight.started_by(opener), True

    def _forget(self, flight: Flight) -> None:
        if flight.key is not None and self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]
