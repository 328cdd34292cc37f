"""The proxy against a real redis-server that misbehaves: frozen, out of memory, a read-only replica, dropping
connections at random. Every request succeeds through the upstream with the right answer, a frozen Redis costs
at most one deadline per retry window, and caching resumes by itself once Redis behaves."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.memory import TieredStore
from proxy.state import STORE
from tests.support import RedisServer, chat_body

pytestmark = pytest.mark.integration

TIMEOUT_MS = 100
RETRY_AFTER_S = 0.3


async def start_proxy(aiohttp_client: Any, settings_for: Any, fake_upstream: Any, url: str) -> TestClient[Any, Any]:
    settings = settings_for(fake_upstream, url=url, timeout_ms=TIMEOUT_MS, retry_after_s=RETRY_AFTER_S)
    client: TestClient[Any, Any] = await aiohttp_client(create_app(settings))
    return client


def tiered(client: TestClient[Any, Any]) -> TieredStore:
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    return store


async def ask(client: TestClient[Any, Any], prompt: str) -> tuple[int, str, str]:
    """Status, ``X-Cache`` and the answer's text; the fake upstream answers ``echo: <prompt>``."""
    response = await client.post("/v1/chat/completions", json=chat_body(prompt))
    body = await response.json()
    text = body["choices"][0]["message"]["content"] if response.status == 200 else ""
    return response.status, response.headers.get("X-Cache", ""), text


async def entry_count(url: str) -> int:
    async with redis.Redis.from_url(url) as conn:
        return len(await conn.keys("test:v2:*"))


async def caches_again(client: TestClient[Any, Any], url: str, prompt: str) -> bool:
    """Whether a new answer reaches Redis within a few retry windows."""
    before = await entry_count(url)
    for attempt in range(20):
        await asyncio.sleep(RETRY_AFTER_S)
        assert (await ask(client, f"{prompt} {attempt}"))[0] == 200
        await tiered(client).remote.drain()
        if await entry_count(url) > before:
            return True
    return False


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def test_frozen_redis_costs_one_deadline_per_retry_window_when_stopped(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, own_redis: RedisServer
) -> None:
    client = await start_proxy(aiohttp_client, settings_for, fake_upstream, own_redis.url)
    started = time.monotonic()
    healthy = [await ask(client, f"healthy {i}") for i in range(10)]
    healthy_s = time.monotonic() - started
    await tiered(client).remote.drain()
    store = tiered(client).remote
    errors_before = store.errors
    with frozen(own_redis):
        started = time.monotonic()
        during = [await ask(client, f"frozen {i}") for i in range(30)]
        frozen_s = time.monotonic() - started
        repeat = await ask(client, "frozen 0")
    added_ms = (frozen_s / len(during) - healthy_s / len(healthy)) * 1000
    print(f"\nfrozen Redis: {added_ms:.1f} ms added per miss on average over {len(during)} (timeout {TIMEOUT_MS} ms)")
    assert [status for status, _, _ in healthy + during] == [200] * 40
    assert [text for _, _, text in during] == [f"echo: frozen {i}" for i in range(30)]
    assert repeat == (200, "HIT", "echo: frozen 0")  # the in-process tier serves this replica's repeats
    # Each retry window lets one probe wait out the deadline; every other request skips Redis.
    windows = frozen_s / RETRY_AFTER_S + 1
    assert 1 <= store.errors - errors_before <= windows + 1
    assert await caches_again(client, own_redis.url, "thawed")


