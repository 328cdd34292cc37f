"""The Helm chart: lint, schema, Kubernetes validity and what each mode renders."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from proxy.config import Settings
from proxy.guards import Screen
from proxy.loader import load_settings

from .support import (
    CHART_DIR,
    CI_VALUES,
    FULLNAME,
    NAMESPACE,
    ROOT,
    Render,
    env_of,
    load_values,
    pod_spec,
    proxy_container,
    proxy_environment,
    render_chart,
    secret_value,
)

pytestmark = pytest.mark.deploy

RenderFn = Callable[[Mapping[str, Any]], Render]

# Kubernetes releases the manifests must validate against: a current one, and 1.29, the first with native
# sidecars (SidecarContainers beta, on by default).
K8S_VERSION = "1.30.0"
K8S_NATIVE_SIDECAR_VERSION = "1.29.0"
# Kinds from CRDs that kubernetes-validate has no schema for; checked by assertions instead.
CRD_KINDS = {"ServiceMonitor"}
HELM_WARNING = 2  # Helm's lint severities: 0 unknown, 1 info, 2 warning, 3 error

EXPECTED_KINDS = {
    "default": ["ServiceAccount", "Secret", "ConfigMap", "Service", "Deployment"],
    "sidecar-native": ["ServiceAccount", "ConfigMap", "Service", "Deployment"],
    "sidecar-legacy": ["ServiceAccount", "Secret", "ConfigMap", "Deployment"],
    "external-redis": ["ServiceAccount", "ConfigMap", "Service", "Deployment"],
    "external-cluster": ["PodDisruptionBudget", "ServiceAccount", "ConfigMap", "Service", "Deployment"],
    "external-sentinel": ["ServiceAccount", "ConfigMap", "Service", "Deployment"],
    "bundled-redis": ["ServiceAccount", "Secret", "ConfigMap", "Service", "Service", "Deployment", "Deployment"],
    "standalone-full": [
        "PodDisruptionBudget",
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "ConfigMap",
        "Service",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Ingress",
        "ServiceMonitor",
    ],
    "security": ["ServiceAccount", "ConfigMap", "Service", "Deployment", "Ingress"],
}
CI_IDS = [p.name for p in CI_VALUES]
# The names of the proxy's Service, which it answers in standalone mode.
SERVICE_HOSTS = [
    FULLNAME,
    f"{FULLNAME}.{NAMESPACE}",
    f"{FULLNAME}.{NAMESPACE}.svc",
    f"{FULLNAME}.{NAMESPACE}.svc.cluster.local",
]
# PROXY_ALLOWED_HOSTS of each ci values file; None where it is unset (a sidecar on 127.0.0.1 with no names).
ALLOWED_HOSTS: dict[str, list[str] | None] = {
    "default": SERVICE_HOSTS,
    "bundled-redis": SERVICE_HOSTS,
    "external-redis": SERVICE_HOSTS,
    "external-cluster": SERVICE_HOSTS,
    "external-sentinel": SERVICE_HOSTS,
    "standalone-full": [*SERVICE_HOSTS, "llm.example.com"],
    "security": [*SERVICE_HOSTS, "llm.internal.example.com", "llm-proxy.example.net"],
    "sidecar-native": None,
    "sidecar-legacy": None,
}


# One Sentinel, for ad-hoc values.
SENTINEL = "redis-sentinel.cache.svc:26379"
# How the proxy finds Redis with each ci values file that uses one: (mode, cluster_nodes, sentinels, sentinel_master).
REDIS_DEPLOYMENTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str]] = {
    "external-redis": ("standalone", (), (), "mymaster"),
    "bundled-redis": ("standalone", (), (), "mymaster"),
    "standalone-full": ("standalone", (), (), "mymaster"),
    "security": ("standalone", (), (), "mymaster"),
    "external-cluster": (
        "cluster",
        (
            "redis-cluster-1.redis-cluster-headless.cache.svc.cluster.local:6379",
            "redis-cluster-2.redis-cluster-headless.cache.svc.cluster.local:6379",
        ),
        (),
        "mymaster",
    ),
    "external-sentinel": (
        "sentinel",
        (),
        tuple(f"redis-node-{n}.redis-headless.cache.svc.cluster.local:26379" for n in range(3)),
        "llm-cache",
    ),
}

# The keys whose hashes helm/ci/security-values.yaml lists, as the clients send them.
SECURITY_CLIENT_KEYS = {"team-a": "ci-security-team-a-key", "team-b": "ci-security-team-b-key"}
# Every secret given as a value, as for a trial: the chart puts them all in its own Secret.
TRIAL_SECRETS: dict[str, Any] = {
    "upstream": {"apiKey": "sk-trial-upstream-key"},
    "redis": {"url": "redis://cache:6379/0", "password": "trial-redis-password"},
    "auth": {"proxyApiKeys": ["trial-client-key-one", "trial-client-key-two"]},
    "encryption": {
        "key": "trial-encryption-key-0123456789abcdef",
        "oldKeys": {"keys": ["trial-old-key-one-0123456789abcdef", "trial-old-key-two-0123456789abcdef"]},
    },
    "cacheKeySecret": {"value": "trial-cache-key-secret"},
}


def secret_values(values: Mapping[str, Any]) -> list[str]:
    """Every secret a values file hands to the chart."""
    encryption = values.get("encryption", {})
    found = [
        values.get("upstream", {}).get("apiKey", ""),
        values.get("redis", {}).get("password", ""),
        encryption.get("key", ""),
        values.get("cacheKeySecret", {}).get("value", ""),
    ]
    found += values.get("auth", {}).get("proxyApiKeys", [])
    found += encryption.get("oldKeys", {}).get("keys", [])
    return [s for s in found if s]


def test_every_mode_has_an_example_when_listing_ci_values() -> None:
    assert sorted(p.name.removesuffix("-values.yaml") for p in CI_VALUES) == sorted(EXPECTED_KINDS)


@pytest.mark.parametrize("path", [None, *CI_VALUES], ids=["chart-defaults", *CI_IDS])
def test_lint_reports_no_warning_when_strict(path: Any) -> None:
    values = {} if path is None else load_values(path)
    result = helm.lint(str(CHART_DIR), values, strict=True)
    assert result["errors"] == []
    assert [m for m in result["messages"] if m["severity"] >= HELM_WARNING] == []


@pytest.mark.parametrize(
    ("values", "where"),
    [
        ({"replicaCount": "two"}, "/replicaCount"),
        ({"containerPort": "8080"}, "/containerPort"),
        ({"mode": "daemonset"}, "/mode"),
        ({"sidecar": {"native": "yes"}}, "/sidecar/native"),
        ({"replicas": 2}, "'replicas'"),
        ({"redis": {"url": "http://cache:6379"}}, "/redis/url"),
        ({"config": {"server": {"host": "0.0.0.0"}}}, "'host'"),
        ({"config": {"redis": {"password": "hunter2"}}}, "'password'"),
        ({"config": {"auth": {"proxy_api_keys": ["k"]}}}, "'auth'"),
        ({"config": {"cache": {"backend": "disk"}}}, "/config/cache/backend"),
        ({"redis": {"tls": {"checkHostname": "no"}}}, "/redis/tls/checkHostname"),
        ({"redis": {"tls": {"caFile": "/ca.pem"}}}, "'caFile'"),
        ({"podDisruptionBudget": {"minAvailable": "half"}}, "/podDisruptionBudget/minAvailable"),
        ({"server": {"allowedHosts": ["*.example.com"]}}, "/server/allowedHosts/0"),
        ({"server": {"allowedHosts": ["llm.example.com:443"]}}, "/server/allowedHosts/0"),
        ({"server": {"allowedOrigins": ["https://chat.example.com/"]}}, "/server/allowedOrigins/0"),
        ({"server": {"allowedOrigins": "https://chat.example.com"}}, "/server/allowedOrigins"),
        ({"config": {"server": {"allowed_hosts": ["llm.example.com"]}}}, "'allowed_hosts'"),
        ({"clusterDomain": "cluster.local."}, "/clusterDomain"),
        ({"encryption": {"key": "hunter2-too-short"}}, "/encryption/key"),
        ({"encryption": {"key": "hunter2,hunter2,hunter2,hunter2,hunter2"}}, "/encryption/key"),
        ({"encryption": {"oldKeys": {"keys": ["hunter2"]}}}, "/encryption/oldKeys/keys/0"),
        ({"encryption": {"oldKeys": ["hunter2-hunter2-hunter2-hunter2-hunter2"]}}, "/encryption/oldKeys"),
        ({"cacheKeySecret": {"value": "hunter2"}}, "/cacheKeySecret/value"),
        ({"cacheKeySecret": "hunter2-hunter2-hunter2"}, "/cacheKeySecret"),
        ({"config": {"cache": {"encryption_key": "hunter2-hunter2-hunter2-hunter2-hunter2"}}}, "'encryption_key'"),
        ({"config": {"cache": {"key_secret": "hunter2-hunter2"}}}, "'key_secret'"),
        ({"auth": {"clientKeys": [{"name": "a", "key": "hunter2"}]}}, "'key'"),
        ({"auth": {"clientKeys": [{"name": "a", "keySha256": "hunter2"}]}}, "/auth/clientKeys/0/keySha256"),
        ({"auth": {"clientKeys": [{"name": "a", "keySha256": "sha256:" + "0" * 57}]}}, "/auth/clientKeys/0/keySha256"),
        ({"auth": {"clientKeys": [{"keySha256": "0" * 64}]}}, "'name'"),
        ({"auth": {"clientKeys": [{"name": "team a", "keySha256": "0" * 64}]}}, "/auth/clientKeys/0/name"),
        ({"config": {"auth": {"client_keys": [{"name": "a", "key": "hunter2"}]}}}, "'auth'"),
        ({"redis": {"mode": "replicated"}}, "/redis/mode"),
        ({"redis": {"sentinels": ["redis-sentinel"]}}, "/redis/sentinels/0"),
        ({"redis": {"sentinels": ["redis://redis-sentinel:26379"]}}, "/redis/sentinels/0"),
        ({"redis": {"sentinels": "s-0:26379,s-1:26379"}}, "/redis/sentinels"),
        ({"redis": {"clusterNodes": ["fd00::7:6379"]}}, "/redis/clusterNodes/0"),
        ({"redis": {"clusterNodes": ["node-1:6379", "node-1:6379"]}}, "/redis/clusterNodes"),
        ({"redis": {"sentinelMaster": ""}}, "/redis/sentinelMaster"),
        ({"redis": {"sentinelMaster": "my master"}}, "/redis/sentinelMaster"),
        ({"config": {"redis": {"mode": "cluster"}}}, "'mode'"),
        ({"config": {"redis": {"cluster_nodes": ["node-1:6379"]}}}, "'cluster_nodes'"),
        ({"config": {"redis": {"sentinels": ["s-0:26379"]}}}, "'sentinels'"),
        ({"config": {"cache": {"replica_single_flight": "no"}}}, "/config/cache/replica_single_flight"),
        ({"config": {"cache": {"flight_wait_s": 0}}}, "/config/cache/flight_wait_s"),
        ({"config": {"log_format": "xml"}}, "/config/log_format"),
        ({"config": {"pricing": {"gpt-4o": {"input": -1}}}}, "/config/pricing/gpt-4o/input"),
        ({"config": {"pricing": {"gpt-4o": {"output": 1}}}}, "'input'"),
    ],
)
def test_schema_rejects_values_when_type_or_key_is_wrong(values: dict[str, Any], where: str) -> None:
    with helm.Chart.load(str(CHART_DIR)) as chart:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)) as caught:
            chart.validate_schema(values)
        with pytest.raises(helm.HelmValuesError):
            chart.render(values, name="rel", namespace=NAMESPACE)
    # Helm quotes a value that fails a pattern, so secrets are checked by length only.
    if where.startswith(("/encryption", "/cacheKeySecret", "/auth")) or where == "'key'":
        assert "hunter2" not in str(caught.value)


def test_every_value_is_documented_when_reading_values_yaml() -> None:
    lines = (CHART_DIR / "values.yaml").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# yaml-language-server: $schema=values.schema.json"
    # helm-docs convention: a "# --" comment documents a key and everything below it.
    stack: list[tuple[int, bool]] = []
    comment: list[str] = []
    undocumented = []
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped)
            continue
        match = re.match(r"^(\s*)(- )?([A-Za-z_][\w-]*):(.*)$", line)
        if match is None:
            comment = []
            continue
        indent = len(match.group(1)) + (2 if match.group(2) else 0)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        documented = any(c.startswith("# --") for c in comment) or any(doc for _, doc in stack)
        if match.group(4).strip() and not documented:
            undocumented.append(f"line {number}: {stripped}")
        stack.append((indent, documented))
        comment = []
    assert undocumented == []


def test_schema_accepts_the_chart_defaults_when_no_values_are_given() -> None:
    with helm.Chart.load(str(CHART_DIR)) as chart:
        chart.validate_schema(load_values(CHART_DIR / "values.yaml"))


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_render_has_the_expected_kinds_when_using_ci_values(rendered: dict[str, Render], name: str) -> None:
    assert [d["kind"] for d in rendered[name].docs] == EXPECTED_KINDS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_render_is_valid_kubernetes_when_using_ci_values(rendered: dict[str, Render], name: str) -> None:
    result = rendered[name]
    for doc in result.docs + result.hooks:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["name"].startswith(FULLNAME)


@pytest.mark.parametrize("name", ["sidecar-native", "sidecar-legacy"])
def test_sidecar_render_is_valid_when_cluster_is_1_29(rendered: dict[str, Render], name: str) -> None:
    for doc in rendered[name].docs:
        kubernetes_validate.validate(doc, K8S_NATIVE_SIDECAR_VERSION, strict=True)


@pytest.mark.parametrize(
    ("name", "kube_version", "refused"),
    [("sidecar-native", "v1.28.9", True), ("sidecar-native", "v1.29.0", False), ("sidecar-legacy", "v1.25.0", False)],
)
def test_native_sidecar_is_refused_when_cluster_is_older_than_1_29(
    tmp_path: Path, name: str, kube_version: str, refused: bool
) -> None:
    # The engine renders for its own Kubernetes version (and lint only logs `fail`), so render a copy of the
    # chart that sees the cluster version under test.
    chart = tmp_path / "chart"
    shutil.copytree(CHART_DIR, chart)
    helpers = chart / "templates" / "_helpers.tpl"
    text = helpers.read_text(encoding="utf-8")
    assert text.count(".Capabilities.KubeVersion.Version") == 1
    helpers.write_text(text.replace(".Capabilities.KubeVersion.Version", f'"{kube_version}"'), encoding="utf-8")
    values = load_values(CHART_DIR / "ci" / f"{name}-values.yaml")
    if refused:
        with pytest.raises(helm.HelmError, match=re.escape("sidecar.native needs Kubernetes 1.29")):
            render_chart(values, chart)
    else:
        render_chart(values, chart)


def test_native_sidecar_starts_before_the_app_when_sidecar_native(rendered: dict[str, Render]) -> None:
    spec = pod_spec(rendered["sidecar-native"].one("Deployment"))
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "llm-cache-proxy"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["exec"]["command"][-1] == "/readyz"
    assert sidecar["livenessProbe"]["exec"]["command"][-1] == "/healthz"
    assert sidecar["readinessProbe"]["exec"]["command"][-1] == "/readyz"
    assert [c["name"] for c in spec["containers"]] == ["web"]


def test_plain_sidecar_is_an_extra_container_when_native_is_off(rendered: dict[str, Render]) -> None:
    spec = pod_spec(rendered["sidecar-legacy"].one("Deployment"))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["worker", "llm-cache-proxy"]
    proxy = spec["containers"][1]
    assert "restartPolicy" not in proxy
    assert proxy["lifecycle"]["preStop"]["exec"]["command"][:2] == ["python", "-c"]


@pytest.mark.parametrize(("name", "port"), [("sidecar-native", 8080), ("sidecar-legacy", 18080)])
def test_app_reaches_proxy_on_loopback_when_mode_is_sidecar(rendered: dict[str, Render], name: str, port: int) -> None:
    deployment = rendered[name].one("Deployment")
    app = pod_spec(deployment)["containers"][0]
    proxy = proxy_container(deployment)
    assert env_of(app)["OPENAI_BASE_URL"]["value"] == f"http://127.0.0.1:{port}/v1"
    assert env_of(proxy)["PROXY_HOST"]["value"] == "127.0.0.1"
    assert env_of(proxy)["PROXY_PORT"]["value"] == str(port)
    # Nothing published: the kubelet cannot reach the pod's loopback, so the probes run inside the container.
    assert "ports" not in proxy
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = proxy[probe]["exec"]["command"]
        assert command[:2] == ["python", "-c"] and "http://127.0.0.1:" in command[2]


@pytest.mark.parametrize(
    "name", ["default", "external-redis", "external-cluster", "external-sentinel", "bundled-redis", "standalone-full"]
)
def test_proxy_listens_on_all_interfaces_when_standalone(rendered: dict[str, Render], name: str) -> None:
    result = rendered[name]
    proxy = proxy_container(result.one("Deployment"))
    assert env_of(proxy)["PROXY_HOST"]["value"] == "0.0.0.0"
    assert proxy["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert proxy["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert proxy["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert proxy["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    service = result.one("Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert service["spec"]["selector"] == result.one("Deployment")["spec"]["selector"]["matchLabels"]


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_proxy_container_is_locked_down_when_using_ci_values(rendered: dict[str, Render], name: str) -> None:
    deployment = rendered[name].one("Deployment")
    context = proxy_container(deployment)["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod_spec(deployment)["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m for m in proxy_container(deployment)["volumeMounts"]}
    assert mounts["/etc/llm-cache-proxy"]["readOnly"] is True
    assert "/tmp" in mounts


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_proxy_reads_the_mounted_config_map_when_using_ci_values(rendered: dict[str, Render], name: str) -> None:
    result = rendered[name]
    deployment = result.one("Deployment")
    proxy = proxy_container(deployment)
    assert env_of(proxy)["PROXY_CONFIG"]["value"] == "/etc/llm-cache-proxy/proxy.yaml"
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["llm-cache-proxy-config"]["configMap"]["name"] == FULLNAME
    assert "proxy.yaml" in result.one("ConfigMap")["data"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_proxy_accepts_the_config_map_when_using_ci_values(
    rendered: dict[str, Render], name: str, tmp_path: Path
) -> None:
    check_settings_arrive(rendered[name], tmp_path)


def test_proxy_accepts_the_config_map_when_every_secret_is_a_value(render: RenderFn, tmp_path: Path) -> None:
    settings = check_settings_arrive(render(TRIAL_SECRETS), tmp_path)
    assert settings.cache.encryption_key == TRIAL_SECRETS["encryption"]["key"]
    assert settings.cache.encryption_old_keys == tuple(TRIAL_SECRETS["encryption"]["oldKeys"]["keys"])
    assert settings.cache.key_secret == TRIAL_SECRETS["cacheKeySecret"]["value"]
    assert settings.redis.password == TRIAL_SECRETS["redis"]["password"]
    assert settings.auth.proxy_api_keys == tuple(TRIAL_SECRETS["auth"]["proxyApiKeys"])


@pytest.mark.parametrize("name", sorted(REDIS_DEPLOYMENTS))
def test_proxy_finds_redis_as_deployed_when_using_ci_values(
    rendered: dict[str, Render], name: str, tmp_path: Path
) -> None:
    redis = check_settings_arrive(rendered[name], tmp_path).redis
    assert (redis.mode, redis.cluster_nodes, redis.sentinels, redis.sentinel_master) == REDIS_DEPLOYMENTS[name]


@pytest.mark.parametrize(
    "values",
    [
        {"redis": {"mode": "cluster", "url": "redis://redis-cluster.cache.svc:6379"}},
        {
            "redis": {
                "mode": "sentinel",
                "url": "rediss://sentinel/0",
                "sentinels": [SENTINEL, "[fd00::7]:26379"],
                "username": "llm-cache",
                "password": "trial-redis-password",
                "tls": {"existingSecret": "cache-redis-tls", "clientCertificate": True},
            }
        },
    ],
    ids=["cluster-without-more-nodes", "sentinel-over-tls"],
)
def test_proxy_accepts_the_config_map_when_redis_mode_varies(
    render: RenderFn, values: dict[str, Any], tmp_path: Path
) -> None:
    settings = check_settings_arrive(render(values), tmp_path)
    assert settings.redis.mode == values["redis"]["mode"]
    assert settings.redis.tls_cert_file == (
        str(tmp_path / "secrets" / "llm-cache-proxy-redis-tls" / "tls.crt") if "tls" in values["redis"] else None
    )


def test_replicas_call_the_upstream_each_when_single_flight_is_off(render: RenderFn, tmp_path: Path) -> None:
    flight = {"replica_single_flight": False, "flight_lease_s": 2, "flight_wait_s": 30}
    result = render({"redis": {"url": "redis://cache:6379/0"}, "config": {"cache": flight}})
    cache = check_settings_arrive(result, tmp_path).cache
    assert (cache.replica_single_flight, cache.flight_lease_s, cache.flight_wait_s) == (False, 2, 30)


def check_settings_arrive(result: Render, tmp_path: Path) -> Settings:
    """Load the proxy's settings from the rendered ConfigMap and environment, and check that each value arrives."""
    env = proxy_environment(result, tmp_path / "secrets")
    text = result.one("ConfigMap")["data"]["proxy.yaml"]
    (tmp_path / "proxy.yaml").write_text(text, encoding="utf-8")
    settings = load_settings(str(tmp_path / "proxy.yaml"), env=env)

    def items(variable: str) -> tuple[str, ...]:
        return tuple(env[variable].split(",")) if variable in env else ()

    assert settings.server.host == env["PROXY_HOST"]
    assert settings.server.port == int(env["PROXY_PORT"])
    assert settings.server.allowed_hosts == items("PROXY_ALLOWED_HOSTS")
    assert settings.server.allowed_origins == items("PROXY_ALLOWED_ORIGINS")
    assert settings.cache.backend == yaml.safe_load(text)["cache"]["backend"]
    assert settings.default_upstream.api_key == env.get("OPENAI_API_KEY")
    assert settings.auth.proxy_api_keys == items("PROXY_API_KEYS")
    key_file = env.get("CACHE_ENCRYPTION_KEY_FILE")
    assert settings.cache.encryption_key == (Path(key_file).read_text(encoding="utf-8") if key_file else None)
    assert settings.cache.encryption_old_keys == items("CACHE_ENCRYPTION_OLD_KEYS")
    assert settings.cache.key_secret == env.get("CACHE_KEY_SECRET")
    client_keys = result.values.get("auth", {}).get("clientKeys", [])
    assert [(k.name, k.digest.hex(), k.namespace) for k in settings.auth.client_keys] == [
        (k["name"], k["keySha256"].lower(), k.get("namespace")) for k in client_keys
    ]
    if settings.cache.backend == "redis":
        redis = result.values.get("redis", {})
        assert settings.redis.mode == redis.get("mode", "standalone")
        assert settings.redis.url == env["REDIS_URL"]
        assert settings.redis.cluster_nodes == tuple(redis.get("clusterNodes", ()))
        assert settings.redis.sentinels == tuple(redis.get("sentinels", ()))
        assert settings.redis.sentinel_master == redis.get("sentinelMaster", "mymaster")
        assert settings.redis.username == env.get("REDIS_USERNAME")
        assert settings.redis.password == env.get("REDIS_PASSWORD")
        assert settings.redis.tls_ca_file == env.get("REDIS_TLS_CA_FILE")
    return settings


