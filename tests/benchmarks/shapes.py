"""Request bodies the workloads send, and response bodies and headers shaped like the OpenAI API."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CREATED = 1732608000
CHAT_MODEL = "gpt-4o-mini-2024-07-18"
EMBEDDING_MODEL = "text-embedding-3-small"
FINGERPRINT = "fp_0ba0d124f1"
EMBEDDING_DIMS = 1536
ANSWER = (
    "First, confirm the new subnet's security group and network ACLs allow the database port from the export "
    "host. Second, check that the job's connection string and DNS now resolve to the new address and that no "
    "stale connection pool keeps the old one. Third, compare the idle timeout of any NAT or load balancer on "
    "the new path with the job's longest query, because a silent drop there reads as a reset."
)
BODY_DIR = Path(__file__).resolve().parent / "bodies"
# Sent by the fake upstreams with every answer, so that the proxy stores and replays them with its entries.
OPENAI_HEADERS = {
    "openai-organization": "org-bench",
    "openai-processing-ms": "412",
    "openai-version": "2020-10-01",
    "x-request-id": "req_0123456789abcdef0123456789abcdef",
}


def request_body(name: str) -> bytes:
    """Return the exact bytes of ``bodies/<name>.json``, the body the wrk scripts send."""
    return (BODY_DIR / f"{name}.json").read_bytes()


def miss_body(nonce: str, n: int, name: str = "chat") -> bytes:
    """Return body *name* with ``<nonce>-<n> `` opening its last message, the way ``lua/miss.lua`` varies it."""
    body = request_body(name)
    marker = b'"content":"'
    cut = body.rindex(marker) + len(marker)
    return body[:cut] + f"{nonce}-{n} ".encode() + body[cut:]


def _pretty(value: Any) -> bytes:
    # The API pretty-prints non-streamed JSON; sizes here match what a client really receives.
    return json.dumps(value, indent=2).encode() + b"\n"


def chat_completion() -> bytes:
    """A ``chat.completion`` object with ``usage`` and ``system_fingerprint``."""
    return _pretty(
        {
            "id": "chatcmpl-AXbench0000000000000000000001",
            "object": "chat.completion",
            "created": CREATED,
            "model": CHAT_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 58,
                "completion_tokens": 84,
                "total_tokens": 142,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "system_fingerprint": FINGERPRINT,
        }
    )


def _chunk(delta: dict[str, Any], finish_reason: str | None, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    event: dict[str, Any] = {
        "id": "chatcmpl-AXbench0000000000000000000002",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": CHAT_MODEL,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
    }
    if usage:
        event["usage"] = usage
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def chat_chunks() -> list[bytes]:
    """The SSE events of a streamed chat completion: role, one event per word, finish, usage, ``[DONE]``."""
    words = ANSWER.split(" ")
    events = [_chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events += [_chunk({"content": word if i == 0 else " " + word}, None) for i, word in enumerate(words)]
    events.append(_chunk({}, "stop"))
    events.append(_chunk({}, None, {"prompt_tokens": 58, "completion_tokens": 84, "total_tokens": 142}))
    events.append(b"data: [DONE]\n\n")
    return events


def completion() -> bytes:
    """A legacy ``text_completion`` object."""
    return _pretty(
        {
            "id": "cmpl-AXbench0000000000000000000003",
            "object": "text_completion",
            "created": CREATED,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": ANSWER, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 84, "total_tokens": 124},
        }
    )


def embeddings() -> bytes:
    """An embeddings ``list`` with one 1536-dimension vector, as text-embedding-3-small returns."""
    rng = random.Random(1536)
    vector = [round(rng.gauss(0.0, 0.025), 9) for _ in range(EMBEDDING_DIMS)]
    return _pretty(
        {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": EMBEDDING_MODEL,
            "usage": {"prompt_tokens": 14, "total_tokens": 14},
        }
    )


def write_static_bodies(root: Path) -> None:
    """Write every fixed response under *root* with the extension nginx maps to its content type."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "chat.json").write_bytes(chat_completion())
    (root / "chat.sse").write_bytes(b"".join(chat_chunks()))
    (root / "completion.json").write_bytes(completion())
    (root / "embeddings.json").write_bytes(embeddings())
