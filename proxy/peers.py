"""The workers of one process group share their metrics: each serves a snapshot of its own on a Unix socket in a
private directory, and the worker a scrape reaches adds up everyone's."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import orjson

from .metrics import Metrics

log = logging.getLogger(__name__)

# Generous for a local socket: a worker that cannot answer in this time is left out of one scrape.
GATHER_TIMEOUT_S = 2.0
_SUFFIX = ".metrics.sock"


class Peers:
    """This worker's socket in *directory* (made by the supervisor, mode 0700, so only the proxy's own user
    can read it), and the gathering of every worker's snapshot there."""

    def __init__(self, directory: str, metrics: Metrics) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{os.getpid()}{_SUFFIX}"
        self._metrics = metrics
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._answer, path=str(self.path))

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(orjson.dumps(self._metrics.snapshot()))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def gather(self) -> list[dict[str, Any]]:
        """This worker's snapshot and those of every other worker that answers within ``GATHER_TIMEOUT_S``."""
        others = [path for path in self.directory.glob(f"*{_SUFFIX}") if path != self.path]
        found = await asyncio.gather(*(self._read(path) for path in others))
        return [self._metrics.snapshot(), *(snapshot for snapshot in found if snapshot is not None)]

    async def _read(self, path: Path) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(GATHER_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    raw = await reader.read()
                finally:
                    writer.close()
            snapshot = orjson.loads(raw)
        except (OSError, TimeoutError, orjson.JSONDecodeError) as exc:
            # A worker starting or stopping: its counts are missing from this one scrape only.
            log.warning("worker metrics unavailable socket=%s error=%r", path.name, exc)
            return None
        return snapshot if isinstance(snapshot, dict) else None

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)
