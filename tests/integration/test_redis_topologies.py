"""The Redis Cluster and Sentinel deployments of ``tests.redis_topologies``, driven by redis-py's own clients."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster as ClusterClient
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from tests.redis_topologies import HASH_SLOTS, HOST, RedisCluster, RedisSentinel

pytestmark = pytest.mark.integration

T = TypeVar("T")
SWITCH_S = 15.0


async def eventually(attempt: Callable[[], Awaitable[T]], timeout_s: float = SWITCH_S) -> T:
    """Retry *attempt* while it fails with a Redis error (a client notices a switch of master on its next tries),
    and re-raise the last error after *timeout_s*."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await attempt()
        except RedisError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


def is_listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((HOST, port)) == 0


async def value_on_node(port: int, key: str) -> bytes | None:
    """*key* as the node on *port* itself holds it, without following a redirection."""
    async with redis.Redis(host=HOST, port=port) as node:
        value: bytes | None = await node.execute_command("GET", key)
        return value


async def test_masters_share_every_slot_with_a_replica_each_when_the_cluster_is_formed(
    redis_cluster: RedisCluster,
) -> None:
    masters = redis_cluster.masters()
    ranges = [slot_range for master in masters for slot_range in master.slots]
    assert len(masters) == 3
    assert ranges[0][0] == 0 and ranges[-1][1] == HASH_SLOTS - 1
    assert all(after[0] == before[1] + 1 for before, after in itertools.pairwise(ranges))
    replicas = [redis_cluster.replicas_of(master.port) for master in masters]
    assert [len(ports) for ports in replicas] == [1, 1, 1]
    everyone = [master.port for master in masters] + [port for ports in replicas for port in ports]
    assert sorted(everyone) == sorted(node.port for node in redis_cluster.nodes)


async def test_keys_land_on_every_master_when_written_through_a_cluster_client(redis_cluster: RedisCluster) -> None:
    redis_cluster.flush()
    keys = [f"spread:{i}" for i in range(30)]
    async with ClusterClient.from_url(redis_cluster.url) as client:
        for key in keys:
            await client.set(key, key)
        slots = [await client.cluster_keyslot(key) for key in keys]
    owners = {key: redis_cluster.master_for_key(key) for key in keys}
    assert set(owners.values()) == {master.port for master in redis_cluster.masters()}
    assert [redis_cluster.master_for_slot(slot) for slot in slots] == list(owners.values())
    for key, port in owners.items():
        assert await value_on_node(port, key) == key.encode()
    assert redis_cluster.master_for_key("{user:1}:a") == redis_cluster.master_for_key(b"{user:1}:b")


async def test_a_write_survives_and_the_client_recovers_when_a_cluster_master_is_killed(
    own_redis_cluster: RedisCluster,
) -> None:
    cluster = own_redis_cluster
    old = cluster.master_for_key("survivor")
    [replica] = cluster.replicas_of(old)
    async with ClusterClient.from_url(cluster.url, socket_timeout=0.5, socket_connect_timeout=0.5) as client:
        await client.set("survivor", b"before")
        await asyncio.to_thread(cluster.wait_until_replicated)
        assert await asyncio.to_thread(cluster.fail_master, old) == replica
        assert cluster.master_for_key("survivor") == replica
        assert await eventually(lambda: client.get("survivor")) == b"before"
        await eventually(lambda: client.set("survivor", b"after"))
        assert await client.get("survivor") == b"after"
    await asyncio.to_thread(cluster.restart, old)
    assert cluster.replicas_of(replica) == [old]
    assert await value_on_node(replica, "survivor") == b"after"


