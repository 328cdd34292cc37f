"""A proxy with PROXY_API_KEYS: the SDK sees OpenAI's 401 for a wrong key and a normal answer for a right one."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.e2e.support import UPSTREAM_KEY, ProxyProcess, chat_kwargs, start_proxy
from tests.support import RedisServer

pytestmark = pytest.mark.e2e

KEYS = ("client-key-one", "client-key-two")


@pytest.fixture(scope="module")
def proxy(
    upstream_url: str, module_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = start_proxy(
        tmp_path_factory.mktemp("keyed-proxy"), upstream_url, module_redis.url, PROXY_API_KEYS=",".join(KEYS)
    )
    yield process
    process.stop()


def _sdk(proxy: ProxyProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.base_url, api_key=key, max_retries=0)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_wrong_key_gets_openai_shaped_401_when_proxy_requires_client_keys(proxy: ProxyProcess, stream: bool) -> None:
    before = proxy.upstream_responses()
    with _sdk(proxy, "sk-not-a-proxy-key") as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk.chat.completions.create(**chat_kwargs("wrong key question"), stream=stream)
    exc = caught.value
    assert exc.status_code == 401
    assert exc.code == "invalid_api_key"
    assert exc.type == "invalid_request_error"
    envelope = exc.response.json()
    assert list(envelope) == ["error"]
    assert set(envelope["error"]) == {"message", "type", "param", "code"}
    assert "sk-not-a-proxy-key" not in exc.response.text
    assert proxy.upstream_responses() == before


async def test_upstream_key_gets_401_when_async_client_offers_it_as_a_client_key(proxy: ProxyProcess) -> None:
    before = proxy.upstream_responses()
    async with openai.AsyncOpenAI(base_url=proxy.base_url, api_key=UPSTREAM_KEY, max_retries=0) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.embeddings.create(model="text-embedding-3-small", input="upstream key as client key")
    assert caught.value.code == "invalid_api_key"
    assert proxy.upstream_responses() == before


def test_right_keys_share_one_entry_when_the_proxy_holds_the_upstream_key(proxy: ProxyProcess) -> None:
    before = proxy.upstream_responses()
    kwargs = chat_kwargs("right key question")
    raws = []
    for key in (KEYS[0], KEYS[0], KEYS[1]):
        with _sdk(proxy, key) as sdk:
            raws.append(sdk.chat.completions.with_raw_response.create(**kwargs))
    assert [raw.headers["X-Cache"] for raw in raws] == ["MISS", "HIT", "HIT"]
    assert len({raw.parse().id for raw in raws}) == 1
    assert raws[0].parse().choices[0].message.content == "echo: right key question"
    assert proxy.upstream_responses() - before == 1
