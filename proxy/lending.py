"""A connection lent to the application's own protocol for one request, and given back once it is answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .wire import AnswerFramer


class LentTransport(asyncio.Transport):
    """The connection's transport as the application's protocol sees it while it answers one request.

    Everything goes through to the real transport, and what is written is followed until the answer is whole.
    Once it is, and the request's handler has finished too (:meth:`request_finished`), *on_answered* runs (on
    the next turn of the loop); after :meth:`give_back`, the protocol can no longer close or write to the
    connection, which is the fast path's again.
    """

    def __init__(self, transport: asyncio.Transport, on_answered: Callable[[], None]) -> None:
        super().__init__()
        self._transport = transport
        self._on_answered = on_answered
        self._framer = AnswerFramer()
        self._handled = False
        self.returned = False
        # The key of the request, when the fast path found nothing under it just now: no need to look again.
        self.missed: str | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.returned:
            return
        self._transport.write(data)
        if self._framer.feed(bytes(data)):
            self._settle()

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def request_finished(self) -> None:
        """The application's handler for the request is done (its response may still be being written)."""
        self._handled = True
        self._settle()

    def _settle(self) -> None:
        if self._handled and self._framer.complete:
            asyncio.get_running_loop().call_soon(self._on_answered)

    def give_back(self) -> None:
        self.returned = True

    def close(self) -> None:
        if not self.returned:
            self._transport.close()

    def abort(self) -> None:
        if not self.returned:
            self._transport.abort()

    def is_closing(self) -> bool:
        return self.returned or self._transport.is_closing()

    # The protocol has its one request whole: what arrives meanwhile waits with the fast path, which alone
    # decides when to stop reading. The protocol's wish would otherwise undo that.
    def pause_reading(self) -> None:
        return None

    def resume_reading(self) -> None:
        return None

    def is_reading(self) -> bool:
        return not self.returned and self._transport.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return False

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()
