"""Properties that must hold for any input: canonical keys, path confinement, header filtering."""

from __future__ import annotations

import json
import posixpath
import random
from typing import Any
from urllib.parse import unquote

import orjson
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from proxy.cache_key import ambiguous
from proxy.config import CacheSettings, Settings, Upstream
from proxy.errors import ProxyError
from proxy.keying import Keyer
from proxy.upstream import HOP_BY_HOP, confined_target, forward_headers

SETTINGS = Settings(upstreams=(Upstream(api_key="sk-up"),), cache=CacheSettings(namespace="ns"))
# Derandomized: the same examples every run, so a pass in CI means what it meant here.
PROPERTY = settings(
    max_examples=400, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
bodies = st.dictionaries(st.text(max_size=8), json_values, max_size=6).map(lambda d: {"model": "m", **d})


def key_of(raw: bytes) -> str | None:
    return Keyer(SETTINGS, enabled=True, memo_max_bytes=1024, secret=None).key("chat/completions", raw, "", {}).key


def reshuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's members in another order."""
    if isinstance(value, dict):
        items = list(value.items())
        rng.shuffle(items)
        return {k: reshuffled(v, rng) for k, v in items}
    if isinstance(value, list):
        return [reshuffled(v, rng) for v in value]
    return value


@PROPERTY
@given(bodies, st.randoms(use_true_random=False), st.sampled_from([None, 0, 2]), st.booleans())
def test_equal_json_gets_one_key_when_order_and_spacing_differ(
    body: dict[str, Any], rng: random.Random, indent: int | None, ascii_only: bool
) -> None:
    compact = orjson.dumps(body)
    other = json.dumps(reshuffled(body, rng), indent=indent, ensure_ascii=ascii_only).encode()
    assert not ambiguous(compact) and not ambiguous(other)
    assert key_of(compact) == key_of(other) is not None


@PROPERTY
@given(bodies, st.text(max_size=8), json_values)
def test_any_change_of_meaning_gets_another_key_when_a_member_changes(
    body: dict[str, Any], name: str, value: Any
) -> None:
    changed = {**body, name: value}
    assume(changed != body or type(body.get(name)) is not type(value))
    assert key_of(orjson.dumps(changed)) != key_of(orjson.dumps(body))


def climbs(path: str) -> bool:
    """Whether *path*, read by any of the normalisations servers apply, leaves ``/v1``."""
    readings = {path, unquote(path), unquote(unquote(path))}
    readings |= {reading.replace("\\", "/") for reading in readings}
    readings |= {"/".join(segment.split(";", 1)[0] for segment in reading.split("/")) for reading in readings}
    return any(not (posixpath.normpath(reading) + "/").startswith("/v1/") for reading in readings)


# Pieces that servers decode, split or resolve differently, combined into segments of one to three pieces.
path_pieces = st.sampled_from(["a", ".", "..", "%2e", "%2E", "%252e", "%5c", "%255c", "\\", ";x", "%2f", "%25"])
path_segments = st.lists(path_pieces, min_size=1, max_size=3).map("".join)
paths = st.lists(path_segments, min_size=1, max_size=4).map("/".join)


@settings(PROPERTY, max_examples=2000)
@given(paths)
def test_admitted_paths_stay_under_v1_when_any_server_normalises_them(rest: str) -> None:
    path = "/v1/" + rest
    try:
        admitted = confined_target(path)
    except ProxyError as refusal:
        assert refusal.status in (400, 404)
        return
    assert admitted == rest
    assert not climbs(path)


header_names = st.sampled_from(
    [*HOP_BY_HOP, "Host", "Content-Length", "Authorization", "X-Custom", "X-Named", "Accept", "OpenAI-Beta"]
)


@PROPERTY
@given(st.dictionaries(header_names, st.text("abc, XNamed-", max_size=12), max_size=8), st.booleans())
def test_forwarded_headers_hold_no_hop_by_hop_field_when_any_are_sent(headers: dict[str, str], keyed: bool) -> None:
    upstream = Upstream(api_key="sk-up" if keyed else None)
    named = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    sent = {name.lower() for name in forward_headers(headers, upstream)}
    assert not sent & (HOP_BY_HOP | named | {"host", "content-length"})
    assert ("authorization" in sent) == (keyed or "Authorization" in headers)


@pytest.mark.parametrize("raw", [b'{"a":1,"a":1}', b'{"x":{"b":2,"b":3}}'])
def test_repeated_members_get_no_key_when_values_even_agree(raw: bytes) -> None:
    assert key_of(raw) is None


number_literals = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.from_regex(r"-?(0|[1-9][0-9]{0,24})(\.[0-9]{1,24})?([eE][-+]?[0-9]{1,3})?", fullmatch=True),
)
string_literals = st.text(max_size=12).map(json.dumps) | st.sampled_from(['"\\""', '"a\\\\"', '"\\":"', '"true e"'])
spaces = st.sampled_from(["", " ", "\n  ", "\t"])


@st.composite
def json_texts(draw: st.DrawFn, depth: int = 0) -> str:
    """JSON text as a client may write it: repeated member names, long or exponent-bearing numbers, escapes and
    arbitrary spacing included."""
    kind = draw(st.sampled_from(["object", "array", "number", "string", "word"] if depth < 3 else ["number", "word"]))
    if kind == "number":
        return draw(number_literals)
    if kind == "string":
        return draw(string_literals)
    if kind == "word":
        return draw(st.sampled_from(["true", "false", "null"]))
    items = draw(st.lists(json_texts(depth + 1), max_size=4))
    gap = draw(spaces)
    if kind == "array":
        return "[" + gap + ("," + gap).join(items) + "]"
    names = draw(st.lists(st.sampled_from(['"a"', '"b"', '"e"', '"\\"q"']), min_size=len(items), max_size=len(items)))
    return "{" + ",".join(f"{gap}{name}{gap}:{gap}{item}" for name, item in zip(names, items, strict=True)) + "}"


@PROPERTY
@given(json_texts())
@example('{"a":1, "a" :2}')
@example("[1e-400]")
@example("100000000000000.001")
@example('{"t":"\\":","t":1}')
def test_ambiguity_is_judged_alike_with_and_without_the_parsed_body(text: str) -> None:
    raw = text.encode()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        assume(False)
    assert ambiguous(raw, parsed) == ambiguous(raw)
