"""Varnish as a peer: a VCL that caches POST keyed on the body (vmod ``bodyaccess``), and its command line."""

from __future__ import annotations

from pathlib import Path
from string import Template

# The bodies the benchmark sends are a few kB; a body over this limit is refused, never cached under a wrong key.
MAX_BODY = "1MB"


VCL = Template("""vcl 4.1;

import std;
import bodyaccess;

backend fake {
    .host = "127.0.0.1";
    .port = "$upstream_port";
}

sub vcl_recv {
    unset req.http.X-Body-Len;
    if (req.url == "/healthz") {
        return (synth(200, "ok"));
    }
    if (req.method == "POST") {
        std.cache_req_body($max_body);
        set req.http.X-Body-Len = bodyaccess.len_req_body();
        if (req.http.X-Body-Len == "-1") {
            return (synth(413, "request body over $max_body"));
        }
        return (hash);
    }
}

sub vcl_hash {
    if (req.http.X-Body-Len) {
        bodyaccess.hash_req_body();
    }
}

sub vcl_backend_fetch {
    if (bereq.http.X-Body-Len) {
        set bereq.method = "POST";
    }
    unset bereq.http.X-Body-Len;
}

sub vcl_backend_response {
    set beresp.ttl = 1h;
}

sub vcl_deliver {
    if (obj.hits > 0) {
        set resp.http.X-Cache = "HIT";
    } else {
        set resp.http.X-Cache = "MISS";
    }
}
""")


def vcl(upstream_port: int) -> str:
    """Cache every POST under its URL, host and body, for an hour, answering ``X-Cache: HIT|MISS`` as the proxy does.

    Varnish passes POST by default; buffering the body (``std.cache_req_body``) lets ``bodyaccess`` hash it, and
    the backend request must be turned back into a POST, since a lookup fetches misses with GET.
    """
    return VCL.substitute(upstream_port=upstream_port, max_body=MAX_BODY)


def argv(root: Path, port: int) -> list[str]:
    """varnishd in the foreground on *port*, its VCL at ``root/default.vcl``, its work dir and cache under *root*.

    As root, varnishd runs its worker as the unprivileged ``vcache`` user: *root* and every directory above it
    must be searchable by that user, and the VCL readable.
    """
    return [
        "varnishd",
        "-F",
        "-a",
        f"127.0.0.1:{port}",
        "-f",
        str(root / "default.vcl"),
        "-n",
        str(root / "work"),
        "-s",
        "malloc,256m",
        "-T",
        "none",
    ]
