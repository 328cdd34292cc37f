"""CacheEntry round trips and refuses what it cannot read."""

from __future__ import annotations

import pytest

from proxy.entry import CacheEntry, EntryFormatError


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
