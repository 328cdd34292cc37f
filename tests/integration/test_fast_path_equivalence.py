"""The fast site and aiohttp's own site of one application answer every request with the same bytes (but ``Date``),
keep and close connections alike, count and log alike, and shut down alike. Which class serves the fast side is
chosen in :mod:`tests.integration.equivalence`."""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.config import Settings
from proxy.kinds import ClientKey
from proxy.memory import MemoryStore, TieredStore
from proxy.state import SETTINGS, STORE
from tests.fakes.upstream import create_fake_upstream
from tests.integration.equivalence import (
    FAST_SITE,
    PLAIN_SITE,
    Answer,
    Masks,
    Sites,
    Step,
    Transcript,
    chunked,
    differences,
    hang_up,
    only_age_differs,
    play,
    play_on,
    read_answer,
    request,
    serve,
)
from tests.support import make_settings, metric, received

pytestmark = pytest.mark.integration

TEAM_KEY = "ck-team-a-0123456789"
ORIGIN = "https://app.example.com"
PROFILES: dict[str, dict[str, Any]] = {
    "open": {},
    "keys": {"client_keys": (ClientKey.from_key("team-a", TEAM_KEY),)},
    "origins": {"allowed_origins": (ORIGIN,)},
}
MAX_BODY_BYTES = 64 * 1024
SLOW_S = 0.5

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
OTHER = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"another"}]}'
FRESH = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"fresh"}]}'
STREAM = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"stream me"}]}'
EMBED = b'{"model":"text-embedding-3-small","input":["one","two"]}'
CHAT_PATH, EMBED_PATH = "/v1/chat/completions", "/v1/embeddings"


def post(body: bytes = CHAT, *headers: str, target: str = CHAT_PATH, rid: str | None = "eq-1", **kw: Any) -> bytes:
    """A JSON POST with an explicit request id (so both sides echo the same one) unless *rid* is ``None``."""
    lines = ("Content-Type: application/json", *([f"X-Request-ID: {rid}"] if rid else []), *headers)
    return request("POST", target, *lines, body=body, **kw)


def keyed(body: bytes = CHAT, *headers: str, **kw: Any) -> bytes:
    return post(body, f"Authorization: Bearer {TEAM_KEY}", *headers, **kw)


def head_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class Case:
    """Requests written as *steps*, the status and ``X-Cache`` each answer must have, and how the connection
    must end. *warm* requests go to the plain side first, so that the entries a hit needs exist."""

    steps: tuple[Step, ...]
    expect: tuple[str, ...]
    end: str = "open"
    warm: tuple[bytes, ...] = ()
    profile: str = "open"
    head_only: bool = False
    masks: Masks = field(default_factory=Masks)
    request_ids: tuple[str, ...] = ()


def one(raw: bytes, *expect: str, **kw: Any) -> Case:
    return Case((Step(raw, len(expect)),), expect, **kw)


def hit(raw: bytes, **kw: Any) -> Case:
    """One request that must be a hit on the entry of :func:`post`'s default request."""
    return one(raw, "200 HIT", warm=(post(),), **kw)


def refused(raw: bytes, status: str = "400", end: str = "closed", **kw: Any) -> Case:
    """One request that must be refused though the entry it would hit is there."""
    return one(raw, status, end=end, warm=(post(),), **kw)


COMPLETION = b'{"model":"gpt-3.5-turbo-instruct","prompt":"say hi"}'
RESPONSE = b'{"model":"gpt-4o-mini","input":"say hi"}'
VERSIONED = f"{CHAT_PATH}?api-version=2024-06-01"

