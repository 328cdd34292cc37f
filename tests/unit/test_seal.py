"""Sealed entries: round trips, binding to the Redis key, key rotation, and every damaged or foreign record a miss."""

from __future__ import annotations

import logging

import pytest
from fakeredis import FakeAsyncRedis

from proxy.entry import MAGIC as PLAIN_MAGIC
from proxy.entry import EntryFormatError
from proxy.seal import (
    KEY_ID_BYTES,
    MAGIC,
    NONCE_BYTES,
    TAG_BYTES,
    ForeignEntryError,
    PlainCodec,
    SealingCodec,
    derive_secret,
)
from proxy.store import RedisStore
from tests.support import make_entry

SECRET = "k7Qm2vX9pL4sT8wZ1aB6cD3eF5gH0jN2rU4yW6xE8zC="
OLD_SECRET = "old-0123456789abcdefghijklmnopqrstuvwxyz+/="
OTHER_SECRET = "other-0123456789abcdefghijklmnopqrstuvwxyz+/"
KEY = "llm-cache:v2:chat/completions:{" + "ab" * 32 + "}"
PROMPT = b"the secret plan for tuesday"
ANSWER = b"echo: the secret plan for tuesday"


ENTRY = make_entry(
    body=b'{"choices":[{"message":{"content":"' + ANSWER + b'"}}]}',
    ttl_s=24 * 3600,
    headers=(("Content-Type", "application/json"), ("openai-organization", "org-private")),
    usage={"prompt_tokens": 11, "completion_tokens": 7, "prompt_text_marker": PROMPT.decode()},
)


def test_entry_round_trips_when_sealed_and_opened() -> None:
    codec = SealingCodec(SECRET)
    original = ENTRY
    raw = codec.encode(KEY, original)
    assert raw.startswith(MAGIC + codec.key_id)
    assert codec.decode(KEY, raw) == original
    assert SealingCodec(SECRET).decode(KEY, raw) == original  # another process with the same key


def test_whole_record_is_hidden_when_sealed() -> None:
    raw = SealingCodec(SECRET).encode(KEY, ENTRY)
    for clear in (ANSWER, PROMPT, b"org-private", b"application/json", b"prompt_tokens", PLAIN_MAGIC):
        assert clear not in raw
    assert len(raw) == len(ENTRY.to_bytes()) + len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES


def test_nonce_differs_when_the_same_entry_is_sealed_twice() -> None:
    codec = SealingCodec(SECRET)
    one, two = codec.encode(KEY, ENTRY), codec.encode(KEY, ENTRY)
    prefix = len(MAGIC) + KEY_ID_BYTES
    assert one[:prefix] == two[:prefix] and one[prefix : prefix + NONCE_BYTES] != two[prefix : prefix + NONCE_BYTES]
    assert one[prefix + NONCE_BYTES :] != two[prefix + NONCE_BYTES :]


def test_value_is_unreadable_when_copied_under_another_key() -> None:
    codec = SealingCodec(SECRET)
    raw = codec.encode(KEY, ENTRY)
    with pytest.raises(EntryFormatError) as caught:
        codec.decode(KEY.replace("ab", "cd", 1), raw)
    assert not isinstance(caught.value, ForeignEntryError)  # a swap is an alarm, not a rotation


def test_old_key_still_opens_entries_when_listed_for_reading() -> None:
    before = SealingCodec(OLD_SECRET).encode(KEY, ENTRY)
    rotated = SealingCodec(SECRET, [OLD_SECRET])
    assert rotated.decode(KEY, before) == ENTRY
    after = rotated.encode(KEY, ENTRY)
    assert after.startswith(MAGIC + SealingCodec(SECRET).key_id)
    with pytest.raises(ForeignEntryError):
        SealingCodec(OLD_SECRET).decode(KEY, after)


def test_entry_is_foreign_when_sealed_under_a_key_not_listed() -> None:
    raw = SealingCodec(OLD_SECRET).encode(KEY, ENTRY)
    with pytest.raises(ForeignEntryError, match="key_id="):
        SealingCodec(SECRET).decode(KEY, raw)


