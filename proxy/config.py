"""Settings: one table says every setting's file key, variable, kind and bounds, and secrecy; defaults live once,
in the dataclasses below. :mod:`proxy.loader` reads files and the environment through it and renders it as
``.env.example``, the README's table and ``check-config``."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from .kinds import (
    NAMESPACE,
    Choice,
    ClientKey,
    ClientKeys,
    File,
    Flag,
    Items,
    Kind,
    MountedSecret,
    Number,
    Prices,
    SecretFile,
    Text,
    Url,
)
from .pricing import PRICES_TAKEN, ModelPrice


class ConfigError(ValueError):
    """One or more settings are missing or malformed; each line of the message names a key and the reason."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One OpenAI-compatible API. *api_key* is a secret: it is excluded from ``repr``."""

    name: str = "default"
    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ("*",)
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    # Azure-style gateways take the raw key in "api-key"; everything else takes "Authorization: Bearer".
    auth_header: str = "Authorization"

    def serves(self, model: str) -> bool:
        """True when *model* matches one of this upstream's glob patterns."""
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where and how the proxy listens."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 32 * 1024 * 1024
    client_timeout_s: float = 60.0
    shutdown_grace_s: float = 25.0
    fast_path: bool = True
    max_upstream_calls: int = 256
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """What is cached and for how long; the memory limits bound the in-process tier. With *encryption_key* (given
    directly or read from *encryption_key_file*), entries in Redis are sealed; *encryption_old_keys* only read
    them. The keys are secret."""

    backend: str = "redis"
    namespace: str = "llm-cache"
    ttl_s: int = 3600
    stale_if_error_s: int = 0
    finish_abandoned: bool = False
    memory_max_entries: int = 10_000
    # Sized so that a sidecar stays small; raise it when CACHE_BACKEND=memory is the whole cache.
    memory_max_bytes: int = 4 * 1024 * 1024
    max_entry_bytes: int = 8 * 1024 * 1024
    replica_single_flight: bool = True
    invalidations: bool = True
    flight_lease_s: float = 5.0
    flight_wait_s: float = 60.0
    share_across_keys: bool = False
    key_secret: str | None = field(default=None, repr=False)
    vary_headers: tuple[str, ...] = ()
    encryption_key: str | None = field(default=None, repr=False)
    encryption_key_file: str | None = None
    encryption_old_keys: tuple[str, ...] = field(default=(), repr=False)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the shared cache lives and how to reach it. *username* wins over a user in *url*; *password* wins over
    *password_file*, which wins over a password in *url*; these three are secret. The ``tls_*`` settings apply to
    a ``rediss://`` *url*."""

    mode: str = "standalone"
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    cluster_nodes: tuple[str, ...] = ()
    sentinels: tuple[str, ...] = ()
    sentinel_master: str = "mymaster"
    sentinel_password: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: MountedSecret | None = field(default=None, repr=False)
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True
    timeout_ms: int = 250
    retry_after_s: float = 2.0
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Client keys the proxy accepts; none means no client check."""

    proxy_api_keys: tuple[str, ...] = field(default=(), repr=False)
    client_keys: tuple[ClientKey, ...] = ()

    @property
    def clients(self) -> tuple[ClientKey, ...]:
        """Every accepted key: the named ones, then ``PROXY_API_KEYS`` as ``api-key-1``, ``api-key-2``..."""
        unnamed = (
            ClientKey.from_key(f"api-key-{i}", key, tenant=False) for i, key in enumerate(self.proxy_api_keys, 1)
        )
        return (*self.client_keys, *unnamed)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy reads at startup. Built by :func:`load_settings`, never mutated. Attribute paths are
    the keys of ``proxy.yaml``."""

    server: ServerSettings = ServerSettings()
    upstreams: tuple[Upstream, ...] = (Upstream(),)
    cache: CacheSettings = CacheSettings()
    redis: RedisSettings = RedisSettings()
    auth: AuthSettings = AuthSettings()
    # Added to the shipped prices (proxy.pricing.DEFAULT_PRICES), and winning over them.
    pricing: tuple[ModelPrice, ...] = ()
    log_level: str = "INFO"
    log_format: str | None = None

    @property
    def default_upstream(self) -> Upstream:
        return self.upstreams[0]

    @property
    def namespaces(self) -> list[str]:
        """Every namespace entries are written in: ``cache.namespace`` and every client key's own."""
        return sorted({self.cache.namespace, *(c.namespace for c in self.auth.clients if c.namespace)})

    def upstream_for(self, model: str | None) -> Upstream:
        """The first upstream after the default whose patterns match *model*, else the default (first) one."""
        if model is not None and len(self.upstreams) > 1:
            for upstream in self.upstreams[1:]:
                if upstream.serves(model):
                    return upstream
        return self.upstreams[0]


