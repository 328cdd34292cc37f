"""A replica's view of namespace generations: read from Redis, switched, and the in-process tier emptied."""

from __future__ import annotations

from fakeredis import FakeAsyncRedis

from proxy.config import CacheSettings, Settings, Upstream
from proxy.generation import Generations
from proxy.keying import Keyer
from proxy.memory import MemoryStore, TieredStore
from proxy.store import RedisStore
from tests.support import dead_redis, make_entry

SETTINGS = Settings(upstreams=(Upstream(api_key="sk-up"),), cache=CacheSettings(namespace="ns", ttl_s=60))
BODY = b'{"model": "m", "input": "x"}'


def watcher(client: object) -> tuple[Generations, Keyer, TieredStore]:
    keyer = Keyer(SETTINGS, enabled=True, memo_max_bytes=64 * 1024, secret=None)
    remote = RedisStore(client, op_timeout_s=0.5, retry_after_s=1)  # type: ignore[arg-type]
    tier = TieredStore(MemoryStore(100, 1 << 20), remote)
    return Generations(remote, keyer, tier, ["ns", "team"], pushed=lambda: True), keyer, tier


async def test_keys_switch_and_tier_empties_when_redis_holds_a_new_generation() -> None:
    redis = FakeAsyncRedis()
    generations, keyer, tier = watcher(redis)
    tier.memory.put_now("ns:v2:embeddings:{ab}", make_entry())
    await generations.refresh()
    assert keyer.generation("ns") == 0 and len(tier.memory) == 1 and generations.known
    await redis.set("ns:generation", 4)
    await generations.refresh()
    assert (keyer.generation("ns"), keyer.generation("team"), len(tier.memory)) == (4, 0, 0)
    keyed = keyer.key("embeddings", BODY, "", {})
    assert keyed.key is not None and keyed.key.startswith("ns:v2g4:embeddings:{")


async def test_generation_stays_when_redis_holds_garbage_or_fails() -> None:
    redis = FakeAsyncRedis()
    await redis.set("ns:generation", "soon")
    generations, keyer, _ = watcher(redis)
    await generations.refresh()
    assert keyer.generation("ns") == 0 and generations.known
    generations, keyer, _ = watcher(dead_redis())
    await generations.refresh()
    assert keyer.generation("ns") == 0 and not generations.known


def test_reports_wake_the_watcher_only_when_they_may_name_a_generation() -> None:
    generations, _, _ = watcher(FakeAsyncRedis())
    generations.heard([b"ns:v2:embeddings:{ab}", b"other:generation"])
    assert not generations._wake.is_set()
    generations.heard([b"ns:v2:embeddings:{ab}", b"team:generation"])
    assert generations._wake.is_set()
    generations._wake.clear()
    generations.heard(None)
    assert generations._wake.is_set()
