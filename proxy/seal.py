"""Entries sealed at rest: AES-GCM bound to the Redis key, keys derived with HKDF, and the codecs RedisStore uses."""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from .entry import MAGIC as PLAIN_MAGIC
from .entry import CacheEntry, EntryFormatError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# Layout: MAGIC (4 bytes, the last one the format version) | key id (8) | nonce (12) | AES-GCM ciphertext of
# CacheEntry.to_bytes() and its 16-byte tag. MAGIC and the key id travel in clear; they are authenticated
# together with the Redis key as associated data, so a value copied under another key does not open.
MAGIC = b"LCE\x01"
KEY_ID_BYTES = 8
NONCE_BYTES = 12
TAG_BYTES = 16
_HEADER_BYTES = len(MAGIC) + KEY_ID_BYTES
_PREFIX_BYTES = _HEADER_BYTES + NONCE_BYTES
# HKDF labels: each purpose gets its own independent secret from the one configured key.
ENTRY_KEY_PURPOSE = b"llm-cache-proxy/v1/entry-encryption"
_KEY_ID_LABEL = b"llm-cache-proxy/v1/key-id"


class ForeignEntryError(EntryFormatError):
    """Well-formed bytes this configuration does not read: sealed under a key it does not hold, sealed while
    encryption is off, or plain while it is on. Expected for a while after a key change."""


class EntryCodec(Protocol):
    """Turns an entry into the bytes stored under a Redis key, and back."""

    def encode(self, key: str, entry: CacheEntry) -> bytes: ...

    def decode(self, key: str, raw: bytes) -> CacheEntry:
        """The entry stored as *raw* under *key*; raises :class:`EntryFormatError` for anything unreadable."""


def derive_secret(material: str, purpose: bytes) -> bytes:
    """A 32-byte secret for *purpose* (a fixed label), derived from *material* with HKDF-SHA256.

    The same material gives unrelated secrets for different purposes, and any long random string is usable as
    material. Pure and deterministic; *material* must be high-entropy, since HKDF does not stretch a password.
    """
    # Imported here: without an encryption key, start-up does without the cryptography bindings.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(material.encode())


def key_id_of(aes_key: bytes) -> bytes:
    """The short public name of *aes_key* written in each sealed record; it reveals nothing about the key."""
    return hmac.digest(aes_key, _KEY_ID_LABEL, "sha256")[:KEY_ID_BYTES]


class PlainCodec:
    """Entries stored as plain :meth:`CacheEntry.to_bytes` records: no encryption key configured."""

    def encode(self, key: str, entry: CacheEntry) -> bytes:
        return entry.to_bytes()

    def decode(self, key: str, raw: bytes) -> CacheEntry:
        if raw.startswith(MAGIC):
            raise ForeignEntryError("entry is sealed and no encryption key is configured")
        return CacheEntry.from_bytes(raw)


class SealingCodec:
    """Entries sealed with AES-GCM under the key derived from *secret*; *old_secrets* are only read.

    A plain record, a record sealed under a key not listed, or a damaged one raises
    :class:`EntryFormatError` (:class:`ForeignEntryError` for the first two), so that the store reads a miss.
    """

    def __init__(self, secret: str, old_secrets: Iterable[str] = ()) -> None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._invalid_tag = InvalidTag
        # Built once: an AESGCM object holds the expanded key schedule.
        self._ciphers: dict[bytes, AESGCM] = {}
        for material in (secret, *old_secrets):
            aes_key = derive_secret(material, ENTRY_KEY_PURPOSE)
            self._ciphers.setdefault(key_id_of(aes_key), AESGCM(aes_key))
        self.key_id = next(iter(self._ciphers))
        self._header = MAGIC + self.key_id
        self._current = self._ciphers[self.key_id]

    def encode(self, key: str, entry: CacheEntry) -> bytes:
        # Random 96-bit nonces stay safe for 2**32 seals per key (NIST SP 800-38D), far more than a cache
        # writes between two rotations.
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._current.encrypt(nonce, entry.to_bytes(), self._header + key.encode())
        return b"".join((self._header, nonce, sealed))

    def decode(self, key: str, raw: bytes) -> CacheEntry:
        if not raw.startswith(MAGIC):
            if raw.startswith(PLAIN_MAGIC):
                # Never served: anyone who can write to Redis could plant such an answer.
                raise ForeignEntryError("entry is not sealed and encryption is on")
            raise EntryFormatError(f"unknown entry format {raw[: len(MAGIC)]!r}")
        if len(raw) < _PREFIX_BYTES + TAG_BYTES:
            raise EntryFormatError("sealed entry truncated")
        kid = raw[len(MAGIC) : _HEADER_BYTES]
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise ForeignEntryError(f"entry sealed under a key not configured key_id={kid.hex()}")
        view = memoryview(raw)
        try:
            plain = cipher.decrypt(
                view[_HEADER_BYTES:_PREFIX_BYTES], view[_PREFIX_BYTES:], raw[:_HEADER_BYTES] + key.encode()
            )
        except self._invalid_tag:
            raise EntryFormatError(
                "sealed entry fails authentication: altered, cut, or stored under another key"
            ) from None
        return CacheEntry.from_bytes(plain)
