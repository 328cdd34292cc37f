"""Derive a stable, secret-free Redis key from an OpenAI request, and refuse bodies that could be read two ways."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import orjson

# v2: the digest is a Redis Cluster hash tag, so that an entry and the keys that coordinate its upstream call
# (its lock and its flight stream) sit on one node.
KEY_VERSION = "v2"
# A namespace's generation number lives under this name in the namespace; a purge increments it. Generation 0
# keeps the plain version segment, so the entries of a cache that was never purged keep their keys.
GENERATION_NAME = "generation"
_GENERATION_MARK = "g"
# A double carries at most 17 significant decimal digits; a literal with more names a value it cannot hold.
_DOUBLE_DIGITS = 17
_INT64 = range(-(2**63), 2**64)
_UNPARSED: Any = object()


def build_key(
    namespace: str, route: str, body: Any, scope: str, secret: bytes | None = None, *, generation: int = 0
) -> str:
    """Return ``<namespace>:<version>:<route>:{<hex digest>}``, the version ``v2`` in *generation* 0, else
    ``v2g<generation>`` (see :func:`key_version`).

    *body* is the parsed JSON request body and *scope* comes from :func:`build_scope`. The whole body is
    keyed: an allow-list of "relevant" fields would silently serve one request's answer to another the day
    the API grows a parameter. Keys are sorted, so the same JSON in another order or spacing shares an entry.
    With a *secret* the digest is an HMAC: whoever reads Redis cannot confirm a guessed prompt by hashing it.
    """
    canonical = orjson.dumps([route, scope, body], option=orjson.OPT_SORT_KEYS)
    if secret:
        digest = hmac.new(secret, canonical, hashlib.sha256).hexdigest()
    else:
        digest = hashlib.sha256(canonical).hexdigest()
    return f"{namespace}:{key_version(generation)}:{route}:{{{digest}}}"


def key_version(generation: int) -> str:
    """The version segment of entry keys in namespace *generation*: ``v2``, then ``v2g1``, ``v2g2``..."""
    return KEY_VERSION if generation == 0 else f"{KEY_VERSION}{_GENERATION_MARK}{generation}"


def generation_key(namespace: str) -> str:
    """The Redis key holding *namespace*'s generation. It sits under the namespace's prefix, so that every
    replica's invalidation listener hears of a change."""
    return f"{namespace}:{GENERATION_NAME}"


def parse_key(key: str, namespace: str) -> tuple[int, str, str] | None:
    """``(generation, route, digest)`` of an entry key of *namespace*, or ``None`` for any other key."""
    if not key.startswith(f"{namespace}:"):
        return None
    version, _, rest = key[len(namespace) + 1 :].partition(":")
    route, _, tagged = rest.rpartition(":")
    if not route or len(tagged) < 3 or tagged[0] != "{" or tagged[-1] != "}":
        return None
    if version == KEY_VERSION:
        return 0, route, tagged[1:-1]
    mark = KEY_VERSION + _GENERATION_MARK
    number = version[len(mark) :]
    if not version.startswith(mark) or not (number.isascii() and number.isdigit()) or number.startswith("0"):
        return None
    return int(number), route, tagged[1:-1]


def build_scope(
    hmac_key: bytes,
    upstream: str,
    query: str,
    partition: str | None,
    organization: str | None,
    project: str | None,
    varied: tuple[tuple[str, str], ...] = (),
) -> str:
    """Digest of everything outside the body that changes the answer.

    *partition* keeps tenants apart: the client's own upstream credential, or the client key that
    authenticated the request; ``None`` when every caller may share answers. It goes through an HMAC so that
    key material can neither be recovered nor confirmed from a Redis dump. *query* must already be canonical
    (sorted); Azure-style gateways select the API version there. *varied* are the other request headers that
    select another answer (``OpenAI-Beta``, configured ones) that the request carries, as ``(name, value)``.
    Headers that vary per call without changing the answer (SDK retry counters, timeouts, user agents,
    idempotency keys) are deliberately absent.
    """
    parts: list[Any] = [upstream, query, partition or "", organization or "", project or ""]
    if varied:
        parts.append(varied)
    return hmac.new(hmac_key, orjson.dumps(parts), hashlib.sha256).hexdigest()


def short_key(key: str) -> str:
    """The first 16 hex digits of the key's hash, for the ``X-Cache-Key`` header and logs."""
    return key.rpartition(":")[2].strip("{}")[:16]


# Digits and dots to "0", every other byte to " ": a run of 18 zeros is a number literal at risk.
_NUMBER_RUNS = bytes(48 if chr(byte) in "0123456789." else 32 for byte in range(256))


def ambiguous(raw: bytes, parsed: Any = _UNPARSED) -> bool:
    """True when JSON parsers could disagree on what *raw* says, so its key would not name one request.

    Parsers resolve a repeated object key differently (first or last wins), and a number literal that no
    double or 64-bit integer holds is rounded by some and kept exact by others. Such a body is forwarded but
    never cached: otherwise a client could store one answer under the key of another request.

    With *parsed* (what ``orjson.loads(raw)`` gave), most bodies are cleared in a few byte scans instead of a
    second parse; the rest get the exact check.
    """
    if parsed is not _UNPARSED and _plainly_unambiguous(raw, parsed):
        return False
    return _exactly_ambiguous(raw)


def _plainly_unambiguous(raw: bytes, parsed: Any) -> bool:
    # Without an escaped quote, every quote in valid JSON delimits a string: splitting on quotes leaves the
    # strings at odd positions, and the rest is structure. A key is a string followed by a colon; as many
    # keys in the text as in *parsed* means none repeats. Numbers are at risk only with an exponent or 18
    # digits and dots in a row ("e" otherwise appears only in true and false).
    if b'\\"' in raw:
        return False
    structure = b'"'.join(raw.split(b'"')[::2]).translate(None, b" \t\n\r")
    if b"E" in structure or structure.count(b"e") != structure.count(b"true") + structure.count(b"false"):
        return False
    if b"0" * 18 in structure.translate(_NUMBER_RUNS):
        return False
    return structure.count(b'":') == _count_keys(parsed)


def _count_keys(value: Any) -> int:
    count, pending = 0, [value]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            count += len(item)
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)
    return count


def _exactly_ambiguous(raw: bytes) -> bool:
    found = False

    def pairs(items: list[tuple[str, Any]]) -> None:
        nonlocal found
        if len({name for name, _ in items}) != len(items):
            found = True

    def integer(text: str) -> int:
        nonlocal found
        value = int(text)
        found = found or value not in _INT64
        return value

    def number(text: str) -> float:
        nonlocal found
        value = float(text)
        mantissa = text.lower().partition("e")[0].lstrip("-").replace(".", "").strip("0")
        found = found or value in (float("inf"), float("-inf")) or len(mantissa) > _DOUBLE_DIGITS
        found = found or (value == 0.0 and mantissa != "")
        return value

    try:
        json.loads(raw, object_pairs_hook=pairs, parse_int=integer, parse_float=number)
    except (ValueError, RecursionError):
        return True
    return found
