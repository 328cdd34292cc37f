"""Namespace generations on a replica: read from Redis at start, whenever Redis reports that one changed, and at an
interval; a change switches the keys built from then on and empties the in-process tier and the remembered keys.

A purge increments a namespace's generation (``<namespace>:generation``), which is part of every entry key
(:func:`~proxy.cache_key.key_version`): every entry of the old generation stops being found at once, whatever
their number, and the old keys are reclaimed afterwards or expire. The generation is read off the request path;
a request only uses the key prefix already chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from functools import partial

from redis.exceptions import RedisError

from .cache_key import generation_key
from .keying import Keyer
from .memory import TieredStore
from .store import RedisStore

log = logging.getLogger(__name__)

# How often the generations are read when Redis cannot report changes (invalidations off, down, or the
# generation not read yet), and otherwise, in case a report was lost.
POLL_S = 1.0
QUIET_POLL_S = 30.0


class Generations:
    """Keeps *keyer*'s generation of each of *namespaces* equal to the one in Redis, and empties *tier* when one
    changes. *pushed* tells whether Redis currently reports changes under the namespaces (the invalidation
    listener is up); :meth:`heard` is to be given what it reports."""

    def __init__(
        self,
        remote: RedisStore,
        keyer: Keyer,
        tier: TieredStore,
        namespaces: list[str],
        *,
        pushed: Callable[[], bool],
    ) -> None:
        self._remote = remote
        self._keyer = keyer
        self._tier = tier
        self._namespaces = {generation_key(namespace): namespace for namespace in namespaces}
        self._names = {name.encode() for name in self._namespaces}
        self._pushed = pushed
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.known = False

    def heard(self, keys: list[bytes] | None) -> None:
        """Redis reports *keys* changed (``None``: anything may have): read the generations again if they may
        be among them."""
        if keys is None or not self._names.isdisjoint(keys):
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        # Woken every POLL_S whatever happens, so that invalidations going down switch to polling at once.
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._wake.wait()
            woken = self._wake.is_set()
            self._wake.clear()
            if woken or not (self.known and self._pushed()) or loop.time() - last >= QUIET_POLL_S:
                last = loop.time()
                await self.refresh()

    async def refresh(self) -> None:
        """Read every generation (one deadline-bound round trip each); switch to any that changed. A Redis
        failure leaves everything as it is, to be read again later."""
        if not self._remote.available:
            return
        try:
            values = await asyncio.gather(
                *(
                    self._remote.call(partial(self._remote.client.get, name), operation="generation")
                    for name in self._namespaces
                )
            )
        except (RedisError, TimeoutError, OSError) as exc:
            log.debug("namespace generations not read; next try later error=%s: %s", type(exc).__name__, exc)
            return
        changed = False
        for (name, namespace), value in zip(self._namespaces.items(), values, strict=True):
            generation = _generation(name, value)
            if generation is not None and self._keyer.switch_generation(namespace, generation):
                log.info(
                    "namespace generation now %d namespace=%s; earlier entries are not served", generation, namespace
                )
                changed = True
        if changed:
            self._tier.invalidate(None)
        self.known = True


def _generation(name: str, value: object) -> int | None:
    if value is None:
        return 0
    text = value.decode() if isinstance(value, bytes) else str(value)
    if not text.isascii() or not text.isdigit():
        log.warning("namespace generation unreadable; keeping the current one key=%s", name)
        return None
    return int(text)
