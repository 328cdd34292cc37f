"""Load benchmark of the proxy against nginx ``proxy_cache``; run it with ``python -m tests.benchmarks``."""
