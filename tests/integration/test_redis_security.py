"""The proxy against a real redis-server that speaks only TLS or wants an ACL user: the right credentials cache,
wrong ones fail open (requests still succeed through the upstream, Redis reported unavailable)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.config import Settings
from proxy.loader import load_settings
from proxy.memory import TieredStore
from proxy.probes import REDIS_DOWN
from proxy.state import STORE
from tests.support import RedisServer, RedisTls, chat_body, clean_env, received
from tests.tls import CertificateAuthority, Leaf

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "admin-pass-0000"
ACL_USER, ACL_PASSWORD = "cache-proxy", "acl-pass-1111"
# What the README says the proxy's ACL user needs.
ACL_COMMANDS = (
    "~test!*",  # leases and flight streams
    *"+ping +mget +set +get +exists +pttl +del +pexpire +eval +xadd +xread +xrevrange".split(),
    *"+client|id +client|tracking +subscribe &__redis__:invalidate".split(),
)
# redis-py builds a TLS context per new connection (about 50 ms of CPU, mostly reading the system's CA bundle), and
# these proxies open several at once: the default deadline would expire while they wait their turn.
TLS_TIMEOUT_MS = 1000


@dataclass(frozen=True, slots=True)
class Pki:
    """The test CA with the certificates it signed, and a second CA that signed nothing of Redis's."""

    ca: CertificateAuthority
    server: Leaf  # for localhost and 127.0.0.1
    misnamed_server: Leaf  # for another host name only
    client: Leaf
    other_ca: CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(directory)
    return Pki(
        ca=ca,
        server=ca.issue(directory, "redis", hosts=("localhost", "127.0.0.1")),
        misnamed_server=ca.issue(directory, "redis-elsewhere", hosts=("redis.elsewhere.test",)),
        client=ca.issue(directory, "cache-proxy", client=True),
        other_ca=CertificateAuthority.create(directory, "other-ca"),
    )


@pytest.fixture
def tls_redis(pki: Pki) -> Iterator[RedisServer]:
    """A redis-server on TLS only, trusting the test CA, not asking clients for a certificate."""
    with RedisServer(tls=RedisTls(pki.server, pki.ca.cert, pki.client)) as server:
        yield server


@pytest.fixture
def mtls_redis(pki: Pki) -> Iterator[RedisServer]:
    """A redis-server on TLS only that refuses clients without a certificate from the test CA."""
    with RedisServer(tls=RedisTls(pki.server, pki.ca.cert, pki.client, require_client_cert=True)) as server:
        yield server


@pytest.fixture
def acl_redis() -> Iterator[RedisServer]:
    """A redis-server whose default user has a password, with an ACL user limited to the proxy's keys and
    commands."""
    with RedisServer(password=ADMIN_PASSWORD) as server:
        server.command("ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~test:*", *ACL_COMMANDS)
        yield server


@pytest.fixture
def tls_settings_for(settings_for: Any, fake_upstream: TestServer, pki: Pki) -> Callable[..., Settings]:
    """``tls_settings_for(server, **overrides)``: settings for a proxy reaching *server* over TLS with the test CA."""

    def build(server: RedisServer, **overrides: Any) -> Settings:
        defaults = {"tls_ca_file": str(pki.ca.cert), "timeout_ms": TLS_TIMEOUT_MS}
        settings: Settings = settings_for(fake_upstream, url=server.url, **{**defaults, **overrides})
        return settings

    return build


def tiered(client: TestClient[Any, Any]) -> TieredStore:
    store = client.app[STORE]
    assert isinstance(store, TieredStore)
    return store


def stored_keys(server: RedisServer) -> bytes:
    """The raw reply to KEYS *, read through the helper's own (TLS) connection."""
    return server.command("KEYS", "*")


async def assert_cached_through_redis(aiohttp_client: Any, upstream: TestServer, settings: Settings) -> None:
    """Two proxies with cold memory tiers: the second can only hit through Redis."""
    one = await aiohttp_client(create_app(settings))
    first = await one.post("/v1/chat/completions", json=chat_body("secured"))
    await tiered(one).remote.drain()
    two = await aiohttp_client(create_app(settings))
    second = await two.post("/v1/chat/completions", json=chat_body("secured"))
    assert [first.headers["X-Cache"], second.headers["X-Cache"]] == ["MISS", "HIT"]
    assert await second.read() == await first.read()
    assert len(received(upstream)) == 1
    assert tiered(one).remote.errors == 0 and tiered(two).remote.errors == 0


