"""``python -m proxy`` as users start it: ./proxy.yaml and .env in the working directory, flags, workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.support import clean_env, fake_upstream_process, free_port

pytestmark = pytest.mark.integration


def start(cwd: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy", *args],
        cwd=cwd,
        env=clean_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def get_json(port: int, path: str, timeout_s: float = 10) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
                return orjson.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=15)
    return process.returncode, err.decode()


def test_working_directory_files_configure_the_proxy_when_present(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "proxy.yaml").write_text("cache: {backend: memory}\nlog_level: DEBUG\n")
    (tmp_path / ".env").write_text(f"PROXY_PORT={port}\nOPENAI_API_KEY=sk-from-dotenv-file\n")
    process = start(tmp_path)
    try:
        assert get_json(port, "/readyz") == {"status": "ready", "cache": "ok"}
    finally:
        code, err = stop(process)
    assert code == 0
    assert "cache=memory" in err and "key=configured" in err
    assert "sk-from-dotenv-file" not in err


def test_real_environment_wins_over_dotenv_when_both_set(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / ".env").write_text(f"PROXY_PORT={free_port()}\nCACHE_BACKEND=redis\n")
    process = start(tmp_path, PROXY_PORT=str(port), CACHE_BACKEND="off")
    try:
        assert get_json(port, "/readyz") == {"status": "ready", "cache": "off"}
    finally:
        code, _ = stop(process)
    assert code == 0


def test_config_flag_selects_the_file_when_given(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "elsewhere.yaml"
    config.write_text(f"server: {{port: {port}}}\ncache: {{backend: off}}\n")
    (tmp_path / "proxy.yaml").write_text("cache: {backend: memory}\n")
    process = start(tmp_path, "--config", str(config))
    try:
        assert get_json(port, "/readyz") == {"status": "ready", "cache": "off"}
    finally:
        stop(process)


def test_bad_setting_stops_startup_naming_the_key_when_invalid(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "proxy"],
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
        env=clean_env(CACHE_TTL="soon", REDIS_URL="redis://:hunter2@h:6379/0"),
    )
    err = result.stderr.decode()
    assert result.returncode == 2
    assert "CACHE_TTL" in err and "Traceback" not in err and "hunter2" not in err


def test_workers_share_the_port_and_stop_together_when_signalled(tmp_path: Path) -> None:
    port = free_port()
    process = start(tmp_path, "--workers", "2", PROXY_PORT=str(port), CACHE_BACKEND="memory")
    try:
        assert get_json(port, "/healthz") == {"status": "ok"}
    finally:
        code, err = stop(process)
    assert code == 0 and "ERROR" not in err


def test_stream_in_flight_finishes_when_proxy_is_told_to_stop(tmp_path: Path) -> None:
    port = free_port()
    with fake_upstream_process(tmp_path / "upstream.log") as upstream_url:
        process = start(tmp_path, PROXY_PORT=str(port), CACHE_BACKEND="memory", UPSTREAM_BASE_URL=upstream_url)
        try:
            get_json(port, "/healthz")
            body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "slow " * 25}]})
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                first = response.read1()
                process.send_signal(signal.SIGTERM)  # a rolling update, mid-stream
                rest = response.read()
            _, err = process.communicate(timeout=15)
            code = process.returncode
        finally:
            if process.poll() is None:
                process.kill()
    assert b"[DONE]" not in first
    assert (first + rest).endswith(b"data: [DONE]\n\n")
    assert code == 0, err.decode()


def test_check_config_prints_settings_without_secrets_when_valid(tmp_path: Path) -> None:
    env = clean_env(OPENAI_API_KEY="sk-secret-value", REDIS_URL="redis://:hunter2@h:6379/0", CACHE_TTL="42")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config"], cwd=tmp_path, env=env, capture_output=True, timeout=30
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "# settings file: none" in out
    assert [line for line in out.splitlines() if line.startswith("cache.ttl_s") and "42  # environment" in line]
    assert "redis://:***@h:6379/0" in out and "upstreams[0].api_key" in out
    assert "sk-secret-value" not in out and "hunter2" not in out


def test_check_config_hides_encryption_keys_when_set(tmp_path: Path) -> None:
    key, old = "current-key-Zm9vYmFyYmF6cXV4LXJhbmRvbQ==", "old-key-b2xkLWtleS1mcm9tLWxhc3QtbW9udGg="
    env = clean_env(CACHE_ENCRYPTION_KEY=key, CACHE_ENCRYPTION_OLD_KEYS=old)
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config"], cwd=tmp_path, env=env, capture_output=True, timeout=30
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "(set, hidden)  # environment (CACHE_ENCRYPTION_KEY)" in out
    assert "(set, hidden)  # environment (CACHE_ENCRYPTION_OLD_KEYS)" in out
    assert key not in out and old not in out


def test_check_config_names_every_problem_when_invalid(tmp_path: Path) -> None:
    (tmp_path / "proxy.yaml").write_text("cache: {ttl_s: soon}\nbogus: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config"],
        cwd=tmp_path,
        env=clean_env(PROXY_PORT="x"),
        capture_output=True,
        timeout=30,
    )
    err = result.stderr.decode()
    assert result.returncode == 2 and result.stdout == b""
    problems = err.splitlines()
    assert len(problems) == 3
    assert any("proxy.yaml" in p and "bogus" in p for p in problems)
    assert any("proxy.yaml" in p and "cache.ttl_s" in p for p in problems)
    assert any("PROXY_PORT" in p and "environment" in p for p in problems)


FORGED_MODEL = "gpt-4o\n2026-01-01 00:00:00,000 level=ERROR logger=proxy forged\u2028x"


def logged_with_model(tmp_path: Path, log_format: str, model: str) -> str:
    """What the proxy wrote to stderr (logs in *log_format*) around one request naming *model*."""
    port = free_port()
    process = start(
        tmp_path,
        PROXY_PORT=str(port),
        CACHE_BACKEND="memory",
        LOG_LEVEL="DEBUG",
        LOG_FORMAT=log_format,
        UPSTREAM_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
    )
    try:
        get_json(port, "/healthz")
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError):  # 502: nothing listens upstream
            urllib.request.urlopen(request, timeout=10)
    finally:
        _, err = stop(process)
    return err


def test_request_values_cannot_forge_log_lines_when_logged_as_text(tmp_path: Path) -> None:
    err = logged_with_model(tmp_path, "text", FORGED_MODEL)
    lines = err.splitlines()
    assert any("model=gpt-4o\\n2026-01-01" in line and "\\u2028x" in line for line in lines), err
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in lines)


def test_request_values_cannot_forge_log_lines_when_logged_as_json(tmp_path: Path) -> None:
    err = logged_with_model(tmp_path, "json", FORGED_MODEL)
    # Python's splitlines() also breaks at U+2028, as some log viewers do: every piece must still be one object.
    records = [json.loads(line) for line in err.splitlines()]
    (request,) = [r for r in records if r["logger"] == "proxy.access"]
    assert request["model"] == FORGED_MODEL and request["status"] == 502 and request["outcome"] == "MISS"