CASES: dict[str, Case] = {
    # What the cache answers.
    "chat-hit": hit(post()),
    "streamed-hit": one(post(STREAM), "200 HIT", warm=(post(STREAM),)),
    "embeddings-hit": one(post(EMBED, target=EMBED_PATH), "200 HIT", warm=(post(EMBED, target=EMBED_PATH),)),
    "completions-hit": one(
        post(COMPLETION, target="/v1/completions"), "200 HIT", warm=(post(COMPLETION, target="/v1/completions"),)
    ),
    "responses-hit": one(
        post(RESPONSE, target="/v1/responses"), "200 HIT", warm=(post(RESPONSE, target="/v1/responses"),)
    ),
    "miss": one(post(FRESH), "200 MISS"),
    "no-cache": one(post(CHAT, "Cache-Control: no-cache"), "200 MISS", warm=(post(),)),
    "no-store": hit(post(CHAT, "Cache-Control: no-store")),
    "max-age-zero": one(post(CHAT, "Cache-Control: max-age=0"), "200 MISS", warm=(post(),)),
    "ttl-header-hit": hit(post(CHAT, "X-Cache-TTL: 5")),
    "ttl-header-miss": one(post(FRESH, "X-Cache-TTL: 5"), "200 MISS"),
    "ttl-header-zero": one(post(FRESH, "X-Cache-TTL: 0"), "200 BYPASS"),
    "query-string": one(post(target=VERSIONED), "200 HIT", warm=(post(target=VERSIONED),)),
    "empty-query-string": hit(post(target=f"{CHAT_PATH}?")),
    "fragment-in-target": hit(post(target=f"{CHAT_PATH}#part")),
    "request-id-echoed": hit(post(rid="client-id.42:x"), request_ids=("client-id.42:x",)),
    "request-id-replaced": hit(post(rid="not a valid id"), request_ids=("<generated>",)),
    "request-id-generated": hit(post(rid=None), request_ids=("<generated>",)),
    "text-plain-content-type": hit(
        request("POST", CHAT_PATH, "Content-Type: text/plain", "X-Request-ID: eq-1", body=CHAT)
    ),
    "no-content-type": hit(request("POST", CHAT_PATH, "X-Request-ID: eq-1", body=CHAT)),
    "lower-case-header-names": hit(
        request("POST", CHAT_PATH, "x-request-id: eq-1", f"content-length: {len(CHAT)}", body=CHAT, length=False)
    ),
    "accept-encoding-gzip": hit(post(CHAT, "Accept-Encoding: gzip")),
    # Connections: versions, keep-alive, pipelining, requests in pieces.
    "http10": hit(post(version="1.0"), end="closed"),
    "http10-keep-alive": hit(post(CHAT, "Connection: keep-alive", version="1.0")),
    "http10-keep-alive-and-close": hit(post(CHAT, "Connection: keep-alive, close", version="1.0")),
    "http10-without-host": hit(post(version="1.0", host=None), end="closed"),
    "http11-close": hit(post(CHAT, "Connection: close"), end="closed"),
    "http11-close-upper-case": hit(post(CHAT, "Connection: CLOSE"), end="closed"),
    "keep-alive-reuse": Case(
        (Step(post(), 1), Step(post(OTHER, rid="eq-2"), 1), Step(post(FRESH, rid="eq-3"), 1), Step(post(), 1)),
        ("200 HIT", "200 HIT", "200 MISS", "200 HIT"),
        warm=(post(), post(OTHER)),
    ),
    "pipelined": Case(
        (Step(post() + post(rid="eq-2") + post(FRESH, rid="eq-3") + post(OTHER, rid="eq-4"), 4),),
        ("200 HIT", "200 HIT", "200 MISS", "200 HIT"),
        warm=(post(), post(OTHER)),
    ),
    # Parsed in one read, a request followed by bytes the parser refuses is not answered: only the refusal is.
    "pipelined-after-close": refused(post(CHAT, "Connection: close") + post()),
    "pipelined-before-garbage": refused(post() + b"GARBAGE\r\n\r\n"),
    "body-longer-than-length": refused(post(CHAT, f"Content-Length: {len(CHAT) - 5}", length=False)),
    "close-then-more-later": Case(
        (Step(post(CHAT, "Connection: close"), 1), Step(post(), 1, pause_s=0.05)),
        ("200 HIT",),
        end="closed",
        warm=(post(),),
    ),
    "body-after-headers": Case((Step(head_of(post())), Step(CHAT, 1, pause_s=0.05)), ("200 HIT",), warm=(post(),)),
    "headers-split-mid-line": Case(
        (Step(post()[:40]), Step(post()[40:], 1, pause_s=0.05)), ("200 HIT",), warm=(post(),)
    ),
    "expect-100-continue": Case(
        (Step(head_of(post(CHAT, "Expect: 100-continue")), 1), Step(CHAT, 1)), ("100", "200 HIT"), warm=(post(),)
    ),
    "expect-100-body-at-once": one(post(CHAT, "Expect: 100-continue"), "100", "200 HIT", warm=(post(),)),
    "upgrade-websocket": hit(post(CHAT, "Connection: Upgrade", "Upgrade: websocket")),
    "upgrade-h2c": hit(post(CHAT, "Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAA")),
    "http2-preface": refused(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    "http12": refused(post(version="1.2")),
    "request-line-without-version": refused(b"GET /healthz\r\n\r\n", "200"),
    # Framing.
    "chunked-body": hit(post(chunked(CHAT, 16), "Transfer-Encoding: chunked", length=False)),
    "chunked-upper-case": hit(post(chunked(CHAT, 16), "Transfer-Encoding: CHUNKED", length=False)),
    "chunk-extension": hit(
        post(chunked(CHAT, 16).replace(b"10\r\n", b"10;ext=1\r\n", 1), "Transfer-Encoding: chunked", length=False)
    ),
    "chunked-trailer": hit(
        post(chunked(CHAT, 16)[:-2] + b"X-Trailer: 1\r\n\r\n", "Transfer-Encoding: chunked", length=False)
    ),
    # aiohttp reads the body as chunked and takes the gzip coding for granted.
    "transfer-coding-list": hit(post(chunked(CHAT, 16), "Transfer-Encoding: gzip, chunked", length=False)),
    "chunked-not-last": refused(post(chunked(CHAT, 16), "Transfer-Encoding: chunked, gzip", length=False)),
    "chunked-twice": refused(
        post(chunked(CHAT, 16), "Transfer-Encoding: chunked", "Transfer-Encoding: chunked", length=False)
    ),
    "chunk-size-invalid": refused(post(b"zz\r\n" + chunked(CHAT, 16), "Transfer-Encoding: chunked", length=False)),
    "content-length-twice-equal": refused(post(CHAT, f"Content-Length: {len(CHAT)}")),
    "content-length-twice-different": refused(post(CHAT, "Content-Length: 3")),
    "content-length-list": refused(post(CHAT, f"Content-Length: {len(CHAT)}, {len(CHAT)}", length=False)),
    "content-length-signed": refused(post(CHAT, f"Content-Length: +{len(CHAT)}", length=False)),
    "content-length-leading-zero": hit(post(CHAT, f"Content-Length: 0{len(CHAT)}", length=False)),
    "content-length-and-chunked": refused(post(chunked(CHAT, 16), "Transfer-Encoding: chunked")),
    # Header syntax.
    "obs-fold": refused(post(CHAT, "X-Folded: one,\r\n two")),
    "bare-lf": refused(post().replace(b"\r\n", b"\n")),
    "control-char-in-header": refused(post(CHAT, "X-Note: a\x01b")),
    "tab-in-header": hit(post(CHAT, "X-Note: a\tb")),
    "latin-1-in-header": hit(post(CHAT, "X-Note: caf\xe9")),
    "space-before-colon": refused(post(CHAT, f"Content-Length : {len(CHAT)}", length=False)),
    "host-twice": refused(post(CHAT, "Host: 127.0.0.1")),
    "header-too-long": refused(post(CHAT, "X-Long: " + "a" * 9000)),
    "too-many-headers": refused(post(CHAT, *(f"X-H{i}: v" for i in range(200)))),
    # Methods and targets.
    "lowercase-method": refused(post().replace(b"POST", b"post", 1)),
    "head": one(request("HEAD", CHAT_PATH, "X-Request-ID: eq-1"), "200 BYPASS", warm=(post(),), head_only=True),
    "get-cacheable-route": one(request("GET", CHAT_PATH, "X-Request-ID: eq-1"), "200 BYPASS", warm=(post(),)),
    "options-asterisk": refused(request("OPTIONS", "*"), "404", "open"),
    "connect": refused(request("CONNECT", "127.0.0.1:443"), "405", "open"),
    "absolute-form": hit(post(target=f"http://127.0.0.1{CHAT_PATH}")),
    "absolute-form-other-host": refused(post(target=f"http://evil.example{CHAT_PATH}"), "421", "open"),
    "encoded-slash": one(post(target="/v1/chat%2Fcompletions"), "200 BYPASS", warm=(post(),)),
    "encoded-letter": hit(post(target="/v1/%63hat/completions")),
    "encoded-nul": refused(post(target=f"{CHAT_PATH}%00"), "400", "open"),
    "double-slash": refused(post(target="/v1//chat/completions"), "400", "open"),
    "dot-segment": refused(post(target="/v1/./chat/completions"), "404", "open"),
    "trailing-slash": one(post(target=f"{CHAT_PATH}/"), "200 BYPASS", warm=(post(),)),
    "path-parameter": one(post(target=f"{CHAT_PATH};x"), "200 BYPASS", warm=(post(),)),
    "upper-case-prefix": refused(post(target="/V1/chat/completions"), "404", "open"),
    "space-in-target": refused(post(target=f"{CHAT_PATH} x")),
    "unknown-v1-path": one(request("GET", "/v1/models", "X-Request-ID: eq-1"), "200 BYPASS"),
    "post-unknown-v1-path": one(post(target="/v1/files"), "200 BYPASS"),
    "healthz": one(request("GET", "/healthz"), "200"),
    # A live reading, different on each scrape.
    "metrics": one(request("GET", "/metrics"), "200", masks=Masks(volatile_body=True)),
    "not-found": one(request("GET", "/nope"), "404"),
    # Bodies.
    "body-too-large": refused(post(b"x" * (MAX_BODY_BYTES + 1)), "413", "open"),
    "chunked-body-too-large": refused(
        post(chunked(b"x" * (MAX_BODY_BYTES + 1), 8192), "Transfer-Encoding: chunked", length=False), "413", "open"
    ),
    "malformed-json": one(post(b'{"model":'), "400 BYPASS"),
    "empty-body": one(post(b"", "Content-Length: 0"), "400 BYPASS"),
    # Who may call.
    "client-key-hit": one(keyed(), "200 HIT", warm=(keyed(),), profile="keys"),
    "client-key-in-api-key-header": one(post(CHAT, f"api-key: {TEAM_KEY}"), "200 HIT", warm=(keyed(),), profile="keys"),
    "client-key-missing": one(post(), "401", warm=(keyed(),), profile="keys"),
    "client-key-wrong": one(post(CHAT, "Authorization: Bearer ck-wrong"), "401", warm=(keyed(),), profile="keys"),
    "host-refused": refused(post(host="evil.example"), "403", "open"),
    "origin-refused": refused(post(CHAT, "Origin: https://evil.example"), "403", "open"),
    "cross-site-fetch": refused(post(CHAT, "Sec-Fetch-Site: cross-site"), "403", "open"),
    "allowed-origin-hit": hit(post(CHAT, f"Origin: {ORIGIN}"), profile="origins"),
    "allowed-origin-preflight": one(
        request("OPTIONS", CHAT_PATH, f"Origin: {ORIGIN}", "Access-Control-Request-Method: POST"),
        "204",
        profile="origins",
    ),
}
# The same requests, each on a connection of its own, for the counters and log lines each side leaves.
AUTH = f"Authorization: Bearer {TEAM_KEY}"
SCRIPT: tuple[bytes, ...] = (
    keyed(rid="s1"),
    keyed(rid="s2"),
    keyed(STREAM, rid="s3"),
    keyed(STREAM, rid="s4"),
    keyed(EMBED, target=EMBED_PATH, rid="s5"),
    keyed(EMBED, target=EMBED_PATH, rid="s6"),
    keyed(chunked(OTHER, 16), "Transfer-Encoding: chunked", length=False, rid="s7"),
    keyed(OTHER, rid="s8"),
    keyed(CHAT, "Cache-Control: no-cache", rid="s9"),
    keyed(b'{"model":', rid="s10"),
    keyed(b"x" * (MAX_BODY_BYTES + 1), rid="s11"),
    post(rid="s12"),
    keyed(host="evil.example", rid="s13"),
    keyed(target="/v1/chat%2Fcompletions", rid="s14"),
    request("GET", "/v1/models", AUTH, "X-Request-ID: s15"),
    request("HEAD", CHAT_PATH, AUTH, "X-Request-ID: s16"),
    request("GET", "/nope"),
    request("GET", "/healthz"),
    keyed(rid="s17") + keyed(OTHER, rid="s18") + keyed(STREAM, rid="s19"),
    keyed(rid=None),
)
# Observations made by the clock (Redis round trips of background work), not by requests.
CLOCK_DRIVEN = frozenset({"llm_cache_redis_operation_duration_seconds"})


@pytest.fixture
async def upstream(aiohttp_server: Any) -> TestServer:
    """The fake upstream, answering the same request with the same bytes every time."""
    server: TestServer = await aiohttp_server(create_fake_upstream(SLOW_S, repeatable=True))
    return server


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The cache backend's settings: in this process, or a real redis-server on a free port."""
    if request.param == "memory":
        return {"backend": "memory"}
    return {"backend": "redis", "url": request.getfixturevalue("redis_url")}


@pytest.fixture
def proxy_settings(
    upstream: TestServer, backend: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> Callable[..., Settings]:
    """``proxy_settings(profile, **overrides)``: settings of a proxy bound to 127.0.0.1 (so the Host screen is
    on), in front of the repeatable upstream, writing request lines as JSON."""
    caplog.set_level("INFO", logger="proxy.access")

    def build(profile: str = "open", **overrides: Any) -> Settings:
        values: dict[str, Any] = {"max_body_bytes": MAX_BODY_BYTES, "client_timeout_s": 2.0, "shutdown_grace_s": 5.0}
        values |= {"log_format": "json", "log_level": "INFO", **backend, **PROFILES[profile], **overrides}
        return make_settings(str(upstream.make_url("/v1")), **values)

    return build


async def settle(sites: Sites) -> None:
    """Wait until every entry written so far is in Redis too."""
    store = sites.app[STORE]
    if isinstance(store, TieredStore):
        await store.remote.drain()


async def forget_entries(sites: Sites) -> None:
    """Empty the cache, so that a side finds only what was warmed for it."""
    store = sites.app[STORE]
    if isinstance(store, TieredStore):
        await store.remote.drain()
        async with redis.Redis.from_url(sites.app[SETTINGS].redis.url) as conn:
            await conn.flushdb()
        store.memory.clear()
    elif isinstance(store, MemoryStore):
        store.clear()


async def run_side(sites: Sites, case: Case, side: str) -> Transcript:
    await forget_entries(sites)
    for raw in case.warm:
        warmed = await play(sites.ports["plain"], [Step(raw, 1)])
        assert [answer.status for answer in warmed.answers] == [200], warmed
    await settle(sites)
    transcript = await play(sites.ports[side], case.steps, head_only=case.head_only)
    await settle(sites)
    return transcript


def outcomes(transcript: Transcript) -> list[str]:
    return [f"{answer.status} {answer.header('X-Cache') or ''}".strip() for answer in transcript.answers]


GENERATED = "<generated>"


def request_ids(transcript: Transcript) -> list[str | None]:
    ids = [answer.header("X-Request-ID") for answer in transcript.answers]
    return [GENERATED if i and re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", i) else i for i in ids]


@pytest.mark.parametrize("name", CASES)
async def test_both_sides_send_the_same_bytes_when_sent_the_same_request(
    name: str, proxy_settings: Callable[..., Settings]
) -> None:
    case = CASES[name]
    async with serve(create_app(proxy_settings(case.profile), log_stream=io.StringIO())) as sites:
        fast, plain = await run_side(sites, case, "fast"), await run_side(sites, case, "plain")
        if only_age_differs(fast, plain, case.masks):
            # Age counts whole seconds since the entry was stored: a pause of the machine between warming and
            # asking makes it 1 on one side. Twice in a row would be a real difference.
            fast, plain = await run_side(sites, case, "fast"), await run_side(sites, case, "plain")
    diff = differences(fast, plain, case.masks)
    assert not diff, "\n".join(diff)
    assert outcomes(fast) == list(case.expect)
    assert fast.end == case.end
    if case.request_ids:
        assert request_ids(fast) == request_ids(plain) == list(case.request_ids)


SECRET = "sk-live-0123456789abcdef"
MALFORMED = {
    "control-byte-in-value": f"Authorization: Bearer {SECRET}\x01",
    "bare-lf-before-it": f"X-Note: a\nAuthorization: Bearer {SECRET}",
    "space-before-colon": f"Authorization : Bearer {SECRET}",
}


@pytest.mark.parametrize("name", MALFORMED)
async def test_malformed_request_gets_an_openai_error_quoting_nothing_when_the_parser_refuses_it(
    name: str, proxy_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    raw = request("POST", CHAT_PATH, MALFORMED[name], "Content-Type: application/json", body=b"{}")
    async with serve(create_app(proxy_settings(), log_stream=io.StringIO())) as sites:
        for side in ("fast", "plain"):
            transcript = await play(sites.ports[side], [Step(raw, 1)])
            (answer,) = transcript.answers
            assert answer.status == 400, side
            assert answer.header("Content-Type") == "application/json"
            error = json.loads(answer.body)["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "malformed_request"
            assert error["message"].startswith("The request is not valid HTTP/1.1")
            assert SECRET not in (answer.head + answer.body).decode("latin-1")
            assert transcript.end == "closed"
    assert SECRET not in caplog.text
    assert "malformed request refused" in caplog.text


def count_requests(raw: bytes) -> int:
    return raw.count(b" HTTP/1.1\r\n") + raw.count(b" HTTP/1.0\r\n")


async def run_script(settings: Settings, side: str) -> tuple[str, list[dict[str, Any]]]:
    """:data:`SCRIPT` against a fresh app served by *side* alone: its metrics afterwards and its request lines."""
    lines = io.StringIO()
    factory = FAST_SITE if side == "fast" else PLAIN_SITE
    async with serve(create_app(settings, log_stream=lines), {side: factory}) as sites:
        await forget_entries(sites)
        for raw in SCRIPT:
            await play(sites.ports[side], [Step(raw, count_requests(raw))], head_only=raw.startswith(b"HEAD "))
            await settle(sites)
        scraped = await play(sites.ports[side], [Step(request("GET", "/metrics"), 1)])
    return scraped.answers[0].body.decode(), [json.loads(line) for line in lines.getvalue().splitlines()]


def counted(exposition: str) -> dict[tuple[Any, ...], float]:
    """Every counter sample, and how many observations each histogram holds: what requests move, not how long
    they took."""
    samples: dict[tuple[Any, ...], float] = {}
    for family in text_string_to_metric_families(exposition):
        if family.name in CLOCK_DRIVEN:
            continue
        for sample in family.samples:
            if family.type == "counter" or sample.name.endswith("_count"):
                samples[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return samples


def loggable(line: dict[str, Any]) -> dict[str, Any]:
    """A request line without its clock readings (but whether a first byte was marked), its generated id masked."""
    kept = {k: v for k, v in line.items() if k not in ("time", "duration_ms", "first_byte_ms")}
    kept["first_byte"] = line["first_byte_ms"] is not None
    if re.fullmatch(r"[0-9a-f]{12}-[0-9a-f]+", line["request_id"]):
        kept["request_id"] = GENERATED
    return kept


async def test_both_sides_count_and_log_alike_when_sent_the_same_requests(
    proxy_settings: Callable[..., Settings],
) -> None:
    settings = proxy_settings("keys")
    fast_metrics, fast_lines = await run_script(settings, "fast")
    plain_metrics, plain_lines = await run_script(settings, "plain")
    assert counted(fast_metrics) == counted(plain_metrics)
    assert [loggable(line) for line in fast_lines] == [loggable(line) for line in plain_lines]
    assert metric(plain_metrics, "llm_cache_requests_total", outcome="HIT") == 8
    assert metric(plain_metrics, "llm_cache_client_requests_total", client="team-a") == 18
    assert len(plain_lines) == sum(1 for raw in SCRIPT for _ in range(count_requests(raw))) - 2


@asynccontextmanager
async def connection(
    port: int, *, receive_buffer: int | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A raw connection to *port*; *receive_buffer* pins the socket's receive buffer (no autotuning)."""
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        await hang_up(writer)


async def closed_after(reader: asyncio.StreamReader, since: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed, in seconds after *since*."""
    async with asyncio.timeout(5):
        got = await reader.read()
    return got, time.monotonic() - since


@pytest.mark.parametrize("side", ["fast", "plain"])
async def test_idle_connection_is_closed_when_idle_past_the_client_timeout(
    side: str, proxy_settings: Callable[..., Settings]
) -> None:
    async with serve(create_app(proxy_settings(client_timeout_s=0.5), log_stream=io.StringIO())) as sites:
        port = sites.ports[side]
        async with connection(port) as (silent, _), connection(port) as (used, writer):
            opened = time.monotonic()
            writer.write(post(FRESH))
            answer = await read_answer(used)
            answered = time.monotonic()
            assert answer is not None and answer.status == 200
            (never_sent, silent_after), (after_answer, used_after) = await asyncio.gather(
                closed_after(silent, opened), closed_after(used, answered)
            )
    assert never_sent == after_answer == b""
    assert 0.4 < silent_after < 1.5 and 0.4 < used_after < 1.5


async def test_stalled_request_is_refused_alike_when_a_client_stops_halfway(
    proxy_settings: Callable[..., Settings],
) -> None:
    async with serve(create_app(proxy_settings(client_timeout_s=0.5), log_stream=io.StringIO())) as sites:

        async def half_head(side: str) -> tuple[bytes, float]:
            async with connection(sites.ports[side]) as (reader, writer):
                writer.write(post()[:40])
                return await closed_after(reader, time.monotonic())

        async def half_body(side: str) -> tuple[Transcript, float]:
            began = time.monotonic()
            # The rest of the body comes after the refusal: aiohttp reads and drops what is left of a refused
            # body for up to 10 s before it reuses or closes the connection.
            steps = [Step(post()[:-10], 1), Step(post()[-10:])]
            return await play(sites.ports[side], steps), time.monotonic() - began

        (fast_head, plain_head), (fast_body, plain_body) = await asyncio.gather(
            asyncio.gather(half_head("fast"), half_head("plain")),
            asyncio.gather(half_body("fast"), half_body("plain")),
        )
    assert fast_head[0] == plain_head[0] == b""
    assert differences(fast_body[0], plain_body[0]) == []
    assert outcomes(fast_body[0]) == ["408"] and fast_body[0].end == "open"
    assert all(0.4 < took_s < 1.5 for took_s in (fast_head[1], plain_head[1], fast_body[1], plain_body[1]))


def embeddings_of(count: int) -> bytes:
    return json.dumps({"model": "text-embedding-3-small", "input": [f"w{i}" for i in range(count)]}).encode()


@pytest.mark.parametrize("side", ["fast", "plain"])
async def test_server_stops_answering_ahead_when_the_client_stops_reading(
    side: str, proxy_settings: Callable[..., Settings]
) -> None:
    big = embeddings_of(1500)  # about 10 KiB asked, 160 KiB answered
    pipelined = 96
    async with serve(create_app(proxy_settings(), log_stream=io.StringIO())) as sites:
        warmed = await play(sites.ports["plain"], [Step(post(big, target=EMBED_PATH), 1)])
        assert outcomes(warmed) == ["200 MISS"]
        await settle(sites)
        async with connection(sites.ports[side], receive_buffer=16384) as (reader, writer):
            writer.write(post(big, target=EMBED_PATH) * pipelined)
            answered = await steady_hits(sites)
            # Several MiB at most fit in the socket buffers; the rest must wait for the client.
            assert answered < pipelined / 2
            async with asyncio.timeout(10):
                answers = [await read_answer(reader) for _ in range(pipelined)]
            after = await play_on(reader, writer, [])
    assert {(a.status, a.header("X-Cache"), a.body) for a in answers if a is not None} == {
        (200, "HIT", warmed.answers[0].body)
    }
    assert len(answers) == pipelined and after.end == "open"


async def steady_hits(sites: Sites) -> float:
    """The hits served so far, once that number has stopped changing for 300 ms."""
    seen: list[float] = []
    while len(seen) < 4 or len(set(seen[-4:])) > 1:
        await asyncio.sleep(0.1)
        scraped = await play(sites.ports["plain"], [Step(request("GET", "/metrics"), 1)])
        seen.append(metric(scraped.answers[0].body.decode(), "llm_cache_requests_total", outcome="HIT"))
        assert len(seen) < 50, seen
    return seen[-1]


async def test_requests_in_flight_finish_and_idle_connections_close_when_the_proxy_shuts_down(
    upstream: TestServer, proxy_settings: Callable[..., Settings]
) -> None:
    async with serve(create_app(proxy_settings(), log_stream=io.StringIO())) as sites:
        idle = {}
        for side, port in sites.ports.items():
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request("GET", "/healthz"))
            assert (await read_answer(reader)) is not None
            idle[side] = (reader, writer)
        slow = {
            side: asyncio.create_task(play(port, [Step(post(FRESH.replace(b"fresh", f"slow {side}".encode())), 1)]))
            for side, port in sites.ports.items()
        }
        for _ in range(500):
            if len(received(upstream)) == len(slow):
                break
            await asyncio.sleep(0.01)
        began = time.monotonic()
        shutting_down = asyncio.create_task(sites.close())
        idle_ended = await asyncio.gather(*(closed_after(reader, began) for reader, _ in idle.values()))
        finished = {side: await task for side, task in slow.items()}
        await shutting_down
        took_s = time.monotonic() - began
        for port in sites.ports.values():
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", port)
        for _, writer in idle.values():
            await hang_up(writer)
    assert all(got == b"" and after_s < SLOW_S / 2 for got, after_s in idle_ended)
    for side, transcript in finished.items():
        assert outcomes(transcript) == ["200 MISS"] and transcript.end == "closed"
        assert json.loads(transcript.answers[0].body)["choices"][0]["message"]["content"] == f"echo: slow {side}"
    assert took_s < 5.0


SAMPLE = Answer(
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"X-Request-ID: 0123456789ab-1f\r\nX-Cache: HIT\r\nAge: 3\r\nContent-Length: 11\r\n\r\n",
    b'{"ok":true}',
)
HEALTHY = Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n", b'{"status":"ok"}')


def with_answer(answer: Answer, end: str = "open") -> Transcript:
    return Transcript((answer,), end, HEALTHY if end == "open" else None)


def test_comparator_reports_a_difference_when_any_compared_byte_differs() -> None:
    raw = SAMPLE.head + SAMPLE.body
    masked = {i for m in re.finditer(rb"(?<=Date: )[^\r]*|(?<=X-Request-ID: )[^\r]*", raw) for i in range(*m.span())}
    for index in set(range(len(raw))) - masked:
        changed = bytearray(raw)
        changed[index] ^= 0x01
        split = len(SAMPLE.head)
        altered = Answer(bytes(changed[:split]), bytes(changed[split:]))
        assert differences(with_answer(SAMPLE), with_answer(altered)), f"byte {index} changed unnoticed"


def test_comparator_finds_no_difference_when_only_date_and_generated_ids_differ() -> None:
    other = Answer(
        SAMPLE.head.replace(b"Mon, 01 Jan 2024 00:00:00", b"Tue, 02 Jan 2024 10:11:12").replace(
            b"0123456789ab-1f", b"ba9876543210-20"
        ),
        SAMPLE.body,
    )
    assert differences(with_answer(SAMPLE), with_answer(other)) == []


def test_comparator_tells_an_age_difference_apart_when_only_age_differs() -> None:
    older = Answer(SAMPLE.head.replace(b"Age: 3", b"Age: 4"), SAMPLE.body)
    louder = Answer(SAMPLE.head.replace(b"Age: 3", b"Age: 4"), SAMPLE.body.replace(b"true", b"TRUE"))
    assert differences(with_answer(SAMPLE), with_answer(older))
    assert only_age_differs(with_answer(SAMPLE), with_answer(older))
    assert not only_age_differs(with_answer(SAMPLE), with_answer(louder))


def test_comparator_reports_a_difference_when_connections_end_differently() -> None:
    assert differences(with_answer(SAMPLE, "open"), with_answer(SAMPLE, "closed"))
    assert differences(with_answer(SAMPLE), Transcript((SAMPLE, SAMPLE), "open", HEALTHY))
    stray = Transcript((SAMPLE,), "open", SAMPLE)
    assert differences(with_answer(SAMPLE), stray)


def test_comparator_ignores_a_live_body_when_masked_as_volatile() -> None:
    other = Answer(SAMPLE.head.replace(b"Content-Length: 11", b"Content-Length: 12"), b'{"ok":false}')
    assert differences(with_answer(SAMPLE), with_answer(other))
    assert differences(with_answer(SAMPLE), with_answer(other), Masks(volatile_body=True)) == []
