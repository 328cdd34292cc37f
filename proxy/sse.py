"""SseRecorder: follow a Server-Sent Events stream across chunk boundaries and tell when it finished."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

# Chat and completion streams end with "data: [DONE]"; the Responses API ends with a
# "response.completed" event instead. Anything else means the stream did not finish.
_DONE = b"[DONE]"
_COMPLETED_TYPE = b'"response.completed"'


class SseRecorder:
    """Inspect each complete event of a stream fed to it in arbitrary chunks.

    :attr:`complete` is true once a terminal event arrived and no error event was seen;
    :attr:`usage` holds the last ``usage`` object the stream reported.
    """

    __slots__ = ("_edge", "_pending", "complete", "failed", "usage")

    def __init__(self) -> None:
        self._pending: list[bytes] = []
        self._edge = b""
        self.complete = False
        self.failed = False
        self.usage: Mapping[str, Any] | None = None

    def feed(self, chunk: bytes) -> None:
        # An event split over many chunks is joined once, when its end arrives, not at every chunk: only the
        # seam (the last bytes so far and the new chunk) is searched for the blank line that ends an event.
        seam = self._edge + chunk
        if b"\r" in seam:
            seam = seam.replace(b"\r\n", b"\n")
        self._edge = (self._edge + chunk)[-3:]
        if b"\n\n" not in seam:
            self._pending.append(chunk)
            return
        buffer = b"".join(self._pending) + chunk
        # Normalising CRLF keeps event splitting simple; the bytes relayed and stored stay untouched.
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, tail = buffer.split(b"\n\n")
        self._pending = [tail] if tail else []
        for event in events:
            self._inspect(event)

    def _inspect(self, event: bytes) -> None:
        data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            return
        if data == _DONE:
            self.complete = not self.failed
            return
        if data.startswith(b'{"error"') or b'"type":"error"' in data[:40] or b'"response.failed"' in data[:60]:
            self.failed = True
            self.complete = False
            return
        if b'"usage"' in data:
            try:
                parsed = orjson.loads(data)
            except orjson.JSONDecodeError:
                return
            usage = _find_usage(parsed)
            if usage is not None:
                self.usage = usage
        if _COMPLETED_TYPE in data[:60] and not self.failed:
            self.complete = True


def _find_usage(event: Any) -> Mapping[str, Any] | None:
    if not isinstance(event, dict):
        return None
    usage = event.get("usage")
    if isinstance(usage, dict):
        return usage
    response = event.get("response")
    if isinstance(response, dict) and isinstance(response.get("usage"), dict):
        return response["usage"]  # type: ignore[no-any-return]
    return None