@pytest.mark.parametrize("name", sorted(EXPECTED_KINDS))
def test_proxy_answers_its_own_host_names_when_using_ci_values(rendered: dict[str, Render], name: str) -> None:
    env = env_of(proxy_container(rendered[name].one("Deployment")))
    expected = ALLOWED_HOSTS[name]
    if expected is None:
        assert "PROXY_ALLOWED_HOSTS" not in env
    else:
        assert env["PROXY_ALLOWED_HOSTS"]["value"].split(",") == expected
    origins = rendered[name].values.get("server", {}).get("allowedOrigins")
    assert env.get("PROXY_ALLOWED_ORIGINS", {}).get("value") == (",".join(origins) if origins else None)


@pytest.mark.parametrize("name", ["standalone-full", "security"])
def test_ingress_hosts_are_answered_when_the_ingress_is_enabled(
    rendered: dict[str, Render], name: str, tmp_path: Path
) -> None:
    result = rendered[name]
    hosts = [rule["host"] for rule in result.one("Ingress")["spec"]["rules"]]
    env = proxy_environment(result, tmp_path / "secrets")
    assert hosts and set(hosts) <= set(env["PROXY_ALLOWED_HOSTS"].split(","))
    (tmp_path / "proxy.yaml").write_text(result.one("ConfigMap")["data"]["proxy.yaml"], encoding="utf-8")
    screen = Screen(load_settings(str(tmp_path / "proxy.yaml"), env=env).server)
    # As bound in the pod (0.0.0.0), the proxy checks Host names because the chart listed some.
    assert screen.checks_host
    answered = [*hosts, f"{FULLNAME}:8080", f"{FULLNAME}.{NAMESPACE}.svc:8080", "10.244.1.7:8080", "[fd00::7]:8080"]
    assert all(screen.host_allowed(host) for host in answered)
    assert not screen.host_allowed("attacker.example:8080")


