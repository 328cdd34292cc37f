"""The cache's keys as the operator commands see them: a client per Redis master, namespaces walked with ``SCAN``
in batches (never ``KEYS``), entries found by their ``X-Cache-Key``, and progress on a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TextIO, TypeVar

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from .cache_key import generation_key, key_version, parse_key
from .config import RedisSettings, Settings
from .redis_client import RedisClient, close_redis, redis_client_for, redis_connection_kwargs
from .seal import EntryCodec, PlainCodec, SealingCodec

T = TypeVar("T")
# Keys per SCAN call: each call is short for Redis, and a million keys take a thousand round trips.
SCAN_COUNT = 1000
SHORT_KEY = re.compile(r"[0-9a-f]{16}")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


class UnknownKey(LookupError):
    """No entry of the current generation has this ``X-Cache-Key``."""


@dataclass(frozen=True, slots=True)
class Located:
    """An entry key found on *node*, with what its name says."""

    node: redis.Redis
    key: str
    namespace: str
    generation: int
    route: str


class Keyspace:
    """What the commands work on: *client* (any Redis mode), a client per master (*nodes*), the entry codec
    and the namespaces of *settings*. Every round trip has the deadline *deadline_s*."""

    def __init__(self, settings: Settings, client: RedisClient, nodes: list[redis.Redis], deadline_s: float) -> None:
        self.settings = settings
        self.client = client
        self.nodes = nodes
        self.deadline_s = deadline_s
        cache = settings.cache
        self.codec: EntryCodec = (
            SealingCodec(cache.encryption_key, cache.encryption_old_keys) if cache.encryption_key else PlainCodec()
        )
        self.namespaces = settings.namespaces

    async def call(self, operation: Awaitable[T]) -> T:
        async with asyncio.timeout(self.deadline_s):
            return await operation

    async def read(self, node: redis.Redis, key: str) -> bytes | None:
        """The value of *key* on *node* (replies are bytes: responses are never decoded)."""
        value = await self.call(node.get(key))
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    async def generation(self, namespace: str) -> int:
        value = await self.call(self.client.get(generation_key(namespace)))
        return int(value) if value else 0

    async def scan(self, node: redis.Redis, match: str) -> AsyncIterator[list[str]]:
        """The keys of *node* that *match* (a glob), a batch per ``SCAN`` call."""
        cursor = 0
        while True:
            cursor, keys = await self.call(node.scan(cursor, match=match, count=SCAN_COUNT))
            if keys:
                yield [key.decode() if isinstance(key, bytes) else str(key) for key in keys]
            if cursor == 0:
                return

    async def locate(self, tag: str) -> list[Located]:
        """Every entry of the current generation, in any namespace, whose ``X-Cache-Key`` is *tag*; raises
        :class:`UnknownKey` when there is none."""
        found = []
        for namespace in self.namespaces:
            generation = await self.generation(namespace)
            match = f"{glob_escape(namespace)}:{key_version(generation)}:*:{{{tag}*"
            for node in self.nodes:
                async for keys in self.scan(node, match):
                    for key in keys:
                        parsed = parse_key(key, namespace)
                        if parsed is not None and parsed[0] == generation and parsed[2].startswith(tag):
                            found.append(Located(node, key, namespace, generation, parsed[1]))
        if not found:
            raise UnknownKey(tag)
        return found


@contextlib.asynccontextmanager
async def opened(settings: Settings, deadline_s: float) -> AsyncIterator[Keyspace]:
    """The :class:`Keyspace` of *settings*' Redis, its connections closed on the way out."""
    client = redis_client_for(settings.redis)
    nodes: list[redis.Redis] = []
    try:
        async with asyncio.timeout(deadline_s):
            nodes = await master_clients(client, settings.redis)
        yield Keyspace(settings, client, nodes, deadline_s)
    finally:
        for node in nodes:
            if node is not client:
                await node.aclose()
        await close_redis(client)


async def master_clients(client: RedisClient, settings: RedisSettings) -> list[redis.Redis]:
    """A client for each master that holds keys: *client* itself, or one per primary of a cluster."""
    if not isinstance(client, RedisCluster):
        return [client]
    await client.initialize()
    kwargs: dict[str, Any] = redis_connection_kwargs(settings)
    ssl = kwargs.pop("ssl", False)
    return [redis.Redis(host=node.host, port=int(node.port), ssl=ssl, **kwargs) for node in client.get_primaries()]


def glob_escape(text: str) -> str:
    """*text* matched literally by a ``SCAN MATCH`` pattern."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


async def node_name(node: redis.Redis) -> str:
    """``host:port`` of *node*; behind Sentinels, of the master they name now."""
    pool = node.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
        return f"{host}:{port}"
    kwargs = pool.connection_kwargs
    return f"{kwargs.get('host', 'unix')}:{kwargs.get('port', kwargs.get('path', ''))}"


class Progress:
    """One line on *stream*, rewritten at most every 0.2 s, and only when *stream* is a terminal."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._shown = stream.isatty()
        self._written = False
        self._last = 0.0

    def update(self, text: str) -> None:
        now = time.monotonic()
        if self._shown and now - self._last >= 0.2:
            self._stream.write(f"\r\x1b[K{text}")
            self._stream.flush()
            self._written, self._last = True, now

    def done(self) -> None:
        if self._written:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
