"""Kinds of setting values: each parses a raw value from proxy.yaml or the environment, or says why not
(``ValueError``, never echoing a secret), and describes itself for the docs."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .pricing import PRICES_TAKEN, ModelPrice


@dataclass(frozen=True, slots=True)
class MountedSecret:
    """A secret read once, at startup, from a file (a mounted Kubernetes Secret). Only *path* is ever shown."""

    path: str
    value: str = field(repr=False)


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
        namespace = NAMESPACE.parse(item["namespace"]) if item.get("namespace") else None
        return ClientKey.from_key(name, key, namespace)

    def describe(self) -> str:
        return "a list of {name, key, namespace}"


@dataclass(frozen=True, slots=True)
class Prices:
    """``pricing``: ``{model: {input: USD, output: USD}}``, per million tokens; *output* may be left out (0)."""

    def parse(self, value: Any) -> tuple[ModelPrice, ...]:
        if not isinstance(value, dict):
            raise ValueError("must be a mapping of model names to {input, output} prices")
        prices = []
        for model, price in value.items():
            if not isinstance(price, dict) or not set(price) <= {"input", "output"} or "input" not in price:
                raise ValueError(f"{model} must be a mapping with input and optionally output (USD per 1M tokens)")
            try:
                given, made = (_USD.parse(price.get(name, 0)) for name in ("input", "output"))
            except ValueError as exc:
                raise ValueError(f"{model}: {exc}") from None
            prices.append(ModelPrice(str(model), float(given), float(made)))
        return tuple(prices)

    def describe(self) -> str:
        return f"{{model: {{input, output}}}} in USD per million tokens (defaults taken in {PRICES_TAKEN})"


_USD = Number(float, 0)
_NAME = Text(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", "a name of letters, digits, '.', '_' or '-'")
NAMESPACE = Text(r"[^\s{}]+", "text without spaces or braces")


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


Kind = Number | Text | Choice | Url | Items | Flag | File | SecretFile | ClientKeys | Prices
