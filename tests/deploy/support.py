"""Helpers shared by the deployment tests: Helm rendering, manifest lookups, Dockerfile parsing."""

from __future__ import annotations

import base64
import json
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm"
CI_VALUES = sorted((CHART_DIR / "ci").glob("*-values.yaml"))
RELEASE = "rel"
NAMESPACE = "ns"
FULLNAME = f"{RELEASE}-llm-cache-proxy"


@dataclass(frozen=True, slots=True)
class Render:
    """One `helm template`-equivalent render: the manifest stream, its objects, the NOTES and the test hooks."""

    values: Mapping[str, Any]
    manifest: str
    docs: list[dict[str, Any]]
    notes: str
    hooks: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str = FULLNAME) -> dict[str, Any]:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, got {len(found)}"
        return found[0]


def load_values(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def render_chart(values: Mapping[str, Any], chart_dir: Path = CHART_DIR) -> Render:
    """Render like `helm template rel ./helm -n ns -f values.yaml`. Raises helm.HelmError as Helm would."""
    # A client-side dry-run install yields exactly the sorted manifest stream `helm template` prints, minus
    # hooks; the hooks (the `helm test` pod) come from the plain template render.
    with helm.Config(namespace=NAMESPACE, storage_driver="memory") as config:
        release = config.install(str(chart_dir), RELEASE, dict(values), dry_run="client")
    with helm.Chart.load(str(chart_dir)) as chart:
        files = chart.render(dict(values), name=RELEASE, namespace=NAMESPACE)
    hooks = [
        doc for name, text in files.items() if "/templates/tests/" in name for doc in yaml.safe_load_all(text) if doc
    ]
    docs = [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]
    return Render(values, release["manifest"], docs, release["notes"], hooks)


def pod_spec(workload: Mapping[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def proxy_container(workload: Mapping[str, Any]) -> dict[str, Any]:
    """The one proxy container of a pod, wherever it sits (containers or initContainers)."""
    spec = pod_spec(workload)
    containers: list[dict[str, Any]] = spec.get("initContainers", []) + spec["containers"]
    found = [c for c in containers if c["name"] == "llm-cache-proxy"]
    assert len(found) == 1, f"expected one proxy container, got {len(found)}"
    return found[0]


def env_of(container: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_value(result: Render, name: str, key: str) -> str:
    """What the kubelet reads from key *key* of Secret *name*: the chart's own Secret is in the render; a Secret
    the user manages is not, so it gets a stand-in that fits any of the proxy's secrets (long, no commas)."""
    if name == FULLNAME:
        encoded: str = result.one("Secret")["data"][key]
        return base64.b64decode(encoded).decode()
    return f"stand-in-{name}-{key}-0123456789abcdef0123456789abcdef"


def proxy_environment(result: Render, files: Path) -> dict[str, str]:
    """The proxy container's environment as the kubelet sets it: literal values as they are, secretKeyRefs
    resolved with :func:`secret_value`. The files of mounted Secrets that variables point at are written under
    *files*, and the variables changed to point there."""
    deployment = result.one("Deployment")
    container = proxy_container(deployment)
    env = {
        name: e["value"] if "value" in e else secret_value(result, **e["valueFrom"]["secretKeyRef"])
        for name, e in env_of(container).items()
    }
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        keys = {item["path"]: item["key"] for item in secret.get("items", [])}
        for name, value in env.items():
            if value.startswith(mount["mountPath"] + "/"):
                path = value.removeprefix(mount["mountPath"] + "/")
                copy = files / mount["name"] / path
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_text(secret_value(result, secret["secretName"], keys.get(path, path)), encoding="utf-8")
                env[name] = str(copy)
    return env


@dataclass(frozen=True, slots=True)
class Dockerfile:
    """The Dockerfile's instructions, per build stage, with continuation lines joined."""

    stages: list[list[tuple[str, str]]]

    def instructions(self, name: str, stage: int = -1) -> list[str]:
        return [args for instr, args in self.stages[stage] if instr == name]

    def env(self, stage: int = -1) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.instructions("ENV", stage):
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                values[key] = value
        return values

    def cmd(self) -> list[str]:
        (args,) = self.instructions("CMD")
        command: list[str] = json.loads(args)
        return command

    def healthcheck(self) -> list[str]:
        """The HEALTHCHECK's exec-form command, as Docker would run it."""
        (args,) = self.instructions("HEALTHCHECK")
        _, _, command = args.partition(" CMD ")
        parsed: list[str] = json.loads(command)
        return parsed


def parse_dockerfile(text: str) -> Dockerfile:
    stages: list[list[tuple[str, str]]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        instr, _, args = logical.partition(" ")
        logical = ""
        instr = instr.upper()
        if instr == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append((instr, args.strip()))
    return Dockerfile(stages)


def read_dockerignore() -> list[str]:
    """The .dockerignore patterns. Negations are not used, which keeps `dockerignore_excludes` exact."""
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "negated patterns are not supported here"
    return patterns


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = []
    i = 0
    body = pattern.strip("/")
    while i < len(body):
        if body.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            parts.append(".*")
            i += 2
        elif body[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif body[i] == "?":
            parts.append("[^/]")
            i += 1
        elif body[i] == "[":
            end = body.index("]", i)
            parts.append(body[i : end + 1])
            i = end + 1
        else:
            parts.append(re.escape(body[i]))
            i += 1
    return re.compile("".join(parts))


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """True when Docker leaves *path* (relative to the context) out: a pattern matches it or a parent."""
    segments = path.split("/")
    prefixes = ["/".join(segments[: n + 1]) for n in range(len(segments))]
    return any(_pattern_regex(p).fullmatch(prefix) for p in patterns for prefix in prefixes)
