"""Cache keys: canonical, namespaced, scoped and free of secrets."""

from __future__ import annotations

from proxy.cache_key import build_key, build_scope, short_key


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
        "ns",
        values["upstream"] or "",
        values["query"] or "",
        values["authorization"],
        values["organization"],
        values["project"],
    )


def test_key_has_namespace_version_and_route_when_built() -> None:
    key = build_key("team", "chat/completions", {"model": "m"}, scope())
    prefix, version, route, digest = key.split(":")
    assert (prefix, version, route, len(digest)) == ("team", "v1", "chat/completions", 64)
    assert short_key(key) == digest[:16]


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
