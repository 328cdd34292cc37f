"""The operator commands on the cache in Redis: ``ping``, ``inspect`` (and ``--extend``) and ``purge``.

Each returns its exit status: 0 done, 1 a failure it names in one line on stderr (Redis unreachable, no such
entry). They read Redis with ``SCAN`` in batches and never block it."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any

import orjson
from redis.exceptions import RedisError

from .cache_key import generation_key, parse_key
from .config import Settings
from .entry import CacheEntry, EntryFormatError
from .keyspace import Keyspace, Located, Progress, UnknownKey, glob_escape, node_name, opened
from .loader import redact_url
from .seal import ForeignEntryError
from .store import kept_ms

# Rewrites an entry only if it is still the value read: a fresh answer stored meanwhile is left alone.
_REPLACE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end"
UNLINK_BATCH = 500


def run(settings: Settings, command: Callable[[Keyspace], Awaitable[int]], deadline_s: float) -> int:
    """Run *command* on the keyspace of *settings*; Redis trouble is one line on stderr and status 1."""

    async def main() -> int:
        async with opened(settings, deadline_s) as keyspace:
            return await command(keyspace)

    try:
        return asyncio.run(main())
    except (RedisError, OSError, TimeoutError) as exc:
        reason = "no answer within the deadline" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        fail(f"redis unreachable at {where(settings)}: {reason}")
        return 1


def where(settings: Settings) -> str:
    """Redis as the settings name it, without its password."""
    redis_settings = settings.redis
    if redis_settings.mode == "sentinel":
        return f"master {redis_settings.sentinel_master} via sentinels {','.join(redis_settings.sentinels)}"
    if redis_settings.mode == "cluster":
        return f"cluster via {redact_url(redis_settings.url)}"
    return redact_url(redis_settings.url)


def fail(message: str) -> None:
    print(f"llm-cache-proxy: {message}", file=sys.stderr)


async def ping(keyspace: Keyspace) -> int:
    """``PING`` every master twice: the first connects, the second times one round trip."""
    times = []
    for node in keyspace.nodes:
        began = time.perf_counter()
        await keyspace.call(node.ping())
        connected = time.perf_counter()
        await keyspace.call(node.ping())
        done = time.perf_counter()
        name = await keyspace.call(node_name(node))
        times.append(f"{name} {1000 * (done - connected):.2f} ms (connect {1000 * (connected - began):.1f} ms)")
    print(f"redis reachable: {where(keyspace.settings)}: PONG from {', '.join(times)}")
    return 0


async def inspect(keyspace: Keyspace, tag: str, *, extend_s: int | None, as_json: bool) -> int:
    """Print what the entries with ``X-Cache-Key`` *tag* hold; with *extend_s*, first make them fresh that much
    longer."""
    try:
        located = await keyspace.locate(tag)
    except UnknownKey:
        return _unknown(keyspace, tag)
    status = 0
    for found in located:
        raw = await keyspace.read(found.node, found.key)
        if raw is None:
            fail(f"entry {found.key} expired or was removed meanwhile")
            status = 1
            continue
        entry, unreadable = _decoded(keyspace, found.key, raw)
        if extend_s is not None:
            if entry is None:
                fail(f"cannot extend {found.key}: {unreadable}")
                status = 1
            elif (longer := await _extend(keyspace, found, raw, entry, extend_s)) is None:
                status = 1
            else:
                entry = longer
        ttl_ms = await keyspace.call(found.node.pttl(found.key))
        report = describe(found, len(raw), ttl_ms, entry, unreadable, time.time())
        print(orjson.dumps(report).decode() if as_json else render(report))
    return status


def _unknown(keyspace: Keyspace, tag: str) -> int:
    fail(f"no entry with X-Cache-Key {tag} in namespace {', '.join(keyspace.namespaces)}")
    return 1


def _decoded(keyspace: Keyspace, key: str, raw: bytes) -> tuple[CacheEntry | None, str]:
    try:
        return keyspace.codec.decode(key, raw), ""
    except ForeignEntryError as exc:
        return None, f"not readable with this configuration ({exc})"
    except EntryFormatError as exc:
        return None, f"damaged ({exc}); the proxy treats it as a miss"


async def _extend(
    keyspace: Keyspace, found: Located, raw: bytes, entry: CacheEntry, extend_s: int
) -> CacheEntry | None:
    now = time.time()
    longer = replace(entry, expires_at=max(entry.expires_at, now) + extend_s)
    ttl_ms = kept_ms(longer, keyspace.settings.cache.stale_if_error_s, now)
    new = keyspace.codec.encode(found.key, longer)
    replaced = await keyspace.call(found.node.eval(_REPLACE, 1, found.key, raw, new, ttl_ms))
    if not replaced:
        fail(f"{found.key} changed while being extended; left as it is")
        return None
    return longer


def describe(
    found: Located, stored_bytes: int, ttl_ms: int, entry: CacheEntry | None, unreadable: str, now: float
) -> dict[str, Any]:
    """What ``inspect`` shows of one entry, as JSON-ready values."""
    report: dict[str, Any] = {
        "key": found.key,
        "namespace": found.namespace,
        "generation": found.generation,
        "route": found.route,
        "stored_bytes": stored_bytes,
        "ttl_s": round(ttl_ms / 1000, 3) if ttl_ms >= 0 else None,
    }
    if entry is None:
        return report | {"unreadable": unreadable}
    return report | {
        "model": model_of(entry),
        "status": entry.status,
        "stream": entry.is_stream,
        "body_bytes": len(entry.body),
        "age_s": round(now - entry.stored_at, 3),
        "fresh_for_s": round(entry.expires_at - now, 3),
        "usage": dict(entry.usage) if entry.usage else None,
    }


def render(report: Mapping[str, Any]) -> str:
    """*report* as aligned ``name  value`` lines."""
    lines = [f"{name:<13}{_shown(value)}" for name, value in report.items()]
    return "\n".join(lines) + "\n"


def _shown(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={v}" for k, v in value.items() if not isinstance(v, Mapping)) or "-"
    return str(value).lower() if isinstance(value, bool) else str(value)


def model_of(entry: CacheEntry) -> str | None:
    """The model the stored answer names: its JSON body's ``model``, or a stream's first event's."""
    body = entry.body
    if entry.is_stream:
        start = body.find(b"data: {")
        if start < 0:
            return None
        body = body[start + 6 : body.find(b"\n", start)]
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    if model is None and isinstance(parsed, dict) and isinstance(parsed.get("response"), dict):
        model = parsed["response"].get("model")  # the Responses API's stream events
    return model if isinstance(model, str) else None