def test_helm_test_and_notes_name_hosts_the_proxy_answers(rendered: dict[str, Render]) -> None:
    result = rendered["standalone-full"]
    allowed = env_of(proxy_container(result.one("Deployment")))["PROXY_ALLOWED_HOSTS"]["value"].split(",")
    (pod,) = result.hooks
    urls = [pod["spec"]["containers"][0]["command"][-1], *re.findall(r"OPENAI_BASE_URL=(\S+)", result.notes)]
    assert len(urls) == 3
    assert [re.sub(r"^https?://([^:/]+).*$", r"\1", url) in allowed for url in urls] == [True] * 3


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"mode": "sidecar", "app": {"image": {"repository": "app"}}, "server": {"allowedHosts": ["llm-proxy"]}},
            "llm-proxy",
        ),
        (
            {"fullnameOverride": "llm", "clusterDomain": "corp.internal"},
            f"llm,llm.{NAMESPACE},llm.{NAMESPACE}.svc,llm.{NAMESPACE}.svc.corp.internal",
        ),
        (
            {
                "ingress": {
                    "enabled": True,
                    "hosts": [
                        {"host": "*.llm.example.com", "paths": [{"path": "/"}]},
                        {"host": "llm.example.com", "paths": [{"path": "/"}]},
                    ],
                },
                "server": {"allowedHosts": ["team-a.llm.example.com", "llm.example.com"]},
            },
            ",".join([*SERVICE_HOSTS, "llm.example.com", "team-a.llm.example.com"]),
        ),
    ],
)
def test_allowed_hosts_follow_the_values_when_set(render: RenderFn, values: dict[str, Any], expected: str) -> None:
    (deployment,) = render(values).of_kind("Deployment")
    env = env_of(proxy_container(deployment))
    assert env["PROXY_ALLOWED_HOSTS"]["value"] == expected


