"""Load settings: ``proxy.yaml`` with ``${VAR}`` expansion, then environment overrides, validated once."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

DEFAULT_CONFIG_FILE = "proxy.yaml"
BACKENDS = ("redis", "memory", "off")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The in-process tier: hot entries in front of Redis, or the whole cache. Sized so that a sidecar stays
# under 60 MiB resident (the imported libraries alone take about 48 MiB); raise it for CACHE_BACKEND=memory
# on a machine with room.
DEFAULT_MEMORY_MAX_BYTES = 4 * 1024 * 1024
_N = TypeVar("_N", int, float)
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the key."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One OpenAI-compatible API. *api_key* is a secret: it is excluded from ``repr``."""

    name: str
    base_url: str
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
class RedisSettings:
    """Where the shared cache lives. *password* overrides one embedded in *url*."""

    url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    password: str | None = field(default=None, repr=False)
    op_timeout_s: float = 0.25
    retry_after_s: float = 2.0
    max_connections: int = 64


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """What is cached and for how long; the memory limits bound the in-process tier."""

    backend: str = "redis"
    namespace: str = "llm-cache"
    ttl_s: int = 3600
    memory_max_entries: int = 10_000
    memory_max_bytes: int = DEFAULT_MEMORY_MAX_BYTES
    max_entry_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the proxy reads at startup. Built by :func:`load_settings`, never mutated."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body_bytes: int = 32 * 1024 * 1024
    upstreams: tuple[Upstream, ...] = (Upstream(name="default", base_url="https://api.openai.com/v1"),)
    redis: RedisSettings = RedisSettings()
    cache: CacheSettings = CacheSettings()
    proxy_api_keys: frozenset[str] = field(default=frozenset(), repr=False)
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


