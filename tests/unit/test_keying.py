"""Keyer: the memo of requests by raw bytes and scope, and the plans it hands out."""

from __future__ import annotations

from dataclasses import replace

import orjson

from proxy.config import CacheSettings, Settings, Upstream
from proxy.keying import Keyer, Memo

SETTINGS = Settings(upstreams=(Upstream(api_key="sk-up"),), cache=CacheSettings(namespace="ns", ttl_s=60))
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})


def keyer(settings: Settings = SETTINGS, *, enabled: bool = True) -> Keyer:
    return Keyer(settings, enabled=enabled, memo_max_bytes=64 * 1024)


def test_memo_empties_itself_when_over_its_byte_bound() -> None:
    memo: Memo[str, int] = Memo(max_bytes=1600)
    for i in range(16):
        memo.put(f"k{i}", 100, i)
    assert len(memo) == 16 and memo.get("k3") == 3
    memo.put("k16", 100, 16)
    assert len(memo) == 1 and memo.get("k3") is None and memo.get("k16") == 16
    memo.put("too-big", 101, 0)  # larger than a sixteenth of the bound: never remembered
    assert memo.get("too-big") is None


def test_repeated_raw_bytes_reuse_the_key_when_headers_match() -> None:
    k = keyer()
    first = k.key("chat/completions", BODY, "", {})
    assert k.key("chat/completions", BODY, "", {}) is first
    assert k.key("chat/completions", BODY, "", {"OpenAI-Project": "p"}) is not first
    assert k.key("embeddings", BODY, "", {}).key != first.key


def test_cache_controls_are_planned_afresh_when_present() -> None:
    k = keyer()
    plain = k.key("chat/completions", BODY, "", {})
    fresh = k.key("chat/completions", BODY, "", {"Cache-Control": "no-cache"})
    assert fresh is not plain and not fresh.plan.lookup and fresh.key == plain.key
    assert k.key("chat/completions", BODY, "", {"X-Cache-TTL": "5"}).plan.ttl_s == 5


def test_scope_is_shared_when_bodies_differ_under_one_credential() -> None:
    k = keyer(replace(SETTINGS, upstreams=(Upstream(),)))
    other = orjson.dumps({"model": "m", "input": "y"})
    a = k.key("chat/completions", BODY, "", {"Authorization": "Bearer sk-a"})
    b = k.key("embeddings", other, "", {"Authorization": "Bearer sk-a"})
    c = k.key("chat/completions", BODY, "", {"Authorization": "Bearer sk-b"})
    assert len({a.key, b.key, c.key}) == 3
    assert len(k._scopes) == 2  # one HMAC per credential, not per request


def test_every_request_bypasses_when_cache_is_off() -> None:
    keyed = keyer(enabled=False).key("chat/completions", BODY, "", {})
    assert keyed.key is None and not keyed.plan.cacheable


def test_invalid_json_bypasses_when_body_does_not_parse() -> None:
    keyed = keyer().key("chat/completions", b"{nope", "", {})
    assert keyed.key is None and keyed.plan.reason == "body"
