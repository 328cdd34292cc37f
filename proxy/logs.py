"""Log lines that a request cannot forge (every value is escaped), as ``key=value`` text or JSON, and the one line
each request leaves."""

from __future__ import annotations

import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators and bidirectional overrides that some
# log viewers honour: none of them may reach a log line raw.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# What JSON allows raw in a string (orjson escapes the rest) but a log viewer may still take for a line break.
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
LINE_FORMAT = "%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
ACCESS_LOGGER = "proxy.access"
# An incoming X-Request-ID is kept when it looks like one; anything else is replaced, never logged.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
# Client-chosen values are cut to this length in a line.
_MAX_VALUE_CHARS = 200
_SEPARATORS = re.compile('[ ="]')
# Every character _text_value changes: a value without any is written as it is.
_TEXT_UNSAFE = re.compile('[\x00-\x20"=\\\\\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]')
_MILLISECONDS = tuple(f",{ms:03d}" for ms in range(1000))
_NUMBERS = (int, float)


def to_json(fields: dict[str, Any]) -> str:
    """*fields* as one line of JSON that no value can break or disguise."""
    line = orjson.dumps(fields).decode()
    # The common case, checked in a fraction of the regular expression's time.
    if line.isascii() and "\x7f" not in line:
        return line
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", line)