def test_checksum_changes_when_config_changes(render: RenderFn) -> None:
    def checksum(values: Mapping[str, Any]) -> str:
        deployment = render(values).one("Deployment")
        annotation: str = deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        return annotation

    base = checksum({})
    assert checksum({"config": {"cache": {"ttl_s": 60}}}) != base
    assert checksum({"config": {"log_level": "DEBUG"}}) != base
    assert checksum({"replicaCount": 3}) == base
    cluster = {"mode": "cluster", "url": "redis://redis-cluster.cache.svc:6379/0"}
    assert checksum({"redis": {**cluster, "clusterNodes": ["redis-cluster-1.cache.svc:6379"]}}) != checksum(
        {"redis": cluster}
    )


def test_upstream_key_is_read_from_the_chart_secret_when_given_as_a_value(rendered: dict[str, Render]) -> None:
    result = rendered["standalone-full"]
    env = env_of(proxy_container(result.one("Deployment")))
    secret = result.one("Secret")
    refs = {
        "OPENAI_API_KEY": ("openai-api-key", result.values["upstream"]["apiKey"]),
        "REDIS_PASSWORD": ("redis-password", result.values["redis"]["password"]),
        "PROXY_API_KEYS": ("proxy-api-keys", ",".join(result.values["auth"]["proxyApiKeys"])),
    }
    for variable, (key, plain) in refs.items():
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": key}
        assert "value" not in env[variable]
        assert base64.b64decode(secret["data"][key]).decode() == plain
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "vllm", "key": "api-key"}
    annotations = result.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" in annotations


