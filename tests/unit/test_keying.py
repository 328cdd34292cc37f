"""Keyer: the memo of requests by raw bytes and scope, and the plans it hands out."""

from __future__ import annotations

from dataclasses import replace

import orjson

from proxy.config import CacheSettings, Settings, Upstream
from proxy.keying import Keyer, Memo
from proxy.kinds import ClientKey

SETTINGS = Settings(upstreams=(Upstream(api_key="sk-up"),), cache=CacheSettings(namespace="ns", ttl_s=60))
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]})


def keyer(settings: Settings = SETTINGS, *, enabled: bool = True) -> Keyer:
    return Keyer(settings, enabled=enabled, memo_max_bytes=64 * 1024, secret=None)


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


def test_client_keys_get_their_own_entries_when_sharing_is_off() -> None:
    alice, bob = ClientKey.from_key("alice", "key-a"), ClientKey.from_key("bob", "key-b")
    k = keyer()
    keys = [k.key("chat/completions", BODY, "", {}, client).key for client in (alice, bob, alice)]
    assert keys[0] != keys[1] and keys[0] == keys[2]
    shared = keyer(replace(SETTINGS, cache=replace(SETTINGS.cache, share_across_keys=True)))
    assert (
        shared.key("chat/completions", BODY, "", {}, alice).key == shared.key("chat/completions", BODY, "", {}, bob).key
    )


def test_client_namespace_prefixes_its_entries_when_configured() -> None:
    team = ClientKey.from_key("team", "key-t", namespace="team-ns")
    keyed = keyer().key("chat/completions", BODY, "", {}, team)
    assert keyed.key is not None and keyed.key.startswith("team-ns:v2:chat/completions:")


def test_beta_and_configured_headers_split_entries_when_sent() -> None:
    k = keyer(replace(SETTINGS, cache=replace(SETTINGS.cache, vary_headers=("X-Model-Version",))))
    keys = {
        k.key("chat/completions", BODY, "", headers).key
        for headers in ({}, {"OpenAI-Beta": "assistants=v2"}, {"X-Model-Version": "2"}, {"X-Other": "1"})
    }
    assert len(keys) == 3  # X-Other changes nothing


def test_ambiguous_body_bypasses_when_a_key_repeats() -> None:
    keyed = keyer().key("chat/completions", b'{"model":"a","messages":[],"model":"b"}', "", {})
    assert keyed.key is None and keyed.plan.reason == "ambiguous"


def test_secret_changes_every_key_when_set() -> None:
    plain = keyer().key("chat/completions", BODY, "", {})
    secret = Keyer(SETTINGS, enabled=True, memo_max_bytes=1024, secret=b"k" * 32).key("chat/completions", BODY, "", {})
    assert plain.key != secret.key


def test_derived_key_equals_the_memoised_one_when_computed_apart() -> None:
    big = orjson.dumps({"model": "m", "input": ["x" * 1000] * 300})
    alice = ClientKey.from_key("alice", "key-a")
    assert keyer().derive("embeddings", big, "", {}, alice).key == keyer().key("embeddings", big, "", {}, alice).key


def test_keys_move_to_the_new_generation_and_memo_empties_when_switched() -> None:
    k = keyer()
    before = k.key("chat/completions", BODY, "", {})
    assert not k.switch_generation("ns", 0)
    assert k.switch_generation("ns", 2) and k.generation("ns") == 2
    after = k.key("chat/completions", BODY, "", {})
    assert before.key is not None and before.key.startswith("ns:v2:")
    assert after.key == before.key.replace("ns:v2:", "ns:v2g2:", 1) and after.tag == before.tag
    assert k.key("chat/completions", BODY, "", {}) is after
