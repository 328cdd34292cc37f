"""The fast path: hits answered straight from the cache by a lean protocol in front of the aiohttp application.

A connection starts here. Each request of the one shape :func:`~proxy.wire.read_head` takes, admitted by the same
screen and client keys as the application, keyed by the same :class:`~proxy.keying.Keyer` and found fresh in the
same store, is answered here, counted in the same metrics and written to the same access log. A request of that
shape it cannot answer (a miss, a bypass, a stale entry) is lent to the application's own protocol and the
connection comes back once the answer is written; at anything else (another shape, a refusal, anything unusual or
malformed) the connection is handed to the application with every byte from that request's first on, for good.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, cast

from aiohttp import web

from .entry import CacheEntry
from .guards import ClientKeys, Screen
from .handlers import OFFLOAD_BYTES, count_hit
from .keying import Keyed, Memo
from .kinds import ClientKey
from .lending import LentTransport
from .logs import Exchange
from .state import ACCESS_LOG, KEYER, METRICS, REQUEST_IDS, SETTINGS, STORE
from .wire import FOREIGN, INCOMPLETE, Head, Replay, head_end, read_head, replayable

log = logging.getLogger(__name__)

# How long a body announced by complete headers may take to arrive before the application takes the request over
# (and applies its own deadline): enough for any client on a working network to send what it has.
BODY_GRACE_S = 0.25
# Pipelined requests buffered while an answer waits for Redis or for the client to read; past it, reading pauses.
MAX_BUFFER_BYTES = 1 << 20
# Answers kept ready to write, for the hot entries; the in-process tier holds the entries themselves.
REPLAYS_MAX_BYTES = 1 << 20
HEADS_MAX_BYTES = 256 * 1024

Admission = tuple[Head, ClientKey | None]


class Front:
    """The application's objects that the fast path uses, read once the application has started."""

    def __init__(self, runner: web.AppRunner) -> None:
        app = runner.app
        settings = app[SETTINGS]
        server = runner.server
        assert server is not None
        self.handover = server
        self.keyer, self.store, self.metrics = app[KEYER], app[STORE], app[METRICS]
        self.access_log, self.request_ids = app[ACCESS_LOG], app[REQUEST_IDS]
        self.screen = Screen(settings.server)
        self.clients = ClientKeys(settings.auth.clients)
        self.max_body_bytes = min(settings.server.max_body_bytes, OFFLOAD_BYTES - 1)
        self.idle_s = settings.server.client_timeout_s
        self.connections: set[FastConnection] = set()
        self._replays: Memo[str, Replay] = Memo(REPLAYS_MAX_BYTES, item_bytes=256)
        # Heads seen, read and judged: a repeated request usually repeats its head byte for byte.
        # A head read holds its header fields as a CIMultiDict: about a kilobyte beside its bytes.
        self._admissions: Memo[bytes, tuple[Admission | None]] = Memo(HEADS_MAX_BYTES, item_bytes=1024)

    def admission(self, raw: bytes) -> Admission | None:
        """The head *raw* read, and the client key it presents, when the application would look its request up
        in the cache before anything else: the one shape taken, past the screen and the client-key check."""
        found = self._admissions.get(raw)
        if found is not None:
            return found[0]
        admission = self._admit(raw)
        self._admissions.put(raw, len(raw), (admission,))
        return admission

    def _admit(self, raw: bytes) -> Admission | None:
        head = read_head(raw, self.max_body_bytes)
        if head is None or self.screen.headers_refusal(head.headers) is not None:
            return None
        client = None
        if self.clients:
            client = self.clients.presented(head.headers)
            if client is None:
                return None
        return head, client

    def replay(self, key: str, entry: CacheEntry, tag: str) -> Replay | None:
        """*entry*'s answer under *key* as the fast path writes it, or ``None`` when it leaves it to the
        application (see :func:`~proxy.wire.replayable`)."""
        found = self._replays.get(key)
        # An entry read from Redis is a new object each time, equal to the last one until it is replaced.
        if found is None or found.tag != tag or (found.entry is not entry and found.entry != entry):
            if not replayable(entry):
                return None
            found = Replay(entry, tag)
            self._replays.put(key, found.size, found)
        return found