def test_entry_is_foreign_when_its_key_id_is_altered() -> None:
    codec = SealingCodec(SECRET)
    raw = bytearray(codec.encode(KEY, ENTRY))
    raw[len(MAGIC)] ^= 0x01
    with pytest.raises(ForeignEntryError):
        codec.decode(KEY, bytes(raw))


@pytest.mark.parametrize("where", ["nonce", "ciphertext", "tag"])
def test_entry_is_unreadable_when_a_bit_is_flipped(where: str) -> None:
    codec = SealingCodec(SECRET)
    raw = bytearray(codec.encode(KEY, ENTRY))
    offset = {"nonce": len(MAGIC) + KEY_ID_BYTES, "ciphertext": len(MAGIC) + KEY_ID_BYTES + NONCE_BYTES + 5}
    raw[offset.get(where, len(raw) - 1)] ^= 0x80
    with pytest.raises(EntryFormatError, match="authentication"):
        codec.decode(KEY, bytes(raw))


def test_entry_is_unreadable_when_cut_short_anywhere() -> None:
    codec = SealingCodec(SECRET)
    raw = codec.encode(KEY, ENTRY)
    for length in range(len(raw)):
        with pytest.raises(EntryFormatError):
            codec.decode(KEY, raw[:length])


def test_plain_entry_is_refused_when_encryption_is_on() -> None:
    with pytest.raises(ForeignEntryError, match="not sealed"):
        SealingCodec(SECRET).decode(KEY, ENTRY.to_bytes())


def test_sealed_entry_is_foreign_when_encryption_is_off() -> None:
    raw = SealingCodec(SECRET).encode(KEY, ENTRY)
    with pytest.raises(ForeignEntryError, match="no encryption key"):
        PlainCodec().decode(KEY, raw)


def test_plain_codec_round_trips_when_encryption_is_off() -> None:
    assert PlainCodec().decode(KEY, PlainCodec().encode(KEY, ENTRY)) == ENTRY


def test_derived_secrets_are_stable_and_separate_when_purposes_differ() -> None:
    one = derive_secret(SECRET, b"purpose one")
    assert one == derive_secret(SECRET, b"purpose one") and len(one) == 32
    assert one != derive_secret(SECRET, b"purpose two")
    assert one != derive_secret(OTHER_SECRET, b"purpose one")
    assert SECRET.encode() not in one


def test_key_ids_differ_when_secrets_differ() -> None:
    assert SealingCodec(SECRET).key_id != SealingCodec(OTHER_SECRET).key_id
    assert SealingCodec(SECRET, [SECRET]).key_id == SealingCodec(SECRET).key_id
    assert len(SealingCodec(SECRET).key_id) == KEY_ID_BYTES


async def test_store_reads_a_miss_and_logs_no_content_when_values_are_tampered_or_foreign(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="proxy.store")
    client = FakeAsyncRedis()
    store = RedisStore(client, op_timeout_s=0.2, retry_after_s=1, codec=SealingCodec(SECRET))
    store.put(KEY, ENTRY)
    await store.drain()
    assert await store.get(KEY) == ENTRY
    raw = await client.get(KEY)
    await client.set("swapped", raw)
    await client.set("planted", ENTRY.to_bytes())
    await client.set("rotated", SealingCodec(OTHER_SECRET).encode("rotated", ENTRY))
    await client.set("cut", raw[:-3])
    assert [await store.get(k) for k in ("swapped", "planted", "rotated", "cut")] == [None] * 4
    assert store.available and store.errors == 0
    levels = {r.getMessage().split("key=")[1].split()[0]: r.levelno for r in caplog.records if "key=" in r.getMessage()}
    assert levels == {
        "swapped": logging.WARNING,
        "planted": logging.DEBUG,
        "rotated": logging.DEBUG,
        "cut": logging.WARNING,
    }
    for clear in (ANSWER, PROMPT, b"org-private", SECRET.encode()):
        assert clear.decode() not in caplog.text
