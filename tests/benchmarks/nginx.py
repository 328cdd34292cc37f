"""nginx command line and configurations: the fake upstream, and the caching reference the proxy is compared to."""

from __future__ import annotations

import os
from pathlib import Path

from .shapes import OPENAI_HEADERS


def argv(root: Path, workers: int) -> list[str]:
    """nginx in the foreground with everything under *root*; one worker runs without a master process."""
    single = " master_process off;" if workers == 1 else ""
    conf, errors = str(root / "nginx.conf"), str(root / "error.log")
    return ["nginx", "-p", str(root), "-c", conf, "-e", errors, "-g", f"daemon off;{single}"]


def _preamble(root: Path, workers: int) -> str:
    # Only a root master may switch users, and its workers must still read the 0700 temp dir.
    user = "user root;\n" if os.geteuid() == 0 and workers > 1 else ""
    temps = "".join(
        f"    {kind}_temp_path {root}/tmp_{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes {workers};\n"
        f"error_log {root}/error.log warn;\n"
        f"pid {root}/nginx.pid;\n"
        "events { worker_connections 8192; }\n"
        "http {\n"
        "    access_log off;\n"
        f"{temps}"
        "    sendfile on;\n"
        "    tcp_nodelay on;\n"
        # nginx closes a keep-alive connection after 1000 requests by default; aiohttp never does.
        "    keepalive_requests 10000000;\n"
        "    keepalive_timeout 300s;\n"
        "    client_body_buffer_size 1m;\n"
        "    client_max_body_size 8m;\n"
    )


def upstream_conf(root: Path, www: Path, port: int) -> str:
    """A fake OpenAI API serving the files written by ``shapes.write_static_bodies`` for any POST body.

    Chat requests whose body has ``"stream": true`` get the SSE file. The body is read (by a mirror
    subrequest) before the static file is chosen, so ``$request_body`` is known when the file is picked.
    """
    extra = "".join(f"            add_header {name} {value};\n" for name, value in OPENAI_HEADERS.items())
    return _preamble(root, 1) + (
        "    types { application/json json; text/event-stream sse; }\n"
        "    charset utf-8;\n"
        "    charset_types application/json text/event-stream;\n"
        "    etag off;\n"
        '    map $request_body $chat_kind { "~\\"stream\\"\\s*:\\s*true" sse; default json; }\n'
        "    server {\n"
        f"        listen 127.0.0.1:{port} backlog=4096;\n"
        # The static module answers POST with 405; error_page turns that into the file as a 200.
        "        location = /v1/chat/completions {\n"
        "            mirror /_read_body;\n"
        f"            alias {www}/chat.json;\n"
        "            error_page 405 =200 /_static/chat.$chat_kind;\n"
        "        }\n"
        "        location = /v1/completions {\n"
        f"            alias {www}/completion.json;\n"
        "            error_page 405 =200 /_static/completion.json;\n"
        "        }\n"
        "        location = /v1/embeddings {\n"
        f"            alias {www}/embeddings.json;\n"
        "            error_page 405 =200 /_static/embeddings.json;\n"
        "        }\n"
        "        location = /_read_body { internal; return 204; }\n"
        "        location = /_status { stub_status; }\n"
        "        location /_static/ {\n"
        "            internal;\n"
        f"            alias {www}/;\n"
        f"{extra}"
        "        }\n"
        "    }\n"
        "}\n"
    )


def reference_conf(root: Path, port: int, upstream_port: int, workers: int = 1) -> str:
    """A caching reverse proxy keyed on URI and request body, in front of the fake upstream.

    Responses carry ``X-Cache: HIT|MISS`` from ``$upstream_cache_status``, the proxy's own header name.
    """
    return _preamble(root, workers) + (
        f"    proxy_cache_path {root}/cache levels=1:2 keys_zone=bench:64m inactive=1h use_temp_path=off;\n"
        "    upstream fake {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 128;\n"
        "        keepalive_requests 10000000;\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port} backlog=4096;\n"
        "        location = /healthz { return 200 'ok'; }\n"
        "        location /v1/ {\n"
        "            proxy_pass http://fake;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "            proxy_cache bench;\n"
        "            proxy_cache_methods POST;\n"
        # $request_body is only set when the whole body fits client_body_buffer_size (1m above).
        '            proxy_cache_key "$request_uri|$request_body";\n'
        "            proxy_cache_valid 200 1h;\n"
        "            proxy_buffering on;\n"
        "            proxy_buffer_size 16k;\n"
        "            proxy_buffers 8 64k;\n"
        "            add_header X-Cache $upstream_cache_status always;\n"
        "        }\n"
        "    }\n"
        "}\n"
    )
