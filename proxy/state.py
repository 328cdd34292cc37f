"""Typed application-state keys, shared by the app factory, the handlers and the guards."""

from __future__ import annotations

import asyncio

import redis.asyncio as redis
from aiohttp import web

from .config import Settings
from .fleet import Fleet
from .flight import Flights
from .keying import Keyer
from .kinds import ClientKey
from .logs import AccessLog, Exchange, RequestIds
from .metrics import Metrics
from .peers import Peers
from .store import CacheStore
from .upstream import CallSlots, UpstreamClient

SETTINGS = web.AppKey("settings", Settings)
KEYER = web.AppKey("keyer", Keyer)
STORE = web.AppKey("store", CacheStore)
UPSTREAMS = web.AppKey("upstreams", dict[str, UpstreamClient])
FLIGHTS = web.AppKey("flights", Flights)
# Present when replicas share upstream calls through Redis.
FLEET = web.AppKey("fleet", Fleet)
METRICS = web.AppKey("metrics", Metrics)
# Present in a worker of a process group (--workers N): the other workers' metrics.
PEERS = web.AppKey("peers", Peers)
ACCESS_LOG = web.AppKey("access_log", AccessLog)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
READY = web.AppKey("ready", asyncio.Event)
INJECTED_REDIS = web.AppKey("injected_redis", redis.Redis)
SLOTS = web.AppKey("slots", CallSlots)
# The client key that authenticated a request, when the proxy has client keys.
CLIENT = web.RequestKey("client", ClientKey)
EXCHANGE = web.RequestKey("exchange", Exchange)