class FastConnection(asyncio.Protocol):
    """One client connection while the fast path serves it (see the module docstring)."""

    def __init__(self, front: Front) -> None:
        self._front = front
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiting: asyncio.Task[None] | None = None
        self._writing_paused = False
        self._reading_paused = False
        self._closing = False
        self._idle_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._body_due: float | None = None
        # The application's protocol and its view of the transport while it answers one request.
        self._lease: tuple[asyncio.Protocol, LentTransport] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)
        self._front.connections.add(self)
        self._idle_at = self._loop.time() + self._front.idle_s
        self._timer = self._loop.call_at(self._idle_at, self._on_timer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._detach()
        self._transport = None
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if self._lease is not None:
            protocol, _ = self._lease
            self._lease = None
            protocol.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiting is None and self._lease is None and not self._writing_paused:
            self._serve()
        if len(self._buf) > MAX_BUFFER_BYTES and self._transport is not None and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()

    def pause_writing(self) -> None:
        self._writing_paused = True
        if self._lease is not None:
            self._lease[0].pause_writing()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._lease is not None:
            self._lease[0].resume_writing()
        elif self._waiting is None:
            self._serve()

    @property
    def buffered_bytes(self) -> int:
        """Bytes received and not answered yet."""
        return len(self._buf)

    @property
    def reading(self) -> bool:
        """Whether it reads from its client now (it stops while its client reads nothing)."""
        return not self._reading_paused

    @property
    def waiting(self) -> asyncio.Task[None] | None:
        """The answer being looked up in the store, if any."""
        return self._waiting

    def close_when_idle(self) -> None:
        """At shutdown: close now unless an answer is being looked up, else once it is written. A request the
        application answers is the application's to finish (its shutdown waits for it)."""
        self._closing = True
        if self._waiting is None and self._lease is None and self._transport is not None:
            self._transport.close()
            self._transport = None

    def _serve(self) -> None:
        """Answer the buffered requests in order, until one must wait or is not ours; read again once what is
        left to answer is small enough."""
        try:
            self._serve_buffered()
        except Exception:
            # A bug here must not cost the client its answer: the application takes the connection as it is.
            log.exception("fast path failed; the application takes the connection")
            self._hand_over()
            return
        if self._reading_paused and self._transport is not None and len(self._buf) <= MAX_BUFFER_BYTES:
            self._reading_paused = False
            self._transport.resume_reading()

    def _serve_buffered(self) -> None:
        front, buf = self._front, self._buf
        while buf and self._transport is not None and not self._writing_paused:
            end = head_end(buf)
            if end is INCOMPLETE:
                return
            if end is FOREIGN:
                self._hand_over()
                return
            assert isinstance(end, int)
            admission = front.admission(bytes(buf[:end]))
            if admission is None:
                self._hand_over()
                return
            head, client = admission
            request_end = end + 4 + head.length
            if len(buf) < request_end:
                self._await_body()
                return
            self._body_due = None
            started = time.perf_counter()
            if len(buf) > request_end and not self._followed_by_ours(head, request_end):
                self._hand_over()
                return
            keyed = front.keyer.key(head.route, bytes(buf[end + 4 : request_end]), head.query, head.headers, client)
            if keyed.key is None or not keyed.plan.lookup:
                self._lend(request_end)
                return
            entry = front.store.hot(keyed.key)
            if entry is None:
                self._waiting = self._loop.create_task(
                    self._serve_from_store(head, request_end, keyed, client, started)
                )
                return
            if not self._answer(head, request_end, keyed, client, entry, started):
                self._lend(request_end)
                return

    def _followed_by_ours(self, head: Head, request_end: int) -> bool:
        """Whether what was received after a request is the start of one the fast path may take. Otherwise the
        application must see them together, as it would without the fast path: it refuses data after a
        request that closes the connection, and a request followed by bytes its parser refuses."""
        if not head.keep_alive:
            return False
        rest = self._buf[request_end:]
        end = head_end(rest)
        if end is INCOMPLETE:
            return True
        return isinstance(end, int) and self._front.admission(bytes(rest[:end])) is not None

    async def _serve_from_store(
        self, head: Head, request_end: int, keyed: Keyed, client: ClientKey | None, started: float
    ) -> None:
        assert keyed.key is not None
        try:
            entry = await self._front.store.get(keyed.key)
        except Exception:
            log.exception("cache lookup failed on the fast path; the application takes the request")
            entry = None
        self._waiting = None
        if self._transport is None:
            return
        if entry is None:
            self._lend(request_end, missed=keyed.key)
            return
        if not self._answer(head, request_end, keyed, client, entry, started):
            self._lend(request_end)
            return
        self._serve()

    def _answer(
        self, head: Head, request_end: int, keyed: Keyed, client: ClientKey | None, entry: CacheEntry, started: float
    ) -> bool:
        """Write *entry* as the answer to the request (*head*, ending at *request_end*), as the application would;
        ``False`` (nothing written) when it may not answer it: stale, past the request's max-age, or not
        replayable here."""
        front = self._front
        assert keyed.key is not None and self._transport is not None
        replay = front.replay(keyed.key, entry, keyed.tag)
        if replay is None:
            return False
        ex = Exchange(front.request_ids.take(head.headers.get("X-Request-ID")), started)
        ex.route, ex.upstream, ex.model, ex.tag = keyed.route, keyed.upstream.name, keyed.model, keyed.tag
        now = time.time()
        if not count_hit(entry, keyed, ex, front.metrics, now):
            return False
        if client is not None:
            front.metrics.clients[(client.name,)] += 1
            ex.client = client.name
        answer = replay.head_for(head.minor, head.keep_alive, max(0, int(now - entry.stored_at)), ex.id)
        finished = time.perf_counter()
        front.metrics.record(ex, finished)
        if front.access_log.enabled:
            front.access_log.record(ex, "POST", head.path, entry.status, finished)
        del self._buf[:request_end]
        self._transport.writelines((answer, replay.body))
        self._idle_at = self._loop.time() + front.idle_s
        if not head.keep_alive or self._closing:
            # As aiohttp does at shutdown: the answer in progress is the connection's last.
            self._transport.close()
            self._transport = None
        return True

    def _await_body(self) -> None:
        now = self._loop.time()
        if self._body_due is None:
            self._body_due = now + BODY_GRACE_S
            self._rearm(self._body_due)
        elif now >= self._body_due:
            self._hand_over()

    def _rearm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._transport is None:
            return
        now = self._loop.time()
        if self._lease is not None:
            # The application keeps its own time while it answers.
            self._rearm(now + self._front.idle_s)
            return
        if self._body_due is not None and self._waiting is None:
            if now >= self._body_due:
                self._hand_over()
            else:
                self._rearm(self._body_due)
            return
        if now < self._idle_at or self._waiting is not None:
            self._rearm(max(self._idle_at, now + 0.001))
            return
        # As aiohttp does: a connection that has not sent a whole request within the idle time is closed.
        self._transport.close()
        self._transport = None

    def _detach(self) -> None:
        self._front.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _lend(self, request_end: int, *, missed: str | None = None) -> None:
        """Let the application answer the request that ends at *request_end*, whose key *missed* the cache just
        now if given; the connection comes back once its answer is written (see
        :class:`~proxy.lending.LentTransport`). Requests after it wait here meanwhile."""
        transport = self._transport
        assert transport is not None
        if transport.is_closing():
            # The client left while its request was looked up: nobody to answer, and a protocol started now
            # would only learn so before it began.
            return
        protocol = self._front.handover()
        lent = LentTransport(transport, self._taken_back)
        lent.missed = missed
        self._lease = (protocol, lent)
        protocol.connection_made(lent)
        if self._writing_paused:
            protocol.pause_writing()
        data = bytes(self._buf[:request_end])
        del self._buf[:request_end]
        protocol.data_received(data)

    def _taken_back(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        protocol, lent = lease
        lent.give_back()
        # The protocol lets go of the connection: whatever it still does, it can no longer write to or close it.
        protocol.connection_lost(None)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._idle_at = self._loop.time() + self._front.idle_s
        if self._closing:
            transport.close()
            self._transport = None
            return
        self._serve()

    def _hand_over(self) -> None:
        """Give the connection to the application's protocol, with every byte not answered here."""
        transport = self._transport
        if transport is None:
            return
        self._detach()
        self._transport = None
        protocol = self._front.handover()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._writing_paused:
            protocol.pause_writing()
        if self._reading_paused:
            transport.resume_reading()
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            protocol.data_received(data)


class FastSite(web.TCPSite):
    """:class:`aiohttp.web.TCPSite` with the fast path in front of the application on each connection. At
    :meth:`stop`, idle connections are closed and answers being prepared get up to *grace_s* to be written."""

    __slots__ = ("_front", "_grace_s")

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, grace_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(runner, host, port, **kwargs)
        self._grace_s = grace_s
        self._front: Front | None = None

    async def start(self) -> None:
        assert isinstance(self._runner, web.AppRunner)
        front = self._front = Front(self._runner)
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FastConnection(front),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        if self._front is None:
            return
        connections = list(self._front.connections)
        for connection in connections:
            connection.close_when_idle()
        waiting = [c.waiting for c in connections if c.waiting is not None]
        if waiting:
            await asyncio.wait(waiting, timeout=self._grace_s)
