"""Typed application state keys, shared by the app factory and the handlers."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as redis
from aiohttp import web

from .cache_key import Keyed, Memo
from .config import Settings
from .metrics import Metrics
from .relay import Flights
from .store import CacheStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", CacheStore)
SESSION = web.AppKey("session", aiohttp.ClientSession)
FLIGHTS = web.AppKey("flights", Flights)
METRICS = web.AppKey("metrics", Metrics)
READY = web.AppKey("ready", asyncio.Event)
KEY_MEMO = web.AppKey("key_memo", Memo[tuple[str | bytes | None, ...], Keyed])
INJECTED_REDIS = web.AppKey("injected_redis", redis.Redis)
