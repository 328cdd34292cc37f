"""CacheEntry, one stored upstream answer and its versioned bytes; :func:`entry_for` decides what is stored."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from multidict import CIMultiDict

from .logs import tokens as usage_tokens

# Layout: MAGIC (4 bytes, the last one the format version) | u32 meta length | u32 CRC-32 of meta and body |
# meta JSON | body. A reader that meets another magic, a length that does not fit or a checksum that does not
# match treats the entry as a miss; the fresh answer then replaces it.
MAGIC = b"LCP\x02"
_HEADER = struct.Struct(">4sII")
# Response headers kept in an entry: metadata of the answer itself, never per-account rate limits or cookies.
_KEPT_PREFIXES = ("openai-", "x-request-id", "azureml-model")


class EntryFormatError(ValueError):
    """Stored bytes are not an entry this version can read."""


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """An upstream answer worth replaying.

    *body* is the JSON body, or for a stream (*is_stream*) the complete Server-Sent Events byte stream
    exactly as the upstream sent it, ending with ``data: [DONE]``. *headers* are the response headers
    worth keeping (content type, OpenAI metadata), *usage* the token usage
    reported by the upstream when it reported one, and *tokens* its input and output tokens (``(0, 0)`` without
    one). *stored_at* and *expires_at* are Unix times.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    is_stream: bool
    stored_at: float
    expires_at: float
    usage: Mapping[str, Any] | None = None
    tokens: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Read once here rather than from the usage on every hit of the entry.
        object.__setattr__(self, "tokens", usage_tokens(self.usage))

    def to_bytes(self) -> bytes:
        meta = orjson.dumps(
            {
                "status": self.status,
                "headers": self.headers,
                "stream": self.is_stream,
                "stored_at": self.stored_at,
                "expires_at": self.expires_at,
                "usage": self.usage,
            }
        )
        checksum = zlib.crc32(self.body, zlib.crc32(meta))
        return b"".join((_HEADER.pack(MAGIC, len(meta), checksum), meta, self.body))

    @classmethod
    def from_bytes(cls, raw: bytes) -> CacheEntry:
        """Parse :meth:`to_bytes` output; raise :class:`EntryFormatError` for anything else."""
        if len(raw) < _HEADER.size:
            raise EntryFormatError("entry too short")
        magic, meta_len, checksum = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise EntryFormatError(f"unknown entry format {magic!r}")
        end = _HEADER.size + meta_len
        if end > len(raw):
            raise EntryFormatError("entry truncated")
        view = memoryview(raw)
        if zlib.crc32(view[end:], zlib.crc32(view[_HEADER.size : end])) != checksum:
            raise EntryFormatError("entry checksum mismatch")
        try:
            meta = orjson.loads(raw[_HEADER.size : end])
            return cls(
                status=int(meta["status"]),
                headers=tuple((str(k), str(v)) for k, v in meta["headers"]),
                body=raw[end:],
                is_stream=bool(meta["stream"]),
                stored_at=float(meta["stored_at"]),
                expires_at=float(meta["expires_at"]),
                usage=meta.get("usage"),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EntryFormatError(f"entry metadata unreadable: {exc}") from None


def peek_meta(head: bytes) -> tuple[int, Mapping[str, Any] | None] | None:
    """Read a plain record's metadata (status, stream, stored_at, expires_at, usage) from its first bytes
    *head*, unchecked: the checksum covers the body too. ``None`` when *head* is not a plain record; otherwise
    how many bytes the header and metadata take, and the metadata if *head* holds them all."""
    if len(head) < _HEADER.size or not head.startswith(MAGIC):
        return None
    needed = _HEADER.size + _HEADER.unpack_from(head)[1]
    if len(head) < needed:
        return needed, None
    try:
        meta = orjson.loads(head[_HEADER.size : needed])
    except orjson.JSONDecodeError:
        return None
    return (needed, meta) if isinstance(meta, dict) else None


@dataclass(frozen=True, slots=True)
class Recording:
    """What one finished upstream exchange produced, as relayed to its clients.

    *finished* is true when the upstream's answer arrived whole: the body read to its end and, for a stream
    (*is_stream*), a terminal event seen with no error event. *usage* is what a stream reported; a JSON
    body's usage is read from the body itself.
    """

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    is_stream: bool
    finished: bool
    usage: Mapping[str, Any] | None = None


def kept_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The response headers worth storing with an entry."""
    return tuple((k, v) for k, v in headers if k.lower() == "content-type" or k.lower().startswith(_KEPT_PREFIXES))


def replay_headers(entry: CacheEntry, tag: str, now: float, label: str) -> CIMultiDict[str]:
    """The headers of *entry* replayed under the key whose short form is *tag*, at *now* (Unix time), with
    ``X-Cache: <label>``."""
    headers = CIMultiDict(entry.headers)
    # As item assignments would (each replaces an equal name where it stands), in one call.
    headers.update((("X-Cache", label), ("X-Cache-Key", tag), ("Age", str(max(0, int(now - entry.stored_at))))))
    return headers


def entry_for(recording: Recording, *, ttl_s: int, max_entry_bytes: int, now: float) -> CacheEntry | None:
    """The entry to store for *recording*, or ``None`` when it must not be replayed: not 2xx, not finished,
    larger than *max_entry_bytes*, or a plain answer that is not JSON."""
    if not 200 <= recording.status < 300 or not recording.finished or len(recording.body) > max_entry_bytes:
        return None
    usage = recording.usage
    if not recording.is_stream:
        try:
            parsed = orjson.loads(recording.body)
        except orjson.JSONDecodeError:
            return None
        usage = parsed.get("usage") if isinstance(parsed, dict) else None
    return CacheEntry(
        status=recording.status,
        headers=kept_headers(recording.headers),
        body=recording.body,
        is_stream=recording.is_stream,
        stored_at=now,
        expires_at=now + ttl_s,
        usage=usage if isinstance(usage, dict) else None,
    )
