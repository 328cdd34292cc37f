"""A minute of mixed load (hits, misses, streams) from tens of clients while Redis is killed and restarted: no
request fails, every answer is right, and memory, file descriptors and asyncio tasks come back to their baseline.

``SOAK_S`` sets the length of the load (default 60 s); the figures are printed (``pytest -s`` shows them)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import openai
import pytest

from tests.e2e.support import CLIENT_KEY, MODEL, ProxyProcess, redis_key_count, start_proxy
from tests.support import RedisServer, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SOAK_S = float(os.environ.get("SOAK_S", "60"))
CLIENTS = 32
CONFIG = "redis:\n  retry_after_s: 0.5\n  timeout_ms: 200\n"
# Allowances for what a long-lived process keeps after warming up: its Redis and upstream pools may keep up to
# one idle socket per concurrent request more than the warm-up left (more on a slow machine, where requests
# overlap longer); a leak would grow with the thousands of requests. The in-process tier, the key memo and
# allocator arenas fill up to their bounds.
FDS_GROWTH_MAX = 2 * CLIENTS
RSS_GROWTH_MAX_MIB = 24


@dataclass
class Tally:
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Usage:
    rss_kib: int
    fds: int
    tasks: int


def usage(proxy: ProxyProcess) -> Usage:
    pid = proxy.process.pid
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return Usage(rss, fds, int(proxy.metric("llm_cache_asyncio_tasks")))


async def one_request(sdk: openai.AsyncOpenAI, rng: random.Random, serial: int, tally: Tally) -> None:
    kind = rng.choice(["hit", "hit", "miss", "stream hit", "stream miss"])
    prompt = f"soak {kind} {rng.randrange(20) if 'hit' in kind else serial}"
    messages = [{"role": "user", "content": prompt}]
    try:
        if kind.startswith("stream"):
            stream = await sdk.chat.completions.create(model=MODEL, messages=messages, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            label = stream.response.headers.get("X-Cache", "")
        else:
            raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
            text, label = raw.parse().choices[0].message.content or "", raw.headers.get("X-Cache", "")
    except openai.OpenAIError as exc:
        tally.failures.append(f"{kind}: {exc!r}")
        return
    finally:
        tally.requests += 1
    tally.labels[label] = tally.labels.get(label, 0) + 1
    if text != f"echo: {prompt}":
        tally.failures.append(f"{kind}: wrong answer {text!r} for {prompt!r}")


async def load(base_url: str, until: float, tally: Tally) -> None:
    async with openai.AsyncOpenAI(base_url=base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30) as sdk:

        async def client(number: int) -> None:
            rng = random.Random(number)
            serial = 0
            while time.monotonic() < until:
                serial += 1
                await one_request(sdk, rng, number * 1_000_000 + serial, tally)

        await asyncio.gather(*(client(n) for n in range(CLIENTS)))


async def soak(proxy: ProxyProcess, redis_server: RedisServer, tally: Tally) -> None:
    started = time.monotonic()
    running = asyncio.create_task(load(proxy.base_url, started + SOAK_S, tally))
    await asyncio.sleep(SOAK_S / 3)
    redis_server.stop()
    await asyncio.sleep(SOAK_S / 6)
    redis_server.start()
    await running


def test_no_request_fails_and_resources_return_when_redis_dies_under_mixed_load(
    upstream_url: str, tmp_path: Path
) -> None:
    with RedisServer() as redis_server:
        proxy = start_proxy(tmp_path, upstream_url, redis_server.url, config=CONFIG)
        try:
            warm = Tally()
            asyncio.run(load(proxy.base_url, time.monotonic() + 3, warm))
            time.sleep(1)
            before = usage(proxy)
            tally = Tally()
            asyncio.run(soak(proxy, redis_server, tally))
            assert eventually(lambda: proxy.metric("llm_cache_flights") == 0, timeout_s=10)
            time.sleep(1)
            after = usage(proxy)
            entries = redis_key_count(redis_server.url)
        finally:
            proxy.stop()
    print(
        f"\nsoak {SOAK_S:g}s, {CLIENTS} clients: {tally.requests} requests, {len(tally.failures)} failures, "
        f"outcomes {tally.labels}; RSS {before.rss_kib // 1024} -> {after.rss_kib // 1024} MiB, "
        f"fds {before.fds} -> {after.fds}, asyncio tasks {before.tasks} -> {after.tasks}; "
        f"{entries} entries in Redis after the restart"
    )
    assert warm.failures == [] and tally.failures == []
    assert tally.requests > CLIENTS * 10 and tally.labels.get("HIT", 0) > 0 and tally.labels.get("MISS", 0) > 0
    assert entries > 0  # caching resumed on the restarted Redis
    assert after.fds <= before.fds + FDS_GROWTH_MAX
    assert after.tasks <= before.tasks + 2
    assert after.rss_kib - before.rss_kib < RSS_GROWTH_MAX_MIB * 1024
