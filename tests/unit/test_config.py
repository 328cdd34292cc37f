"""Settings from proxy.yaml, ${VAR} expansion and environment overrides."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from proxy.config import SETTINGS_TABLE, ConfigError, Settings, attribute
from proxy.kinds import MountedSecret
from proxy.loader import env_example, load_settings, resolve, settings_table_markdown
from proxy.pricing import ModelPrice

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_apply_when_nothing_is_configured(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ""), env={})
    assert (settings.server.host, settings.server.port, settings.cache.backend, settings.cache.ttl_s) == (
        "127.0.0.1",
        8080,
        "redis",
        3600,
    )
    assert settings.default_upstream.base_url == "https://api.openai.com/v1"
    assert settings.default_upstream.api_key is None
    assert settings.auth.proxy_api_keys == ()


def test_repository_files_load_when_used_as_shipped() -> None:
    from dotenv import dotenv_values

    env = {k: v for k, v in dotenv_values(REPO / ".env.example").items() if v is not None}
    settings = load_settings(str(REPO / "proxy.yaml"), env=env)
    assert settings.default_upstream.name == "openai"
    assert settings.redis.timeout_ms == 250


def test_environment_overrides_file_when_both_set(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "server: {port: 9000}\ncache: {ttl_s: 10, backend: memory}\n"
        "upstreams:\n  - name: main\n    base_url: http://file.example/v1\n",
    )
    env = {
        "PROXY_PORT": "9100",
        "CACHE_TTL": "20",
        "CACHE_BACKEND": "off",
        "UPSTREAM_BASE_URL": "http://env/v1/",
        "OPENAI_API_KEY": "sk-env",
        "UPSTREAM_TIMEOUT": "30",
        "PROXY_API_KEYS": " a, b ,,",
        "REDIS_URL": "rediss://:pw@redis.example:6380/2",
        "REDIS_PASSWORD": "other",
    }
    settings = load_settings(path, env=env)
    upstream = settings.default_upstream
    assert (settings.server.port, settings.cache.ttl_s, settings.cache.backend) == (9100, 20, "off")
    assert (upstream.name, upstream.base_url, upstream.api_key, upstream.timeout_s) == (
        "main",
        "http://env/v1",
        "sk-env",
        30.0,
    )
    assert settings.auth.proxy_api_keys == ("a", "b")
    assert settings.redis.password == "other"


def test_variables_expand_when_referenced_in_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, "# a comment mentioning ${UNSET_IN_COMMENT}\ncache: {namespace: '${NS}', ttl_s: ${TTL:77}}\n"
    )
    settings = load_settings(path, env={"NS": "team-a"})
    assert (settings.cache.namespace, settings.cache.ttl_s) == ("team-a", 77)


def test_unset_variable_fails_when_it_has_no_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\{MISSING\}"):
        load_settings(write(tmp_path, "cache: {namespace: '${MISSING}'}\n"), env={})


def test_upstream_keys_come_from_named_variables_when_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "upstreams:\n  - name: a\n    base_url: http://a/v1\n"
        "  - name: b\n    base_url: http://b/v1\n    api_key_env: B_KEY\n    models: ['llama*']\n"
        "  - name: c\n    base_url: http://c/v1\n    models: qwen*\n",
    )
    settings = load_settings(path, env={"OPENAI_API_KEY": "ka", "B_KEY": "kb"})
    assert [u.api_key for u in settings.upstreams] == ["ka", "kb", None]
    assert settings.upstream_for("llama-3").name == "b"
    assert settings.upstream_for("qwen2").name == "c"
    assert settings.upstream_for("gpt-4o").name == "a"
    assert settings.upstream_for(None).name == "a"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("server: {port: 70000}\n", {}, "PROXY_PORT"),
        ("", {"PROXY_PORT": "http"}, "PROXY_PORT"),
        ("", {"CACHE_TTL": "-1"}, "CACHE_TTL"),
        ("", {"CACHE_BACKEND": "disk"}, "CACHE_BACKEND"),
        ("", {"REDIS_URL": "http://:hunter2@host"}, "REDIS_URL"),
        ("", {"UPSTREAM_BASE_URL": "api.openai.com"}, "UPSTREAM_BASE_URL"),
        ("cache: {ttl: 5}\n", {}, "cache.ttl"),
        ("surprise: 1\n", {}, "surprise"),
        ("upstreams: {name: x}\n", {}, "upstreams"),
        ("upstreams:\n  - {name: x, base_url: 'http://a/v1'}\n  - {name: x, base_url: 'http://b/v1'}\n", {}, "unique"),
        ("- just a list\n", {}, "mapping"),
        ("cache: [\n", {}, "not valid YAML"),
        ("", {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ("", {"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ("pricing: [gpt-4o]\n", {}, "pricing .*must be a mapping"),
        ("pricing: {gpt-4o: {input: -1}}\n", {}, "pricing .*gpt-4o"),
        ("pricing: {gpt-4o: {output: 2}}\n", {}, "pricing .*gpt-4o must be a mapping with input"),
        ("pricing: {gpt-4o: {input: 1, cached: 0.5}}\n", {}, "pricing .*gpt-4o"),
        ("", {"REDIS_TLS_CHECK_HOSTNAME": "maybe"}, "REDIS_TLS_CHECK_HOSTNAME"),
        ("", {"REDIS_TLS_CA_FILE": "/nonexistent/ca.pem"}, "REDIS_TLS_CA_FILE.*cannot read /nonexistent/ca.pem"),
        ("redis: {password_file: /nonexistent/pw}\n", {}, r"redis.password_file \(REDIS_PASSWORD_FILE\) in .*/pw"),
    ],
)
def test_bad_values_fail_naming_the_key_when_loaded(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(write(tmp_path, text), env=env)
    assert "hunter2" not in str(caught.value)


def test_pricing_and_log_format_load_when_configured(tmp_path: Path) -> None:
    text = "pricing:\n  my-model: {input: 0.5, output: 1.25}\n  embedder: {input: 0.01}\nlog_format: text\n"
    settings = load_settings(write(tmp_path, text), env={})
    assert settings.pricing == (ModelPrice("my-model", 0.5, 1.25), ModelPrice("embedder", 0.01, 0.0))
    assert settings.log_format == "text"
    assert load_settings(write(tmp_path, text), env={"LOG_FORMAT": "json"}).log_format == "json"
    assert load_settings(write(tmp_path, ""), env={}).log_format is None


def test_secrets_stay_out_of_repr_when_settings_are_printed(tmp_path: Path) -> None:
    (tmp_path / "redis-password").write_text("pw3-hidden\n")
    settings = load_settings(
        write(tmp_path, ""),
        env={
            "OPENAI_API_KEY": "sk-hidden",
            "PROXY_API_KEYS": "ck-hidden",
            "REDIS_URL": "redis://:pw-hidden@h:6379/0",
            "REDIS_PASSWORD": "pw2-hidden",
            "REDIS_PASSWORD_FILE": str(tmp_path / "redis-password"),
        },
    )
    assert "hidden" not in repr(settings)
    assert "hidden" not in repr(settings.redis.password_file)


def test_secrets_stay_out_of_repr_when_resolved_settings_are_printed(tmp_path: Path) -> None:
    env = {
        "OPENAI_API_KEY": "sk-s3cret",
        "CACHE_KEY_SECRET": "ks-s3cret-0123456789",
        "REDIS_URL": "redis://:s3cret@h/0",
    }
    resolved = resolve(write(tmp_path, ""), env=env)[1]
    assert "s3cret" not in repr(resolved)
    assert "cache.key_secret='(set, hidden)'" in repr(resolved)


def test_missing_config_file_fails_when_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(str(tmp_path / "absent.yaml"), env={})


def test_unquoted_off_means_off_when_yaml_reads_it_as_false(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "cache: {backend: off}\n"), env={}).cache.backend == "off"


def test_every_problem_is_reported_when_several_values_are_bad(tmp_path: Path) -> None:
    path = write(tmp_path, "cache: {ttl_s: 0, nope: 1}\nredis: {timeout_ms: -1}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={"PROXY_PORT": "0"})
    problems = str(caught.value).splitlines()
    assert len(problems) == 4
    assert [p for p in problems if "cache.nope" in p and path in p]
    assert [p for p in problems if "cache.ttl_s (CACHE_TTL)" in p and path in p]
    assert [p for p in problems if "redis.timeout_ms" in p]
    assert [p for p in problems if "PROXY_PORT" in p and "environment" in p]


def test_defaults_come_from_the_dataclasses_when_table_lists_them() -> None:
    defaults = Settings()
    assert {s.key: s.default for s in SETTINGS_TABLE}["cache.ttl_s"] == defaults.cache.ttl_s
    assert {s.key: s.default for s in SETTINGS_TABLE}["upstreams[0].base_url"] == defaults.upstreams[0].base_url


def test_secret_settings_have_no_repr_when_table_marks_them() -> None:
    secrets = {s.key for s in SETTINGS_TABLE if s.secret}
    assert secrets >= {
        "upstreams[0].api_key",
        "redis.url",
        "redis.password",
        "redis.password_file",
        "auth.proxy_api_keys",
    }
    for key in secrets:
        owner, _, name = key.rpartition(".")
        holder = attribute(Settings(), owner)
        assert {f.name: f.repr for f in fields(holder)}[name] is False, key


def test_env_example_lists_every_variable_when_generated_from_the_table() -> None:
    shipped = (REPO / ".env.example").read_text()
    assert shipped == env_example(), "regenerate with: scripts/config-docs"
    for setting in SETTINGS_TABLE:
        assert setting.env is None or f"# {setting.env}=" in shipped


def test_readme_table_matches_the_settings_table_when_rendered() -> None:
    readme = (REPO / "README.md").read_text()
    start, end = "<!-- settings table: scripts/config-docs -->\n", "<!-- end of settings table -->"
    assert start in readme and end in readme
    assert readme.split(start, 1)[1].split(end, 1)[0] == settings_table_markdown(), (
        "regenerate with: scripts/config-docs"
    )


ENCRYPTION_KEY = "Zm9vYmFyYmF6cXV4LXJhbmRvbS1ieXRlcy0xMjM0NTY="
OLD_ENCRYPTION_KEY = "b2xkLWtleS1mcm9tLWxhc3QtbW9udGgtMTIzNDU2Nzg="


def test_encryption_keys_load_when_set_in_environment_or_file(tmp_path: Path) -> None:
    env = {"CACHE_ENCRYPTION_KEY": ENCRYPTION_KEY, "CACHE_ENCRYPTION_OLD_KEYS": f"{OLD_ENCRYPTION_KEY}, "}
    cache = load_settings(write(tmp_path, ""), env=env).cache
    assert (cache.encryption_key, cache.encryption_old_keys) == (ENCRYPTION_KEY, (OLD_ENCRYPTION_KEY,))
    listed = f"cache: {{encryption_key: {ENCRYPTION_KEY}, encryption_old_keys: [{OLD_ENCRYPTION_KEY}]}}\n"
    assert load_settings(write(tmp_path, listed), env={}).cache == cache
    assert load_settings(write(tmp_path, ""), env={}).cache.encryption_key is None


def test_encryption_key_is_read_from_file_when_a_secret_is_mounted(tmp_path: Path) -> None:
    secret = tmp_path / "encryption-key"
    secret.write_text(ENCRYPTION_KEY + "\n")
    settings, resolved = resolve(write(tmp_path, ""), env={"CACHE_ENCRYPTION_KEY_FILE": str(secret)})
    assert settings.cache.encryption_key == ENCRYPTION_KEY
    assert settings.cache.encryption_key_file == str(secret)
    shown = {r.setting.key: (r.shown(), r.source) for r in resolved}
    assert shown["cache.encryption_key"] == ("(set, hidden)", "cache.encryption_key_file")
    assert ENCRYPTION_KEY not in repr(settings)


@pytest.mark.parametrize(
    ("env", "file_text", "message"),
    [
        ({"CACHE_ENCRYPTION_KEY": "short-but-secret"}, None, r"CACHE_ENCRYPTION_KEY\) .*at least 32 characters"),
        ({"CACHE_ENCRYPTION_KEY": f"{ENCRYPTION_KEY} secret"}, None, "CACHE_ENCRYPTION_KEY"),
        ({"CACHE_ENCRYPTION_OLD_KEYS": f"{ENCRYPTION_KEY},short-secret"}, None, "CACHE_ENCRYPTION_OLD_KEYS"),
        ({"CACHE_ENCRYPTION_OLD_KEYS": OLD_ENCRYPTION_KEY}, None, "needs an encryption key"),
        ({}, "short-secret\n", "CACHE_ENCRYPTION_KEY_FILE.*at least 32 characters"),
        ({"CACHE_ENCRYPTION_KEY": ENCRYPTION_KEY}, ENCRYPTION_KEY, "both set"),
        ({"CACHE_ENCRYPTION_KEY_FILE": "/nonexistent/encryption-key"}, None, "cannot read /nonexistent"),
    ],
)
def test_bad_encryption_keys_fail_without_echo_when_loaded(
    tmp_path: Path, env: dict[str, str], file_text: str | None, message: str
) -> None:
    if file_text is not None:
        (tmp_path / "key").write_text(file_text)
        env = {**env, "CACHE_ENCRYPTION_KEY_FILE": str(tmp_path / "key")}
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(write(tmp_path, ""), env=env)
    assert "secret" not in str(caught.value) and ENCRYPTION_KEY not in str(caught.value)


def pem_files(tmp_path: Path) -> dict[str, str]:
    """Stand-ins for mounted certificate files: the settings check that they can be read, not what they hold."""
    names = {"REDIS_TLS_CA_FILE": "ca.crt", "REDIS_TLS_CERT_FILE": "tls.crt", "REDIS_TLS_KEY_FILE": "tls.key"}
    for name in names.values():
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    return {variable: str(tmp_path / name) for variable, name in names.items()}


def test_redis_security_settings_load_when_set_in_the_environment(tmp_path: Path) -> None:
    (tmp_path / "password").write_text("pw-from-file\r\n")
    env = {
        "REDIS_URL": "rediss://url-user:url-pass@redis.example:6380/0",
        "REDIS_USERNAME": "cache-proxy",
        "REDIS_PASSWORD_FILE": str(tmp_path / "password"),
        "REDIS_TLS_CHECK_HOSTNAME": "no",
        **pem_files(tmp_path),
    }
    redis = load_settings(write(tmp_path, ""), env=env).redis
    assert redis.username == "cache-proxy" and redis.password is None
    assert redis.password_file == MountedSecret(str(tmp_path / "password"), "pw-from-file")
    assert (redis.tls_ca_file, redis.tls_cert_file, redis.tls_key_file) == (
        env["REDIS_TLS_CA_FILE"],
        env["REDIS_TLS_CERT_FILE"],
        env["REDIS_TLS_KEY_FILE"],
    )
    assert redis.tls_check_hostname is False


def test_redis_security_settings_load_when_set_in_the_file(tmp_path: Path) -> None:
    files = pem_files(tmp_path)
    path = write(
        tmp_path,
        f"redis:\n  url: rediss://redis.example:6380/0\n  username: cache-proxy\n"
        f"  tls_ca_file: {files['REDIS_TLS_CA_FILE']}\n  tls_check_hostname: false\n",
    )
    redis = load_settings(path, env={}).redis
    assert (redis.username, redis.tls_ca_file, redis.tls_check_hostname) == (
        "cache-proxy",
        files["REDIS_TLS_CA_FILE"],
        False,
    )
    assert load_settings(write(tmp_path, ""), env={}).redis.tls_check_hostname is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("YES", True), ("1", True), ("False", False), ("no", False), ("0", False)],
)
def test_hostname_check_reads_common_spellings_when_set_in_a_variable(
    tmp_path: Path, text: str, expected: bool
) -> None:
    env = {"REDIS_TLS_CHECK_HOSTNAME": text}
    assert load_settings(write(tmp_path, ""), env=env).redis.tls_check_hostname is expected


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), (b"", "is empty"), (b"\n", "is empty"), (b"\xffpw-not-utf8", "is not UTF-8 text")],
)
def test_password_file_fails_naming_the_key_but_not_the_content_when_unusable(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    secret = tmp_path / "redis-password"
    if content is not None:
        secret.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, ""), env={"REDIS_PASSWORD_FILE": str(secret)})
    (problem,) = str(caught.value).splitlines()
    assert problem.startswith("redis.password_file (REDIS_PASSWORD_FILE) in the environment")
    assert message in problem and str(secret) in problem and "pw-not-utf8" not in problem


def test_password_file_shows_only_its_path_when_settings_are_resolved(tmp_path: Path) -> None:
    (tmp_path / "redis-password").write_text("pw-shown-nowhere\n")
    env = {"REDIS_PASSWORD_FILE": str(tmp_path / "redis-password"), "REDIS_TLS_CHECK_HOSTNAME": "0"}
    shown = {r.setting.key: r.shown() for r in resolve(write(tmp_path, ""), env=env)[1]}
    assert shown["redis.password_file"] == f"{tmp_path / 'redis-password'} (read, content hidden)"
    assert shown["redis.tls_check_hostname"] == "false"
    assert "pw-shown-nowhere" not in "".join(shown.values())


@pytest.mark.parametrize(
    ("url", "variables", "message"),
    [
        ("redis://h:6379/0", ["REDIS_TLS_CA_FILE"], "redis.tls_ca_file (REDIS_TLS_CA_FILE) needs a rediss://"),
        ("unix:///run/redis.sock", ["REDIS_TLS_CERT_FILE"], "REDIS_TLS_CERT_FILE) needs a rediss:// redis.url"),
        ("rediss://h:6380/0", ["REDIS_TLS_KEY_FILE"], "REDIS_TLS_KEY_FILE) needs redis.tls_cert_file"),
    ],
)
def test_tls_settings_fail_naming_both_keys_when_they_do_not_fit_together(
    tmp_path: Path, url: str, variables: list[str], message: str
) -> None:
    files = pem_files(tmp_path)
    env = {"REDIS_URL": url, **{variable: files[variable] for variable in variables}}
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, ""), env=env)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_MODE": "sentinel"}, "REDIS_SENTINELS"),
        ({"REDIS_MODE": "cluster", "REDIS_URL": "redis://node:7000/2"}, "database 0"),
        ({"REDIS_MODE": "cluster", "REDIS_URL": "unix:///run/redis.sock"}, "redis:// or rediss://"),
        ({"REDIS_SENTINELS": "s1:26379"}, "only read in sentinel mode"),
    ],
)
def test_redis_modes_refuse_settings_that_do_not_fit_when_loaded(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, ""), env=env)


def test_cluster_and_sentinel_settings_load_when_given(tmp_path: Path) -> None:
    cluster = load_settings(
        write(tmp_path, "redis: {cluster_nodes: ['n2:7001', '[::1]:7002']}\n"),
        env={"REDIS_MODE": "cluster", "REDIS_URL": "redis://n1:7000"},
    ).redis
    assert (cluster.mode, cluster.cluster_nodes) == ("cluster", ("n2:7001", "[::1]:7002"))
    sentinel = load_settings(
        write(tmp_path, ""),
        env={"REDIS_MODE": "sentinel", "REDIS_SENTINELS": "s1:26379,s2:26379", "REDIS_SENTINEL_MASTER": "cache"},
    ).redis
    assert (sentinel.mode, sentinel.sentinels, sentinel.sentinel_master) == (
        "sentinel",
        ("s1:26379", "s2:26379"),
        "cache",
    )
