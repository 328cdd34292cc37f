"""Single-flight: one answer, recorded as it arrives and relayed live to every identical request."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import aclosing, nullcontext
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .entry import Recording
from .errors import InternalError, ProxyError, UpstreamTimeout, UpstreamUnreachable
from .logs import Exchange
from .sse import SseRecorder
from .upstream import CallSlots, relay_headers

log = logging.getLogger(__name__)

Opener = Callable[[], Awaitable[aiohttp.ClientResponse]]
# Receives the finished recording and the shortest TTL any participant asked for.
OnFinish = Callable[[Recording, int], None]
# Headers a response adds, or a function that names them once the answer has begun.
ExtraHeaders = Iterable[tuple[str, str]] | Callable[[], Iterable[tuple[str, str]]]
# The answer to give instead of an upstream failure, if there is one (a stale entry).
Fallback = Callable[[], web.StreamResponse | None]
# The proxy's own errors that mean the upstream failed: unreachable (502), busy (503), too slow (504).
_UPSTREAM_FAILURES = frozenset({502, 503, 504})


def cut_off(request: web.Request) -> None:
    """End a response whose upstream broke off: closing without the chunked terminator tells the client the
    body is truncated, where a clean end would pass a partial answer off as whole."""
    if request.transport is not None:
        request.transport.close()


@dataclass(frozen=True, slots=True)
class Start:
    """How an answer begins: its status, the headers to relay, and whether it is a Server-Sent Events stream."""

    status: int
    headers: tuple[tuple[str, str], ...]
    is_stream: bool


class Flight:
    """One answer whose chunks are recorded as they arrive and shared by its consumers.

    The source is an upstream call (:meth:`started_by`) or another replica's flight (:meth:`fed_by`), read
    by a background task. Each consumer (:meth:`respond`) writes what has arrived so far and then follows
    live, so a client that joins late still gets every byte, and a stream reaches every client as it
    arrives. The task is cancelled when the last consumer leaves before the end: nobody is left to pay for.

    Memory: chunks are kept for late joiners and the store only while the flight is *joinable* (it has a
    key) and its answer may still be stored (*ttl_s* set, at most *max_kept_bytes*); otherwise only the
    chunks some consumer has yet to write are kept. Past *max_kept_bytes* the flight stops being joinable.
    Once the answer has been read to its end, *on_finish* receives the :class:`Recording`; *on_close* runs
    when the flight can no longer be joined.
    """

    def __init__(
        self,
        key: str | None,
        *,
        ttl_s: int | None = None,
        on_finish: OnFinish | None = None,
        on_close: Callable[[Flight], None] | None = None,
        slots: CallSlots | None = None,
        max_kept_bytes: int = 8 * 1024 * 1024,
        finish_abandoned: bool = False,
    ) -> None:
        self.key = key
        self.finish_abandoned = finish_abandoned
        self.ttl_s = ttl_s
        self.status = 0
        self.headers: tuple[tuple[str, str], ...] = ()
        self.is_stream = False
        self.body = b""
        self.started = False
        self.finished = False
        self.complete = False
        self.error: ProxyError | None = None
        self.own_call = False
        # Runs when the last client leaves before the end and the call is cancelled.
        self.on_abandon: Callable[[], None] | None = None
        # The publication of this answer to other replicas, when it has one (see :mod:`.fleet`).
        self.publication: asyncio.Task[None] | None = None
        self._chunks: list[bytes] = []
        self._first = 0  # index, in the whole answer, of _chunks[0]
        self._kept_bytes = 0
        self._max_kept_bytes = max_kept_bytes
        self._positions: dict[object, int] = {}
        self._clients = 0
        self._recorder: SseRecorder | None = None
        self.on_finish = on_finish
        self._on_close = on_close
        self._slots = slots
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def consumers(self) -> int:
        return self._clients

    @property
    def kept_chunks(self) -> int:
        """Chunks held in memory now (for tests and metrics)."""
        return len(self._chunks)

    def started_by(self, opener: Opener) -> Flight:
        """Begin the upstream call in the background; returns ``self``."""
        self.own_call = True
        self._task = asyncio.get_running_loop().create_task(self._drive(self.from_upstream(opener)))
        return self

    def fed_by(self, source: AsyncGenerator[Start | bytes, None]) -> Flight:
        """Relay *source* (a :class:`Start`, then chunks; it ends normally only when the answer is whole, and
        raises :class:`ProxyError` otherwise); returns ``self``."""
        self._task = asyncio.get_running_loop().create_task(self._drive(source))
        return self

    def join_ttl(self, ttl_s: int) -> None:
        """A request with its own TTL joined: the shortest one asked for wins."""
        self.ttl_s = ttl_s if self.ttl_s is None else min(self.ttl_s, ttl_s)

    def recording(self) -> Recording:
        """What the source sent, as a :class:`Recording` (whole only if it was kept)."""
        recorder = self._recorder
        return Recording(
            status=self.status,
            headers=self.headers,
            body=b"".join(self._chunks) if self.is_stream else self.body,
            is_stream=self.is_stream,
            finished=self.complete and (recorder is None or recorder.complete),
            usage=recorder.usage if recorder is not None else None,
        )

    async def from_upstream(self, opener: Opener) -> AsyncGenerator[Start | bytes, None]:
        """The source for an upstream call of this flight's own (:attr:`own_call` becomes true)."""
        self.own_call = True
        with self._slots or nullcontext():
            response = await opener()
            try:
                yield Start(response.status, tuple(relay_headers(response.headers)), _is_stream(response))
                async for chunk in response.content.iter_any():
                    yield chunk
            except (aiohttp.ClientError, TimeoutError) as exc:
                response.close()
                log.warning("upstream broke off mid-response status=%s error=%r", response.status, exc)
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout("upstream went silent mid-response") from None
                raise UpstreamUnreachable("upstream response broke off") from None
            except BaseException:
                response.close()  # cancelled, or abandoned half-read: the connection cannot be reused
                raise
            response.release()  # read to its end: the connection goes back to the pool

    async def _drive(self, source: AsyncGenerator[Start | bytes, None]) -> None:
        try:
            async with aclosing(source):
                async for item in source:
                    if isinstance(item, Start):
                        self._begin(item)
                    else:
                        self._add(item)
            if not self.is_stream:
                # A plain answer is served whole: joined once here for every consumer and the store.
                self.body, self._chunks = b"".join(self._chunks), []
            self.complete = self.started
        except ProxyError as exc:
            self.error = exc
        except Exception:
            # A bug of the proxy's own: the client gets a 500 in OpenAI's shape, the log the traceback.
            log.exception("flight failed key=%s", self.key or "-")
            self.error = InternalError("The proxy failed to handle this request.")
        finally:
            self.finished = True
            self._notify()
            if self._on_close is not None:
                self._on_close(self)
        if self.complete and self.on_finish is not None and self.ttl_s is not None:
            try:
                self.on_finish(self.recording(), self.ttl_s)
            except Exception:
                log.exception("storing a finished answer failed key=%s", self.key or "-")

    def _begin(self, start: Start) -> None:
        self.status, self.headers, self.is_stream = start.status, start.headers, start.is_stream
        if self.is_stream:
            self._recorder = SseRecorder()
        self.started = True
        self._notify()

    def _add(self, chunk: bytes) -> None:
        if self._recorder is not None:
            self._recorder.feed(chunk)
        self._chunks.append(chunk)
        self._kept_bytes += len(chunk)
        if self._kept_bytes > self._max_kept_bytes and self.is_stream and self._keeps_all():
            # Too large to store: stop keeping it for the store and for late joiners.
            self.ttl_s = None
            if self._on_close is not None:
                self._on_close(self)
            self.key = None
        if not self._keeps_all():
            self._trim()
        self._notify()

    def _finishes_alone(self) -> bool:
        # Only a call of this replica's own whose answer is to be stored is worth finishing without a client.
        return self.finish_abandoned and self.own_call and self.on_finish is not None and self.ttl_s is not None

    def _keeps_all(self) -> bool:
        return not self.is_stream or (self.key is not None or self.ttl_s is not None)

    def _trim(self) -> None:
        done = min(self._positions.values(), default=self._first + len(self._chunks)) - self._first
        if done > 0:
            self._kept_bytes -= sum(len(chunk) for chunk in self._chunks[:done])
            del self._chunks[:done]
            self._first += done

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def respond(
        self,
        request: web.Request,
        extra_headers: ExtraHeaders,
        fallback: Fallback | None = None,
        exchange: Exchange | None = None,
    ) -> web.StreamResponse:
        """Answer one client from this flight, adding *extra_headers* (or what it returns, once the answer has
        begun); raise the flight's :class:`ProxyError` if it never started. When the upstream fails (no answer,
        or a 5xx or 429 status) and *fallback* returns a response, that response is the answer instead. A
        stream's first write is marked on *exchange*."""
        me = object()
        self._positions[me] = self._first
        self._clients += 1
        try:
            while not self.started and not self.finished:
                await self._changed.wait()
            if not self.started:
                error = self.error or UpstreamUnreachable("upstream call was abandoned")
                if fallback is not None and error.status in _UPSTREAM_FAILURES and (instead := fallback()):
                    return instead
                raise error
            if fallback is not None and (self.status >= 500 or self.status == 429) and (instead := fallback()):
                return instead
            if self.is_stream:
                return await self._stream(request, extra_headers, me, exchange)
            while not self.finished:
                await self._changed.wait()
            if not self.complete:
                raise self.error or UpstreamUnreachable("upstream response broke off")
            response = web.Response(status=self.status, body=self.body)
            _set_headers(response, self.headers, extra_headers)
            return response
        finally:
            del self._positions[me]
            self._clients -= 1
            if not self._clients and not self.finished and self._task is not None and not self._finishes_alone():
                self._task.cancel()
                # Forget it now, not when the task unwinds: a request arriving meanwhile must start afresh.
                if self._on_close is not None:
                    self._on_close(self)
                if self.on_abandon is not None:
                    self.on_abandon()

    async def batches(self) -> AsyncGenerator[list[Start | bytes], None]:
        """Follow this flight from its start as a reader that is not a client: each batch holds every item that
        arrived since the last one (a :class:`Start` first). Trimming waits for it; cancellation, when the last
        client leaves, does not. A plain answer comes whole, once it is complete."""
        me = object()
        self._positions[me] = self._first
        try:
            while not self.started:
                if self.finished:
                    return
                await self._changed.wait()
            pending: list[Start | bytes] = [Start(self.status, self.headers, self.is_stream)]
            if not self.is_stream:
                while not self.finished:
                    await self._changed.wait()
                if self.complete:
                    yield [*pending, self.body]
                return
            while True:
                position, upto = self._positions[me], self._first + len(self._chunks)
                if position < upto:
                    pending.extend(self._chunks[position - self._first :])
                    self._positions[me] = upto
                # A Start alone waits for the first chunk: it is of no use to a reader without one.
                if pending and (len(pending) > 1 or not isinstance(pending[0], Start)):
                    yield pending
                    pending = []
                    continue
                if self.finished:
                    if pending:
                        yield pending
                    return
                await self._changed.wait()
        finally:
            del self._positions[me]

    async def _stream(
        self, request: web.Request, extra_headers: ExtraHeaders, me: object, exchange: Exchange | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(status=self.status)
        _set_headers(response, self.headers, extra_headers)
        await response.prepare(request)
        while True:
            sent = self._positions[me]
            upto = self._first + len(self._chunks)
            if sent < upto:
                start = sent - self._first
                pending = self._chunks[start] if upto - sent == 1 else b"".join(self._chunks[start:])
                self._positions[me] = upto
                if not self._keeps_all():
                    self._trim()
                await response.write(pending)
                if exchange is not None and exchange.first_byte_s is None:
                    exchange.mark_first_byte(time.perf_counter())
                continue
            if self.finished:
                break
            await self._changed.wait()
        if self.complete:
            await response.write_eof()
        else:
            if self.publication is not None:
                # Other replicas learn that the call broke before this client does, so a retry that follows
                # at once calls the upstream afresh instead of joining the broken call.
                await asyncio.wait((self.publication,))
            cut_off(request)
        return response


def _is_stream(response: aiohttp.ClientResponse) -> bool:
    return response.content_type == "text/event-stream"


def _set_headers(response: web.StreamResponse, headers: Iterable[tuple[str, str]], extra_headers: ExtraHeaders) -> None:
    out = response.headers
    for name, value in headers:
        out.add(name, value)
    for name, value in extra_headers() if callable(extra_headers) else extra_headers:
        out[name] = value


class Flights:
    """The flights in progress, by cache key: identical concurrent requests share one upstream call."""

    def __init__(
        self, slots: CallSlots | None = None, max_kept_bytes: int = 8 * 1024 * 1024, *, finish_abandoned: bool = False
    ) -> None:
        self._by_key: dict[str, Flight] = {}
        self.slots = slots
        self._max_kept_bytes = max_kept_bytes
        self.finish_abandoned = finish_abandoned

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, key: str) -> Flight | None:
        """The joinable flight for *key*, if one is in progress."""
        flight = self._by_key.get(key)
        return flight if flight is not None and not flight.finished else None

    def start(self, key: str, ttl_s: int, on_finish: OnFinish | None) -> Flight:
        """A new joinable flight for *key*, not started yet: call :meth:`Flight.started_by` or
        :meth:`Flight.fed_by`."""
        flight = Flight(
            key,
            ttl_s=ttl_s,
            on_finish=on_finish,
            on_close=self._forget,
            slots=self.slots,
            max_kept_bytes=self._max_kept_bytes,
            finish_abandoned=self.finish_abandoned,
        )
        self._by_key[key] = flight
        return flight

    def _forget(self, flight: Flight) -> None:
        if flight.key is not None and self._by_key.get(flight.key) is flight:
            del self._by_key[flight.key]