def test_no_secret_is_created_when_existing_secrets_are_used(rendered: dict[str, Render]) -> None:
    result = rendered["external-redis"]
    assert result.of_kind("Secret") == []
    env = env_of(proxy_container(result.one("Deployment")))
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "llm-keys", "key": "openai-api-key"}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "cache-redis", "key": "password"}
    assert env["PROXY_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "llm-keys", "key": "proxy-api-keys"}
    assert env["REDIS_URL"]["value"] == result.values["redis"]["url"]
    annotations = result.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in annotations


def test_redis_certificates_are_mounted_from_a_secret_when_tls_is_configured(
    rendered: dict[str, Render], render: RenderFn
) -> None:
    deployment = rendered["external-redis"].one("Deployment")
    env = env_of(proxy_container(deployment))
    assert env["REDIS_USERNAME"]["value"] == "llm-cache"
    assert env["REDIS_TLS_CA_FILE"]["value"] == "/etc/redis-tls/ca.crt"
    assert not {"REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE", "REDIS_TLS_CHECK_HOSTNAME"} & env.keys()
    mounts = {m["name"]: m for m in proxy_container(deployment)["volumeMounts"]}
    assert mounts["llm-cache-proxy-redis-tls"] == {
        "name": "llm-cache-proxy-redis-tls",
        "mountPath": "/etc/redis-tls",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["llm-cache-proxy-redis-tls"]["secret"] == {"secretName": "cache-redis-tls"}

    tls = {"existingSecret": "redis-client", "clientCertificate": True, "checkHostname": False}
    result = render({"redis": {"url": "rediss://10.0.0.7:6380/0", "tls": tls}})
    env = env_of(proxy_container(result.one("Deployment")))
    assert [env[n]["value"] for n in ("REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE", "REDIS_TLS_CHECK_HOSTNAME")] == [
        "/etc/redis-tls/tls.crt",
        "/etc/redis-tls/tls.key",
        "false",
    ]
    for doc in result.docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_no_certificate_is_mounted_when_redis_tls_is_not_configured(rendered: dict[str, Render]) -> None:
    for name in ("default", "bundled-redis", "standalone-full", "sidecar-native"):
        deployment = rendered[name].one("Deployment")
        assert "llm-cache-proxy-redis-tls" not in {v["name"] for v in pod_spec(deployment)["volumes"]}
        assert not [n for n in env_of(proxy_container(deployment)) if n.startswith("REDIS_TLS_")]


def test_seed_nodes_go_to_proxy_yaml_when_redis_mode_is_cluster(rendered: dict[str, Render]) -> None:
    result = rendered["external-cluster"]
    deployment = result.one("Deployment")
    env = env_of(proxy_container(deployment))
    assert env["REDIS_MODE"]["value"] == "cluster"
    assert env["REDIS_URL"]["value"] == result.values["redis"]["url"]
    assert not {"REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"} & env.keys()
    # The proxy reads further nodes from its file only.
    config = yaml.safe_load(result.one("ConfigMap")["data"]["proxy.yaml"])
    assert config["redis"] == {"timeout_ms": 250, "cluster_nodes": list(REDIS_DEPLOYMENTS["external-cluster"][1])}
    # Credentials and TLS as for a single server, from the Secrets the user manages.
    assert result.of_kind("Secret") == []
    assert env["REDIS_USERNAME"]["value"] == "llm-cache"
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "cache-redis", "key": "password"}
    assert env["REDIS_TLS_CA_FILE"]["value"] == "/etc/redis-tls/ca.crt"
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["llm-cache-proxy-redis-tls"]["secret"] == {"secretName": "cache-redis-tls"}


def test_no_seed_node_is_written_when_the_cluster_url_is_the_only_one(render: RenderFn) -> None:
    result = render({"redis": {"mode": "cluster", "url": "redis://redis-cluster.cache.svc:6379/0"}})
    assert env_of(proxy_container(result.one("Deployment")))["REDIS_MODE"]["value"] == "cluster"
    assert "cluster_nodes" not in yaml.safe_load(result.one("ConfigMap")["data"]["proxy.yaml"])["redis"]


def test_sentinels_are_variables_when_redis_mode_is_sentinel(rendered: dict[str, Render]) -> None:
    result = rendered["external-sentinel"]
    env = env_of(proxy_container(result.one("Deployment")))
    _, _, sentinels, master = REDIS_DEPLOYMENTS["external-sentinel"]
    assert env["REDIS_MODE"]["value"] == "sentinel"
    assert env["REDIS_URL"]["value"] == "redis://sentinel/1"
    assert env["REDIS_SENTINELS"]["value"] == ",".join(sentinels)
    assert env["REDIS_SENTINEL_MASTER"]["value"] == master
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "cache-redis", "key": "password"}
    assert env["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "cache-redis",
        "key": "sentinel-password",
    }
    assert result.of_kind("Secret") == []
    assert "cluster_nodes" not in yaml.safe_load(result.one("ConfigMap")["data"]["proxy.yaml"])["redis"]


