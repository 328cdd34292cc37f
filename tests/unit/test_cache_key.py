"""Cache keys: canonical, namespaced, scoped and free of secrets."""

from __future__ import annotations

import hashlib
import hmac

import orjson
import pytest

from proxy.cache_key import ambiguous, build_key, build_scope, generation_key, parse_key, short_key


def scope(**overrides: str | None) -> str:
    values: dict[str, str | None] = {
        "upstream": "default",
        "query": "",
        "authorization": None,
        "organization": None,
        "project": None,
    }
    values.update(overrides)
    return build_scope(
        b"ns",
        values["upstream"] or "",
        values["query"] or "",
        values["authorization"],
        values["organization"],
        values["project"],
    )


def test_key_has_namespace_version_and_route_when_built() -> None:
    key = build_key("team", "chat/completions", {"model": "m"}, scope())
    prefix, version, route, digest = key.split(":")
    assert (prefix, version, route, len(digest)) == ("team", "v2", "chat/completions", 66)
    assert digest[0] + digest[-1] == "{}"  # a Redis Cluster hash tag
    assert short_key(key) == digest[1:17]


def test_key_keeps_the_v2_format_when_generation_is_zero() -> None:
    body = {"model": "m"}
    assert build_key("ns", "embeddings", body, scope(), generation=0) == build_key("ns", "embeddings", body, scope())
    later = build_key("ns", "embeddings", body, scope(), generation=3)
    assert later.startswith("ns:v2g3:embeddings:{") and short_key(later) == short_key(
        build_key("ns", "embeddings", body, scope())
    )


def test_key_parses_back_to_generation_route_and_digest_when_in_the_namespace() -> None:
    digest = "ab" * 32
    assert parse_key(f"ns:v2:chat/completions:{{{digest}}}", "ns") == (0, "chat/completions", digest)
    assert parse_key(f"ns:v2g12:embeddings:{{{digest}}}", "ns") == (12, "embeddings", digest)
    assert parse_key(f"a:b:v2:embeddings:{{{digest}}}", "a:b") == (0, "embeddings", digest)
    for other in (
        generation_key("ns"),
        f"other:v2:embeddings:{{{digest}}}",
        f"ns:v1:embeddings:{{{digest}}}",
        f"ns:v2g:embeddings:{{{digest}}}",
        f"ns:v2g01:embeddings:{{{digest}}}",
        f"ns:v2g\u00b2:embeddings:{{{digest}}}",
        f"ns:v2:embeddings:{digest}",
        f"ns!v2:embeddings:{{{digest}}}:lease",
    ):
        assert parse_key(other, "ns") is None, other


def test_key_ignores_key_order_when_json_is_equal() -> None:
    a = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    b = {"stream": True, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert build_key("ns", "r", a, scope()) == build_key("ns", "r", b, scope())


def test_key_changes_when_anything_that_matters_changes() -> None:
    body = {"model": "m", "input": "x"}
    keys = {
        build_key("ns", "embeddings", body, scope()),
        build_key("other", "embeddings", body, scope()),
        build_key("ns", "moderations", body, scope()),
        build_key("ns", "embeddings", {**body, "encoding_format": "base64"}, scope()),
        build_key("ns", "embeddings", body, scope(upstream="local")),
        build_key("ns", "embeddings", body, scope(query="api-version=2024-10-21")),
        build_key("ns", "embeddings", body, scope(authorization="Bearer sk-a")),
        build_key("ns", "embeddings", body, scope(organization="org-1")),
        build_key("ns", "embeddings", body, scope(project="proj-1")),
    }
    assert len(keys) == 9


def test_credential_is_not_recoverable_when_it_partitions_the_key() -> None:
    digest = scope(authorization="Bearer sk-very-secret")
    assert "sk-very-secret" not in digest and len(digest) == 64


def test_scope_is_unchanged_when_no_other_header_varies() -> None:
    # Entries stored before OpenAI-Beta and configured headers were keyed stay reachable.
    legacy = hmac.new(b"ns", orjson.dumps(["default", "", "", "org-1", ""]), hashlib.sha256).hexdigest()
    assert scope(organization="org-1") == legacy
    beta = build_scope(b"ns", "default", "", None, "org-1", None, (("OpenAI-Beta", "assistants=v2"),))
    assert beta != legacy


def test_secret_keys_the_digest_when_configured() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "guess me"}]}
    plain = build_key("ns", "chat/completions", body, scope())
    canonical = orjson.dumps(["chat/completions", scope(), body], option=orjson.OPT_SORT_KEYS)
    # Without a secret anyone can confirm a guess; with one, the same guess yields nothing.
    assert plain.endswith(hashlib.sha256(canonical).hexdigest() + "}")
    keyed = build_key("ns", "chat/completions", body, scope(), secret=b"s" * 32)
    assert keyed != plain and not keyed.endswith(hashlib.sha256(canonical).hexdigest() + "}")
    assert keyed == build_key("ns", "chat/completions", body, scope(), secret=b"s" * 32)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"a","model":"b"}',
        b'{"messages":[{"role":"user","role":"system","content":"x"}]}',
        b'{"seed":123456789012345678901234567890}',
        b'{"temperature":0.10000000000000000001}',
        b'{"temperature":1e400}',
        b'{"temperature":1e-400}',
        b"[" * 5000 + b"]" * 5000,
    ],
)
def test_body_is_ambiguous_when_parsers_could_read_it_differently(raw: bytes) -> None:
    assert ambiguous(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.7,"seed":42}',
        b'{"a":{"a":{"a":1}},"n":-9223372036854775808,"f":1.2345678901234567e-300,"z":0.0}',
        rb'{"unicode":"caf\u00e9","e":1E5,"neg":-0}',
    ],
)
def test_body_is_unambiguous_when_every_parser_agrees(raw: bytes) -> None:
    assert not ambiguous(raw)
