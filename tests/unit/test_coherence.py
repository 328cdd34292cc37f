"""The invalidation listener's life cycle."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fakeredis import FakeAsyncRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.coherence import Invalidations
from proxy.config import RedisSettings


class Node:
    async def aclose(self) -> None:
        return None


async def test_close_returns_when_a_listener_fails_as_it_is_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    listening = asyncio.Event()

    async def listener_whose_connection_breaks(self: Invalidations, node: Any, ready: asyncio.Event) -> None:
        listening.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            # A Redis connection torn down under a listener fails it with an error of its own; Python 3.11's task
            # group then raises that error instead of the cancellation.
            raise RedisConnectionError("Connection closed by server.") from None

    stop = False

    async def one_node(self: Invalidations) -> list[Node]:
        if stop:
            raise asyncio.CancelledError  # ends a listener loop that would not stop, so that the test can end
        return [Node()]

    monkeypatch.setattr(Invalidations, "_listen", listener_whose_connection_breaks)
    monkeypatch.setattr(Invalidations, "_listener_clients", one_node)
    invalidations = Invalidations(
        FakeAsyncRedis(), RedisSettings(), ["test:"], drop=lambda keys: None, trust=lambda coherent: None
    )
    invalidations.start()
    await asyncio.wait_for(listening.wait(), 2)
    closing = asyncio.ensure_future(invalidations.aclose())
    try:
        done, _ = await asyncio.wait({closing}, timeout=2)
        assert closing in done, "the listener went on listening after it was cancelled"
    finally:
        stop = True
        await asyncio.wait({closing}, timeout=2)
