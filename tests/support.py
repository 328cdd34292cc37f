"""Helpers shared by every test folder: free ports, a clean environment, settings and bodies, Redis and proxy
processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import redis.asyncio as redis
from aiohttp.test_utils import TestServer

from proxy.config import AuthSettings, CacheSettings, RedisSettings, ServerSettings, Settings, Upstream
from proxy.entry import CacheEntry
from tests.fakes.upstream import RECEIVED, Received
from tests.tls import Leaf

REPO = Path(__file__).resolve().parents[1]
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
# Whatever the shell running the tests exports must not configure the proxy or the SDK behind their back.
_FOREIGN_ENV = ("PROXY_", "UPSTREAM_", "CACHE_", "REDIS_", "OPENAI_", "LOG_LEVEL")
_SECTIONS = {"server": ServerSettings, "cache": CacheSettings, "redis": RedisSettings, "auth": AuthSettings}


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any proxy or SDK setting, the repository importable, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def make_settings(
    upstream_url: str, *, api_key: str | None = UPSTREAM_KEY, backend: str = "redis", **overrides: Any
) -> Settings:
    """Settings for one proxy in front of *upstream_url* (which ends in ``/v1``), with short timeouts.

    *overrides* name fields of any section (``ttl_s``, ``url``, ``max_body_bytes``, ``proxy_api_keys``...) or
    of :class:`Settings` itself (``upstreams``).
    """
    upstream = Upstream(name="default", base_url=upstream_url, api_key=api_key, timeout_s=5.0, connect_timeout_s=2.0)
    settings = Settings(
        upstreams=(upstream,),
        redis=RedisSettings(timeout_ms=200, retry_after_s=0.5),
        cache=CacheSettings(backend=backend, namespace="test", ttl_s=60),
    )
    for section, cls in _SECTIONS.items():
        names = {f.name for f in fields(cls)} & set(overrides)
        if names:
            current = getattr(settings, section)
            settings = replace(settings, **{section: replace(current, **{n: overrides.pop(n) for n in names})})
    return replace(settings, **overrides)


def received(server: TestServer) -> list[Received]:
    """What the fake upstream got so far (a list it appends to)."""
    return server.app[RECEIVED]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called *name* whose labels include *labels*, in the Prometheus text *text*, parsed
    with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def chat_body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


def make_entry(body: bytes = b'{"ok":true}', ttl_s: float = 60, **overrides: Any) -> CacheEntry:
    """A JSON answer stored now for *ttl_s* seconds; *overrides* set any other field."""
    now = time.time()
    values: dict[str, Any] = {
        "status": 200,
        "headers": (("Content-Type", "application/json"),),
        "body": body,
        "is_stream": False,
        "stored_at": now,
        "expires_at": now + ttl_s,
    }
    return CacheEntry(**{**values, **overrides})


def dead_redis() -> redis.Redis:
    """A real client aimed at a port where nothing listens: every call fails like a dead server."""
    return redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send *head* (request line and headers, without the blank line) and *body* byte for byte, as no HTTP
    client library would, on a fresh connection that is closed after the answer; return status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n\r\n" + body)
        async with asyncio.timeout(10):
            reply = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def eventually(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll *condition* until it holds or *timeout_s* passes; for effects applied in the background."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_until_serving(
    url: str, process: subprocess.Popen[bytes], log: Path | None = None, timeout_s: float = 20
) -> None:
    """Return once *url* answers below 500; raise with the process's log if it exits or stays silent."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    stop_process(process)
    raise RuntimeError(f"{process.args!r} did not answer {url}:\n{_tail(log)}")


def _tail(log: Path | None) -> str:
    return log.read_text(errors="replace")[-4000:] if log is not None and log.exists() else ""


@contextmanager
def fake_upstream_process(log: Path, *, delay_s: float | None = None) -> Iterator[str]:
    """The fake OpenAI upstream (``tests.fakes.upstream``) in a process of its own, answering; yields its base
    URL (``http://127.0.0.1:<port>/v1``) and stops it afterwards. *delay_s*: how long its "slow" requests take."""
    port = free_port()
    args = [sys.executable, "-m", "tests.fakes.upstream", "--port", str(port)]
    if delay_s is not None:
        args += ["--delay", str(delay_s)]
    with log.open("wb") as out:
        process = subprocess.Popen(args, cwd=REPO, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        # Any path answers; /v1/ping falls through to the fake's echo route.
        wait_until_serving(f"http://127.0.0.1:{port}/v1/ping", process, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass(frozen=True, slots=True)
class RedisTls:
    """How a :class:`RedisServer` speaks TLS: its certificate, the CA it checks client certificates against, and
    whether clients must present one. *client* is the certificate the helper's own connections present."""

    server: Leaf
    ca_file: Path
    client: Leaf
    require_client_cert: bool = False


class RedisServer:
    """A throwaway ``redis-server`` without persistence on a free loopback port, plain or TLS-only. :meth:`stop`
    and :meth:`start` keep the port, so a test can kill Redis under a running proxy and bring it back where the
    proxy expects it."""

    def __init__(self, password: str | None = None, *, tls: RedisTls | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed; scripts/test installs it (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.password = password
        self.tls = tls
        self.dir = Path(tempfile.mkdtemp(prefix="redis-test-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [self.binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(self.dir), "--daemonize", "no", "--loglevel", "warning"]
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls.server.cert)]
            args += ["--tls-key-file", str(self.tls.server.key), "--tls-ca-cert-file", str(self.tls.ca_file)]
            args += ["--tls-auth-clients", "yes" if self.tls.require_client_cert else "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self._connect(timeout_s=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):
                        return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def _connect(self, timeout_s: float) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s)
        if self.tls is None:
            return sock
        # The helper trusts the test CA; whether the server's name matches is for the tests to find out.
        context = ssl.create_default_context(cafile=str(self.tls.ca_file))
        context.check_hostname = False
        context.load_cert_chain(self.tls.client.cert, self.tls.client.key)
        try:
            return context.wrap_socket(sock)
        except BaseException:
            sock.close()
            raise

    def command(self, *words: str) -> bytes:
        """Send one inline command over a fresh socket and return the first reply bytes (for test set-up)."""
        with self._connect(timeout_s=2) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(" ".join(words).encode() + b"\r\n")
            return sock.recv(65536)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
