"""The operator commands (``ping``, ``inspect``, ``stats``, ``purge``) as processes against a real Redis, with
proxies serving from it meanwhile."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.memory import TieredStore
from proxy.state import STORE
from tests.support import REPO, chat_body, clean_env, free_port, make_entry

pytestmark = pytest.mark.integration

ENCRYPTION_KEY = "commands-test-key-0123456789abcdefghijkl"


async def cli(*args: str, **env: str) -> tuple[int, str, str]:
    """Run ``python -m proxy <args>`` without blocking the loop the proxies under test run on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        cwd=REPO / "tests",
        env=clean_env(CACHE_NAMESPACE="test", **env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def tiered(client: TestClient[Any, Any]) -> TieredStore:
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    return store


async def replica(aiohttp_client: Any, settings: Any) -> TestClient[Any, Any]:
    """A proxy on real Redis whose in-process tier is coherent (or needs no invalidations)."""
    client = await aiohttp_client(create_app(settings))
    for _ in range(300):
        if tiered(client).coherent:
            return client
        await asyncio.sleep(0.01)
    raise AssertionError("invalidations never became active")


async def ask(client: TestClient[Any, Any], content: str, route: str = "chat/completions") -> tuple[str, str]:
    body = chat_body(content) if route == "chat/completions" else {"model": "text-embedding-3-small", "input": content}
    response = await client.post(f"/v1/{route}", json=body)
    assert response.status == 200
    await response.read()
    await tiered(client).remote.drain()
    return response.headers["X-Cache"], response.headers["X-Cache-Key"]


async def test_ping_reports_round_trip_when_redis_answers(redis_url: str) -> None:
    code, out, err = await cli("ping", REDIS_URL=redis_url)
    assert code == 0, err
    assert out.startswith("redis reachable: ") and "PONG from 127.0.0.1:" in out and " ms" in out


async def test_ping_fails_in_one_line_without_password_when_redis_unreachable() -> None:
    code, out, err = await cli("ping", REDIS_URL=f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    assert code == 1 and out == ""
    assert err.startswith("llm-cache-proxy: redis unreachable at redis://:***@127.0.0.1:")
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "hunter2" not in err


async def test_inspect_shows_route_model_status_and_usage_when_key_exists(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await replica(aiohttp_client, settings_for(fake_upstream, url=redis_url))
    _, tag = await ask(client, "inspect me")
    code, out, err = await cli("inspect", tag, "--json", REDIS_URL=redis_url)
    assert code == 0, err
    shown = orjson.loads(out)
    assert shown["key"].startswith("test:v2:chat/completions:{" + tag)
    assert (shown["route"], shown["model"], shown["status"], shown["stream"]) == (
        "chat/completions",
        "gpt-4o-mini",
        200,
        False,
    )
    assert shown["usage"]["total_tokens"] > 0 and shown["body_bytes"] > 0
    assert 0 <= shown["age_s"] < 30 and 30 < shown["ttl_s"] <= 60 and 30 < shown["fresh_for_s"] <= 60
    code, text, _ = await cli("inspect", tag, REDIS_URL=redis_url)
    assert code == 0 and "model        gpt-4o-mini" in text and "route        chat/completions" in text


async def test_inspect_exits_1_naming_the_key_when_no_entry_has_it(redis_url: str) -> None:
    code, out, err = await cli("inspect", "0123456789abcdef", REDIS_URL=redis_url)
    assert (code, out) == (1, "")
    assert err == "llm-cache-proxy: no entry with X-Cache-Key 0123456789abcdef in namespace test\n"


async def test_purge_refuses_a_namespace_when_no_entry_is_written_there(redis_url: str, redis_server: Any) -> None:
    code, out, err = await cli("purge", "--namespace", "tset", REDIS_URL=redis_url)
    assert (code, out) == (2, "")
    assert "namespace tset is neither cache.namespace nor a client key's own" in err
    assert redis_server.command("EXISTS", "tset:generation") == b":0\r\n"


async def test_inspect_extend_keeps_entry_fresh_longer_when_asked(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    settings = settings_for(fake_upstream, url=redis_url, stale_if_error_s=30)
    client = await replica(aiohttp_client, settings)
    _, tag = await ask(client, "keep me longer")
    env = {"REDIS_URL": redis_url, "CACHE_STALE_IF_ERROR": "30"}
    code, out, err = await cli("inspect", tag, "--extend", "1000", "--json", **env)
    assert code == 0, err
    shown = orjson.loads(out)
    assert 1030 < shown["fresh_for_s"] <= 1060
    assert shown["ttl_s"] == pytest.approx(shown["fresh_for_s"] + 30, abs=2)  # kept for stale-if-error after
    assert await ask(client, "keep me longer") == ("HIT", tag)


async def test_inspect_decodes_sealed_entry_when_encryption_key_configured(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await replica(aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=ENCRYPTION_KEY))
    _, tag = await ask(client, "sealed")
    code, out, err = await cli("inspect", tag, "--json", REDIS_URL=redis_url, CACHE_ENCRYPTION_KEY=ENCRYPTION_KEY)
    assert code == 0, err
    assert orjson.loads(out)["model"] == "gpt-4o-mini"
    code, out, err = await cli("inspect", tag, "--json", REDIS_URL=redis_url)
    assert code == 0, err
    shown = orjson.loads(out)
    assert "model" not in shown and "sealed" in shown["unreadable"] and shown["stored_bytes"] > 0
    code, _, err = await cli("inspect", tag, "--extend", "10", REDIS_URL=redis_url)
    assert code == 1 and "cannot extend" in err


async def test_stats_counts_entries_per_route_when_cache_has_entries(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await replica(aiohttp_client, settings_for(fake_upstream, url=redis_url))
    for content in ("a", "b", "c"):
        await ask(client, content)
    for content in ("d", "e"):
        await ask(client, content, "embeddings")
    await ask(client, "a")
    metrics_url = str(client.make_url("/metrics"))
    code, out, err = await cli("stats", "--json", "--metrics-url", metrics_url, REDIS_URL=redis_url)
    assert code == 0, err
    found = orjson.loads(out)
    namespace = found["namespaces"]["test"]
    routes = namespace["routes"]
    assert (namespace["generation"], namespace["entries"]) == (0, 5)
    assert {route: r["entries"] for route, r in routes.items()} == {"chat/completions": 3, "embeddings": 2}
    chat = routes["chat/completions"]
    assert chat["bytes"] > 0 and 30 < chat["ttl_s"]["min"] <= chat["ttl_s"]["max"] <= 60
    assert 0 <= chat["age_s"]["min"] <= chat["age_s"]["max"] < 30 and chat["unknown_age"] == 0
    assert found["redis"][0]["used_memory"] > 0
    assert found["hit_rate"]["outcomes"] == {"HIT": 1, "MISS": 5} and found["hit_rate"]["ratio"] == pytest.approx(
        1 / 6, abs=1e-3
    )
    code, text, _ = await cli("stats", REDIS_URL=redis_url)
    assert (
        code == 0 and "namespace test (generation 0): 5 entries" in text and "hit rate: counted by each replica" in text
    )


async def test_stats_still_reports_and_exits_1_naming_the_url_when_metrics_cannot_be_read(redis_url: str) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/metrics"
    code, out, err = await cli("stats", "--json", "--metrics-url", unreachable, REDIS_URL=redis_url)
    assert code == 1
    assert err.startswith(f"llm-cache-proxy: metrics unreadable at {unreachable}: ") and "redis" not in err
    assert orjson.loads(out)["hit_rate"] is None and "test" in orjson.loads(out)["namespaces"]


async def test_stats_reads_sealed_ages_only_when_encryption_key_configured(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await replica(aiohttp_client, settings_for(fake_upstream, url=redis_url, encryption_key=ENCRYPTION_KEY))
    await ask(client, "sealed one")
    await ask(client, "sealed two")
    runs = [
        await cli("stats", "--json", REDIS_URL=redis_url, **env)
        for env in ({"CACHE_ENCRYPTION_KEY": ENCRYPTION_KEY}, {})
    ]
    with_key, without_key = (
        orjson.loads(out)["namespaces"]["test"]["routes"]["chat/completions"] for _, out, _ in runs
    )
    assert (with_key["entries"], with_key["unknown_age"], with_key["age_s"]["max"] < 30) == (2, 0, True)
    assert (without_key["entries"], without_key["unknown_age"], without_key["age_s"]) == (2, 2, None)


async def test_stats_reads_further_when_metadata_outgrows_the_first_kilobyte(redis_url: str) -> None:
    long_headers = tuple((f"openai-extra-{n}", "x" * 100) for n in range(30))
    async with redis.Redis.from_url(redis_url) as admin:
        for n in range(3):
            entry = make_entry(headers=long_headers, stored_at=time.time() - 100 * (n + 1))
            await admin.set(f"test:v2:embeddings:{{{n:064x}}}", entry.to_bytes(), px=60_000)
    code, out, err = await cli("stats", "--json", REDIS_URL=redis_url)
    assert code == 0, err
    embeddings = orjson.loads(out)["namespaces"]["test"]["routes"]["embeddings"]
    assert (embeddings["entries"], embeddings["unknown_age"]) == (3, 0)
    assert embeddings["age_s"]["min"] == pytest.approx(100, abs=10) and embeddings["age_s"]["max"] == pytest.approx(
        300, abs=10
    )


async def test_stats_counts_earlier_generation_keys_apart_when_not_yet_reclaimed(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await replica(aiohttp_client, settings_for(fake_upstream, url=redis_url))
    await ask(client, "old one")
    await ask(client, "old two")
    async with redis.Redis.from_url(redis_url) as admin:
        await admin.incr("test:generation")
    code, out, err = await cli("stats", "--json", REDIS_URL=redis_url)
    assert code == 0, err
    namespace = orjson.loads(out)["namespaces"]["test"]
    assert (namespace["generation"], namespace["entries"], namespace["old_generation_keys"]) == (1, 0, 2)
    code, text, _ = await cli("stats", REDIS_URL=redis_url)
    assert "earlier generations: 2 keys" in text


async def test_stats_and_inspect_read_every_master_when_redis_is_a_cluster(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_cluster: Any
) -> None:
    redis_cluster.flush()
    client = await replica(aiohttp_client, settings_for(fake_upstream, mode="cluster", url=redis_cluster.url))
    tags = [(await ask(client, f"spread {n}"))[1] for n in range(12)]
    env = {"REDIS_MODE": "cluster", "REDIS_URL": redis_cluster.url}
    code, out, err = await cli("stats", "--json", **env)
    assert code == 0, err
    found = orjson.loads(out)
    assert found["namespaces"]["test"]["entries"] == 12 and len(found["redis"]) == 3
    for tag in tags[:3]:
        code, out, err = await cli("inspect", tag, "--json", **env)
        assert code == 0, err
        assert orjson.loads(out)["route"] == "chat/completions"
    code, out, err = await cli("ping", **env)
    assert code == 0 and out.count(" ms (connect") == 3, err


async def test_commands_find_the_master_when_redis_is_behind_sentinels(redis_sentinel: Any) -> None:
    redis_sentinel.flush()
    env = {
        "REDIS_MODE": "sentinel",
        "REDIS_URL": "redis://sentinel-named-master/0",
        "REDIS_SENTINELS": redis_sentinel.addresses,
        "REDIS_SENTINEL_MASTER": redis_sentinel.name,
    }
    code, out, err = await cli("ping", **env)
    assert code == 0, err
    assert f"PONG from 127.0.0.1:{redis_sentinel.master_port} " in out
    code, out, err = await cli("purge", **env)
    assert code == 0 and "generation 0 -> 1" in out, err
    code, out, err = await cli("stats", "--json", **env)
    assert code == 0 and orjson.loads(out)["namespaces"]["test"]["generation"] == 1, err


async def eventually_missed(client: TestClient[Any, Any], content: str, within_s: float) -> float:
    """Ask until *client* misses; return how long that took."""
    began = time.monotonic()
    while (await ask(client, content))[0] == "HIT":
        assert time.monotonic() - began < within_s, f"still a hit {within_s}s after the purge"
        await asyncio.sleep(0.005)
    return time.monotonic() - began


async def test_purge_makes_another_replica_miss_when_entry_was_in_its_memory(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    settings = settings_for(fake_upstream, url=redis_url)
    one, two = await replica(aiohttp_client, settings), await replica(aiohttp_client, settings)
    await ask(one, "purge me")
    assert (await ask(two, "purge me"))[0] == "HIT"
    assert (await ask(two, "purge me"))[0] == "HIT" and len(tiered(two).memory) == 1  # from two's own memory
    code, out, err = await cli("purge", REDIS_URL=redis_url)
    assert code == 0, err
    assert "namespace test: generation 0 -> 1" in out and "reclaimed 1 old entries" in out
    await eventually_missed(two, "purge me", within_s=0.1)
    assert (await ask(one, "purge me"))[0] == "HIT"  # two's fresh answer, stored in the new generation
    async with redis.Redis.from_url(redis_url) as admin:
        keys = sorted(await admin.keys("test:*"))
    assert keys[0] == b"test:generation" and all(key.startswith(b"test:v2g1:") for key in keys[1:])


async def test_replica_polls_the_generation_when_invalidations_are_off(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    client = await replica(aiohttp_client, settings_for(fake_upstream, url=redis_url, invalidations=False))
    await ask(client, "polled")
    assert (await ask(client, "polled"))[0] == "HIT"
    code, _, err = await cli("purge", REDIS_URL=redis_url)
    assert code == 0, err
    await eventually_missed(client, "polled", within_s=3)


async def test_replica_starts_in_the_current_generation_when_purged_before(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    async with redis.Redis.from_url(redis_url) as admin:
        await admin.set("test:generation", 7)
    client = await aiohttp_client(create_app(settings_for(fake_upstream, url=redis_url)))
    await ask(client, "seventh")
    async with redis.Redis.from_url(redis_url) as admin:
        keys = [key async for key in admin.scan_iter("test:v2*")]
    assert len(keys) == 1 and keys[0].startswith(b"test:v2g7:chat/completions:")


async def test_purge_key_removes_one_entry_from_every_replica_when_given(
    aiohttp_client: Any, fake_upstream: Any, settings_for: Any, redis_url: str
) -> None:
    settings = settings_for(fake_upstream, url=redis_url)
    one, two = await replica(aiohttp_client, settings), await replica(aiohttp_client, settings)
    _, tag = await ask(one, "remove me")
    await ask(one, "keep me")
    for content in ("remove me", "keep me", "remove me", "keep me"):
        assert (await ask(two, content))[0] == "HIT"
    code, out, err = await cli("purge", "--key", tag, REDIS_URL=redis_url)
    assert code == 0, err
    assert out.startswith("removed test:v2:chat/completions:{" + tag)
    await eventually_missed(two, "remove me", within_s=0.1)
    assert (await ask(two, "keep me"))[0] == "HIT"
    code, _, err = await cli("purge", "--key", tag[::-1], REDIS_URL=redis_url)
    assert code == 1 and "no entry with X-Cache-Key" in err
