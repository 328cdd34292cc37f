"""Settings: one table says every setting's file key, variable, type, bounds and secrecy; defaults live once, in
the dataclasses below. The table drives loading, validation, ``.env.example``, the README and ``check-config``."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

DEFAULT_CONFIG_FILE = "proxy.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


class ConfigError(ValueError):
    """One or more settings are missing or malformed; each line of the message names a key and the reason."""


@dataclass(frozen=True, slots=True)
class MountedSecret:
    """A secret read once, at startup, from a file (a mounted Kubernetes Secret). Only *path* is ever shown."""

    path: str
    value: str = field(repr=False)


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
    memory_max_entries: int = 10_000
    # Sized so that a sidecar stays small; raise it when CACHE_BACKEND=memory is the whole cache.
    memory_max_bytes: int = 4 * 1024 * 1024
    max_entry_bytes: int = 8 * 1024 * 1024
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

    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: MountedSecret | None = field(default=None, repr=False)
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True
    op_timeout_s: float = 0.25
    retry_after_s: float = 2.0
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class ClientKey:
    """A key that clients present to the proxy. Only its SHA-256 is kept; *name* is what logs and metrics show,
    *namespace* (optional) replaces ``cache.namespace`` for this client's entries. A *tenant* (a named key)
    gets entries of its own unless ``cache.share_across_keys``; a key of ``PROXY_API_KEYS`` only admits."""

    name: str
    digest: bytes = field(repr=False)
    namespace: str | None = None
    tenant: bool = True

    @classmethod
    def from_key(cls, name: str, key: str, namespace: str | None = None, *, tenant: bool = True) -> ClientKey:
        """A client key given in clear, or as ``sha256:<64 hex digits>`` of the key."""
        if key.startswith("sha256:"):
            return cls(name, bytes.fromhex(key[7:]), namespace, tenant)
        return cls(name, hashlib.sha256(key.encode()).digest(), namespace, tenant)


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
    log_level: str = "INFO"

    @property
    def default_upstream(self) -> Upstream:
        return self.upstreams[0]

    def upstream_for(self, model: str | None) -> Upstream:
        """The first upstream after the default whose patterns match *model*, else the default (first) one."""
        if model is not None and len(self.upstreams) > 1:
            for upstream in self.upstreams[1:]:
                if upstream.serves(model):
                    return upstream
        return self.upstreams[0]


# Kinds: each parses a raw value (YAML or environment text) or raises ValueError with the reason.


@dataclass(frozen=True, slots=True)
class Number:
    """An int or float in ``[low, high]``; with *low_open*, strictly above *low*."""

    kind: type[int] | type[float]
    low: float = 1
    high: float | None = None
    low_open: bool = False

    def parse(self, value: Any) -> int | float:
        try:
            if isinstance(value, bool):
                raise ValueError
            number = self.kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {self.describe()}, got {value!r}") from None
        too_low = number <= self.low if self.low_open else number < self.low
        if too_low or (self.high is not None and number > self.high):
            raise ValueError(f"must be {self.describe()}, got {value!r}")
        return number

    def describe(self) -> str:
        name = "an integer" if self.kind is int else "a number"
        if self.high is not None:
            return f"{name} from {self.low:g} to {self.high:g}"
        return f"{name} {'>' if self.low_open else '≥'} {self.low:g}"


@dataclass(frozen=True, slots=True)
class Text:
    pattern: str = r".+"
    meaning: str = "non-empty text"

    def parse(self, value: Any) -> str:
        text = "" if value is None else str(value)
        if not re.fullmatch(self.pattern, text):
            raise ValueError(f"must be {self.meaning}, got {text!r}")
        return text

    def describe(self) -> str:
        return self.meaning


@dataclass(frozen=True, slots=True)
class Choice:
    options: tuple[str, ...]

    def parse(self, value: Any) -> str:
        # YAML 1.1 reads an unquoted `off` as false.
        text = "off" if value is False and "off" in self.options else str(value)
        if text.lower() in self.options:
            return text.lower()
        if text.upper() in self.options:
            return text.upper()
        raise ValueError(f"must be one of {', '.join(self.options)}, got {text!r}")

    def describe(self) -> str:
        return " | ".join(self.options)


@dataclass(frozen=True, slots=True)
class Url:
    schemes: tuple[str, ...]

    def parse(self, value: Any) -> str:
        text = str(value).strip()
        parts = urlsplit(text)
        if parts.scheme not in self.schemes or (parts.scheme != "unix" and not parts.hostname):
            # Never echo the value: a URL may carry a password.
            raise ValueError(f"must be {self.describe()}")
        return text.rstrip("/") if parts.scheme in ("http", "https") else text

    def describe(self) -> str:
        return f"a URL starting with {' or '.join(f'{scheme}://' for scheme in self.schemes)}"


@dataclass(frozen=True, slots=True)
class Items:
    """A YAML list or a comma-separated string of non-empty items, in order and without repeats; with *item*,
    each item must also pass it."""

    item: Text | None = None

    def parse(self, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise ValueError("must be a list or a comma-separated string")
        unique = tuple(dict.fromkeys(str(item).strip() for item in items if str(item).strip()))
        if self.item is not None:
            unique = tuple(self.item.parse(item) for item in unique)
        return unique

    def describe(self) -> str:
        of = f" of {self.item.describe()}" if self.item is not None else ""
        return f"a list{of} (comma-separated in a variable)"


@dataclass(frozen=True, slots=True)
class Flag:
    """A boolean: YAML's own, or true/false, yes/no, 1/0 in any case."""

    def parse(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1"):
            return True
        if text in ("false", "no", "0"):
            return False
        raise ValueError(f"must be {self.describe()}, got {value!r}")

    def describe(self) -> str:
        return "true or false (or yes/no, 1/0)"


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """``auth.client_keys``: a list of ``{name, key, namespace}``; *key* in clear or as ``sha256:<hex>``."""

    def parse(self, value: Any) -> tuple[ClientKey, ...]:
        if not isinstance(value, list):
            raise ValueError("must be a list of {name, key, namespace} mappings")
        keys = tuple(self._one(item, index) for index, item in enumerate(value))
        for label, values in (("names", [k.name for k in keys]), ("keys", [k.digest for k in keys])):
            if len(set(values)) != len(values):
                raise ValueError(f"must have unique {label}")
        return keys

    def _one(self, item: Any, index: int) -> ClientKey:
        if not isinstance(item, dict) or set(item) - {"name", "key", "namespace"} or not item.get("key"):
            raise ValueError(f"[{index}] must be a mapping with name, key and optionally namespace")
        name = _NAME.parse(item.get("name", f"client-{index + 1}"))
        key = str(item["key"])
        if key.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", key):
            raise ValueError(f"[{index}].key must be sha256: followed by 64 hex digits")
        namespace = _NAMESPACE.parse(item["namespace"]) if item.get("namespace") else None
        return ClientKey.from_key(name, key, namespace)

    def describe(self) -> str:
        return "a list of {name, key, namespace}"


_NAME = Text(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "a name of letters, digits, '.', '_' or '-'")
_NAMESPACE = Text(r"[^\s{}]+", "text without spaces or braces")


@dataclass(frozen=True, slots=True)
class File:
    """The path of a file this process can read now; checked at startup, so a missing mount fails early."""

    def parse(self, value: Any) -> str:
        path = str(value).strip()
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        return path

    def describe(self) -> str:
        return "the path of a readable file"


@dataclass(frozen=True, slots=True)
class SecretFile:
    """The path of a file holding one secret, read at startup into a :class:`MountedSecret`. A trailing newline
    is not part of the secret. Errors name the path, never the content."""

    def parse(self, value: Any) -> MountedSecret:
        path = str(value).strip()
        try:
            content = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text") from None
        if not content:
            raise ValueError(f"{path} is empty")
        return MountedSecret(path, content)

    def describe(self) -> str:
        return "the path of a readable, non-empty UTF-8 file"


Kind = Number | Text | Choice | Url | Items | Flag | File | SecretFile | ClientKeys


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
# Any long random string works: HKDF turns it into the AES key. No commas, so that it can join the old keys.
_ENCRYPTION_KEY = Text(r"[^\s,]{32,}", "at least 32 characters without spaces or commas")
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
        _NAMESPACE,
        "prefix of every Redis key the proxy writes",
    ),
    Setting("cache.ttl_s", "CACHE_TTL", Number(int), "seconds a stored answer lives"),
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
        "cache.vary_headers",
        "CACHE_VARY_HEADERS",
        Items(Text(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "a header name")),
        "request headers that select another answer upstream, keyed besides OpenAI-Organization, "
        "OpenAI-Project and OpenAI-Beta",
    ),
    Setting(
        "cache.encryption_key",
        "CACHE_ENCRYPTION_KEY",
        _ENCRYPTION_KEY,
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
        Items(item=_ENCRYPTION_KEY),
        "earlier encryption keys, only for reading entries written before a rotation",
        secret=True,
    ),
    Setting(
        "redis.url",
        "REDIS_URL",
        Url(("redis", "rediss", "unix")),
        "redis://, rediss:// or unix:// URL, with user, password and db",
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
    Setting("redis.op_timeout_s", None, _SECONDS, "deadline of one Redis round trip; past it, a miss"),
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
        "DEBUG adds an access-log line per request with its cache outcome",
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
_SECTIONS = {"server": ServerSettings, "cache": CacheSettings, "redis": RedisSettings, "auth": AuthSettings}


def attribute(settings: Settings, key: str) -> Any:
    """The value at *key* (``cache.ttl_s``, ``upstreams[0].base_url``) of *settings*."""
    value: Any = settings
    for part in key.split("."):
        name, _, index = part.partition("[")
        value = getattr(value, name)
        if index:
            value = value[int(index.rstrip("]"))]
    return value


@dataclass(frozen=True, slots=True)
class Resolved:
    """A setting's final value and where it came from: ``default``, ``file`` or ``environment``; or, for the
    encryption key, ``cache.encryption_key_file``."""

    setting: Setting
    value: Any
    source: str

    def shown(self) -> str:
        """The value as ``check-config`` prints it: a secret only as set or unset (a secret file by its path), a URL
        without its password."""
        if isinstance(self.setting.kind, Url):
            return redact_url(str(self.value))
        if isinstance(self.value, MountedSecret):
            return f"{self.value.path} (read, content hidden)"
        if self.setting.secret:
            return "(set, hidden)" if self.value else "(unset)"
        if isinstance(self.value, tuple):
            return ",".join(v.name if isinstance(v, ClientKey) else str(v) for v in self.value) or "(none)"
        return str(self.value).lower() if isinstance(self.value, bool) else str(self.value)


def redact_url(url: str) -> str:
    """*url* with any password replaced by ``***``, for logs and printed settings."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}`` and ``${VAR:default}`` outside comment lines; an unset variable without a default
    is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"proxy.yaml refers to ${{{name}}}, which is not set and has no default")

    return "".join(
        line if line.lstrip().startswith("#") else _VAR.sub(substitute, line) for line in text.splitlines(keepends=True)
    )


def config_path(config_file: str | None, env: Mapping[str, str]) -> str | None:
    """The settings file: *config_file*, else ``$PROXY_CONFIG``, else ``./proxy.yaml`` when it exists."""
    path = config_file or env.get("PROXY_CONFIG")
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        return DEFAULT_CONFIG_FILE
    return path


def read_file(path: str | None, env: Mapping[str, str]) -> Mapping[str, Any]:
    """The parsed settings file, ``{}`` without one. Raises :class:`ConfigError` naming the file."""
    if path is None:
        return {}
    # Imported here: without a settings file, start-up does without PyYAML.
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        loaded = yaml.safe_load(expand_vars(text, env))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return loaded or {}


def load_settings(config_file: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from the settings file (see :func:`config_path`) and *env* (default
    ``os.environ``); variables win over the file. Raises :class:`ConfigError` listing every problem."""
    return resolve(config_file, env)[0]


def resolve(config_file: str | None = None, env: Mapping[str, str] | None = None) -> tuple[Settings, list[Resolved]]:
    """:func:`load_settings`, plus each table setting's final value and its source (for ``check-config``)."""
    env = os.environ if env is None else env
    path = config_path(config_file, env)
    data = read_file(path, env)
    problems = [f"{path}: {problem}" for problem in _unknown_keys(data)]
    sections: dict[str, dict[str, Any]] = {name: {} for name in [*_SECTIONS, "", "upstreams[0]"]}
    sources: dict[str, str] = {}
    for setting in SETTINGS_TABLE:
        raw, source = _lookup(setting, data, env)
        if source == "default":
            continue
        section, _, name = setting.key.rpartition(".")
        try:
            sections[section][name] = setting.kind.parse(raw)
        except ValueError as exc:
            # A secret's raw value is the secret itself, except for a secret file, whose raw value is its path.
            shown = not setting.secret or isinstance(setting.kind, SecretFile)
            reason = str(exc) if shown else f"must be {setting.kind.describe()}"
            place = "in the environment" if source == "environment" else f"in {path}"
            problems.append(f"{setting.names()} {place} {reason}")
            continue
        sources[setting.key] = source
    _read_encryption_key(sections["cache"], sources, problems)
    upstreams = _upstreams(data.get("upstreams"), env, sections.pop("upstreams[0]"), problems)
    if problems:
        raise ConfigError("\n".join(problems))
    top = sections.pop("")
    settings = Settings(upstreams=upstreams, **{n: cls(**sections[n]) for n, cls in _SECTIONS.items()}, **top)
    problems = _conflicts(settings)
    if problems:
        raise ConfigError("\n".join(problems))
    resolved = [
        Resolved(s, attribute(settings, s.key), sources.get(s.key) or _implicit_source(s, data)) for s in SETTINGS_TABLE
    ]
    return settings, resolved


def _read_encryption_key(cache: dict[str, Any], sources: dict[str, str], problems: list[str]) -> None:
    """Put the content of ``cache.encryption_key_file`` in ``cache.encryption_key``; report what does not fit."""
    path = cache.get("encryption_key_file")
    if path is None:
        if cache.get("encryption_old_keys") and "encryption_key" not in cache:
            problems.append("cache.encryption_old_keys (CACHE_ENCRYPTION_OLD_KEYS) needs an encryption key")
        return
    names = "cache.encryption_key_file (CACHE_ENCRYPTION_KEY_FILE)"
    if "encryption_key" in cache:
        problems.append(f"{names} and cache.encryption_key (CACHE_ENCRYPTION_KEY) are both set; set one of them")
        return
    try:
        # Secret files usually end with a newline, which is no part of the key.
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        problems.append(f"{names}: cannot read {path}: {exc.strerror}")
        return
    except UnicodeDecodeError:
        problems.append(f"{names}: {path} is not UTF-8 text")
        return
    try:
        cache["encryption_key"] = _ENCRYPTION_KEY.parse(text)
    except ValueError:
        problems.append(f"{names}: {path} must hold {_ENCRYPTION_KEY.describe()}")
        return
    sources["cache.encryption_key"] = "cache.encryption_key_file"


def _conflicts(settings: Settings) -> list[str]:
    """Problems of settings that are each valid alone but do not fit together."""
    names = {setting.key: setting.names() for setting in SETTINGS_TABLE}
    redis = settings.redis
    problems = []
    if urlsplit(redis.url).scheme != "rediss":
        # Certificates given for a plain-text URL mean someone expects TLS that would silently not happen.
        tls_files = ("redis.tls_ca_file", "redis.tls_cert_file", "redis.tls_key_file")
        problems += [
            f"{names[key]} needs a rediss:// {names['redis.url']}" for key in tls_files if attribute(settings, key)
        ]
    if redis.tls_key_file and not redis.tls_cert_file:
        problems.append(f"{names['redis.tls_key_file']} needs {names['redis.tls_cert_file']}")
    return problems


def _lookup(setting: Setting, data: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Any, str]:
    # An empty variable counts as unset, so that blank lines of a copied .env.example change nothing.
    if setting.env and env.get(setting.env):
        return env[setting.env], "environment"
    section, _, name = setting.key.rpartition(".")
    holder = data.get(section) if section else data
    if not section.startswith("upstreams[") and isinstance(holder, dict) and holder.get(name) is not None:
        return holder[name], "file"
    return None, "default"


def _implicit_source(setting: Setting, data: Mapping[str, Any]) -> str:
    # The default upstream's own entries are read with the rest of `upstreams:`.
    if setting.key.startswith("upstreams[0]") and isinstance(data.get("upstreams"), list):
        return "file"
    return "default"


def _unknown_keys(data: Mapping[str, Any]) -> list[str]:
    known: dict[str, set[str]] = {"upstreams": set()}
    for setting in SETTINGS_TABLE:
        section, _, name = setting.key.rpartition(".")
        if not section.startswith("upstreams["):
            known.setdefault(section or name, set()).update({name} if section else set())
    problems = []
    for key, value in data.items():
        if key not in known:
            problems.append(f"unknown setting {key} (known: {', '.join(sorted(known))})")
        elif known[key] and value is not None and not isinstance(value, dict):
            problems.append(f"{key} must be a mapping")
        elif known[key] and value is not None:
            problems += [
                f"unknown setting {key}.{name} (known: {', '.join(sorted(known[key]))})"
                for name in sorted(set(value) - known[key])
            ]
    return problems


def _upstreams(
    items: Any, env: Mapping[str, str], overrides: Mapping[str, Any], problems: list[str]
) -> tuple[Upstream, ...]:
    if items is None:
        items = [{"name": "default"}]
    if not isinstance(items, list) or not items:
        problems.append("upstreams must be a non-empty list of mappings")
        return (Upstream(),)
    upstreams = [_upstream(item, i, env, problems) for i, item in enumerate(items)]
    upstreams[0] = replace(upstreams[0], **overrides)
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        problems.append(f"upstreams: names must be unique, got {names}")
    return tuple(upstreams)


def _upstream(item: Any, index: int, env: Mapping[str, str], problems: list[str]) -> Upstream:
    where = f"upstreams[{index}]"
    if not isinstance(item, dict):
        problems.append(f"{where} must be a mapping")
        return Upstream()
    values: dict[str, Any] = {"name": f"upstream{index}"}
    for key, raw in item.items():
        kind = UPSTREAM_KEYS.get(key)
        if kind is None:
            problems.append(f"unknown setting {where}.{key} (known: {', '.join(sorted(UPSTREAM_KEYS))})")
            continue
        try:
            values[key] = kind.parse(raw)
        except ValueError as exc:
            problems.append(f"{where}.{key} {exc}")
    key_env = values.pop("api_key_env", "OPENAI_API_KEY" if index == 0 else None)
    values["api_key"] = (env.get(key_env) or None) if key_env else None
    return Upstream(**values)


def env_example() -> str:
    """The text of ``.env.example``: every variable of the table, commented out, with its default."""
    lines = [
        "# Copy to .env for local runs: `python -m proxy` reads it from the working directory.",
        "# Real environment variables win over .env, and .env wins over proxy.yaml; an empty value counts as unset.",
        "# Uncomment what you change: a variable set here overrides the same key in proxy.yaml.",
        "",
        "# Settings file (default: ./proxy.yaml when present).",
        "# PROXY_CONFIG=/etc/llm-cache-proxy/proxy.yaml",
    ]
    for setting in SETTINGS_TABLE:
        if setting.env:
            help_lines = textwrap.wrap(f"{setting.key}: {setting.help}.", 110)
            lines += ["", *(f"# {line}" for line in help_lines), f"# {setting.env}={_doc_default(setting)}"]
    return "\n".join(lines) + "\n"


def settings_table_markdown() -> str:
    """The README's configuration table."""
    rows = ["| `proxy.yaml` key | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for setting in SETTINGS_TABLE:
        env = f"`{setting.env}`" if setting.env else ""
        default = _doc_default(setting)
        meaning = setting.help.replace("<", "&lt;").replace(">", "&gt;")
        rows.append(f"| `{setting.key}` | {env} | {f'`{default}`' if default else 'unset'} | {meaning} |")
    return "\n".join(rows) + "\n"


def _doc_default(setting: Setting) -> str:
    default = setting.default
    if default is None or default == ():
        return ""
    if isinstance(default, bool):
        return str(default).lower()
    return f"{default:g}" if isinstance(default, float) else str(default)
