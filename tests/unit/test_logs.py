"""AccessLog: values taken when a request ends, formatted into the same line later; the log format's default."""

from __future__ import annotations

import io
import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

from proxy.logs import AccessLog, Exchange, _text_value, chosen_format, escape

Request = tuple[Exchange, str, str, int | None, float]


def tricky_requests() -> Iterator[Request]:
    ex = Exchange("r-1", 10.0)
    ex.route, ex.upstream, ex.model, ex.outcome, ex.tag = (
        "chat/completions",
        "openai",
        'gpt-4o x=1 "q" \\x20',
        "HIT",
        "k",
    )
    ex.tokens, ex.first_byte_s, ex.client = (3, 4), 0.0012345, "team\u2028a"
    yield ex, "POST", "/v1/chat/completions", 200, 10.0123456
    ex = Exchange("r-2", 10.0)
    ex.route, ex.model, ex.outcome, ex.upstream_status = "embeddings", "m\n\x1b[31m\x7f\x85\u202eé😀", "MISS", 503
    ex.usage = {"input_tokens": 7, "output_tokens": -2}
    yield ex, "POST", "/v1/embeddings?x=" + "p" * 300, None, 12.5
    yield Exchange("r-3", 10.0), "GET", "/v1/models/a b=c", 404, 10.0000004
    ex = Exchange("r-4", 10.0)
    ex.model, ex.outcome, ex.upstream, ex.usage, ex.first_byte_s = "", "COALESCED", "u", {"prompt_tokens": True}, 1e-7
    yield ex, "POST", "/v1/responses\\", 200, 1e6


P = "p" * 183
# What the lines looked like when each was formatted as its request ended, after the time stamp.
JSON_LINES = [
    '"level":"INFO","logger":"proxy.access","message":"request","request_id":"r-1","method":"POST",'
    '"path":"/v1/chat/completions","status":200,"model":"gpt-4o x=1 \\"q\\" \\\\x20","outcome":"HIT",'
    '"upstream":"openai","upstream_status":null,"duration_ms":12.346,"first_byte_ms":1.234,"input_tokens":3,'
    '"output_tokens":4,"key":"k","client":"team\\u2028a"}',
    '"level":"INFO","logger":"proxy.access","message":"request","request_id":"r-2","method":"POST",'
    f'"path":"/v1/embeddings?x={P}","status":null,"model":"m\\n\\u001b[31m\\u007f\\u0085\\u202eé😀",'
    '"outcome":"MISS","upstream":null,"upstream_status":503,"duration_ms":2500.0,"first_byte_ms":null,'
    '"input_tokens":7,"output_tokens":0,"key":null,"client":null}',
    '"level":"INFO","logger":"proxy.access","message":"request","request_id":"r-3","method":"GET",'
    '"path":"/v1/models/a b=c","status":404,"model":null,"outcome":null,"upstream":null,"upstream_status":null,'
    '"duration_ms":0.0,"first_byte_ms":null,"input_tokens":0,"output_tokens":0,"key":null,"client":null}',
    '"level":"INFO","logger":"proxy.access","message":"request","request_id":"r-4","method":"POST",'
    '"path":"/v1/responses\\\\","status":200,"model":"","outcome":"COALESCED","upstream":"u",'
    '"upstream_status":null,"duration_ms":999990000.0,"first_byte_ms":0.0,"input_tokens":0,"output_tokens":0,'
    '"key":null,"client":null}',
]
TEXT_LINES = [
    " level=INFO logger=proxy.access request request_id=r-1 method=POST path=/v1/chat/completions status=200 "
    "model=gpt-4o\\x20x\\x3d1\\x20\\x22q\\x22\\x20\\x5cx20 outcome=HIT upstream=openai upstream_status=- "
    "duration_ms=12.346 first_byte_ms=1.234 input_tokens=3 output_tokens=4 key=k client=team\\u2028a",
    f" level=INFO logger=proxy.access request request_id=r-2 method=POST path=/v1/embeddings?x\\x3d{P} status=- "
    "model=m\\n\\x1b[31m\\x7f\\x85\\u202eé😀 outcome=MISS upstream=- upstream_status=503 duration_ms=2500.0 "
    "first_byte_ms=- input_tokens=7 output_tokens=0 key=- client=-",
    " level=INFO logger=proxy.access request request_id=r-3 method=GET path=/v1/models/a\\x20b\\x3dc status=404 "
    "model=- outcome=- upstream=- upstream_status=- duration_ms=0.0 first_byte_ms=- input_tokens=0 "
    "output_tokens=0 key=- client=-",
    " level=INFO logger=proxy.access request request_id=r-4 method=POST path=/v1/responses\\x5c status=200 model= "
    "outcome=COALESCED upstream=u upstream_status=- duration_ms=999990000.0 first_byte_ms=0.0 input_tokens=0 "
    "output_tokens=0 key=- client=-",
]
# logging's asctime, which the lines open with (JSON: as their "time").
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
HEADS = {"json": re.compile(r'\{"time":"' + STAMP + '",'), "text": re.compile(STAMP)}