def escape(text: str) -> str:
    """*text* with every character that could end or disguise a log line written as ``\\xNN``/``\\uNNNN``."""
    if not _UNSAFE.search(text):
        return text
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingFormatter(logging.Formatter):
    """Formats ``key=value`` lines whose message part is escaped, so a model name, path or header from a
    request can never start a fake line. A traceback, which the proxy writes itself, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message`` and, with a traceback, ``error``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return to_json(line)


def chosen_format(fmt: str | None, stream: TextIO) -> str:
    """*fmt* when set; otherwise ``text`` for a person at a terminal, ``json`` for a collector reading a pipe or
    file, as *stream* is."""
    return fmt or ("text" if stream.isatty() else "json")


def configure(level: str, fmt: str | None = None) -> str:
    """Send every log record to stderr at *level*, as *fmt* (``json`` or ``text``; by default chosen by
    :func:`chosen_format`); returns the format in use."""
    fmt = chosen_format(fmt, sys.stderr)
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else EscapingFormatter(LINE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return fmt


class Exchange:
    """One request as its log line and the metrics see it, filled in as it is served. Times are
    ``time.perf_counter()`` seconds; *first_byte_s* is relative to *started*. *tokens* are the answer's input and
    output tokens (a cache entry's :attr:`~proxy.entry.CacheEntry.tokens`); left ``None``, they are read from
    *usage*, the answer's ``usage`` object."""

    __slots__ = (
        "client",
        "first_byte_s",
        "id",
        "model",
        "outcome",
        "route",
        "started",
        "tag",
        "tokens",
        "upstream",
        "upstream_status",
        "usage",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.id = request_id
        self.started = started
        self.route = ""
        self.upstream = ""
        self.model: str | None = None
        self.outcome: str | None = None
        self.upstream_status: int | None = None
        self.first_byte_s: float | None = None
        self.tokens: tuple[int, int] | None = None
        self.usage: Any = None
        self.tag = ""
        self.client: str | None = None

    def mark_first_byte(self, now: float) -> None:
        if self.first_byte_s is None:
            self.first_byte_s = now - self.started


class RequestIds:
    """Request ids: the client's ``X-Request-ID`` when it is a plausible one, else ``<process prefix>-<counter>``
    (random per process, so that the workers of one group never repeat each other's)."""

    def __init__(self) -> None:
        self._prefix = f"{os.urandom(6).hex()}-"
        self._count = itertools.count(1)

    def take(self, incoming: str | None) -> str:
        if incoming is None:
            return f"{self._prefix}{next(self._count):x}"
        return incoming if _REQUEST_ID.fullmatch(incoming) else f"{self._prefix}{next(self._count):x}"


def tokens(usage: Any) -> tuple[int, int]:
    """Input and output tokens of an answer's ``usage`` (chat's prompt/completion tokens, or the Responses API's
    input/output tokens); ``(0, 0)`` without one."""
    if not isinstance(usage, dict):
        return 0, 0
    given = usage.get("prompt_tokens")
    if given is None:
        given = usage.get("input_tokens")
    made = usage.get("completion_tokens")
    if made is None:
        made = usage.get("output_tokens")
    return (given if type(given) is int and given > 0 else 0), (made if type(made) is int and made > 0 else 0)


# What record() keeps of a request for its line: time.time(), request id, method, path, status, model, outcome,
# upstream, upstream status, duration and first byte in seconds, tokens, usage, key tag, client.
_Row = tuple[
    float,
    str,
    str,
    str,
    int | None,
    str | None,
    str | None,
    str,
    int | None,
    float,
    float | None,
    tuple[int, int] | None,
    Any,
    str,
    str | None,
]


class AccessLog:
    """The line each request leaves at INFO on the ``proxy.access`` logger, written without the logging module's
    per-record machinery (a LogRecord costs more than a cache hit's budget allows). A request's values are taken
    as it ends; they are formatted and written together once per event-loop turn when *schedule*
    (``loop.call_soon``) is set, else at once."""

    def __init__(self, fmt: str, write: Callable[[str], object], flush: Callable[[], object]) -> None:
        self.enabled = logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.INFO)
        self.is_json = fmt == "json"
        self.schedule: Callable[[Callable[[], None]], object] | None = None
        self._write, self._flush = write, flush
        self._pending: list[_Row] = []
        self._second = -1
        self._stamp = ""

    def record(self, ex: Exchange, method: str, path: str, status: int | None, now: float) -> None:
        """Write *ex*'s line: it answered *status* (``None``: the client left first) after ``now - ex.started``."""
        pending = self._pending
        pending.append(
            (
                time.time(),
                ex.id,
                method,
                path,
                status,
                ex.model,
                ex.outcome,
                ex.upstream,
                ex.upstream_status,
                now - ex.started,
                ex.first_byte_s,
                ex.tokens,
                ex.usage,
                ex.tag,
                ex.client,
            )
        )
        if len(pending) == 1:
            if self.schedule is None:
                self.flush()
            else:
                self.schedule(self.flush)

    def flush(self) -> None:
        """Format and write the lines of the requests recorded since the last flush."""
        rows, self._pending = self._pending, []
        if rows:
            line = to_json if self.is_json else _text
            self._write("".join([f"{line(self._fields(row))}\n" for row in rows]))
            self._flush()

    def _fields(self, row: _Row) -> dict[str, Any]:
        (
            at,
            request_id,
            method,
            path,
            status,
            model,
            outcome,
            upstream,
            upstream_status,
            duration_s,
            first_byte_s,
            counted,
            usage,
            tag,
            client,
        ) = row
        input_tokens, output_tokens = counted if counted is not None else tokens(usage)
        return {
            "time": self._time(at),
            "level": "INFO",
            "logger": ACCESS_LOGGER,
            "message": "request",
            "request_id": request_id,
            "method": method,
            "path": path[:_MAX_VALUE_CHARS],
            "status": status,
            "model": model[:_MAX_VALUE_CHARS] if model is not None else None,
            "outcome": outcome,
            "upstream": upstream or None,
            "upstream_status": upstream_status,
            "duration_ms": round(duration_s * 1000, 3),
            "first_byte_ms": None if first_byte_s is None else round(first_byte_s * 1000, 3),
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "key": tag or None,
            "client": client,
        }

    def _time(self, now: float) -> str:
        """*now* (``time.time()``) as logging's default ``asctime``, in local time."""
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return self._stamp + _MILLISECONDS[int((now - second) * 1000)]


def _text(fields: dict[str, Any]) -> str:
    head = LINE_FORMAT % {
        "asctime": fields.pop("time"),
        "levelname": fields.pop("level"),
        "name": fields.pop("logger"),
        "message": fields.pop("message"),
    }
    # Numbers are written as they are: escaping is for what a request can choose.
    rest = " ".join(
        f"{name}={'-' if value is None else value if type(value) in _NUMBERS else _text_value(str(value))}"
        for name, value in fields.items()
    )
    return f"{head} {rest}"


def _text_value(value: str) -> str:
    if not _TEXT_UNSAFE.search(value):
        return value
    # Beyond what escape() covers, what separates fields is escaped too: a model named "x outcome=HIT" stays one
    # value, and a backslash in a value cannot pass for an escape.
    value = escape(value.replace("\\", "\\x5c"))
    if _SEPARATORS.search(value):
        value = value.replace(" ", "\\x20").replace("=", "\\x3d").replace('"', "\\x22")
    return value
