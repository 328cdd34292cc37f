"""Optional peers: their configurations, their request dialects, and the note when one is not installed."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.benchmarks import figures, peers, shapes, varnish
from tests.benchmarks.__main__ import parse_args
from tests.benchmarks.figures import HIT_WORKLOADS
from tests.benchmarks.report import markdown
from tests.benchmarks.stack import SERVERS
from tests.benchmarks.test_report import ENVIRONMENT, _wrk_run


def test_varnish_keys_post_on_the_body_when_its_vcl_is_rendered() -> None:
    vcl = varnish.vcl(8081)
    assert "import bodyaccess;\n" in vcl and '.port = "8081";' in vcl
    assert "std.cache_req_body(1MB);" in vcl and "return (hash);" in vcl
    assert "bodyaccess.hash_req_body();" in vcl
    assert 'set bereq.method = "POST";' in vcl
    assert 'set resp.http.X-Cache = "HIT";' in vcl


def test_tensorzero_config_points_both_models_at_upstream_when_rendered() -> None:
    config = tomllib.loads(peers.tensorzero_toml(8081))
    assert config["gateway"]["observability"]["enabled"] is False
    chat = config["models"]["mock"]["providers"]["local"]
    embed = config["embedding_models"]["embed"]["providers"]["local"]
    assert chat["api_base"] == embed["api_base"] == "http://127.0.0.1:8081/v1/"
    assert (chat["type"], chat["api_key_location"]) == ("openai", "none")


def test_litellm_config_caches_in_the_runs_redis_when_rendered() -> None:
    config = yaml.safe_load(peers.litellm_yaml(8081, 6380, "bench-x-litellm"))
    assert [model["model_name"] for model in config["model_list"]] == ["gpt-4o-mini", "text-embedding-3-small"]
    assert config["model_list"][0]["litellm_params"]["api_base"] == "http://127.0.0.1:8081/v1"
    cache = config["litellm_settings"]["cache_params"]
    assert (cache["type"], cache["port"], cache["namespace"]) == ("redis", 6380, "bench-x-litellm")
    assert config["general_settings"]["master_key"] == "sk-bench"


def test_tensorzero_bodies_differ_from_the_others_only_in_its_own_fields() -> None:
    server = peers.PEERS["tensorzero"]
    assert server.wrk_options() == ("prefix=/openai", "bodies=tensorzero")
    for name in ("chat", "chat_stream", "embeddings"):
        theirs = json.loads(shapes.request_body(server.body_name(name)))
        ours = json.loads(shapes.request_body(name))
        assert theirs.pop("tensorzero::cache_options") == {"enabled": "on"}
        assert theirs.pop("model").startswith("tensorzero::")
        assert theirs == {key: value for key, value in ours.items() if key != "model"}
    assert shapes.miss_body("n", 1, server.body_name("chat")).count(b'"content":"n-1 ') == 1


def test_servers_speak_the_plain_api_when_no_dialect_is_set() -> None:
    assert all(server.wrk_options() == () and server.body_name("chat") == "chat" for server in SERVERS)
    litellm, varnish = peers.PEERS["litellm"], peers.PEERS["varnish"]
    assert (litellm.seconds(1), litellm.connections(64), litellm.connections(1)) == (3, 8, 1)
    assert (varnish.seconds(1), varnish.connections(64)) == (1, 64)


def test_missing_peer_is_skipped_with_its_install_command_when_asked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(peers, "PEERS_VENV", tmp_path / "no-such-venv")
    said: list[str] = []
    chosen, skipped = peers.select(["tensorzero", "litellm"], said.append)
    assert chosen == []
    assert "pip install tensorzero 'litellm[proxy]'" in skipped["litellm"]
    assert said == [f"skipping peer {name}: {reason}" for name, reason in skipped.items()]
    results = {"environment": {**ENVIRONMENT, "peers": {}, "peers_skipped": skipped}}
    assert "- tensorzero skipped: tensorzero is not installed in tests/benchmarks/.peers-venv" in markdown(results)


def test_unknown_peer_is_refused_when_parsing_the_command_line() -> None:
    assert parse_args(["--peers", "varnish,litellm"]).peers == ["varnish", "litellm"]
    with pytest.raises(SystemExit):
        parse_args(["--peers", "squid"])


def test_capped_connections_are_noted_when_a_peer_ran_with_fewer() -> None:
    hits: dict[str, Any] = {}
    for workload in HIT_WORKLOADS:
        for conns in (64, 1):
            for name in ("proxy", "nginx", "litellm"):
                run = {**_wrk_run(name, 1000.0, 1.0, 2.0), "connections": min(conns, 8) if name == "litellm" else conns}
                hits[f"{workload}/{conns}/{name}"] = figures.summarize([run])
    servers = {"hits": ["proxy", "nginx", "litellm"], "misses": ["proxy", "nginx", "litellm"]}
    text = markdown({"environment": ENVIRONMENT, "servers": servers, "hits": hits})
    assert "- hit/64/litellm: ran with 8 connections, not 64" in text
    assert "hit/1/litellm: ran with" not in text and "hit/64/nginx: ran with" not in text
