"""End-to-end fixtures: the fake upstream, redis-server and the proxy as real processes on real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import openai
import pytest

from tests.e2e.support import CLIENT_KEY, ProxyProcess, start_proxy
from tests.support import RedisServer, fake_upstream_process


@pytest.fixture(scope="session")
def upstream_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The fake OpenAI upstream (``tests.fakes.upstream``) in a process of its own, shared by all e2e tests."""
    with fake_upstream_process(tmp_path_factory.mktemp("fake-upstream") / "upstream.log") as url:
        yield url


@pytest.fixture(scope="module")
def module_redis() -> Iterator[RedisServer]:
    """A redis-server for the proxies of one test module."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(
    upstream_url: str, module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    """The proxy with default settings, shared by one test module (tests use prompts of their own)."""
    process = start_proxy(tmp_path_factory.mktemp("proxy"), upstream_url, module_redis.url)
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def _sdk_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The SDK reads these when no argument is given; an exported one would add headers to every request.
    for name in ("OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_BASE_URL", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def client(proxy: ProxyProcess) -> Iterator[openai.OpenAI]:
    # max_retries=0: the SDK retries 5xx and 429 by default, which would skew upstream counts.
    with openai.OpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(proxy: ProxyProcess) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=CLIENT_KEY, max_retries=0) as sdk:
        yield sdk
