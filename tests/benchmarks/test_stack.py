"""The servers a run starts: the proxy without its in-process tier."""

from __future__ import annotations

from pathlib import Path

from proxy.loader import load_settings
from proxy.memory import MemoryStore
from tests.benchmarks.figures import REDIS_HITS
from tests.benchmarks.stack import NO_TIER_YAML, SERVERS
from tests.support import make_entry


def test_proxy_without_tier_keeps_no_entry_in_process_when_its_config_is_loaded(tmp_path: Path) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(NO_TIER_YAML)
    env = {"UPSTREAM_BASE_URL": "http://127.0.0.1:9/v1", "OPENAI_API_KEY": "sk-bench", "CACHE_BACKEND": "redis"}
    cache = load_settings(str(config), env).cache
    tier = MemoryStore(cache.memory_max_entries, cache.memory_max_bytes)
    tier.put_now("key", make_entry(b"{}"))
    assert len(tier) == 0 and tier.hot("key") is None


def test_proxy_without_tier_runs_hits_only_and_must_need_redis() -> None:
    server = next(server for server in SERVERS if server.name == REDIS_HITS)
    assert (server.needs_redis, server.serves_misses, server.copies_subject) == (True, False, True)
    assert [server.name for server in SERVERS][:3] == ["proxy", "nginx", REDIS_HITS]
