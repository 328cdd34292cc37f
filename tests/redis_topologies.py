"""Throwaway Redis Cluster and Sentinel deployments of real redis-server processes on loopback, for tests.

Each deployment lives in a temporary directory, keeps no data on disk (``--save "" --appendonly no``) and kills
every process it started when it closes, also when starting it failed halfway. The methods that wait (start, fail
over, restart) block; a test that keeps an event loop busy meanwhile (a proxy under load) calls them through
``asyncio.to_thread``. A Sentinel is ``redis-server <conf> --sentinel``, so only the redis-server package is needed.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

HOST = "127.0.0.1"
HASH_SLOTS = 16384
# Ports come from below Linux's ephemeral range (32768 and up), so that no outgoing connection can take a node's
# port or its cluster bus port (port + 10000) between the check and the bind.
PORTS = range(12000, 22000)
BUS_OFFSET = 10000
WAIT_S = 30.0
_DATA_ARGS: tuple[str, ...] = ("--bind", HOST, "--save", "", "--appendonly", "no", "--daemonize", "no")
# A full sync otherwise waits 5 s for more replicas to share the transfer.
_DATA_ARGS += ("--repl-diskless-sync-delay", "0")


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(count: int) -> list[int]:
    """*count* distinct free loopback ports, each with port + 10000 (a cluster node's bus) free as well."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.choice(PORTS)
        if port not in ports and _is_free(port) and _is_free(port + BUS_OFFSET):
            ports.append(port)
    return ports


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll *condition* until it holds; a Redis or socket error counts as "not yet". Raise :class:`TimeoutError`
    naming *what* after *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout_s} s")
        time.sleep(0.05)