def test_sentinel_password_is_read_from_the_chart_secret_when_given_as_a_value(render: RenderFn) -> None:
    sentinel = {"mode": "sentinel", "url": "redis://sentinel/0", "sentinels": [SENTINEL], "sentinelMaster": "m"}
    result = render({"redis": {**sentinel, "sentinelPassword": "trial-sentinel-password"}})
    env = env_of(proxy_container(result.one("Deployment")))
    ref = env["REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": FULLNAME, "key": "redis-sentinel-password"}
    assert secret_value(result, FULLNAME, "redis-sentinel-password") == "trial-sentinel-password"
    assert "trial-sentinel-password" not in repr(result.one("Deployment"))
    standalone = render({"redis": {"url": "redis://cache:6379/0", "sentinelPassword": "trial-sentinel-password"}})
    assert "REDIS_SENTINEL_PASSWORD" not in env_of(proxy_container(standalone.one("Deployment")))
    assert "trial-sentinel-password" not in standalone.manifest


@pytest.mark.parametrize("name", sorted(set(EXPECTED_KINDS) - {"external-cluster", "external-sentinel"}))
def test_redis_mode_is_standalone_when_not_set(rendered: dict[str, Render], name: str) -> None:
    result = rendered[name]
    env = env_of(proxy_container(result.one("Deployment")))
    config = yaml.safe_load(result.one("ConfigMap")["data"]["proxy.yaml"])
    if config["cache"]["backend"] == "redis":
        assert env["REDIS_MODE"]["value"] == "standalone"
    else:
        assert not [n for n in env if n.startswith("REDIS_")]
    assert not {"REDIS_SENTINELS", "REDIS_SENTINEL_MASTER"} & env.keys()
    assert "cluster_nodes" not in config.get("redis", {})


@pytest.mark.parametrize(
    ("values", "ref"),
    [
        ({"upstream": {"apiKey": "sk-ignored-value", "existingSecret": "llm-keys"}}, "OPENAI_API_KEY"),
        (
            {"encryption": {"key": "ignored-value-0123456789abcdef0123456789", "existingSecret": "enc"}},
            "CACHE_ENCRYPTION_KEY_FILE",
        ),
        (
            {
                "encryption": {
                    "existingSecret": "enc",
                    "oldKeys": {"keys": ["ignored-value-0123456789abcdef0123456789"], "existingSecret": "enc"},
                }
            },
            "CACHE_ENCRYPTION_OLD_KEYS",
        ),
        ({"cacheKeySecret": {"value": "ignored-value-0123", "existingSecret": "enc"}}, "CACHE_KEY_SECRET"),
    ],
)
def test_existing_secret_wins_when_a_value_is_also_given(render: RenderFn, values: dict[str, Any], ref: str) -> None:
    result = render(values)
    assert result.of_kind("Secret") == []
    assert "ignored-value" not in result.manifest
    assert ref in env_of(proxy_container(result.one("Deployment")))


@pytest.mark.parametrize("name", [*sorted(EXPECTED_KINDS), "every secret as a value"])
def test_no_secret_value_leaves_its_secret_when_using_ci_values(
    rendered: dict[str, Render], render: RenderFn, name: str
) -> None:
    result = rendered[name] if name in rendered else render(TRIAL_SECRETS)
    secrets = secret_values(result.values)
    assert secrets or name not in ("standalone-full", "every secret as a value")
    encoded = [base64.b64encode(s.encode()).decode() for s in secrets]
    for doc in result.docs + result.hooks:
        text = yaml.safe_dump(doc)
        for secret in secrets:
            assert secret not in text, f"{secret!r} leaked into {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "ConfigMap":
            assert not [e for e in encoded if e in text]
    assert not [s for s in secrets if s in result.notes]


def test_encryption_key_is_a_mounted_file_when_it_comes_from_an_existing_secret(rendered: dict[str, Render]) -> None:
    deployment = rendered["security"].one("Deployment")
    env = env_of(proxy_container(deployment))
    assert env["CACHE_ENCRYPTION_KEY_FILE"] == {
        "name": "CACHE_ENCRYPTION_KEY_FILE",
        "value": "/etc/cache-encryption/key",
    }
    assert "CACHE_ENCRYPTION_KEY" not in env
    mounts = {m["name"]: m for m in proxy_container(deployment)["volumeMounts"]}
    assert mounts["llm-cache-proxy-encryption"] == {
        "name": "llm-cache-proxy-encryption",
        "mountPath": "/etc/cache-encryption",
        "readOnly": True,
    }
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    assert volumes["llm-cache-proxy-encryption"]["secret"] == {
        "secretName": "llm-cache-encryption",
        "items": [{"key": "encryption-key", "path": "key"}],
    }
    assert env["CACHE_KEY_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "llm-cache-encryption",
        "key": "cache-key-secret",
    }
    assert "CACHE_ENCRYPTION_OLD_KEYS" not in env


