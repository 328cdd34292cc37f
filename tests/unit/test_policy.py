"""decide(): cacheable bodies and the request's cache controls."""

from __future__ import annotations

import pytest

from proxy.policy import decide

BODY = {"model": "m", "messages": []}


@pytest.mark.parametrize("route", ["chat/completions", "completions", "embeddings", "moderations", "responses"])
def test_openai_generation_routes_are_cacheable_when_posted(route: str) -> None:
    plan = decide(route, BODY, None, 60)
    assert (plan.lookup, plan.store, plan.ttl_s) == (True, True, 60)


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("chat/completions", None),
        ("chat/completions", [1, 2]),
        ("responses", {"model": "m", "background": True}),
    ],
)
def test_request_bypasses_cache_when_not_cacheable(route: str, body: object) -> None:
    assert not decide(route, body, None, 60).cacheable


@pytest.mark.parametrize(
    ("header", "lookup", "store"),
    [
        ("no-cache", False, True),
        ("no-store", True, False),
        ("No-Cache, No-Store", False, False),
        ("max-age=0", True, True),
        ("private", True, True),
    ],
)
def test_cache_control_changes_plan_when_sent(header: str, lookup: bool, store: bool) -> None:
    plan = decide("chat/completions", BODY, header, 60)
    assert (plan.lookup, plan.store) == (lookup, store)


def test_max_age_is_parsed_when_sent() -> None:
    assert decide("embeddings", BODY, "max-age=30", 60).max_age_s == 30
    assert decide("embeddings", BODY, "max-age=bogus", 60).max_age_s is None


@pytest.mark.parametrize(("value", "ttl", "store"), [("30", 30, True), ("0", 60, False), ("junk", 60, True)])
def test_ttl_header_overrides_default_when_valid(value: str, ttl: int, store: bool) -> None:
    plan = decide("chat/completions", BODY, None, 60, value)
    assert (plan.ttl_s, plan.store) == (ttl, store)
