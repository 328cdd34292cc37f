"""Client keys: named or not, stored in clear or hashed; what reaches the upstream and who shares entries."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from typing import Any

import pytest
from fakeredis import FakeAsyncRedis

from proxy.kinds import ClientKey
from proxy.memory import TieredStore
from proxy.state import STORE
from tests.support import UPSTREAM_KEY, chat_body, received

ALICE, BOB = "sk-proxy-alice-0001", "sk-proxy-bob-0002"
NAMED = (
    ClientKey.from_key("alice", ALICE),
    ClientKey.from_key("bob", f"sha256:{hashlib.sha256(BOB.encode()).hexdigest()}", namespace="team-bob"),
)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def outcomes(client: Any, keys: tuple[str, ...], content: str) -> list[str]:
    found = []
    for key in keys:
        response = await client.post("/v1/chat/completions", json=chat_body(content), headers=bearer(key))
        assert response.status == 200, await response.text()
        found.append(response.headers["X-Cache"])
    return found


async def test_client_key_never_reaches_the_upstream_when_upstream_has_no_key(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream, api_key=None, proxy_api_keys=(ALICE, BOB))
    assert await outcomes(client, (ALICE, BOB), "keyless upstream") == ["MISS", "HIT"]
    await client.get("/v1/models", headers=bearer(ALICE))
    for sent in received(fake_upstream):
        assert "Authorization" not in sent.headers and "api-key" not in sent.headers


async def test_upstream_gets_its_own_key_when_client_key_admitted_the_request(
    fake_upstream: Any, proxy_for: Any
) -> None:
    client = await proxy_for(fake_upstream, client_keys=NAMED)
    await client.post("/v1/chat/completions", json=chat_body("inject"), headers={"api-key": ALICE})
    await client.get("/v1/models", headers=bearer(ALICE))
    assert [r.headers["Authorization"] for r in received(fake_upstream)] == [f"Bearer {UPSTREAM_KEY}"] * 2
    assert all("api-key" not in r.headers for r in received(fake_upstream))


async def test_named_keys_get_their_own_entries_when_sharing_is_off(fake_upstream: Any, proxy_for: Any) -> None:
    redis = FakeAsyncRedis()
    client = await proxy_for(fake_upstream, redis_client=redis, client_keys=NAMED)
    assert await outcomes(client, (ALICE, BOB, ALICE, BOB), "tenants") == ["MISS", "MISS", "HIT", "HIT"]
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    await store.remote.drain()
    namespaces = sorted(key.split(b":")[0] for key in await redis.keys("*}"))
    assert namespaces == [b"team-bob", b"test"]


async def test_named_keys_share_entries_when_sharing_is_on(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, client_keys=(*NAMED[:1], ClientKey.from_key("bob", BOB)))
    shared = await proxy_for(
        fake_upstream, client_keys=(*NAMED[:1], ClientKey.from_key("bob", BOB)), share_across_keys=True
    )
    assert await outcomes(client, (ALICE, BOB), "apart") == ["MISS", "MISS"]
    assert await outcomes(shared, (ALICE, BOB), "together") == ["MISS", "HIT"]


async def test_own_upstream_keys_share_entries_when_sharing_is_on(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, api_key=None, share_across_keys=True)
    assert await outcomes(client, ("sk-a", "sk-b"), "shared passthrough") == ["MISS", "HIT"]
    assert [r.headers["Authorization"] for r in received(fake_upstream)] == ["Bearer sk-a"]


async def test_hashed_key_admits_when_presented_in_clear(fake_upstream: Any, proxy_for: Any) -> None:
    client = await proxy_for(fake_upstream, client_keys=NAMED)
    wrong = await client.get("/v1/models", headers=bearer(hashlib.sha256(BOB.encode()).hexdigest()))
    right = await client.get("/v1/models", headers=bearer(BOB))
    assert (wrong.status, right.status) == (401, 200)


async def test_client_name_shows_in_metrics_and_logs_when_key_never_does(
    fake_upstream: Any, proxy_for: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    lines = io.StringIO()
    client = await proxy_for(fake_upstream, client_keys=NAMED, log_stream=lines)
    await outcomes(client, (ALICE, ALICE, BOB), "who asked")
    text = await (await client.get("/metrics")).text()
    assert 'llm_cache_client_requests_total{client="alice"} 2.0' in text
    assert 'llm_cache_client_requests_total{client="bob"} 1.0' in text
    assert [json.loads(line)["client"] for line in lines.getvalue().splitlines()] == ["alice", "alice", "bob"]
    for secret in (ALICE, BOB):
        assert secret not in text and secret not in caplog.text and secret not in lines.getvalue()