async def assert_fails_open(
    aiohttp_client: Any, upstream: TestServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests succeed, a repeat hits the in-process tier, Redis is reported unavailable, and the logs say why
    in one line each, without a traceback."""
    caplog.set_level(logging.DEBUG)
    client = await aiohttp_client(create_app(settings))
    responses = [await client.post("/v1/chat/completions", json=chat_body("refused")) for _ in range(2)]
    assert [r.status for r in responses] == [200, 200]
    assert [r.headers["X-Cache"] for r in responses] == ["MISS", "HIT"]
    assert len(received(upstream)) == 1
    remote = tiered(client).remote
    assert not remote.available and remote.errors >= 1
    assert await (await client.get("/readyz")).json() == {
        "status": "ready",
        "cache": "degraded",
        "redis": "down",
        "detail": REDIS_DOWN,
    }
    assert [r for r in caplog.records if r.name == "proxy.store" and r.levelno == logging.WARNING]
    assert [r for r in caplog.records if r.exc_info] == [] and "Traceback" not in caplog.text


async def test_answers_are_cached_in_redis_when_tls_is_checked_against_the_ca(
    aiohttp_client: Any, fake_upstream: TestServer, tls_settings_for: Any, tls_redis: RedisServer
) -> None:
    await assert_cached_through_redis(aiohttp_client, fake_upstream, tls_settings_for(tls_redis))
    assert b"test:v2:chat/completions:" in stored_keys(tls_redis)


async def test_requests_succeed_without_redis_when_the_ca_is_wrong(
    aiohttp_client: Any,
    fake_upstream: TestServer,
    tls_settings_for: Any,
    tls_redis: RedisServer,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = tls_settings_for(tls_redis, tls_ca_file=str(pki.other_ca.cert))
    await assert_fails_open(aiohttp_client, fake_upstream, settings, caplog)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert b"test:" not in stored_keys(tls_redis)


async def test_requests_succeed_without_redis_when_the_certificate_names_another_host(
    aiohttp_client: Any, fake_upstream: TestServer, tls_settings_for: Any, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    with RedisServer(tls=RedisTls(pki.misnamed_server, pki.ca.cert, pki.client)) as server:
        await assert_fails_open(aiohttp_client, fake_upstream, tls_settings_for(server), caplog)
    assert "IP address mismatch" in caplog.text


async def test_answers_are_cached_when_hostname_checking_is_off_for_an_unlisted_address(
    aiohttp_client: Any, fake_upstream: TestServer, tls_settings_for: Any, pki: Pki
) -> None:
    with RedisServer(tls=RedisTls(pki.misnamed_server, pki.ca.cert, pki.client)) as server:
        settings = tls_settings_for(server, tls_check_hostname=False)
        await assert_cached_through_redis(aiohttp_client, fake_upstream, settings)
        assert b"test:v2:" in stored_keys(server)


async def test_answers_are_cached_when_the_server_requires_the_client_certificate_given(
    aiohttp_client: Any, fake_upstream: TestServer, tls_settings_for: Any, mtls_redis: RedisServer, pki: Pki
) -> None:
    settings = tls_settings_for(mtls_redis, tls_cert_file=str(pki.client.cert), tls_key_file=str(pki.client.key))
    await assert_cached_through_redis(aiohttp_client, fake_upstream, settings)
    assert b"test:v2:" in stored_keys(mtls_redis)


async def test_requests_succeed_without_redis_when_a_required_client_certificate_is_missing(
    aiohttp_client: Any,
    fake_upstream: TestServer,
    tls_settings_for: Any,
    mtls_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The server refuses after the handshake: the log shows its TLS alert or a reset, whichever arrives first.
    await assert_fails_open(aiohttp_client, fake_upstream, tls_settings_for(mtls_redis), caplog)
    assert b"test:" not in stored_keys(mtls_redis)


async def test_answers_are_cached_when_an_acl_user_authenticates(
    aiohttp_client: Any, fake_upstream: TestServer, settings_for: Any, acl_redis: RedisServer
) -> None:
    # The URL's password is the admin's: the username and password settings must win over it.
    settings = settings_for(fake_upstream, url=acl_redis.url, username=ACL_USER, password=ACL_PASSWORD)
    await assert_cached_through_redis(aiohttp_client, fake_upstream, settings)
    assert b"test:v2:" in stored_keys(acl_redis)
    # The proxy's pooled connections are still open, authenticated as the ACL user.
    assert f"user={ACL_USER}".encode() in acl_redis.command("CLIENT", "LIST")


async def test_requests_succeed_without_redis_when_the_acl_password_is_wrong(
    aiohttp_client: Any,
    fake_upstream: TestServer,
    settings_for: Any,
    acl_redis: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = acl_redis.url.replace(f":{ADMIN_PASSWORD}@", "")
    settings = settings_for(fake_upstream, url=url, username=ACL_USER, password="wrong-acl-pass-2222")
    await assert_fails_open(aiohttp_client, fake_upstream, settings, caplog)
    assert "AuthenticationError" in caplog.text
    assert "wrong-acl-pass-2222" not in caplog.text and ACL_PASSWORD not in caplog.text


def secured_env(url: str, pki: Pki, password_file: Path, upstream: TestServer) -> dict[str, str]:
    """Variables as a Kubernetes pod would set them: the password and the certificates are mounted files."""
    return {
        "REDIS_URL": url,
        "REDIS_USERNAME": ACL_USER,
        "REDIS_PASSWORD_FILE": str(password_file),
        "REDIS_TLS_CA_FILE": str(pki.ca.cert),
        "REDIS_TLS_CERT_FILE": str(pki.client.cert),
        "REDIS_TLS_KEY_FILE": str(pki.client.key),
        "UPSTREAM_BASE_URL": str(upstream.make_url("/v1")),
        "OPENAI_API_KEY": "sk-upstream-secret-0123456789",
        "CACHE_NAMESPACE": "test",
    }


async def test_answers_are_cached_when_tls_acl_and_password_file_come_from_the_environment(
    aiohttp_client: Any, fake_upstream: TestServer, pki: Pki, tmp_path: Path
) -> None:
    password_file = tmp_path / "redis-password"
    password_file.write_text(f"{ACL_PASSWORD}\n")  # as `echo` or an editor leaves it
    tls = RedisTls(pki.server, pki.ca.cert, pki.client, require_client_cert=True)
    with RedisServer(password=ADMIN_PASSWORD, tls=tls) as server:
        server.command("ACL", "SETUSER", ACL_USER, "on", f">{ACL_PASSWORD}", "~test:*", *ACL_COMMANDS)
        url = server.url.replace(f":{ADMIN_PASSWORD}@", "")
        (tmp_path / "proxy.yaml").write_text(f"redis: {{timeout_ms: {TLS_TIMEOUT_MS}}}\n")
        settings = load_settings(str(tmp_path / "proxy.yaml"), env=secured_env(url, pki, password_file, fake_upstream))
        await assert_cached_through_redis(aiohttp_client, fake_upstream, settings)
        assert b"test:v2:" in stored_keys(server)
        assert f"user={ACL_USER}".encode() in server.command("CLIENT", "LIST")


def test_check_config_shows_where_secrets_come_from_but_not_their_content_when_read_from_files(
    tmp_path: Path, pki: Pki
) -> None:
    password_file = tmp_path / "redis-password"
    password_file.write_text("file-pass-3333\n")
    env = clean_env(
        REDIS_URL="rediss://:url-pass-4444@redis.example:6380/0",
        REDIS_USERNAME=ACL_USER,
        REDIS_PASSWORD_FILE=str(password_file),
        REDIS_TLS_CA_FILE=str(pki.ca.cert),
        REDIS_TLS_CHECK_HOSTNAME="no",
    )
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config"], cwd=tmp_path, env=env, capture_output=True, timeout=30
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    lines = {line.split(" = ")[0].strip(): line for line in out.splitlines() if " = " in line}
    assert f"{password_file} (read, content hidden)" in lines["redis.password_file"]
    assert f"= {pki.ca.cert}  # environment (REDIS_TLS_CA_FILE)" in lines["redis.tls_ca_file"]
    assert "= false  # environment" in lines["redis.tls_check_hostname"]
    assert f"= {ACL_USER}  #" in lines["redis.username"]
    assert "file-pass-3333" not in out + result.stderr.decode() and "url-pass-4444" not in out


def test_startup_fails_naming_the_key_when_the_password_file_is_missing(tmp_path: Path) -> None:
    env = clean_env(REDIS_PASSWORD_FILE=str(tmp_path / "absent"))
    result = subprocess.run([sys.executable, "-m", "proxy"], cwd=tmp_path, env=env, capture_output=True, timeout=30)
    err = result.stderr.decode()
    assert result.returncode == 2 and "Traceback" not in err
    assert "redis.password_file (REDIS_PASSWORD_FILE)" in err and "absent" in err