async def test_requests_succeed_and_hits_still_served_when_redis_refuses_writes_out_of_memory(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, own_redis: RedisServer
) -> None:
    writer = await start_proxy(aiohttp_client, settings_for, fake_upstream, own_redis.url)
    reader = await start_proxy(aiohttp_client, settings_for, fake_upstream, own_redis.url)
    await ask(writer, "stored before")
    await tiered(writer).remote.drain()
    own_redis.command("CONFIG", "SET", "maxmemory-policy", "noeviction")
    own_redis.command("CONFIG", "SET", "maxmemory", "1")
    during = [await ask(writer, f"out of memory {i}") for i in range(5)]
    await tiered(writer).remote.drain()
    assert [(status, text) for status, _, text in during] == [(200, f"echo: out of memory {i}") for i in range(5)]
    assert await entry_count(own_redis.url) == 1 and tiered(writer).remote.errors >= 1
    assert await ask(reader, "stored before") == (200, "HIT", "echo: stored before")  # reads still work
    own_redis.command("CONFIG", "SET", "maxmemory", "0")
    assert await caches_again(writer, own_redis.url, "memory back")


async def test_requests_succeed_when_the_url_names_a_read_only_replica(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, own_redis: RedisServer
) -> None:
    # Redis 7 waits 5 s before a diskless full sync, for other replicas to join it: none will here.
    own_redis.command("CONFIG", "SET", "repl-diskless-sync-delay", "0")
    with RedisServer() as replica:
        replica.command("REPLICAOF", "127.0.0.1", str(own_redis.port))
        on_master = await start_proxy(aiohttp_client, settings_for, fake_upstream, own_redis.url)
        on_replica = await start_proxy(aiohttp_client, settings_for, fake_upstream, replica.url)
        await ask(on_master, "written to the master")
        await tiered(on_master).remote.drain()
        for _ in range(200):
            if await entry_count(replica.url) == 1:
                break
            await asyncio.sleep(0.05)
        assert await entry_count(replica.url) == 1, "the replica did not receive the master's entry"
        during = [await ask(on_replica, f"read only {i}") for i in range(5)]
        await tiered(on_replica).remote.drain()
        assert [(status, text) for status, _, text in during] == [(200, f"echo: read only {i}") for i in range(5)]
        assert await entry_count(replica.url) == 1 and tiered(on_replica).remote.errors >= 1
        await asyncio.sleep(RETRY_AFTER_S)
        assert await ask(on_replica, "written to the master") == (200, "HIT", "echo: written to the master")
        replica.command("REPLICAOF", "NO", "ONE")
        assert await caches_again(on_replica, replica.url, "promoted")


class ConnectionKiller:
    """Closes the proxy's Redis connections (commands and invalidations alike) at random intervals of up to
    *every_s*, from a thread, until stopped."""

    def __init__(self, server: RedisServer, every_s: float = 0.05) -> None:
        self._server, self._every_s = server, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.kills = 0

    def _run(self) -> None:
        rng = random.Random(7)
        while not self._stop.wait(rng.uniform(0, self._every_s)):
            kind = rng.choice(["normal", "pubsub"])
            reply = self._server.command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
            self.kills += int(reply.strip(b":\r\n") or 0)

    def __enter__(self) -> ConnectionKiller:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def test_every_answer_is_right_when_redis_closes_connections_at_random(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, own_redis: RedisServer
) -> None:
    one = await start_proxy(aiohttp_client, settings_for, fake_upstream, own_redis.url)
    two = await start_proxy(aiohttp_client, settings_for, fake_upstream, own_redis.url)
    prompts = [f"chaos {i % 12}" for i in range(96)]
    with ConnectionKiller(own_redis) as killer:
        answers: list[tuple[int, str, str]] = []
        for start in range(0, len(prompts), 8):
            batch = prompts[start : start + 8]
            answers += await asyncio.gather(*(ask(one if i % 2 else two, p) for i, p in enumerate(batch)))
            await asyncio.sleep(0.02)
    assert killer.kills > 0
    assert [(status, text) for status, _, text in answers] == [(200, f"echo: {p}") for p in prompts]
    assert {label for _, label, _ in answers} <= {"MISS", "HIT", "COALESCED"}
    assert await caches_again(one, own_redis.url, "calm again")
