"""Entries encrypted at rest in a real redis-server: nothing readable in Redis, shared by replicas with the same
key, and a changed key turning entries into misses, never errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.entry import MAGIC as PLAIN_MAGIC
from proxy.loader import load_settings
from proxy.memory import TieredStore
from proxy.seal import MAGIC, SealingCodec
from proxy.state import STORE
from tests.support import chat_body, received

pytestmark = pytest.mark.integration

KEY = "bXktY3VycmVudC1lbmNyeXB0aW9uLWtleS0xMjM0NTY="
OTHER_KEY = "YW5vdGhlci1lbmNyeXB0aW9uLWtleS1lbnRpcmVseS0x"
# Rotation keeps cache keys only with a key secret of its own: without one it derives from the encryption key.
KEY_SECRET = "a-cache-key-secret-that-outlives-rotations"
# Words the fake upstream echoes back, so they appear in both the prompt and the answer.
WORDS = ("zanzibar", "quokka", "marmalade")


async def start_proxy(aiohttp_client: Any, settings: Any) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(settings))


async def ask(client: TestClient[Any, Any], **extra: Any) -> tuple[str, bytes]:
    """One chat request about WORDS, its X-Cache outcome and body, once the store has written it."""
    response = await client.post("/v1/chat/completions", json=chat_body(" ".join(WORDS), **extra))
    body = await response.read()
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    await store.remote.drain()
    return response.headers["X-Cache"], body


async def stored(url: str) -> dict[bytes, bytes]:
    async with redis.Redis.from_url(url) as conn:
        return {key: await conn.get(key) for key in await conn.keys("*}")}


async def test_redis_holds_no_prompt_answer_or_metadata_when_encryption_is_on(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await start_proxy(aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=KEY))
    assert (await ask(client))[0] == "MISS"
    _, streamed = await ask(client, stream=True)
    assert all(word.encode() in streamed for word in WORDS)
    values = await stored(redis_url)
    assert len(values) == 2
    for raw in values.values():
        assert raw.startswith(MAGIC + SealingCodec(KEY).key_id)
        for clear in (*WORDS, "chat.completion", "prompt_tokens", "openai-", "application/json", KEY):
            assert clear.encode() not in raw


async def test_replica_with_the_same_key_gets_a_hit_when_entries_are_sealed(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    settings = settings_for(fake_upstream, url=redis_url, encryption_key=KEY)
    one, two = await start_proxy(aiohttp_client, settings), await start_proxy(aiohttp_client, settings)
    first, second = await ask(one), await ask(two)
    assert [first[0], second[0]] == ["MISS", "HIT"] and second[1] == first[1]
    assert len(received(fake_upstream)) == 1


async def test_entry_is_a_miss_and_replaced_when_the_key_changes(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    old = await start_proxy(
        aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=KEY, key_secret=KEY_SECRET)
    )
    await ask(old)
    new = await start_proxy(
        aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=OTHER_KEY, key_secret=KEY_SECRET)
    )
    outcome, body = await ask(new)
    assert outcome == "MISS" and b"quokka" in body
    (raw,) = (await stored(redis_url)).values()
    assert raw.startswith(MAGIC + SealingCodec(OTHER_KEY).key_id)
    again = await start_proxy(
        aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=OTHER_KEY, key_secret=KEY_SECRET)
    )
    assert (await ask(again))[0] == "HIT"
    assert len(received(fake_upstream)) == 2


async def test_entry_sealed_under_an_old_key_is_a_hit_when_listed_in_old_keys(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str, tmp_path: Path
) -> None:
    before = await start_proxy(
        aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=KEY, key_secret=KEY_SECRET)
    )
    first = await ask(before)
    (tmp_path / "proxy.yaml").write_text("")
    env = {"CACHE_ENCRYPTION_KEY": OTHER_KEY, "CACHE_ENCRYPTION_OLD_KEYS": KEY}
    rotated = load_settings(str(tmp_path / "proxy.yaml"), env=env).cache
    after = await start_proxy(
        aiohttp_client,
        settings_for(
            fake_upstream,
            url=redis_url,
            encryption_key=rotated.encryption_key,
            encryption_old_keys=rotated.encryption_old_keys,
            key_secret=KEY_SECRET,
        ),
    )
    assert await ask(after) == ("HIT", first[1])
    assert len(received(fake_upstream)) == 1


async def test_entries_are_misses_and_replaced_when_encryption_is_turned_on_or_off(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    plain = settings_for(fake_upstream, url=redis_url, key_secret=KEY_SECRET)
    sealed = settings_for(fake_upstream, url=redis_url, encryption_key=KEY, key_secret=KEY_SECRET)
    outcomes = []
    for settings, magic in ((plain, PLAIN_MAGIC), (sealed, MAGIC), (plain, PLAIN_MAGIC)):
        outcomes.append((await ask(await start_proxy(aiohttp_client, settings)))[0])
        (raw,) = (await stored(redis_url)).values()
        assert raw.startswith(magic)
    assert outcomes == ["MISS", "MISS", "MISS"]
    assert len(received(fake_upstream)) == 3


async def test_cache_keys_follow_the_encryption_key_when_no_key_secret_is_set(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    for key in (KEY, OTHER_KEY):
        await ask(await start_proxy(aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=key)))
    # Whoever cannot decrypt entries cannot confirm a guessed prompt from a key either: no shared digest.
    assert len(await stored(redis_url)) == 2
    assert len(received(fake_upstream)) == 2