async def test_the_replica_takes_over_with_every_write_when_the_cluster_fails_over_gently(
    own_redis_cluster: RedisCluster,
) -> None:
    cluster = own_redis_cluster
    old = cluster.master_for_key("planned")
    [replica] = cluster.replicas_of(old)
    async with ClusterClient.from_url(cluster.url) as client:
        await client.set("planned", b"kept")
        await asyncio.to_thread(cluster.failover, replica)
        assert (cluster.master_for_key("planned"), cluster.replicas_of(replica)) == (replica, [old])
        assert await eventually(lambda: client.get("planned")) == b"kept"


async def test_sentinels_name_the_master_and_its_replica_when_the_deployment_is_formed(
    redis_sentinel: RedisSentinel,
) -> None:
    redis_sentinel.flush()
    assert redis_sentinel.addresses == ",".join(f"{host}:{port}" for host, port in redis_sentinel.hosts)
    assert len(redis_sentinel.hosts) == 3
    async with Sentinel(redis_sentinel.hosts, socket_timeout=0.5) as sentinel:
        assert await sentinel.discover_master(redis_sentinel.name) == (HOST, redis_sentinel.master_port)
        assert await sentinel.discover_slaves(redis_sentinel.name) == [
            (HOST, port) for port in redis_sentinel.replica_ports()
        ]
        async with sentinel.master_for(redis_sentinel.name) as master:
            await master.set("formed", b"yes")
    await asyncio.to_thread(redis_sentinel.wait_until_replicated)
    assert await value_on_node(redis_sentinel.replica_ports()[0], "formed") == b"yes"


async def test_master_for_follows_the_new_master_when_sentinels_fail_over(
    own_redis_sentinel: RedisSentinel,
) -> None:
    deployment = own_redis_sentinel
    old, [replica] = deployment.master_port, deployment.replica_ports()
    async with Sentinel(deployment.hosts, socket_timeout=0.5, socket_connect_timeout=0.5) as sentinel:
        async with sentinel.master_for(deployment.name) as master:
            await master.set("survivor", b"before")
            await asyncio.to_thread(deployment.wait_until_replicated)
            assert await asyncio.to_thread(deployment.fail_master) == replica
            assert await sentinel.discover_master(deployment.name) == (HOST, replica)
            assert await eventually(lambda: master.get("survivor")) == b"before"
            await eventually(lambda: master.set("survivor", b"after"))
    await asyncio.to_thread(deployment.restart, old)
    assert deployment.replica_ports() == [old]
    assert await value_on_node(old, "survivor") == b"after"


async def test_master_for_follows_a_planned_switch_when_sentinels_fail_over_gently(
    own_redis_sentinel: RedisSentinel,
) -> None:
    deployment = own_redis_sentinel
    old, [replica] = deployment.master_port, deployment.replica_ports()
    async with Sentinel(deployment.hosts, socket_timeout=0.5, socket_connect_timeout=0.5) as sentinel:
        async with sentinel.master_for(deployment.name) as master:
            await master.set("planned", b"before")
            await asyncio.to_thread(deployment.wait_until_replicated)
            assert await asyncio.to_thread(deployment.failover) == replica
            assert deployment.replica_ports() == [old]
            assert await eventually(lambda: master.get("planned")) == b"before"
            await eventually(lambda: master.set("planned", b"after"))
    assert await value_on_node(replica, "planned") == b"after"


def test_no_process_or_directory_is_left_when_a_deployment_closes() -> None:
    with RedisSentinel(replicas=0, sentinels=1) as deployment:
        ports = [node.port for node in [*deployment.nodes, *deployment.sentinels]]
        assert all(map(is_listening, ports))
    assert not any(map(is_listening, ports))
    assert not deployment.dir.exists()


def test_no_process_or_directory_is_left_when_a_cluster_fails_to_start() -> None:
    cluster = RedisCluster()
    taken = cluster.nodes[3].port
    with socket.socket() as blocker:
        blocker.bind((HOST, taken))
        blocker.listen()
        with pytest.raises(RuntimeError, match=f"{taken} exited"):
            cluster.start()
    assert not any(is_listening(node.port) for node in cluster.nodes)
    assert not cluster.dir.exists()