def test_encryption_secrets_are_read_from_the_chart_secret_when_given_as_values(render: RenderFn) -> None:
    result = render(TRIAL_SECRETS)
    deployment = result.one("Deployment")
    env = env_of(proxy_container(deployment))
    assert env["CACHE_ENCRYPTION_KEY_FILE"]["value"] == "/etc/cache-encryption/key"
    volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
    # Only the encryption key is mounted, not the other secrets the chart's Secret holds.
    assert volumes["llm-cache-proxy-encryption"]["secret"] == {
        "secretName": FULLNAME,
        "items": [{"key": "encryption-key", "path": "key"}],
    }
    assert env["CACHE_ENCRYPTION_OLD_KEYS"]["valueFrom"]["secretKeyRef"] == {
        "name": FULLNAME,
        "key": "encryption-old-keys",
    }
    assert env["CACHE_KEY_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": "cache-key-secret"}
    encryption = TRIAL_SECRETS["encryption"]
    assert secret_value(result, FULLNAME, "encryption-key") == encryption["key"]
    assert secret_value(result, FULLNAME, "encryption-old-keys") == ",".join(encryption["oldKeys"]["keys"])
    assert secret_value(result, FULLNAME, "cache-key-secret") == TRIAL_SECRETS["cacheKeySecret"]["value"]
    assert "checksum/secret" in deployment["spec"]["template"]["metadata"]["annotations"]
    for doc in result.docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_old_keys_come_from_their_own_secret_when_one_is_named(render: RenderFn) -> None:
    values = {
        "encryption": {
            "key": TRIAL_SECRETS["encryption"]["key"],
            "oldKeys": {"existingSecret": "rotation", "existingSecretKey": "previous"},
        }
    }
    result = render(values)
    env = env_of(proxy_container(result.one("Deployment")))
    assert env["CACHE_ENCRYPTION_OLD_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "rotation", "key": "previous"}
    assert set(result.one("Secret")["data"]) == {"encryption-key"}


@pytest.mark.parametrize("name", sorted(set(EXPECTED_KINDS) - {"security"}))
def test_nothing_is_encrypted_when_no_key_is_set(rendered: dict[str, Render], name: str) -> None:
    deployment = rendered[name].one("Deployment")
    assert (
        not {"CACHE_ENCRYPTION_KEY_FILE", "CACHE_ENCRYPTION_OLD_KEYS", "CACHE_KEY_SECRET"}
        & env_of(proxy_container(deployment)).keys()
    )
    assert "llm-cache-proxy-encryption" not in {v["name"] for v in pod_spec(deployment)["volumes"]}


def test_client_keys_reach_proxy_yaml_as_hashes_when_listed(rendered: dict[str, Render]) -> None:
    result = rendered["security"]
    config = yaml.safe_load(result.one("ConfigMap")["data"]["proxy.yaml"])
    assert config["auth"] == {
        "client_keys": [
            {
                "name": "team-a",
                "key": "sha256:" + hashlib.sha256(SECURITY_CLIENT_KEYS["team-a"].encode()).hexdigest(),
                "namespace": "llm-cache-team-a",
            },
            {"name": "team-b", "key": "sha256:" + hashlib.sha256(SECURITY_CLIENT_KEYS["team-b"].encode()).hexdigest()},
        ]
    }
    for key in SECURITY_CLIENT_KEYS.values():
        assert key not in result.manifest
    assert "auth.clientKeys" not in result.notes


def test_client_keys_stay_out_of_proxy_yaml_when_none_are_listed(rendered: dict[str, Render]) -> None:
    for name in sorted(set(EXPECTED_KINDS) - {"security"}):
        assert "auth" not in yaml.safe_load(rendered[name].one("ConfigMap")["data"]["proxy.yaml"])


def test_check_config_accepts_the_rendered_settings_when_locked_down(
    rendered: dict[str, Render], tmp_path: Path
) -> None:
    result = rendered["security"]
    env = proxy_environment(result, tmp_path / "secrets")
    (tmp_path / "proxy.yaml").write_text(result.one("ConfigMap")["data"]["proxy.yaml"], encoding="utf-8")
    env |= {"PROXY_CONFIG": str(tmp_path / "proxy.yaml"), "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = [line.partition("  # ")[0].split(" = ", 1) for line in done.stdout.splitlines() if " = " in line]
    shown = {key.strip(): value for key, value in lines}
    assert shown["server.allowed_hosts"] == env["PROXY_ALLOWED_HOSTS"]
    assert shown["server.allowed_origins"] == "https://chat.example.com"
    assert shown["auth.client_keys"] == "team-a,team-b"
    assert shown["cache.encryption_key"] == shown["cache.key_secret"] == "(set, hidden)"
    assert "stand-in" not in done.stdout


def test_bundled_redis_runs_beside_the_proxy_when_enabled(rendered: dict[str, Render]) -> None:
    result = rendered["bundled-redis"]
    redis_name = f"{FULLNAME}-redis"
    deployment = result.one("Deployment", redis_name)
    service = result.one("Service", redis_name)
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"] == [{"port": 6379, "targetPort": "redis", "protocol": "TCP", "name": "redis"}]
    env = env_of(proxy_container(result.one("Deployment")))
    assert env["REDIS_URL"]["value"] == f"redis://{redis_name}:6379/0"
    # The proxy's Service must not send traffic to the Redis pod.
    proxy_selector = result.one("Service")["spec"]["selector"].items()
    redis_labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    assert not proxy_selector <= redis_labels

    spec = pod_spec(deployment)
    (redis,) = spec["containers"]
    args = redis["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_of(redis)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": "redis-password"}
    assert [v for v in spec["volumes"] if "emptyDir" not in v] == []
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["securityContext"]["allowPrivilegeEscalation"] is False
    assert redis["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_bundled_redis_needs_no_password_when_none_is_set(render: RenderFn) -> None:
    result = render({"redis": {"bundled": {"enabled": True}}})
    (redis,) = pod_spec(result.one("Deployment", f"{FULLNAME}-redis"))["containers"]
    assert "--requirepass" not in redis["args"] and "env" not in redis
    assert yaml.safe_load(result.one("ConfigMap")["data"]["proxy.yaml"])["cache"]["backend"] == "redis"


@pytest.mark.parametrize(
    ("values", "backend"),
    [
        ({}, "memory"),
        ({"redis": {"url": "redis://cache:6379/0"}}, "redis"),
        ({"redis": {"url": "redis://cache:6379/0"}, "config": {"cache": {"backend": "off"}}}, "off"),
    ],
)
def test_cache_backend_follows_the_redis_settings_when_not_set(
    render: RenderFn, values: dict[str, Any], backend: str
) -> None:
    result = render(values)
    assert yaml.safe_load(result.one("ConfigMap")["data"]["proxy.yaml"])["cache"]["backend"] == backend
    assert ("REDIS_URL" in env_of(proxy_container(result.one("Deployment")))) == (backend == "redis")


def test_autoscaler_owns_the_replica_count_when_enabled(rendered: dict[str, Render]) -> None:
    result = rendered["standalone-full"]
    deployment = result.one("Deployment")
    assert "replicas" not in deployment["spec"]
    hpa = result.one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    pdb = result.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_service_monitor_scrapes_the_proxy_service_when_enabled(rendered: dict[str, Render]) -> None:
    result = rendered["standalone-full"]
    monitor = result.one("ServiceMonitor")
    service = result.one("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(monitor["spec"]) == {"namespaceSelector", "selector", "endpoints"}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"
    assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])


def test_ingress_routes_to_the_proxy_service_when_enabled(rendered: dict[str, Render]) -> None:
    result = rendered["standalone-full"]
    (rule,) = result.one("Ingress")["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": FULLNAME, "port": {"number": result.one("Service")["spec"]["ports"][0]["port"]}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"config": {"cache": {"backend": "redis"}}}, "set redis.url, or redis.bundled.enabled"),
        ({"redis": {"url": "redis://cache:6379/0", "bundled": {"enabled": True}}}, "not both"),
        ({"redis": {"url": "redis://:hunter2@cache:6379/0"}}, "must not carry a password"),
        ({"redis": {"url": "redis://default:hunter2@cache:6379/0"}}, "must not carry a password"),
        ({"redis": {"url": "redis://cache:6379/0", "tls": {"existingSecret": "ca"}}}, "needs a rediss:// redis.url"),
        ({"redis": {"bundled": {"enabled": True}, "tls": {"existingSecret": "ca"}}}, "needs a rediss:// redis.url"),
        (
            {
                "mode": "sidecar",
                "app": {"image": {"repository": "app"}},
                "metrics": {"serviceMonitor": {"enabled": True}},
            },
            "needs mode=standalone",
        ),
        (
            {"mode": "sidecar", "app": {"image": {"repository": "app"}}, "ingress": {"enabled": True}},
            "needs mode=standalone",
        ),
        ({"mode": "sidecar"}, "app.image.repository is required"),
        (
            {"encryption": {"oldKeys": {"keys": ["hunter2-hunter2-hunter2-hunter2-hunter2"]}}},
            "set encryption.key or encryption.existingSecret too",
        ),
        (
            {"encryption": {"oldKeys": {"existingSecret": "rotation"}}},
            "set encryption.key or encryption.existingSecret",
        ),
        (
            {"auth": {"clientKeys": [{"name": "a", "keySha256": "ab" * 32}, {"name": "a", "keySha256": "cd" * 32}]}},
            "auth.clientKeys: every name must be different",
        ),
        (
            {"auth": {"clientKeys": [{"name": "a", "keySha256": "ab" * 32}, {"name": "b", "keySha256": "AB" * 32}]}},
            "auth.clientKeys: every keySha256 must be different",
        ),
        (
            {"ingress": {"enabled": True, "hosts": [{"host": "*.llm.example.com", "paths": [{"path": "/"}]}]}},
            "ingress host *.llm.example.com is a wildcard",
        ),
        (
            {
                "ingress": {"enabled": True, "hosts": [{"host": "*.llm.example.com", "paths": [{"path": "/"}]}]},
                "server": {"allowedHosts": ["llm.example.com"]},
            },
            "list the names clients use under it in server.allowedHosts",
        ),
        (
            {"redis": {"mode": "cluster", "bundled": {"enabled": True}}},
            "redis.mode=cluster needs an external Redis: the bundled Redis is a single server",
        ),
        (
            {"redis": {"mode": "sentinel", "sentinels": [SENTINEL], "bundled": {"enabled": True}}},
            "redis.mode=sentinel needs an external Redis: the bundled Redis is a single server",
        ),
        ({"redis": {"mode": "cluster"}}, "redis.mode=cluster needs a redis:// or rediss:// redis.url"),
        (
            {"redis": {"mode": "cluster", "url": "unix:///run/redis/redis.sock"}},
            "redis.mode=cluster needs a redis:// or rediss:// redis.url",
        ),
        ({"redis": {"mode": "cluster", "url": "redis://cache:6379/2"}}, "Redis Cluster has database 0 only"),
        (
            {"redis": {"mode": "sentinel", "sentinels": [SENTINEL]}},
            "redis.mode=sentinel needs a redis:// or rediss:// redis.url",
        ),
        ({"redis": {"mode": "sentinel", "url": "redis://sentinel/0"}}, "redis.mode=sentinel needs redis.sentinels"),
        (
            {"redis": {"url": "redis://cache:6379/0", "sentinels": [SENTINEL]}},
            "redis.sentinels are only used with redis.mode=sentinel",
        ),
        (
            {"redis": {"mode": "cluster", "url": "redis://cache:6379/0", "sentinels": [SENTINEL]}},
            "redis.sentinels are only used with redis.mode=sentinel",
        ),
        (
            {"redis": {"url": "redis://cache:6379/0", "clusterNodes": ["cache-1:6379"]}},
            "redis.clusterNodes are only used with redis.mode=cluster",
        ),
        (
            {
                "redis": {
                    "mode": "sentinel",
                    "url": "redis://sentinel/0",
                    "sentinels": [SENTINEL],
                    "clusterNodes": ["cache-1:6379"],
                }
            },
            "redis.clusterNodes are only used with redis.mode=cluster",
        ),
        (
            {"redis": {"mode": "sentinel", "url": "redis://:hunter2@sentinel/0", "sentinels": [SENTINEL]}},
            "must not carry a password",
        ),
    ],
)
def test_render_fails_with_a_clear_message_when_values_conflict(
    render: RenderFn, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)) as caught:
        render(values)
    assert "hunter2" not in str(caught.value)