# Kinds: each parses a raw value (YAML or environment text) or raises ValueError with the reason.


@dataclass(frozen=True, slots=True)
class Setting:
    """One row of the table. *key* is both the ``proxy.yaml`` key and the attribute path in :class:`Settings`
    (``upstreams[0]`` is the default upstream); *env* the variable that overrides it."""

    key: str
    env: str | None
    kind: Kind
    help: str
    secret: bool = False

    @property
    def default(self) -> Any:
        return attribute(Settings(), self.key)

    def names(self) -> str:
        return f"{self.key} ({self.env})" if self.env else self.key


_SECONDS = Number(float, 0, low_open=True)
_ADDRESS = Text(r"[A-Za-z0-9.-]+:[0-9]{1,5}|\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}", "host:port")
# Any long random string works: HKDF turns it into the AES key. No commas, so that it can join the old keys.
ENCRYPTION_KEY = Text(r"[^\s,]{32,}", "at least 32 characters without spaces or commas")
SETTINGS_TABLE: tuple[Setting, ...] = (
    Setting("server.host", "PROXY_HOST", Text(), "listen address; 0.0.0.0 inside a container"),
    Setting("server.port", "PROXY_PORT", Number(int, 1, 65535), "listen port"),
    Setting(
        "server.workers", "PROXY_WORKERS", Number(int), "processes sharing the port (SO_REUSEPORT); also --workers N"
    ),
    Setting(
        "server.max_body_bytes",
        "MAX_BODY_BYTES",
        Number(int),
        "largest request body, chunked ones included; a larger one gets 413 and nothing is forwarded",
    ),
    Setting(
        "server.client_timeout_s",
        "PROXY_CLIENT_TIMEOUT",
        _SECONDS,
        "seconds a client may take to send its request, and an idle connection stays open",
    ),
    Setting(
        "server.shutdown_grace_s",
        "SHUTDOWN_GRACE_S",
        Number(float, 0),
        "on SIGTERM, new connections are refused at once and requests in flight and pending stores get this "
        "long to finish (inside Kubernetes' 30 s default grace period)",
    ),
    Setting(
        "server.fast_path",
        "PROXY_FAST_PATH",
        Flag(),
        "answer repeated requests found in the cache from a lean HTTP/1.1 server in front of the application; "
        "anything else, and everything when off, goes to the application",
    ),
    Setting(
        "server.max_upstream_calls",
        "PROXY_MAX_UPSTREAM_CALLS",
        Number(int),
        "upstream calls in flight per process at most; beyond, 503 with Retry-After (hits are not counted)",
    ),
    Setting(
        "server.allowed_hosts",
        "PROXY_ALLOWED_HOSTS",
        Items(Text(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", "a host name")),
        "Host names the proxy answers besides localhost and IP addresses; bound to a non-loopback address, "
        "setting it turns the Host check on",
    ),
    Setting(
        "server.allowed_origins",
        "PROXY_ALLOWED_ORIGINS",
        Items(Text(r"https?://[A-Za-z0-9.-]+(:[0-9]+)?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]+)?", "an origin")),
        "browser origins (https://app.example.com) allowed to call the proxy, with CORS; others get 403",
    ),
    Setting(
        "upstreams[0].base_url",
        "UPSTREAM_BASE_URL",
        Url(("http", "https")),
        "the default upstream, including its /v1: /v1/<rest> goes to <base_url>/<rest>",
    ),
    Setting(
        "upstreams[0].api_key",
        "OPENAI_API_KEY",
        Text(),
        "upstream key, sent in place of the client's; unset, each client's own key goes upstream and entries are "
        "partitioned by a keyed hash of it",
        secret=True,
    ),
    Setting(
        "upstreams[0].timeout_s",
        "UPSTREAM_TIMEOUT",
        _SECONDS,
        "seconds of upstream silence before the client gets a 504 (between bytes, so long streams are fine)",
    ),
    Setting(
        "cache.backend",
        "CACHE_BACKEND",
        Choice(("redis", "memory", "off")),
        "redis (shared, with an in-process tier in front), memory (this process only) or off",
    ),
    Setting(
        "cache.namespace",
        "CACHE_NAMESPACE",
        NAMESPACE,
        "prefix of every Redis key the proxy writes",
    ),
    Setting("cache.ttl_s", "CACHE_TTL", Number(int), "seconds a stored answer lives"),
    Setting(
        "cache.stale_if_error_s",
        "CACHE_STALE_IF_ERROR",
        Number(int, 0),
        "seconds an answer is kept past its TTL to be served, marked X-Cache: STALE, when the upstream fails "
        "(5xx, 429, timeout, unreachable); never served otherwise; 0 turns it off",
    ),
    Setting(
        "cache.finish_abandoned",
        "CACHE_FINISH_ABANDONED",
        Flag(),
        "when every client of an upstream call has disconnected, finish the call and store its answer (for an "
        "eval or CI run that will ask again); off, the call is cancelled and nothing is paid for or stored",
    ),
    Setting("cache.memory_max_entries", None, Number(int), "entries in the in-process tier at most"),
    Setting(
        "cache.memory_max_bytes",
        None,
        Number(int),
        "bytes in the in-process tier at most (a hot set in front of Redis; raise it when the backend is memory)",
    ),
    Setting("cache.max_entry_bytes", None, Number(int), "larger answers are relayed but not stored"),
    Setting(
        "cache.share_across_keys",
        "CACHE_SHARE_ACROSS_KEYS",
        Flag(),
        "share entries between named client keys, and between clients' own upstream keys; off, each has its own",
    ),
    Setting(
        "cache.key_secret",
        "CACHE_KEY_SECRET",
        Text(r".{16,}", "at least 16 characters"),
        "secret of the keyed hash behind every cache key; without it, whoever reads Redis can confirm a guessed "
        "prompt by hashing it",
        secret=True,
    ),
    Setting(
        "cache.replica_single_flight",
        "CACHE_REPLICA_SINGLE_FLIGHT",
        Flag(),
        "identical requests on different replicas share one upstream call, through a lock and a stream in Redis",
    ),
    Setting(
        "cache.invalidations",
        "CACHE_INVALIDATIONS",
        Flag(),
        "keep every replica's in-process tier coherent through Redis's invalidations (CLIENT TRACKING); off, an entry "
        "replaced or deleted elsewhere may be served from a replica's memory until it expires",
    ),
    Setting(
        "cache.flight_lease_s",
        None,
        _SECONDS,
        "how long a replica's claim on an upstream call lasts unless renewed; a replica that dies frees it so late",
    ),
    Setting(
        "cache.flight_wait_s",
        None,
        _SECONDS,
        "how long a replica waits for another's call to start answering before it calls the upstream itself",
    ),
    Setting(
        "cache.vary_headers",
        "CACHE_VARY_HEADERS",
        Items(Text(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "a header name")),
        "request headers that select another answer upstream, keyed besides OpenAI-Organization, "
        "OpenAI-Project and OpenAI-Beta",
    ),
    Setting(
        "cache.encryption_key",
        "CACHE_ENCRYPTION_KEY",
        ENCRYPTION_KEY,
        "when set, entries are encrypted in Redis (AES-GCM) with a key derived from it: 32 random bytes or more, "
        "e.g. `openssl rand -base64 32`; fewer than 32 characters are refused",
        secret=True,
    ),
    Setting(
        "cache.encryption_key_file",
        "CACHE_ENCRYPTION_KEY_FILE",
        Text(),
        "file holding the encryption key (a mounted Kubernetes secret), instead of cache.encryption_key",
    ),
    Setting(
        "cache.encryption_old_keys",
        "CACHE_ENCRYPTION_OLD_KEYS",
        Items(item=ENCRYPTION_KEY),
        "earlier encryption keys, only for reading entries written before a rotation",
        secret=True,
    ),
    Setting(
        "redis.mode",
        "REDIS_MODE",
        Choice(("standalone", "cluster", "sentinel")),
        "standalone (one server), cluster (Redis Cluster) or sentinel (a master found through Sentinels)",
    ),
    Setting(
        "redis.url",
        "REDIS_URL",
        Url(("redis", "rediss", "unix")),
        "redis://, rediss:// or unix:// URL, with user, password and db; in cluster mode one node of the cluster, "
        "in sentinel mode only credentials, db and TLS (the address comes from the Sentinels)",
        secret=True,
    ),
    Setting(
        "redis.cluster_nodes",
        None,
        Items(_ADDRESS),
        "more cluster nodes (host:port) to start from, besides the URL's, in cluster mode",
    ),
    Setting(
        "redis.sentinels",
        "REDIS_SENTINELS",
        Items(_ADDRESS),
        "the Sentinels (host:port,host:port) that name the master, in sentinel mode",
    ),
    Setting("redis.sentinel_master", "REDIS_SENTINEL_MASTER", Text(), "the master's name at the Sentinels"),
    Setting(
        "redis.sentinel_password",
        "REDIS_SENTINEL_PASSWORD",
        Text(),
        "password of the Sentinels themselves (sentinel requirepass), when they have one",
        secret=True,
    ),
    Setting("redis.username", "REDIS_USERNAME", Text(), "Redis ACL user; wins over one in the URL"),
    Setting(
        "redis.password",
        "REDIS_PASSWORD",
        Text(),
        "Redis password; wins over REDIS_PASSWORD_FILE and over one in the URL",
        secret=True,
    ),
    Setting(
        "redis.password_file",
        "REDIS_PASSWORD_FILE",
        SecretFile(),
        "file whose content is the Redis password (a mounted Secret; a trailing newline is dropped); read at "
        "startup, wins over a password in the URL",
        secret=True,
    ),
    Setting(
        "redis.tls_ca_file",
        "REDIS_TLS_CA_FILE",
        File(),
        "PEM file of the CA certificates that Redis's certificate is checked against (rediss:// only); unset, the "
        "system's CAs",
    ),
    Setting(
        "redis.tls_cert_file",
        "REDIS_TLS_CERT_FILE",
        File(),
        "PEM client certificate, for a Redis that requires one (tls-auth-clients yes)",
    ),
    Setting(
        "redis.tls_key_file",
        "REDIS_TLS_KEY_FILE",
        File(),
        "PEM private key of the client certificate; unset, it is read from REDIS_TLS_CERT_FILE",
    ),
    Setting(
        "redis.tls_check_hostname",
        "REDIS_TLS_CHECK_HOSTNAME",
        Flag(),
        "check that Redis's certificate names the URL's host; turn off only for a Redis reached by an address "
        "its certificate does not list",
    ),
    Setting(
        "redis.timeout_ms",
        "REDIS_TIMEOUT_MS",
        Number(int, 1, 60_000),
        "deadline in milliseconds of one Redis round trip, waiting for a connection included; past it the request "
        "goes on without the cache (a lookup is a miss) and Redis is left alone for redis.retry_after_s",
    ),
    Setting("redis.retry_after_s", None, _SECONDS, "after a Redis failure, serve without Redis this long, then retry"),
    Setting("redis.max_connections", None, Number(int), "Redis connections per process at most"),
    Setting(
        "auth.proxy_api_keys",
        "PROXY_API_KEYS",
        Items(),
        "client keys (Authorization: Bearer <key>), named api-key-1, api-key-2... in logs; they share entries; "
        "with any client key, other callers get 401 and nothing goes upstream",
        secret=True,
    ),
    Setting(
        "auth.client_keys",
        None,
        ClientKeys(),
        "named client keys, one per tenant: [{name, key, namespace}], key in clear or as sha256:<hex>; each has "
        "entries of its own (in its namespace, if given); the name shows in logs and metrics",
    ),
    Setting(
        "log_level",
        "LOG_LEVEL",
        Choice(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")),
        "INFO and DEBUG log one line per /v1 request (its id, outcome, status, timings, tokens); WARNING and above "
        "leave them out",
    ),
    Setting(
        "log_format",
        "LOG_FORMAT",
        Choice(("json", "text")),
        "json (one object per line) or text (key=value); unset, text when stderr is a terminal, else json",
    ),
    Setting(
        "pricing",
        None,
        Prices(),
        f"USD per million input and output tokens by model, {{gpt-4o: {{input: 2.5, output: 10}}}}, added to and "
        f"winning over the shipped OpenAI list prices (taken in {PRICES_TAKEN}); turns tokens served from the cache "
        "into llm_cache_cost_saved_usd_total",
    ),
)

# Keys of one entry of `upstreams:` in proxy.yaml (only there), with what each must be.
UPSTREAM_KEYS: dict[str, Kind] = {
    "name": Text(),
    "base_url": Url(("http", "https")),
    "api_key_env": Text(r"[A-Za-z_][A-Za-z0-9_]*", "the name of an environment variable"),
    "models": Items(),
    "timeout_s": _SECONDS,
    "connect_timeout_s": _SECONDS,
    "auth_header": Text(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "a header name"),
}
SECTIONS = {"server": ServerSettings, "cache": CacheSettings, "redis": RedisSettings, "auth": AuthSettings}


def attribute(settings: Settings, key: str) -> Any:
    """The value at *key* (``cache.ttl_s``, ``upstreams[0].base_url``) of *settings*."""
    value: Any = settings
    for part in key.split("."):
        name, _, index = part.partition("[")
        value = getattr(value, name)
        if index:
            value = value[int(index.rstrip("]"))]
    return value
