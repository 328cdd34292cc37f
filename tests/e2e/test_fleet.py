"""A fleet: two proxy processes sharing a Redis Cluster (3 masters with replicas) or a Sentinel-managed master.
Hits on every master, one upstream call for identical requests on different replicas (plain and streamed),
refreshes seen by the other replica, and a master failing under load."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.e2e.support import NAMESPACE, ProxyProcess, chat_kwargs, start_proxy
from tests.redis_topologies import RedisCluster, RedisSentinel

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Quick to notice a failed master and to try Redis again; a short lease so that tests never wait long.
CONFIG = "redis:\n  timeout_ms: 300\n  retry_after_s: 0.3\ncache:\n  flight_lease_s: 2\n"


@dataclass
class Fleet:
    one: ProxyProcess
    two: ProxyProcess
    topology: RedisCluster | RedisSentinel

    @property
    def replicas(self) -> tuple[ProxyProcess, ProxyProcess]:
        return self.one, self.two

    def upstream_calls(self) -> int:
        return sum(int(proxy.metric("llm_cache_upstream_responses_total")) for proxy in self.replicas)


def fleet_env(topology: RedisCluster | RedisSentinel) -> dict[str, str]:
    if isinstance(topology, RedisCluster):
        return {"REDIS_MODE": "cluster", "REDIS_URL": topology.url}
    # In sentinel mode the URL carries only credentials and the database; the Sentinels name the master.
    return {
        "REDIS_MODE": "sentinel",
        "REDIS_URL": "redis://sentinel-named-master/0",
        "REDIS_SENTINELS": topology.addresses,
        "REDIS_SENTINEL_MASTER": topology.name,
    }


def start_fleet(tmp_path: Path, upstream_url: str, topology: RedisCluster | RedisSentinel) -> Fleet:
    env = fleet_env(topology)
    one = start_proxy(tmp_path / "one", upstream_url, env["REDIS_URL"], config=CONFIG, **env)
    two = start_proxy(tmp_path / "two", upstream_url, env["REDIS_URL"], config=CONFIG, **env)
    return Fleet(one, two, topology)


@pytest.fixture(params=["cluster", "sentinel"])
def fleet(
    request: pytest.FixtureRequest, upstream_url: str, tmp_path: Path, redis_cluster: Any, redis_sentinel: Any
) -> Iterator[Fleet]:
    topology = redis_cluster if request.param == "cluster" else redis_sentinel
    topology.flush()
    started = start_fleet(tmp_path, upstream_url, topology)
    yield started
    for proxy in started.replicas:
        proxy.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def ask(http: aiohttp.ClientSession, proxy: ProxyProcess, content: str, **extra: Any) -> tuple[str, bytes]:
    headers = extra.pop("headers", {})
    async with http.post(
        f"{proxy.base_url}/chat/completions", json=chat_kwargs(content, **extra), headers=headers
    ) as r:
        assert r.status == 200, await r.text()
        return r.headers["X-Cache"], await r.read()


async def coherent(proxy: ProxyProcess) -> None:
    for _ in range(200):
        if await asyncio.to_thread(proxy.metric, "llm_cache_invalidations_up") == 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("invalidations never became active")


async def test_answers_are_hits_on_the_other_replica_when_spread_over_every_master(
    fleet: Fleet, http: aiohttp.ClientSession, upstream_url: str
) -> None:
    prompts = [f"spread {i}" for i in range(12)]
    firsts = [await ask(http, fleet.one, prompt) for prompt in prompts]
    assert {outcome for outcome, _ in firsts} == {"MISS"}
    await asyncio.sleep(0.2)  # stores are written off the response path
    seconds = [await ask(http, fleet.two, prompt) for prompt in prompts]
    assert [outcome for outcome, _ in seconds] == ["HIT"] * len(prompts)
    assert [body for _, body in seconds] == [body for _, body in firsts]
    if isinstance(fleet.topology, RedisCluster):
        entries = [
            key
            for master in fleet.topology.masters()
            for key in fleet.topology.node(master.port).client().keys(f"{NAMESPACE}:*}}")
        ]
        assert len(entries) == len(prompts)
        assert len({fleet.topology.master_for_key(key) for key in entries}) == 3


async def test_identical_requests_on_both_replicas_make_one_upstream_call_when_concurrent(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    before = fleet.upstream_calls()
    asked = [ask(http, proxy, "slow fleet plain question") for proxy in (*fleet.replicas, *fleet.replicas)]
    answers = await asyncio.gather(*asked)
    assert fleet.upstream_calls() - before == 1
    assert len({body for _, body in answers}) == 1
    assert sorted(outcome for outcome, _ in answers) == ["COALESCED"] * 3 + ["MISS"]


async def test_followers_on_the_other_replica_stream_live_when_one_replica_calls(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    before = fleet.upstream_calls()
    kwargs = chat_kwargs("slow " * 30 + "fleet stream", stream=True)

    async def read(proxy: ProxyProcess, delay_s: float) -> tuple[str, bytes, float, float]:
        await asyncio.sleep(delay_s)
        async with http.post(f"{proxy.base_url}/chat/completions", json=kwargs) as response:
            first = await response.content.readany()
            first_at = time.monotonic()
            rest = await response.read()
            return response.headers["X-Cache"], first + rest, first_at, time.monotonic()

    leader, follower = await asyncio.gather(read(fleet.one, 0), read(fleet.two, 0.2))
    assert fleet.upstream_calls() - before == 1
    assert (leader[0], follower[0]) == ("MISS", "COALESCED")
    assert follower[1] == leader[1] and leader[1].endswith(b"data: [DONE]\n\n")
    # The follower's first event arrived while the upstream was still writing the leader's stream.
    assert follower[2] < leader[3] - 0.1


async def test_refresh_on_one_replica_is_served_by_the_other_when_invalidations_flow(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    await coherent(fleet.one)
    await coherent(fleet.two)
    first = await ask(http, fleet.one, "fleet refresh")
    await asyncio.sleep(0.2)
    assert await ask(http, fleet.two, "fleet refresh") == ("HIT", first[1])
    assert await ask(http, fleet.two, "fleet refresh") == ("HIT", first[1])  # from two's own memory now
    refreshed = await ask(http, fleet.one, "fleet refresh", headers={"Cache-Control": "no-cache"})
    assert refreshed[0] == "MISS" and refreshed[1] != first[1]
    deadline = time.monotonic() + 2
    while (seen := await ask(http, fleet.two, "fleet refresh"))[1] == first[1]:
        assert time.monotonic() < deadline, "the other replica kept serving the replaced answer"
        await asyncio.sleep(0.01)
    assert seen == ("HIT", refreshed[1])


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
async def test_no_request_fails_and_caching_resumes_when_a_master_fails_under_load(
    kind: str, upstream_url: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    topology: RedisCluster | RedisSentinel = RedisCluster() if kind == "cluster" else RedisSentinel()
    with topology:
        fleet = start_fleet(tmp_path, upstream_url, topology)
        try:
            await _load_through_a_failover(fleet, http)
        finally:
            for proxy in fleet.replicas:
                proxy.stop()


async def _load_through_a_failover(fleet: Fleet, http: aiohttp.ClientSession) -> None:
    failures: list[str] = []
    stop = asyncio.Event()

    async def load(proxy: ProxyProcess, name: str) -> int:
        sent = 0
        while not stop.is_set():
            try:
                await ask(http, proxy, f"{name} load {sent % 20}")
            except (AssertionError, aiohttp.ClientError) as exc:
                failures.append(repr(exc))
            sent += 1
        return sent

    loads = [asyncio.create_task(load(proxy, name)) for proxy, name in zip(fleet.replicas, ("a", "b"), strict=True)]
    await asyncio.sleep(1)
    topology = fleet.topology
    if isinstance(topology, RedisCluster):
        victim = topology.master_for_key(f"{NAMESPACE}:v2:chat/completions:{{x}}")
        await asyncio.to_thread(topology.fail_master, victim)
    else:
        await asyncio.to_thread(topology.fail_master)
    await asyncio.sleep(2)
    stop.set()
    sent = sum(await asyncio.gather(*loads))
    assert failures == [] and sent > 20
    # Caching works again on the new master, with no restart of either proxy: what one replica stores is soon a
    # hit on the other. The first tries may fall in a pause after an error from a client still learning the
    # new topology, so resumption is awaited, within a bound.
    deadline, attempt = time.monotonic() + 15, 0
    while True:
        stored = await ask(http, fleet.one, f"after failover {attempt}")
        await asyncio.sleep(0.2)
        again = await ask(http, fleet.two, f"after failover {attempt}")
        if again[0] == "HIT":
            break
        assert time.monotonic() < deadline, f"caching did not resume: {attempt + 1} answers were not shared"
        attempt += 1
    assert stored[0] == "MISS" and orjson.loads(again[1])["object"] == "chat.completion"
