"""The wrk report parser, on output captured from wrk 4.1, the chunked-body reader of the TTFB client, and the
reader of Redis's ``INFO stats`` (Redis 7.0)."""

from __future__ import annotations

import pytest

from tests.benchmarks.clients import dechunk, keyspace_hits
from tests.benchmarks.processes import BenchmarkError
from tests.benchmarks.wrk import WrkOutputError, parse_wrk

CLEAN = """\
Running 2s test @ http://127.0.0.1:18102
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.63ms    2.68ms  22.34ms   58.14%
    Req/Sec    16.58k     1.99k   19.45k    70.00%
  Latency Distribution
     50%    3.16ms
     75%    4.97ms
     90%    7.24ms
     99%   13.29ms
  33140 requests in 2.01s, 48.80MB read
Requests/sec:  16490.54
Transfer/sec:     24.28MB
"""

NON_2XX = """\
Running 1s test @ http://127.0.0.1:18101/missing
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   168.85us  225.19us   4.32ms   99.07%
    Req/Sec    25.82k     4.54k   31.54k    60.00%
  Latency Distribution
     50%  150.00us
     75%  169.00us
     90%  205.00us
     99%  345.00us
  25664 requests in 1.00s, 7.91MB read
  Non-2xx or 3xx responses: 25664
Requests/sec:  25539.98
Transfer/sec:      7.87MB
"""

SOCKET_ERRORS = """\
Running 1s test @ http://127.0.0.1:18199/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.11s, 0.00B read
  Socket errors: connect 0, read 8734, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
"""


def test_numbers_are_read_when_the_run_is_clean() -> None:
    result = parse_wrk(CLEAN)
    assert (result.requests, result.duration_s, result.requests_per_s) == (33140, 2.01, 16490.54)
    assert (result.p50_ms, result.p75_ms, result.p90_ms, result.p99_ms) == (3.16, 4.97, 7.24, 13.29)
    assert (result.latency_avg_ms, result.latency_max_ms) == (3.63, 22.34)
    assert result.bytes_read == round(48.80 * 1024**2)
    assert result.errors == 0


def test_microseconds_become_milliseconds_when_latency_is_small() -> None:
    result = parse_wrk(NON_2XX)
    assert result.p50_ms == pytest.approx(0.150)
    assert result.p99_ms == pytest.approx(0.345)
    assert result.latency_max_ms == pytest.approx(4.32)


def test_failed_responses_count_as_errors_when_non_2xx_is_reported() -> None:
    result = parse_wrk(NON_2XX)
    assert result.non_2xx == 25664
    assert result.errors == 25664


def test_socket_errors_count_as_errors_when_reported() -> None:
    result = parse_wrk(SOCKET_ERRORS)
    assert (result.connect_errors, result.read_errors, result.write_errors, result.timeouts) == (0, 8734, 0, 0)
    assert result.errors == 8734
    assert result.requests == 0


def test_parser_refuses_output_when_latency_distribution_is_missing() -> None:
    without = "\n".join(line for line in CLEAN.splitlines() if "%  " not in line or "Latency" in line)
    with pytest.raises(WrkOutputError, match="--latency"):
        parse_wrk(without)


def test_parser_refuses_output_when_wrk_did_not_finish() -> None:
    with pytest.raises(WrkOutputError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_chunked_body_is_complete_when_the_last_chunk_and_empty_line_arrived() -> None:
    payload = b'6\r\ndata: \r\n11\r\n{"a":1}\n\ndata: [D\r\n0\r\n\r\n'
    assert dechunk(payload) == (b'data: {"a":1}\n\ndata: [D', True)


def test_chunked_body_is_incomplete_when_cut_inside_a_chunk_or_before_the_end() -> None:
    payload = b'6\r\ndata: \r\n11\r\n{"a":1}\n\ndata: [D\r\n0\r\n\r\n'
    assert dechunk(payload[:14]) == (b"data: ", False)
    assert dechunk(payload[:-2]) == (b'data: {"a":1}\n\ndata: [D', False)


INFO_STATS = (
    b"$1294\r\n# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:2\r\n"
    b"evicted_keys:0\r\nevicted_clients:0\r\nkeyspace_hits:2\r\nkeyspace_misses:1\r\npubsub_channels:0\r\n"
    b"active_defrag_hits:7\r\nactive_defrag_key_hits:5\r\n\r\n"
)


def test_keys_found_are_read_when_redis_reports_its_stats() -> None:
    assert keyspace_hits(INFO_STATS) == 2


def test_keys_found_are_refused_when_the_reply_is_not_info_stats() -> None:
    with pytest.raises(BenchmarkError, match="keyspace_hits"):
        keyspace_hits(b"-ERR unknown command\r\n")
    with pytest.raises(BenchmarkError, match="keyspace_hits"):
        keyspace_hits(b"$20\r\n# Stats\r\nkeyspace_misses:1\r\n")
