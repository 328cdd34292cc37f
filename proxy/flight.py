"""Single-flight: one upstream exchange, recorded as it arrives and relayed live to every identical request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from contextlib import nullcontext

import aiohttp
from aiohttp import web

from .entry import Recording
from .errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from .sse import SseRecorder
from .upstream import CallSlots, relay_headers

log = logging.getLogger(__name__)

Opener = Callable[[], Awaitable[aiohttp.ClientResponse]]


def cut_off(request: web.Request) -> None:
    """End a response whose upstream broke off: closing without the chunked terminator tells the client the
    body is truncated, where a clean end would pass a partial answer off as whole."""
    if request.transport is not None:
        request.transport.close()


class Flight:
    """One upstream call whose response is recorded chunk by chunk and shared by its consumers.

    A background task reads the upstream; each consumer (:meth:`respond`) writes what has arrived so far and
    then follows live, so a client that joins late still gets every byte, and a stream reaches every client
    as it arrives. The task is cancelled when the last consumer leaves before the upstream finished: nobody
    is left to pay for. Once the upstream's answer has been read to its end, *on_finish* receives the
    :class:`Recording`; *on_close* runs when the flight can no longer be joined.
    """

    def __init__(
        self,
        key: str | None,
        on_finish: Callable[[Recording], None] | None = None,
        on_close: Callable[[Flight], None] | None = None,
        slots: CallSlots | None = None,
    ) -> None:
        self.key = key
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.is_stream = False
        self.chunks: list[bytes] = []
        self.body = b""
        self.started = False
        self.finished = False
        self.complete = False
        self.error: ProxyError | None = None
        self.consumers = 0
        self._recorder: SseRecorder | None = None
        self._on_finish = on_finish
        self._on_close = on_close
        self._slots = slots
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def started_by(self, opener: Opener) -> Flight:
        """Begin the upstream call in the background; returns ``self``."""
        self._task = asyncio.get_running_loop().create_task(self._drive(opener))
        return self

    def recording(self) -> Recording:
        """What the upstream sent, as a :class:`Recording`."""
        recorder = self._recorder
        return Recording(
            status=self.status,
            headers=tuple(self.headers),
            body=b"".join(self.chunks) if self.is_stream else self.body,
            is_stream=self.is_stream,
            finished=self.complete and (recorder is None or recorder.complete),
            usage=recorder.usage if recorder is not None else None,
        )

    async def _drive(self, opener: Opener) -> None:
        try:
            with self._slots or nullcontext():
                try:
                    response = await opener()
                except ProxyError as exc:
                    self.error = exc
                    return
                try:
                    await self._read(response)
                finally:
                    if self.complete:
                        response.release()
                    else:
                        response.close()
        except ProxyError as exc:  # no slot free
            self.error = exc
        finally:
            self.finished = True
            self._notify()
            if self._on_close is not None:
                self._on_close(self)
        if self.complete and self._on_finish is not None:
            self._on_finish(self.recording())

    async def _read(self, response: aiohttp.ClientResponse) -> None:
        self.status = response.status
        self.headers = relay_headers(response.headers)
        self.is_stream = response.content_type == "text/event-stream"
        recorder = self._recorder = SseRecorder() if self.is_stream else None
        self.started = True
        self._notify()
        try:
            async for chunk in response.content.iter_any():
                if recorder is not None:
                    recorder.feed(chunk)
                self.chunks.append(chunk)
                self._notify()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Consumers see a truncated response; nothing is stored.
            log.warning("upstream broke off mid-response status=%s error=%r", self.status, exc)
            if isinstance(exc, TimeoutError):
                self.error = UpstreamTimeout("upstream went silent mid-response")
            else:
                self.error = UpstreamUnreachable("upstream response broke off")
            return
        if not self.is_stream:
            # A plain answer is served whole: joined once here for every consumer and the store.
            self.body = b"".join(self.chunks)
        self.complete = True

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def respond(self, request: web.Request, extra_headers: Iterable[tuple[str, str]]) -> web.StreamResponse:
        """Answer one client from this flight; raise the flight's :class:`ProxyError` if it never started."""
        self.consumers += 1
        try:
            while not self.started and not self.finished:
                await self._changed.wait()
            if not self.started:
                raise self.error or UpstreamUnreachable("upstream call was abandoned")
            if self.is_stream:
                return await self._stream(request, extra_headers)
            while not self.finished:
                await self._changed.wait()
            if not self.complete:
                raise self.error or UpstreamUnreachable("upstream response broke off")
            response = web.Response(status=self.status, body=self.body)
            _set_headers(response, self.headers, extra_headers)
            return response
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
            await self._changed.wait()
        if self.complete:
            await response.write_eof()
        else:
            cut_off(request)
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

    def __init__(self, slots: CallSlots | None = None) -> None:
        self._by_key: dict[str, Flight] = {}
        self.slots = slots

    def __len__(self) -> int:
        return len(self._by_key)

    def join(self, key: str, opener: Opener, on_finish: Callable[[Recording], None] | None) -> tuple[Flight, bool]:
        """The flight for *key*, started with *opener* when none is in progress; the bool is ``True``
        for the client that started it."""
        flight = self._by_key.get(key)
        if flight is not None and not flight.finished:
            return flight, False
        flight = Flight(key, on_finish, self._forget, self.slots)
        self._by_key[key] = flight
        return flight.started_by(opener), True

    def _forget(self, flight: Flight) -> None:
        if flight.key is not None and self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]
