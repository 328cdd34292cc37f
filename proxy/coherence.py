"""Keep every replica's in-process tier coherent with Redis: Redis pushes the name of every key written, deleted,
expired or flushed under the namespace (``CLIENT TRACKING`` in broadcast mode), and each replica drops its copy.

While the channel is down nothing is known of what changed, so the in-process tier is distrusted: bypassed
while Redis answers, and emptied when the channel is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .config import RedisSettings
from .redis_client import RedisClient, redis_connection_kwargs, standalone_client

log = logging.getLogger(__name__)

CHANNEL = "__redis__:invalidate"
# With no message for this long a listener pings, so that a silently dead connection is noticed.
PING_EVERY_S = 1.0
RETRY_AFTER_S = 0.5


class _TrackingPubSub(PubSub):
    """A Pub/Sub connection that, when it connects, asks Redis to push invalidations of *prefixes* to itself.
    Tracking belongs to a connection; the listener never reconnects one, it starts over with a new one."""

    def __init__(self, *args: Any, prefixes: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._prefixes = prefixes

    async def connect(self) -> None:
        # The pool hands over a connection already connected, so on_connect does not run for the first one.
        first = self.connection is None
        await super().connect()  # type: ignore[no-untyped-call]
        if first:
            await self._track(self.connection)

    async def on_connect(self, connection: Any) -> None:
        await self._track(connection)
        await super().on_connect(connection)

    async def _track(self, connection: Any) -> None:
        await connection.send_command("CLIENT", "ID")
        client_id = await connection.read_response()
        prefix_args = [word for prefix in self._prefixes for word in ("PREFIX", prefix)]
        await connection.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", client_id, "BCAST", *prefix_args)
        await connection.read_response()


class Invalidations:
    """Listens for invalidations on every Redis master that holds entries (one in standalone and Sentinel
    mode, each primary in a cluster) and reports them to *drop*: a list of keys, or ``None`` for "anything
    may have changed". *trust* is told whether the in-process tier may be believed: false from the moment a
    listener is down until every listener is subscribed again.
    """

    def __init__(
        self,
        client: RedisClient,
        settings: RedisSettings,
        prefixes: list[str],
        *,
        drop: Callable[[list[bytes] | None], None],
        trust: Callable[[bool], None],
    ) -> None:
        self._client = client
        self._settings = settings
        self._prefixes = prefixes
        self._drop = drop
        self._trust = trust
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.up = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        quiet = False
        while True:
            try:
                await self._listen_to_all()
            except (RedisError, OSError, TimeoutError) as exc:
                if self._closing:
                    # Cancelled while a listener failed: Python 3.11's TaskGroup then raises the failure and
                    # drops the cancellation, and this loop would listen again for ever (a shutdown that hangs).
                    return
                self._down(exc, quiet=quiet)
                quiet = True
            else:
                quiet = False
            await asyncio.sleep(RETRY_AFTER_S)

    def _down(self, exc: BaseException, *, quiet: bool) -> None:
        if self.up or not quiet:
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "redis invalidations stopped; in-process cache bypassed until they resume error=%s: %s",
                type(exc).__name__,
                exc,
            )
        # Not emptied: should Redis itself be down, the copies here keep serving; while it is up they are
        # bypassed, and emptied once invalidations resume, since what changed meanwhile is unknown.
        self.up = False
        self._trust(False)

    async def _listen_to_all(self) -> None:
        clients = await self._listener_clients()
        subscribed: list[asyncio.Event] = [asyncio.Event() for _ in clients]
        try:
            async with asyncio.TaskGroup() as group:
                for node, ready in zip(clients, subscribed, strict=True):
                    group.create_task(self._listen(node, ready))
                group.create_task(self._trust_when(subscribed))
        except* (RedisError, OSError, TimeoutError) as failures:
            raise failures.exceptions[0] from None
        finally:
            for node in clients:
                await node.aclose()

    async def _trust_when(self, subscribed: list[asyncio.Event]) -> None:
        await asyncio.gather(*(ready.wait() for ready in subscribed))
        # What changed while no listener was up is unknown: start from an empty tier.
        self._drop(None)
        self.up = True
        self._trust(True)
        log.info("redis invalidations active; in-process cache coherent across replicas")

    async def _listen(self, node: redis.Redis, ready: asyncio.Event) -> None:
        pubsub = _TrackingPubSub(node.connection_pool, prefixes=self._prefixes)
        loop = asyncio.get_running_loop()
        try:
            await pubsub.subscribe(CHANNEL)
            heard = loop.time()
            while True:
                message = await pubsub.get_message(timeout=PING_EVERY_S)
                if message is not None:
                    heard = loop.time()
                    if message["type"] == "subscribe":
                        ready.set()
                    elif message["type"] == "message":
                        data = message["data"]
                        self._drop(list(data) if isinstance(data, list) else None)
                elif loop.time() - heard > 3 * PING_EVERY_S:
                    raise TimeoutError("redis stopped answering the invalidation listener's pings")
                else:
                    await pubsub.ping()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listener_clients(self) -> list[redis.Redis]:
        """One RESP2 client per master: invalidations arrive as Pub/Sub messages only over RESP2. They never
        retry: a broken connection must end the listener, so that the tier is distrusted at once."""
        kwargs = redis_connection_kwargs(self._settings)
        kwargs |= {"protocol": 2, "retry": Retry(NoBackoff(), 0), "socket_timeout": 3 * PING_EVERY_S}
        ssl = kwargs.pop("ssl", False)
        if isinstance(self._client, RedisCluster):
            return [redis.Redis(host=host, port=port, ssl=ssl, **kwargs) for host, port in await self._primaries()]
        if self._settings.mode == "sentinel":
            sentinel = self._client.connection_pool.sentinel_manager  # type: ignore[attr-defined]
            host, port = await sentinel.discover_master(self._settings.sentinel_master)
            return [redis.Redis(host=host, port=port, ssl=ssl, **kwargs)]
        kwargs.pop("username"), kwargs.pop("password")
        return [standalone_client(self._settings, **kwargs)]

    async def _primaries(self) -> list[tuple[str, int]]:
        # Asked afresh each time: after a failover the promoted replica holds the slots.
        assert isinstance(self._client, RedisCluster)
        nodes = await self._client.cluster_nodes()
        masters = []
        for address, node in nodes.items():
            flags = str(node.get("flags", ""))
            if "master" in flags and "fail" not in flags and node.get("slots"):
                host, _, port = str(address).partition("@")[0].rpartition(":")
                masters.append((host, int(port)))
        return masters