def load_settings(config_path: str | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from the YAML file (if any) and *env* (default ``os.environ``).

    The file is *config_path*, else ``$PROXY_CONFIG``, else ``./proxy.yaml`` when it exists.
    Environment variables win over the file. Raises :class:`ConfigError` naming the bad key.
    """
    env = os.environ if env is None else env
    path = config_path or env.get("PROXY_CONFIG")
    data: Mapping[str, Any] = {}
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        # Imported here: without a settings file, start-up does without it (about 15 ms).
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
        data = loaded or {}
    return _build(data, env)


def _build(data: Mapping[str, Any], env: Mapping[str, str]) -> Settings:
    _reject_unknown(data, "", {"server", "upstreams", "cache", "redis", "auth", "log_level"})
    server = _section(data, "server", {"host", "port", "workers", "max_body_bytes"})
    cache = _section(data, "cache", set(CacheSettings.__dataclass_fields__))
    redis_data = _section(data, "redis", {"url", "password", "op_timeout_s", "retry_after_s", "max_connections"})
    auth = _section(data, "auth", {"proxy_api_keys"})

    upstreams = [_upstream(item, i, env) for i, item in enumerate(_list(data, "upstreams"))]
    if not upstreams:
        upstreams = [_upstream({"name": "default"}, 0, env)]
    default = upstreams[0]
    upstreams[0] = replace(
        default,
        base_url=_url(env.get("UPSTREAM_BASE_URL", default.base_url), "UPSTREAM_BASE_URL", ("http", "https")),
        api_key=env.get("OPENAI_API_KEY") or default.api_key,
        timeout_s=_positive(env.get("UPSTREAM_TIMEOUT", default.timeout_s), "UPSTREAM_TIMEOUT", float),
    )
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise ConfigError(f"upstreams: names must be unique, got {names}")

    keys_value = env.get("PROXY_API_KEYS", auth.get("proxy_api_keys", []))
    if isinstance(keys_value, str):
        keys_value = keys_value.split(",")
    if not isinstance(keys_value, list):
        raise ConfigError("auth.proxy_api_keys must be a list or a comma-separated string")
    proxy_api_keys = frozenset(str(k).strip() for k in keys_value if str(k).strip())

    backend_value = env.get("CACHE_BACKEND", cache.get("backend", "redis"))
    # YAML 1.1 reads an unquoted `off` as false.
    backend = "off" if backend_value is False else str(backend_value).lower()
    if backend not in BACKENDS:
        raise ConfigError(f"CACHE_BACKEND must be one of {', '.join(BACKENDS)}, got {backend!r}")
    namespace = str(env.get("CACHE_NAMESPACE", cache.get("namespace", "llm-cache")))
    if not namespace or any(c.isspace() for c in namespace):
        raise ConfigError(f"CACHE_NAMESPACE must be non-empty and contain no spaces, got {namespace!r}")

    log_level = str(env.get("LOG_LEVEL", data.get("log_level", "INFO"))).upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {log_level!r}")

    return Settings(
        host=str(env.get("PROXY_HOST", server.get("host", "127.0.0.1"))),
        port=_port(env.get("PROXY_PORT", server.get("port", 8080)), "PROXY_PORT"),
        workers=_positive(env.get("PROXY_WORKERS", server.get("workers", 1)), "PROXY_WORKERS", int),
        max_body_bytes=_positive(server.get("max_body_bytes", 32 * 1024 * 1024), "server.max_body_bytes", int),
        upstreams=tuple(upstreams),
        redis=RedisSettings(
            url=_url(
                env.get("REDIS_URL", redis_data.get("url", DEFAULT_REDIS_URL)), "REDIS_URL", ("redis", "rediss", "unix")
            ),
            password=env.get("REDIS_PASSWORD") or _opt_str(redis_data.get("password")),
            op_timeout_s=_positive(redis_data.get("op_timeout_s", 0.25), "redis.op_timeout_s", float),
            retry_after_s=_positive(redis_data.get("retry_after_s", 2.0), "redis.retry_after_s", float),
            max_connections=_positive(redis_data.get("max_connections", 64), "redis.max_connections", int),
        ),
        cache=CacheSettings(
            backend=backend,
            namespace=namespace,
            ttl_s=_positive(env.get("CACHE_TTL", cache.get("ttl_s", 3600)), "CACHE_TTL", int),
            memory_max_entries=_positive(cache.get("memory_max_entries", 10_000), "cache.memory_max_entries", int),
            memory_max_bytes=_positive(
                cache.get("memory_max_bytes", DEFAULT_MEMORY_MAX_BYTES), "cache.memory_max_bytes", int
            ),
            max_entry_bytes=_positive(cache.get("max_entry_bytes", 8 * 1024 * 1024), "cache.max_entry_bytes", int),
        ),
        proxy_api_keys=proxy_api_keys,
        log_level=log_level,
    )


def _upstream(item: Any, index: int, env: Mapping[str, str]) -> Upstream:
    where = f"upstreams[{index}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where} must be a mapping")
    _reject_unknown(
        item,
        where + ".",
        {"name", "base_url", "api_key_env", "models", "timeout_s", "connect_timeout_s", "auth_header"},
    )
    key_env = item.get("api_key_env", "OPENAI_API_KEY" if index == 0 else None)
    if key_env is not None and not isinstance(key_env, str):
        raise ConfigError(f"{where}.api_key_env must be the name of an environment variable")
    models = item.get("models", ["*"])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise ConfigError(f"{where}.models must be a list of glob patterns")
    return Upstream(
        name=str(item.get("name", f"upstream{index}")),
        base_url=_url(item.get("base_url", "https://api.openai.com/v1"), f"{where}.base_url", ("http", "https")),
        api_key=(env.get(key_env) or None) if key_env else None,
        models=tuple(models),
        timeout_s=_positive(item.get("timeout_s", 600), f"{where}.timeout_s", float),
        connect_timeout_s=_positive(item.get("connect_timeout_s", 10), f"{where}.connect_timeout_s", float),
        auth_header=str(item.get("auth_header", "Authorization")),
    )


def _section(data: Mapping[str, Any], name: str, allowed: set[str]) -> Mapping[str, Any]:
    value = data.get(name) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping")
    _reject_unknown(value, name + ".", allowed)
    return value


def _list(data: Mapping[str, Any], name: str) -> list[Any]:
    value = data.get(name) or []
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be a list")
    return value


def _reject_unknown(data: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown setting {prefix}{unknown[0]} (known: {', '.join(sorted(allowed))})")


def _positive(value: Any, key: str, kind: type[_N]) -> _N:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a positive {kind.__name__}, got {value!r}") from None
    if isinstance(value, bool) or number <= 0:
        raise ConfigError(f"{key} must be a positive {kind.__name__}, got {value!r}")
    return number


def _port(value: Any, key: str) -> int:
    port = _positive(value, key, int)
    if port > 65535:
        raise ConfigError(f"{key} must be a TCP port (1-65535), got {value!r}")
    return port


def _url(value: Any, key: str, schemes: tuple[str, ...]) -> str:
    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in schemes or (parts.scheme != "unix" and not parts.hostname):
        # Never echo the value: a URL may carry a password.
        raise ConfigError(f"{key} must be a {'/'.join(s + '://' for s in schemes)} URL")
    return text.rstrip("/") if parts.scheme in ("http", "https") else text


def _opt_str(value: Any) -> str | None:
    return None if value in (None, "") else str(value)