class RedisNode:
    """One redis-server process on a fixed loopback port, in its own directory, logging to ``redis.log`` there.
    :meth:`kill` and :meth:`start` keep the port and the directory (and so a cluster node's ``nodes.conf``)."""

    def __init__(self, binary: str, port: int, directory: Path, args: Sequence[str]) -> None:
        self.binary = binary
        self.port = port
        self.dir = directory
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, extra_args: Sequence[str] = ()) -> None:
        """Start the process with its arguments plus *extra_args*; return once it answers on its port."""
        with (self.dir / "redis.log").open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary, *self.args, *extra_args], cwd=self.dir, stdout=log, stderr=subprocess.STDOUT
            )

        def answers() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"redis-server {self.address} exited:\n{self.log_tail()}")
            # Whoever else might hold the port would answer too.
            return bool(self.info("server").get("process_id") == self.process.pid)

        try:
            wait_for(answers, f"redis-server {self.address} answering", 10)
        except TimeoutError as exc:
            self.kill()
            raise RuntimeError(f"redis-server {self.address} did not start:\n{self.log_tail()}") from exc

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost machine would end it."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def client(self) -> redis.Redis:
        """A synchronous client with short timeouts, no retries (callers poll) and decoded RESP2 replies (flat
        lists, not maps)."""
        return redis.Redis(
            host=HOST,
            port=self.port,
            protocol=2,
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )

    def command(self, *args: str | int) -> Any:
        """Send one command on a fresh connection; ``("CLUSTER", "NODES")`` comes back as the raw text."""
        with self.client() as conn:
            return conn.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with self.client() as conn:
            reply: dict[str, Any] = conn.info(section)
            return reply

    def is_synced_replica_of(self, master_port: int) -> bool:
        """Whether this node replicates *master_port* with the link up and no full sync in progress."""
        info = self.info("replication")
        return (
            info.get("role") == "slave"
            and info.get("master_port") == master_port
            and info.get("master_link_status") == "up"
            and info.get("master_sync_in_progress") == 0
        )

    def log_tail(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed; scripts/test installs it (apt-get install redis-server)")
    return binary


def _wait_until_replicated(masters: dict[RedisNode, list[RedisNode]], timeout_s: float) -> None:
    """Wait until each running replica has acknowledged its master's whole replication stream."""

    def caught_up() -> bool:
        for master, replicas in masters.items():
            offset = master.info("replication")["master_repl_offset"]
            for replica in replicas:
                if replica.is_running and replica.info("replication").get("slave_repl_offset", -1) < offset:
                    return False
        return True

    wait_for(caught_up, "replicas caught up with their masters", timeout_s)


@dataclass(frozen=True, slots=True)
class ClusterNode:
    """One line of ``CLUSTER NODES``: a node as its peers see it. *slots* are inclusive ``(first, last)`` ranges;
    *master_id* is None for a master; *failed* is the FAIL flag the cluster agreed on (not a lone ``fail?``)."""

    node_id: str
    port: int
    is_master: bool
    master_id: str | None
    failed: bool
    slots: tuple[tuple[int, int], ...]

    @classmethod
    def parse(cls, line: str) -> ClusterNode:
        node_id, address, flags, master, *_, rest = [*line.split(" ", 8), ""][:9]
        names = set(flags.split(","))
        slots = []
        for word in rest.split():
            if not word.startswith("["):  # "[slot->-id]": a slot being migrated, owned elsewhere
                first, _, last = word.partition("-")
                slots.append((int(first), int(last or first)))
        return cls(
            node_id=node_id,
            port=int(address.split("@")[0].rpartition(":")[2]),
            is_master="master" in names,
            master_id=None if master == "-" else master,
            failed="fail" in names,
            slots=tuple(sorted(slots)),
        )

    def owns(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


class RedisCluster:
    """A Redis Cluster of *masters* masters with *replicas* replicas each (3 and 1: six processes), every slot
    assigned and every replica in sync once :meth:`start` returns. Roles change under failovers, so each question
    about the topology (:meth:`masters`, :meth:`master_for_key`...) is asked of a running node."""

    def __init__(self, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000) -> None:
        binary = _redis_server()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-cluster-"))
        self.master_count = masters
        self.nodes = [
            RedisNode(binary, port, self.dir / str(port), [*_DATA_ARGS, "--port", str(port), "--dir", "."])
            for port in free_ports(masters * (1 + replicas))
        ]
        for node in self.nodes:
            node.args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            node.args += ["--cluster-node-timeout", str(node_timeout_ms)]

    @property
    def url(self) -> str:
        """A seed URL: any node leads a cluster client to all the others."""
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        return [f"redis://{node.address}/0" for node in self.nodes]

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            self._form()
            self.wait_until_healthy()
        except BaseException:
            self.close()
            raise

    def _form(self) -> None:
        masters, replicas = self.nodes[: self.master_count], self.nodes[self.master_count :]
        for i, master in enumerate(masters):
            first, last = HASH_SLOTS * i // len(masters), HASH_SLOTS * (i + 1) // len(masters) - 1
            master.command("CLUSTER", "ADDSLOTSRANGE", first, last)
            # Distinct epochs up front, as redis-cli does, spare the cluster resolving a collision first.
            master.command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for node in self.nodes[1:]:
            self.nodes[0].command("CLUSTER", "MEET", HOST, node.port)
        wait_for(self._all_nodes_met, "every node knowing every other")
        for i, replica in enumerate(replicas):
            master_id = masters[i % len(masters)].command("CLUSTER", "MYID")
            replica.command("CLUSTER", "REPLICATE", master_id)

    def _all_nodes_met(self) -> bool:
        return all(
            len(self._view_of(node)) == len(self.nodes) and "handshake" not in node.command("CLUSTER", "NODES")
            for node in self.nodes
        )

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def node(self, port: int) -> RedisNode:
        return next(node for node in self.nodes if node.port == port)

    def _view_of(self, node: RedisNode) -> dict[int, ClusterNode]:
        lines = node.command("CLUSTER", "NODES").splitlines()
        return {entry.port: entry for entry in map(ClusterNode.parse, lines)}

    def topology(self) -> dict[int, ClusterNode]:
        """Every node by port, as the first running node sees them."""
        return self._view_of(next(node for node in self.nodes if node.is_running))

    def masters(self) -> list[ClusterNode]:
        """The masters that own slots, in slot order."""
        owners = [entry for entry in self.topology().values() if entry.is_master and entry.slots]
        return sorted(owners, key=lambda entry: entry.slots)

    def replicas_of(self, port: int) -> list[int]:
        view = self.topology()
        return sorted(entry.port for entry in view.values() if entry.master_id == view[port].node_id)

    def master_for_slot(self, slot: int) -> int:
        """The port of the master serving *slot*."""
        return next(entry.port for entry in self.masters() if entry.owns(slot))

    def master_for_key(self, key: str | bytes) -> int:
        """The port of the master serving *key* (hash tags included)."""
        return self.master_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def flush(self) -> None:
        """Empty every master (their replicas follow)."""
        for entry in self.masters():
            self.node(entry.port).command("FLUSHALL")

    def wait_until_replicated(self, timeout_s: float = WAIT_S) -> None:
        """Return once every running replica has every write its master took so far (before a failover that
        must not lose them)."""
        masters = {
            self.node(entry.port): [self.node(p) for p in self.replicas_of(entry.port)] for entry in self.masters()
        }
        _wait_until_replicated(masters, timeout_s)

    def wait_until_healthy(self, timeout_s: float = WAIT_S) -> None:
        """Return once all running nodes agree on one topology in which running masters own every slot, every
        running node is a master with slots or a replica in sync, and each says ``cluster_state:ok``."""
        wait_for(self._is_healthy, "a healthy cluster", timeout_s)

    def _is_healthy(self) -> bool:
        running = [node for node in self.nodes if node.is_running]
        views = [self._view_of(node) for node in running]
        if any(view != views[0] for view in views) or len(views[0]) != len(self.nodes):
            return False
        ids = {entry.node_id: entry for entry in views[0].values()}
        owners = [entry for entry in views[0].values() if entry.slots]
        if sum(last - first + 1 for entry in owners for first, last in entry.slots) != HASH_SLOTS:
            return False
        if not all(self.node(entry.port).is_running for entry in owners):
            return False
        for node in running:
            entry = views[0][node.port]
            if entry.failed or (entry.is_master and not entry.slots):
                return False
            if entry.master_id is not None and not node.is_synced_replica_of(ids[entry.master_id].port):
                return False
            if "cluster_state:ok" not in node.command("CLUSTER", "INFO"):
                return False
        return True

    def kill(self, port: int) -> None:
        """Kill the node on *port* and return at once; the cluster has not noticed yet."""
        self.node(port).kill()

    def fail_master(self, port: int, timeout_s: float = WAIT_S) -> int:
        """Kill the master on *port*, wait until a replica took over its slots and the cluster is healthy again,
        and return the new master's port. Writes its replica had not received are lost, as in production:
        :meth:`wait_until_replicated` first to keep them."""
        slot = self._owned(port).slots[0][0]
        self.kill(port)
        self.wait_until_healthy(timeout_s)
        return self.master_for_slot(slot)

    def failover(self, replica_port: int, timeout_s: float = WAIT_S) -> None:
        """The gentle variant: ``CLUSTER FAILOVER`` on a replica, which takes over once it has every write."""
        self.node(replica_port).command("CLUSTER", "FAILOVER")
        wait_for(lambda: self.topology()[replica_port].is_master, f"{replica_port} promoted", timeout_s)
        self.wait_until_healthy(timeout_s)

    def restart(self, port: int, timeout_s: float = WAIT_S) -> None:
        """Start the killed node on *port* again; it rejoins (a failed-over master as a replica of its successor),
        and this returns once it is in sync and the cluster healthy."""
        self.node(port).start()
        self.wait_until_healthy(timeout_s)

    def _owned(self, port: int) -> ClusterNode:
        entry = self.topology()[port]
        if not (entry.is_master and entry.slots):
            raise ValueError(f"{port} is not a master with slots")
        return entry


class RedisSentinel:
    """A master, *replicas* replicas and *sentinels* Sentinels watching them under *name*, formed once
    :meth:`start` returns: every Sentinel names the master, knows the other Sentinels and sees the replicas."""

    def __init__(self, name: str = "mymaster", *, replicas: int = 1, sentinels: int = 3) -> None:
        binary = _redis_server()
        self.dir = Path(tempfile.mkdtemp(prefix="redis-sentinel-"))
        self.name = name
        ports = free_ports(1 + replicas + sentinels)
        self.nodes = [
            RedisNode(binary, port, self.dir / str(port), [*_DATA_ARGS, "--port", str(port), "--dir", "."])
            for port in ports[: 1 + replicas]
        ]
        self.sentinels = [self._sentinel(binary, port, ports[0], sentinels // 2 + 1) for port in ports[1 + replicas :]]

    def _sentinel(self, binary: str, port: int, master_port: int, quorum: int) -> RedisNode:
        directory = self.dir / str(port)
        directory.mkdir()
        # Sentinel rewrites its configuration file with what it learns, so it gets one of its own.
        conf = directory / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind {HOST}\ndir {directory}\n"
            f"sentinel monitor {self.name} {HOST} {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {self.name} 1000\n"
            f"sentinel failover-timeout {self.name} 3000\n"
        )
        return RedisNode(binary, port, directory, [str(conf), "--sentinel"])

    @property
    def addresses(self) -> str:
        """The Sentinels as ``REDIS_SENTINELS`` takes them: ``127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3``."""
        return ",".join(sentinel.address for sentinel in self.sentinels)

    @property
    def hosts(self) -> list[tuple[str, int]]:
        """The Sentinels as ``redis.asyncio.sentinel.Sentinel`` takes them."""
        return [(HOST, sentinel.port) for sentinel in self.sentinels]

    def start(self) -> None:
        try:
            master, *replicas = self.nodes
            master.start()
            for replica in replicas:
                replica.start(["--replicaof", HOST, str(master.port)])
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_until_healthy(master.port)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisSentinel:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def node(self, port: int) -> RedisNode:
        return next(node for node in self.nodes if node.port == port)

    def master_address(self) -> tuple[str, int]:
        """``SENTINEL get-master-addr-by-name``, asked of the first running Sentinel."""
        sentinel = next(sentinel for sentinel in self.sentinels if sentinel.is_running)
        return self._master_address_of(sentinel)

    def _master_address_of(self, sentinel: RedisNode) -> tuple[str, int]:
        host, port = sentinel.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        return str(host), int(port)

    @property
    def master_port(self) -> int:
        return self.master_address()[1]

    def replica_ports(self) -> list[int]:
        """The running data nodes other than the master."""
        master_port = self.master_port
        return [node.port for node in self.nodes if node.is_running and node.port != master_port]

    def flush(self) -> None:
        self.node(self.master_port).command("FLUSHALL")

    def wait_until_replicated(self, timeout_s: float = WAIT_S) -> None:
        """Return once every running replica has every write the master took so far."""
        master = self.node(self.master_port)
        _wait_until_replicated({master: [node for node in self.nodes if node is not master]}, timeout_s)

    def wait_until_healthy(self, master_port: int, timeout_s: float = WAIT_S) -> None:
        """Return once every Sentinel names *master_port* as a master it sees up, knows all other Sentinels and
        sees every running replica up, and those replicas are in sync."""
        wait_for(lambda: self._is_healthy(master_port), f"Sentinels agreeing on master {master_port}", timeout_s)

    def _is_healthy(self, master_port: int) -> bool:
        replicas = [node for node in self.nodes if node.is_running and node.port != master_port]
        for sentinel in self.sentinels:
            if self._master_address_of(sentinel) != (HOST, master_port):
                return False
            state = _pairs(sentinel.command("SENTINEL", "MASTER", self.name))
            if state["flags"] != "master" or int(state["num-other-sentinels"]) != len(self.sentinels) - 1:
                return False
            seen = {
                int(entry["port"]): entry["flags"]
                for entry in map(_pairs, sentinel.command("SENTINEL", "REPLICAS", self.name))
            }
            if any(seen.get(replica.port) != "slave" for replica in replicas):
                return False
        return all(replica.is_synced_replica_of(master_port) for replica in replicas)

    def fail_master(self, timeout_s: float = WAIT_S) -> int:
        """Kill the master, wait until every Sentinel names a replica as the new master and the deployment is
        healthy again, and return the new master's port. Writes the replica had not received are lost:
        :meth:`wait_until_replicated` first to keep them."""
        old = self.master_port
        self.node(old).kill()

        def switched() -> bool:
            addresses = {self._master_address_of(sentinel) for sentinel in self.sentinels}
            return len(addresses) == 1 and addresses != {(HOST, old)}

        wait_for(switched, f"Sentinels replacing master {old}", timeout_s)
        self.wait_until_healthy(new := self.master_port, timeout_s)
        return new

    def failover(self, timeout_s: float = WAIT_S) -> int:
        """The gentle variant: ``SENTINEL FAILOVER`` on a live master; return the new master's port."""
        old = self.master_port
        self.sentinels[0].command("SENTINEL", "FAILOVER", self.name)
        wait_for(lambda: self.master_port != old, f"Sentinels replacing master {old}", timeout_s)
        new = self.master_port
        # Sentinel would demote the old master itself, but only after watching it for 8 s.
        self.node(old).command("REPLICAOF", HOST, new)
        self.wait_until_healthy(new, timeout_s)
        return new

    def restart(self, port: int, timeout_s: float = WAIT_S) -> None:
        """Start the killed data node on *port* again, as a replica of the current master (where Sentinel would
        put it, after watching it for 8 s), and return once the Sentinels see it in sync."""
        master_port = self.master_port
        self.node(port).start(["--replicaof", HOST, str(master_port)])
        self.wait_until_healthy(master_port, timeout_s)


def _pairs(reply: Sequence[str]) -> dict[str, str]:
    """A Sentinel state reply, ``[key, value, key, value...]``, as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True))