async def purge_key(keyspace: Keyspace, tag: str) -> int:
    """Remove the entries with ``X-Cache-Key`` *tag*. Redis reports the removal to every replica, which drops
    its in-process copy."""
    try:
        located = await keyspace.locate(tag)
    except UnknownKey:
        return _unknown(keyspace, tag)
    for found in located:
        await keyspace.call(found.node.unlink(found.key))
        print(f"removed {found.key}")
    return 0


async def purge(keyspace: Keyspace, namespace: str) -> int:
    """Start a new generation of *namespace*: from then on no replica finds an earlier entry. Then reclaim the
    earlier entries' memory, in batches."""
    generation = int(await keyspace.call(keyspace.client.incr(generation_key(namespace))))
    print(f"namespace {namespace}: generation {generation - 1} -> {generation}; earlier entries are no longer served")
    progress = Progress()
    reclaimed = scanned = 0
    try:
        for node in keyspace.nodes:
            async for keys in keyspace.scan(node, f"{glob_escape(namespace)}:v2*"):
                scanned += len(keys)
                old = [key for key in keys if (parsed := parse_key(key, namespace)) and parsed[0] < generation]
                reclaimed += await _unlink(keyspace, node, old)
                progress.update(f"reclaiming: {reclaimed} old entries removed of {scanned} keys scanned")
    except (asyncio.CancelledError, RedisError, OSError, TimeoutError):
        progress.done()
        print(
            f"reclaiming stopped after {reclaimed} old entries; the rest are never served and expire with their TTL",
            file=sys.stderr,
        )
        raise
    progress.done()
    print(f"reclaimed {reclaimed} old entries ({scanned} keys scanned)")
    return 0


async def _unlink(keyspace: Keyspace, node: Any, keys: list[str]) -> int:
    for start in range(0, len(keys), UNLINK_BATCH):
        async with node.pipeline(transaction=False) as pipe:
            for key in keys[start : start + UNLINK_BATCH]:
                pipe.unlink(key)
            await keyspace.call(pipe.execute())
    return len(keys)