def test_notes_give_the_service_url_when_standalone(rendered: dict[str, Render]) -> None:
    notes = rendered["default"].notes
    assert f"OPENAI_BASE_URL=http://{FULLNAME}.{NAMESPACE}.svc:8080/v1" in notes
    assert "https://llm.example.com/v1" in rendered["standalone-full"].notes


@pytest.mark.parametrize(
    ("name", "cache"),
    [
        ("external-redis", "Cache: redis at rediss://redis-master.cache.svc.cluster.local:6380/0"),
        (
            "external-cluster",
            "Cache: redis on the Redis Cluster reached through "
            "rediss://redis-cluster-0.redis-cluster-headless.cache.svc.cluster.local:6379/0, "
            "redis-cluster-1.redis-cluster-headless.cache.svc.cluster.local:6379, "
            "redis-cluster-2.redis-cluster-headless.cache.svc.cluster.local:6379\n",
        ),
        (
            "external-sentinel",
            'Cache: redis on the master "llm-cache" named by the Sentinels '
            + ", ".join(REDIS_DEPLOYMENTS["external-sentinel"][2])
            + "\n",
        ),
    ],
)
def test_notes_say_where_the_cache_is_when_redis_is_external(
    rendered: dict[str, Render], name: str, cache: str
) -> None:
    assert cache in rendered[name].notes


@pytest.mark.parametrize(("name", "port"), [("sidecar-native", 8080), ("sidecar-legacy", 18080)])
def test_notes_give_the_loopback_url_when_sidecar(rendered: dict[str, Render], name: str, port: int) -> None:
    assert f"OPENAI_BASE_URL=http://127.0.0.1:{port}/v1" in rendered[name].notes


def test_helm_test_calls_readyz_through_the_service_when_standalone(rendered: dict[str, Render]) -> None:
    (pod,) = rendered["default"].hooks
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["command"][-1] == f"http://{FULLNAME}:8080/readyz"
    assert rendered["sidecar-native"].hooks == []