def logged(fmt: str, requests: Iterable[Request]) -> tuple[AccessLog, io.StringIO, list[Callable[[], None]]]:
    out = io.StringIO()
    access_log = AccessLog(fmt, out.write, out.flush)
    scheduled: list[Callable[[], None]] = []
    access_log.schedule = scheduled.append
    for ex, method, path, status, now in requests:
        access_log.record(ex, method, path, status, now)
    return access_log, out, scheduled


@pytest.mark.parametrize(("fmt", "expected"), [("json", JSON_LINES), ("text", TEXT_LINES)])
def test_lines_escape_cut_and_round_values_as_before_when_formatted_at_flush(fmt: str, expected: list[str]) -> None:
    access_log, out, _ = logged(fmt, tricky_requests())
    access_log.flush()
    lines = out.getvalue().splitlines()
    heads = [HEADS[fmt].match(line) for line in lines]
    assert [line[head.end() :] if head else line for line, head in zip(lines, heads, strict=True)] == expected


def test_line_keeps_the_values_of_the_request_end_when_written_a_turn_later() -> None:
    ex, method, path, status, now = next(tricky_requests())
    access_log, out, scheduled = logged("json", [(ex, method, path, status, now)])
    ex.outcome, ex.tokens, ex.first_byte_s, ex.client = "STALE", (9, 9), 2.0, "other"
    assert out.getvalue() == "" and scheduled == [access_log.flush]
    scheduled[0]()
    (line,) = out.getvalue().splitlines()
    assert line.endswith(JSON_LINES[0]) and len(line) - len(JSON_LINES[0]) == len('{"time":"2026-11-29 18:00:00,000",')


def test_one_write_carries_the_lines_of_a_turn_when_scheduled() -> None:
    access_log, out, scheduled = logged("text", tricky_requests())
    assert len(scheduled) == 1
    access_log.flush()
    assert out.getvalue().count("\n") == len(TEXT_LINES) and out.getvalue().endswith("\n")


def test_line_is_written_at_once_when_no_loop_schedules_it() -> None:
    out = io.StringIO()
    access_log = AccessLog("json", out.write, out.flush)
    ex, method, path, status, now = next(tricky_requests())
    access_log.record(ex, method, path, status, now)
    assert out.getvalue().endswith(JSON_LINES[0] + "\n")


def test_time_reads_as_logging_asctime_when_formatted() -> None:
    access_log = AccessLog("json", io.StringIO().write, lambda: None)
    for _ in range(50):
        record = logging.makeLogRecord({})
        assert access_log._time(record.created) == logging.Formatter().formatTime(record)
        time.sleep(0.0003)


def test_text_value_is_left_as_it_is_only_when_escaping_would_not_change_it() -> None:
    for code in (*range(0x250), *range(0x2000, 0x2070), 0xFEFF, 0x1F600):
        char = chr(code)
        unchanged = escape(char) == char and char not in ' ="\\'
        assert (_text_value(f"a{char}b") == f"a{char}b") == unchanged, hex(code)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_follows_the_stream_when_none_is_chosen() -> None:
    assert chosen_format(None, Terminal()) == "text" and chosen_format(None, io.StringIO()) == "json"
    assert chosen_format("json", Terminal()) == "json" and chosen_format("text", io.StringIO()) == "text"
