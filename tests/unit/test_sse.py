"""SseRecorder: terminal events found across any chunking, failures and usage noticed."""

from __future__ import annotations

import orjson
import pytest

from proxy.sse import SseRecorder


def chat_stream(with_usage: bool = True, crlf: bool = False) -> bytes:
    events = [{"id": "c", "object": "chat.completion.chunk", "choices": [{"delta": {"content": w}}]} for w in "ab"]
    if with_usage:
        events.append(
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5},
            }
        )
    text = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    return text.replace(b"\n", b"\r\n") if crlf else text


def feed_in(data: bytes, size: int) -> SseRecorder:
    recorder = SseRecorder()
    for i in range(0, len(data), size):
        recorder.feed(data[i : i + size])
    return recorder


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
@pytest.mark.parametrize("crlf", [False, True])
def test_done_is_found_when_events_are_split_anywhere(size: int, crlf: bool) -> None:
    recorder = feed_in(chat_stream(crlf=crlf), size)
    assert recorder.complete
    assert recorder.usage == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}


def test_stream_is_incomplete_when_done_never_arrives() -> None:
    data = chat_stream()
    recorder = feed_in(data[: data.index(b"data: [DONE]") + 8], 5)
    assert not recorder.complete


def test_stream_is_incomplete_when_an_error_event_arrives() -> None:
    data = b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\ndata: [DONE]\n\n'
    recorder = feed_in(data, 4)
    assert recorder.failed and not recorder.complete


def test_responses_stream_completes_when_response_completed_arrives() -> None:
    data = (
        b'event: response.created\ndata: {"type":"response.created","response":{}}\n\n'
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"usage":{"input_tokens":3,"output_tokens":2}}}\n\n'
    )
    recorder = feed_in(data, 9)
    assert recorder.complete and recorder.usage == {"input_tokens": 3, "output_tokens": 2}


def test_responses_stream_is_incomplete_when_response_failed() -> None:
    recorder = feed_in(b'event: response.failed\ndata: {"type":"response.failed","response":{}}\n\n', 100)
    assert not recorder.complete and recorder.failed


def test_comments_and_multiline_data_are_handled_when_present() -> None:
    recorder = feed_in(b": keep-alive\n\ndata: [DO\n\ndata: [DONE]\n\n", 3)
    assert recorder.complete


class CountingBytes(bytes):
    """A chunk that counts the bytes copied when something is prepended to it with ``+``."""

    copied = 0

    def __radd__(self, other: bytes) -> bytes:
        CountingBytes.copied += len(other) + len(self)
        return bytes(other) + bytes(self)


def test_work_is_linear_when_one_event_spans_many_chunks() -> None:
    event = b'data: {"choices":[{"delta":{"content":"' + b"x" * 200_000 + b'"}}]}\n\ndata: [DONE]\n\n'
    recorder = SseRecorder()
    CountingBytes.copied = 0
    for i in range(0, len(event), 7):
        recorder.feed(CountingBytes(event[i : i + 7]))
    assert recorder.complete
    # Re-joining the buffered part at every chunk would copy about len(event)**2 / 14 bytes.
    assert CountingBytes.copied < 4 * len(event)
