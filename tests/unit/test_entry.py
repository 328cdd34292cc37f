"""CacheEntry round trips and refuses what it cannot read; entry_for decides what is worth storing."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from proxy.entry import CacheEntry, EntryFormatError, Recording, entry_for, peek_meta


def entry(**overrides: object) -> CacheEntry:
    values: dict[str, object] = {
        "status": 200,
        "headers": (("Content-Type", "text/event-stream"),),
        "body": b"data: {}\n\ndata: [DONE]\n\n",
        "is_stream": True,
        "stored_at": 1.5,
        "expires_at": 61.5,
        "usage": {"total_tokens": 3},
    }
    values.update(overrides)
    return CacheEntry(**values)  # type: ignore[arg-type]


def test_entry_round_trips_when_serialised() -> None:
    original = entry()
    assert CacheEntry.from_bytes(original.to_bytes()) == original
    binary = entry(body=bytes(range(256)), is_stream=False, usage=None)
    assert CacheEntry.from_bytes(binary.to_bytes()) == binary


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"LCP",
        b"XXXX\x00\x00\x00\x02{}",
        b"LCP\x02\x00\x00\x00\x02{}",
        b"LCP\x01\x00\x00\x00\xff{}",
        b"LCP\x01\x00\x00\x00\x02{}",
        b"LCP\x01\x00\x00\x00\x03{x}",
    ],
)
def test_unreadable_bytes_raise_format_error_when_parsed(raw: bytes) -> None:
    with pytest.raises(EntryFormatError):
        CacheEntry.from_bytes(raw)


def flipped(raw: bytes, position: int) -> bytes:
    return raw[:position] + bytes([raw[position] ^ 0x04]) + raw[position + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: flipped(raw, len(raw) - 3), id="bit flip in the body"),
        pytest.param(lambda raw: flipped(raw, 20), id="bit flip in the metadata"),
        pytest.param(lambda raw: flipped(raw, 9), id="bit flip in the checksum"),
        pytest.param(lambda raw: raw[:-1], id="truncated body"),
        pytest.param(lambda raw: raw + b"\n", id="trailing garbage"),
        pytest.param(lambda raw: b"LCP\x03" + raw[4:], id="future format"),
        pytest.param(lambda raw: bytes(len(raw)), id="zeros"),
    ],
)
def test_damaged_record_raises_format_error_when_read(damage: Callable[[bytes], bytes]) -> None:
    raw = entry(body=b'{"id":"chatcmpl-1","choices":[]}', is_stream=False).to_bytes()
    with pytest.raises(EntryFormatError):
        CacheEntry.from_bytes(damage(raw))


def recording(**overrides: object) -> Recording:
    values: dict[str, object] = {
        "status": 200,
        "headers": (("Content-Type", "application/json"), ("Set-Cookie", "a=b"), ("x-request-id", "req_1")),
        "body": b'{"id":"c","usage":{"total_tokens":7}}',
        "is_stream": False,
        "finished": True,
    }
    values.update(overrides)
    return Recording(**values)  # type: ignore[arg-type]


def test_finished_json_answer_becomes_an_entry_when_2xx() -> None:
    stored = entry_for(recording(), ttl_s=30, max_entry_bytes=1000, now=100.0)
    assert stored is not None
    assert (stored.stored_at, stored.expires_at, stored.usage) == (100.0, 130.0, {"total_tokens": 7})
    assert stored.headers == (("Content-Type", "application/json"), ("x-request-id", "req_1"))


def test_stream_keeps_the_usage_it_reported_when_finished() -> None:
    stream = recording(body=b"data: [DONE]\n\n", is_stream=True, usage={"total_tokens": 3})
    stored = entry_for(stream, ttl_s=30, max_entry_bytes=1000, now=0.0)
    assert stored is not None and stored.is_stream and stored.usage == {"total_tokens": 3}


def test_entry_counts_its_tokens_once_when_built_from_a_recording() -> None:
    body = b'{"id":"c","usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}'
    stored = entry_for(recording(body=body), ttl_s=30, max_entry_bytes=1000, now=0.0)
    assert stored is not None and stored.tokens == (12, 34)
    responses = recording(body=b"data: [DONE]\n\n", is_stream=True, usage={"input_tokens": 5, "output_tokens": 6})
    streamed = entry_for(responses, ttl_s=30, max_entry_bytes=1000, now=0.0)
    assert streamed is not None and streamed.tokens == (5, 6)


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4}, (3, 4)),
        ({"input_tokens": 3, "output_tokens": 4}, (3, 4)),
        ({"prompt_tokens": -1, "completion_tokens": "4"}, (0, 0)),
        ({"total_tokens": 3}, (0, 0)),
        (None, (0, 0)),
    ],
)
def test_decoded_entry_carries_the_tokens_of_its_usage_when_read_back(
    usage: dict[str, object] | None, expected: tuple[int, int]
) -> None:
    decoded = CacheEntry.from_bytes(entry(usage=usage).to_bytes())
    assert decoded.tokens == expected and decoded.usage == usage


@pytest.mark.parametrize(
    "overrides",
    [
        {"status": 429},
        {"status": 500},
        {"finished": False},
        {"body": b"x" * 1001},
        {"body": b"<html>not json</html>"},
        {"is_stream": True, "finished": False, "body": b"data: {}\n\n"},
    ],
)
def test_nothing_is_stored_when_answer_is_not_replayable(overrides: dict[str, object]) -> None:
    assert entry_for(recording(**overrides), ttl_s=30, max_entry_bytes=1000, now=0.0) is None


def test_metadata_is_read_from_the_first_bytes_when_the_record_is_plain() -> None:
    stored = entry(body=b"x" * 5000)
    raw = stored.to_bytes()
    needed, meta = peek_meta(raw[:2048]) or (0, None)
    assert meta is not None and meta["stored_at"] == 1.5 and meta["expires_at"] == 61.5
    assert needed < 2048 and peek_meta(raw[: needed - 1]) == (needed, None)
    assert peek_meta(b"LCE\x01" + raw[4:]) is None and peek_meta(b"") is None
