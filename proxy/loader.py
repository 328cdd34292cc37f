"""Load settings through the table: ``proxy.yaml`` with ``${VAR}`` expansion, then the environment, every problem
reported at once; and render the table as ``.env.example``, the README's table and ``check-config`` lines."""

from __future__ import annotations

import os
import re
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .config import (
    ENCRYPTION_KEY,
    SECTIONS,
    SETTINGS_TABLE,
    UPSTREAM_KEYS,
    ConfigError,
    Setting,
    Settings,
    Upstream,
    attribute,
)
from .kinds import ClientKey, MountedSecret, SecretFile, Url
from .pricing import ModelPrice

DEFAULT_CONFIG_FILE = "proxy.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::([^}]*))?\}")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A setting's final value and where it came from: ``default``, ``file`` or ``environment``; or, for the
    encryption key, ``cache.encryption_key_file``."""

    setting: Setting
    value: Any
    source: str

    def __repr__(self) -> str:
        return f"Resolved({self.setting.key}={self.shown()!r}, source={self.source!r})"

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
            return ",".join(_shown_item(v) for v in self.value) or "(none)"
        return str(self.value).lower() if isinstance(self.value, bool) else str(self.value)


def _shown_item(value: Any) -> str:
    if isinstance(value, ClientKey):
        return value.name
    if isinstance(value, ModelPrice):
        return f"{value.model}={value.input_usd_per_mtok:g}/{value.output_usd_per_mtok:g}"
    return str(value)


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
    sections: dict[str, dict[str, Any]] = {name: {} for name in [*SECTIONS, "", "upstreams[0]"]}
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
    settings = Settings(upstreams=upstreams, **{n: cls(**sections[n]) for n, cls in SECTIONS.items()}, **top)
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
        cache["encryption_key"] = ENCRYPTION_KEY.parse(text)
    except ValueError:
        problems.append(f"{names}: {path} must hold {ENCRYPTION_KEY.describe()}")
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
    return problems + _mode_conflicts(settings, names)


def _mode_conflicts(settings: Settings, names: Mapping[str, str]) -> list[str]:
    redis = settings.redis
    url = urlsplit(redis.url)
    mode = f"{names['redis.mode']} {redis.mode}"
    problems = []
    if redis.mode != "standalone" and url.scheme == "unix":
        problems.append(f"{mode} needs a redis:// or rediss:// {names['redis.url']}")
    if redis.mode == "sentinel" and not redis.sentinels:
        problems.append(f"{mode} needs {names['redis.sentinels']}")
    if redis.mode != "sentinel" and redis.sentinels:
        problems.append(f"{names['redis.sentinels']} is only read in sentinel mode")
    if redis.mode != "cluster" and redis.cluster_nodes:
        problems.append(f"{names['redis.cluster_nodes']} is only read in cluster mode")
    if redis.mode == "cluster" and url.path.strip("/") not in ("", "0"):
        problems.append(f"{mode} has only database 0; {names['redis.url']} names another")
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
