"""A fake OpenAI-compatible upstream, shaped like OpenAI's real responses, that records what it receives.

Behaviour is chosen by the request itself, so SDK-driven tests can trigger it: a user message containing
``fail:<status>`` answers that status with an OpenAI error (and ``Retry-After`` on 429), ``drop`` breaks a
stream off before ``[DONE]``, ``slow`` waits :data:`DELAY_S` seconds before answering, ``hang`` never answers,
``cookie`` adds a ``Set-Cookie`` and hop-by-hop response headers (``Connection: X-Hop`` naming ``X-Hop``).
Every answer carries a fresh id (``chatcmpl-<n>``), so a test can tell a replay from a new upstream call; a
repeatable fake (``create_fake_upstream(repeatable=True)``) gives every call the first call's ids and one fixed
``created`` time, so that identical requests get identical bytes.
A test can also make every request fail, whatever it says: ``app[OUTAGE].status = 503`` answers that status,
and ``app[OUTAGE].status = HANG`` answers nothing, until it is set back to ``0``.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy


@dataclass(frozen=True, slots=True)
class Received:
    method: str
    path: str
    query: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


RECEIVED = web.AppKey("received", list[Received])
DELAY_S = web.AppKey("delay_s", float)
HANG = -1


@dataclass
class Outage:
    """What every request gets instead of its answer: nothing special (0), an error status, or :data:`HANG`."""

    status: int = 0


OUTAGE = web.AppKey("outage", Outage)
MODEL_HEADER = "x-fake-upstream"
# What a repeatable fake answers as the time of every answer.
REPEATABLE_CREATED = 1_700_000_000


def _text_of(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    parts: list[str] = []
    for message in body.get("messages") or []:
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    for key in ("prompt", "input"):
        if isinstance(body.get(key), str):
            parts.append(body[key])
    return " ".join(parts)


def _usage(prompt: str, completion: int = 5) -> dict[str, Any]:
    prompt_tokens = max(1, len(prompt.split()))
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _error(status: int, message: str) -> web.Response:
    kinds = {
        400: ("invalid_request_error", None),
        401: ("invalid_request_error", "invalid_api_key"),
        429: ("requests", "rate_limit_exceeded"),
        500: ("server_error", None),
        503: ("server_error", None),
    }
    type_, code = kinds.get(status, ("server_error", None))
    headers = {"Retry-After": "7", "x-request-id": "req_error"} if status == 429 else {"x-request-id": "req_error"}
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": None, "code": code}},
        status=status,
        headers=headers,
        dumps=lambda o: orjson.dumps(o).decode(),
    )


class _OutageError(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


@web.middleware
async def _outage_answers(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except _OutageError as outage:
        return _error(outage.status, "The fake upstream is having an outage.")
    return response


class FakeOpenAI:
    """State shared by the handlers: a call counter, which a *repeatable* fake keeps at one, and the clock."""

    def __init__(self, repeatable: bool = False) -> None:
        self.calls = 0
        self.repeatable = repeatable

    def next_id(self, prefix: str) -> str:
        self.calls = 1 if self.repeatable else self.calls + 1
        return f"{prefix}-{self.calls}"

    def now(self) -> int:
        return REPEATABLE_CREATED if self.repeatable else int(time.time())


def create_fake_upstream(delay_s: float = 0.3, *, repeatable: bool = False) -> web.Application:
    """The fake as an aiohttp app; ``app[RECEIVED]`` lists every request it got, in order. *repeatable*: the same
    request always gets the same answer, byte for byte."""
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_outage_answers])
    app[RECEIVED] = []
    app[DELAY_S] = delay_s
    app[OUTAGE] = Outage()
    state = FakeOpenAI(repeatable)

    async def record(request: web.Request) -> tuple[Any, str]:
        raw = await request.read()
        app[RECEIVED].append(Received(request.method, request.path, request.query_string, request.headers, raw))
        if app[OUTAGE].status == HANG:
            await asyncio.sleep(3600)
        if app[OUTAGE].status:
            raise _OutageError(app[OUTAGE].status)
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        text = _text_of(body)
        if "slow" in text:
            await asyncio.sleep(app[DELAY_S])
        if "hang" in text:
            await asyncio.sleep(3600)
        return body, text

    def headers(model: str) -> dict[str, str]:
        return {
            "openai-version": "2020-10-01",
            "openai-processing-ms": "12",
            "openai-organization": "org-fake",
            "x-request-id": f"req_{state.calls}",
            "x-ratelimit-remaining-requests": "99",
            "openai-model": model,
        }

    async def chat(request: web.Request) -> web.StreamResponse:
        body, text = await record(request)
        if not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request.")
        if "fail:" in text:
            return _error(int(text.split("fail:")[1][:3]), "The fake upstream was told to fail.")
        model = str(body.get("model", "gpt-4o-mini"))
        cid, created = state.next_id("chatcmpl"), state.now()
        answer = f"echo: {text}"
        extra = headers(model)
        if "cookie" in text:
            extra.update({"Set-Cookie": "session=per-user; Path=/", "Connection": "keep-alive, X-Hop"})
            extra.update({"X-Hop": "hop", "Keep-Alive": "timeout=5"})
        if body.get("stream") is True:
            return await _stream_chat(request, cid, created, model, answer, text, body, extra)
        return web.Response(
            body=orjson.dumps(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": answer, "refusal": None, "annotations": []},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": _usage(text),
                    "service_tier": "default",
                    "system_fingerprint": "fp_fake",
                }
            ),
            content_type="application/json",
            headers=extra,
        )

    async def _stream_chat(
        request: web.Request,
        cid: str,
        created: int,
        model: str,
        answer: str,
        text: str,
        body: dict[str, Any],
        extra: dict[str, str],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", **extra})
        await response.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None, usage: Any = None, choices: bool = True) -> bytes:
            event = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if (body.get("stream_options") or {}).get("include_usage"):
                event["usage"] = usage
            return b"data: " + orjson.dumps(event) + b"\n\n"

        await response.write(chunk({"role": "assistant", "content": "", "refusal": None}, None))
        words = answer.split(" ")
        for i, word in enumerate(words):
            piece = chunk({"content": word if i == 0 else " " + word}, None)
            # Split events across writes so that readers must reassemble them.
            await response.write(piece[:7])
            await response.write(piece[7:])
            if "drop" in text and i == len(words) // 2:
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.close()
                return response
            if "slow" in text:
                await asyncio.sleep(0.02)
        await response.write(chunk({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            await response.write(chunk({}, None, _usage(text), choices=False))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def completions(request: web.Request) -> web.StreamResponse:
        body, text = await record(request)
        if not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request.")
        model = str(body.get("model", "gpt-3.5-turbo-instruct"))
        return web.Response(
            body=orjson.dumps(
                {
                    "id": state.next_id("cmpl"),
                    "object": "text_completion",
                    "created": state.now(),
                    "model": model,
                    "choices": [{"text": f" echo: {text}", "index": 0, "logprobs": None, "finish_reason": "stop"}],
                    "usage": _usage(text),
                }
            ),
            content_type="application/json",
            headers=headers(model),
        )

    async def embeddings(request: web.Request) -> web.StreamResponse:
        body, text = await record(request)
        if not isinstance(body, dict) or "input" not in body:
            return _error(400, "'input' is a required property")
        if "fail:" in text:
            return _error(int(text.split("fail:")[1][:3]), "The fake upstream was told to fail.")
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        serial = state.next_id("emb")
        data = []
        for i, item in enumerate(inputs):
            vector = [round(0.001 * (len(str(item)) + i + j + int(serial.split("-")[1])), 6) for j in range(8)]
            encoded: Any = vector
            if body.get("encoding_format") == "base64":
                encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        model = str(body.get("model", "text-embedding-3-small"))
        return web.Response(
            body=orjson.dumps(
                {
                    "object": "list",
                    "data": data,
                    "model": model,
                    "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
                }
            ),
            content_type="application/json",
            headers={**headers(model), "x-embedding-serial": serial},
        )

    async def moderations(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(
            body=orjson.dumps(
                {
                    "id": state.next_id("modr"),
                    "model": "omni-moderation-latest",
                    "results": [
                        {"flagged": False, "categories": {"violence": False}, "category_scores": {"violence": 0.0001}}
                    ],
                }
            ),
            content_type="application/json",
        )

    async def responses(request: web.Request) -> web.StreamResponse:
        body, text = await record(request)
        if not isinstance(body, dict):
            return _error(400, "We could not parse the JSON body of your request.")
        rid, model = state.next_id("resp"), str(body.get("model", "gpt-4o-mini"))
        result = {
            "id": rid,
            "object": "response",
            "created_at": state.now(),
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{rid}",
                    "status": "completed",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": f"echo: {text}", "annotations": []}],
                }
            ],
            "usage": {"input_tokens": 3, "output_tokens": 2, "total_tokens": 5},
        }
        if body.get("stream") is not True:
            return web.Response(body=orjson.dumps(result), content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        events = [
            (
                "response.created",
                {
                    "type": "response.created",
                    "sequence_number": 0,
                    "response": {**result, "status": "in_progress", "output": []},
                },
            ),
            (
                "response.output_text.delta",
                {
                    "type": "response.output_text.delta",
                    "sequence_number": 1,
                    "item_id": f"msg_{rid}",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": f"echo: {text}",
                },
            ),
            ("response.completed", {"type": "response.completed", "sequence_number": 2, "response": result}),
        ]
        for name, event in events:
            if "drop" in text and name == "response.completed":
                assert request.transport is not None
                request.transport.close()
                return response
            await response.write(f"event: {name}\ndata: ".encode() + orjson.dumps(event) + b"\n\n")
        await response.write_eof()
        return response

    async def models(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(
            body=orjson.dumps(
                {
                    "object": "list",
                    "data": [{"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}],
                }
            ),
            content_type="application/json",
        )

    async def echo(request: web.Request) -> web.StreamResponse:
        await record(request)
        received = app[RECEIVED][-1]
        return web.Response(
            body=orjson.dumps(
                {
                    "method": request.method,
                    "path": request.path,
                    "query": request.query_string,
                    "bytes": len(received.body),
                }
            ),
            content_type="application/json",
        )

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/moderations", moderations)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/v1/{rest:.*}", echo)
    return app


def main() -> None:
    """``python -m tests.fakes.upstream --port N``: serve the fake on 127.0.0.1 for manual runs."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    parser.add_argument("--delay", type=float, default=0.3, help="seconds a 'slow' request waits")
    args = parser.parse_args()
    web.run_app(create_fake_upstream(args.delay), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
