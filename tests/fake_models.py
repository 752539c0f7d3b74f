"""A scriptable fake of two model-provider APIs, for tests that cannot reach a real provider.

Standard library only (Python 3.11). One HTTP server on 127.0.0.1 speaks both:

* OpenAI Chat Completions, ``POST /v1/chat/completions`` (base URL ``fake.openai_base``, i.e.
  ``{url}/v1``), key in ``Authorization: Bearer <key>``; JSON replies, or with ``"stream": true``
  server-sent events ``data: {chat.completion.chunk}``: a role chunk, content chunks, a chunk with
  an empty delta and ``finish_reason`` (OpenAI sends it on its own), with
  ``stream_options.include_usage`` a ``choices: []`` chunk carrying ``usage``, then ``data: [DONE]``.
* Anthropic Messages, ``POST /v1/messages`` (base URL ``fake.anthropic_base``, i.e. ``{url}``),
  key in ``x-api-key`` (or ``Authorization: Bearer``, as the newest official SDKs send it), an
  ``anthropic-version`` header (2023-01-01, 2023-06-01 or 2026-10-21) required; JSON replies, or
  named SSE events ``message_start, content_block_start, ping, content_block_delta...,
  content_block_stop, message_delta, message_stop``.
* ``GET /v1/models`` in either dialect (Anthropic's when an ``x-api-key`` or
  ``anthropic-version`` header is sent).

Errors use each provider's status codes and bodies: OpenAI ``{"error": {"message", "type",
"param", "code"}}`` (401 ``invalid_api_key``, 404 ``model_not_found``, 429
``rate_limit_exceeded``, 500 ``server_error`` type with ``code: null`` as OpenAI sends it);
Anthropic ``{"type": "error", "error": {"type", "message"}, "request_id"}``
(``authentication_error``, ``not_found_error``, ``rate_limit_error``, ``api_error``,
``overloaded_error``). A wrong or missing key (401), a malformed request (400: bad JSON, missing
fields, a ``system`` role in Anthropic messages, a missing ``anthropic-version``) and a model not
in ``fake.models`` (404) are answered before any scripted reply is consumed. 429 replies carry
``retry-after``.

Python API::

    with FakeModels(key="sk-test-123") as fake:          # port=0: a free port
        fake.script({"text": "```python\\nprint(1)\\n```"},
                    {"status": 429, "retry_after": 0},
                    {"text": "slow", "chunks": 20, "delay_s": 0.1})
        ... point the client at fake.openai_base / fake.anthropic_base ...
        fake.requests[-1]["headers"]["authorization"]     # what the client sent
        fake.wait_for(lambda reqs: reqs and reqs[-1]["disconnected"])  # block till true, or TimeoutError

A reply (one per provider request, first in first out, shared by both APIs) is a dict, or a
string as shorthand for ``{"text": ...}``:

    text           the assistant's text (default "")
    input_tokens   reported prompt tokens (default: ceil(characters of every prompt text / 4))
    output_tokens  reported completion tokens (default: ceil(len(text) / 4))
    chunks         stream the text in this many pieces (default: pieces of about 16 characters)
    delay_s        pause after each streamed piece (slow streams, for interrupt tests)
    stop_reason    "end_turn" (default), "max_tokens" or "stop_sequence" (OpenAI: "stop"/"length")
    status         answer with this provider error instead: 400 401 403 404 429 500 503 529
    retry_after    seconds for the retry-after header of a 429 (default 1)
    message        the error message (default: the provider's usual text)
    malformed      "not_json": 200 with a body that is not JSON (stream or not);
                   "bad_sse": an event stream with a data line that is not JSON amid good ones;
                   "truncated": a stream that ends cleanly but without [DONE] / message_stop
                                (without streaming: a JSON body cut short of its Content-Length);
                   "empty": no choices (OpenAI) / no content blocks (Anthropic)

With the queue empty the fake answers 200 with ``NO_SCRIPT_TEXT``, which says so.

Every provider request is logged (``fake.requests``, copies): ``id, time, method, path``
(as received, with any query), ``api`` ("openai", "anthropic", "models" or None), ``headers``
(lowercased names), ``body`` (parsed JSON or None), ``raw_body`` (text), ``stream``, ``reply``
(the script entry used, or None), ``status``, ``disconnected`` (the client went away mid-reply)
and ``finished`` (the reply was fully written, or abandoned).

HTTP control endpoints, no auth: ``GET /_fake/requests``, ``GET|POST /_fake/script`` (POST a
JSON list of replies, or one reply, to append), ``POST /_fake/reset`` (empties queue and log),
``GET|POST /_fake/models`` (POST a JSON list of model names to replace the set).

Streams use HTTP/1.1 chunked encoding and are written and flushed piece by piece; a client that
disconnects is noticed between pieces (also during ``delay_s`` pauses) and the stream stops
quietly. ``stop()`` ends open connections and pauses at once.

As a script: ``python tests/fake_models.py [--port 0] [--key K] [--model M ...]`` prints
``fake-models listening on http://127.0.0.1:PORT`` and serves until interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import select
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

DEFAULT_KEY = "sk-test-fake-models-0000"
DEFAULT_MODELS = frozenset({
    "fake-model",
    "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-5", "gpt-5-mini",
    "claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5", "claude-3-5-haiku-latest",
})
NO_SCRIPT_TEXT = ("[fake-models] No scripted reply is loaded: call FakeModels.script(...) or "
                  "POST /_fake/script before sending this request.")
ANTHROPIC_VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})
REPLY_KEYS = frozenset({"text", "input_tokens", "output_tokens", "chunks", "delay_s", "stop_reason",
                        "status", "retry_after", "message", "malformed"})
MALFORMED = frozenset({"not_json", "bad_sse", "truncated", "empty"})
ERROR_STATUSES = frozenset({400, 401, 403, 404, 429, 500, 503, 529})
STOP_REASONS = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop"}
CHUNK_CHARS = 16
NOT_JSON_BODY = b"<html><body><h1>502 Bad Gateway</h1>upstream sent garbage</body></html>\n"


def estimate_tokens(chars: int) -> int:
    """The fake's token count for `chars` characters: about four characters a token."""
    return math.ceil(chars / 4)


def split_text(text: str, pieces: int | None = None) -> list[str]:
    """`text` in `pieces` contiguous, nearly equal parts (at most one per character; none when
    empty); by default parts of about CHUNK_CHARS characters."""
    if not text:
        return []
    n = max(1, min(pieces or math.ceil(len(text) / CHUNK_CHARS), len(text)))
    size, extra = divmod(len(text), n)
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def check_reply(reply: dict | str) -> dict:
    """A validated copy of one scripted reply; ValueError says what is wrong."""
    if isinstance(reply, str):
        reply = {"text": reply}
    if not isinstance(reply, dict):
        raise ValueError(f"a reply is a dict or a string, not {reply!r}")
    unknown = set(reply) - REPLY_KEYS
    if unknown:
        raise ValueError(f"unknown reply keys {sorted(unknown)}; known: {sorted(REPLY_KEYS)}")

    def number(name, kind, minimum):
        value = reply.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value < minimum):
            raise ValueError(f"reply {name} must be a number >= {minimum}, not {value!r}")

    number("input_tokens", int, 0)
    number("output_tokens", int, 0)
    number("chunks", int, 1)
    number("delay_s", (int, float), 0)
    number("retry_after", (int, float), 0)
    if not isinstance(reply.get("text", ""), str) or not isinstance(reply.get("message", ""), str):
        raise ValueError("reply text and message must be strings")
    if "status" in reply and reply["status"] not in ERROR_STATUSES:
        raise ValueError(f"reply status must be one of {sorted(ERROR_STATUSES)}, not {reply['status']!r}")
    if "malformed" in reply and reply["malformed"] not in MALFORMED:
        raise ValueError(f"reply malformed must be one of {sorted(MALFORMED)}, not {reply['malformed']!r}")
    if "stop_reason" in reply and reply["stop_reason"] not in STOP_REASONS:
        raise ValueError(f"reply stop_reason must be one of {sorted(STOP_REASONS)}")
    return dict(reply)


def _mask(key: str) -> str:
    """A key as OpenAI echoes it in a 401: its start and last four characters."""
    if len(key) < 12:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def _prompt_chars(content) -> int:
    """Characters of text in a message content or system prompt: a string or a list of parts."""
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return 0


def _sse(data, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return (f"event: {event}\n" if event else "").encode() + f"data: {payload}\n\n".encode()


class _Error(Exception):
    """An HTTP error reply: status, JSON body, extra headers."""

    def __init__(self, status: int, body: dict, headers: dict | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers or {}


class _StreamEnded(Exception):
    """The reply cannot go on: the client disconnected, or the server is stopping."""


class _Ctx:
    """What a provider needs to build one reply."""

    def __init__(self, model: str, input_tokens: int, output_tokens: int, text: str,
                 stop_reason: str, include_usage: bool):
        self.model, self.text, self.stop_reason = model, text, stop_reason
        self.input_tokens, self.output_tokens = input_tokens, output_tokens
        self.include_usage = include_usage
        self.created = int(time.time())


class _OpenAI:
    """OpenAI Chat Completions."""

    name = "openai"
    request_id_header = "x-request-id"
    _errors = {
        400: ("invalid_request_error", None, "Invalid request."),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: {masked}. You can find "
              "your API key at https://platform.openai.com/account/api-keys."),
        403: ("invalid_request_error", None, "You are not allowed to sample from this model"),
        404: ("invalid_request_error", "model_not_found",
              "The model `{model}` does not exist or you do not have access to it."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached for {model} in organization org-fake on "
              "requests per min (RPM): Limit 3, Used 3, Requested 1. Please try again in {retry_after}s."),
        500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
        503: ("server_error", None, "The server is overloaded or not ready yet."),
        529: ("server_error", None, "The server is overloaded or not ready yet."),
    }

    def error(self, status, message=None, *, model="", key="", retry_after=1, param=None, code=None):
        etype, default_code, text = self._errors.get(status, self._errors[500 if status >= 500 else 400])
        message = message or text.format(model=model, masked=_mask(key), retry_after=f"{retry_after:g}")
        return _Error(status, {"error": {"message": message, "type": etype, "param": param,
                                         "code": code if code is not None else default_code}})

    def authenticate(self, headers, key):
        auth = headers.get("authorization")
        if not auth:
            raise _Error(401, {"error": {
                "message": "You didn't provide an API key. You need to provide your API key in an "
                           "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "type": "invalid_request_error", "param": None, "code": None}})
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or given.strip() != key:
            raise self.error(401, key=given.strip() or auth)

    def validate(self, headers, body):
        if not isinstance(body, dict):
            raise self.error(400, "We could not parse the JSON body of your request. (HINT: This likely means "
                             "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                             "payload, but what was sent was not valid JSON.)")
        for field in ("model", "messages"):
            if field not in body:
                raise self.error(400, f"Missing required parameter: '{field}'.", param=field,
                                 code="missing_required_parameter")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise self.error(400, "Invalid 'messages': expected a non-empty array.", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in {"system", "developer", "user", "assistant", "tool"}:
                raise self.error(400, f"Invalid value for 'messages[{i}].role'.", param=f"messages[{i}].role")

    def prompt_chars(self, body):
        return sum(_prompt_chars(m.get("content")) for m in body["messages"])

    def wants_usage(self, body):
        options = body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def _usage(self, ctx):
        return {"prompt_tokens": ctx.input_tokens, "completion_tokens": ctx.output_tokens,
                "total_tokens": ctx.input_tokens + ctx.output_tokens}

    def response(self, ctx, rid, empty):
        choices = [] if empty else [{
            "index": 0, "message": {"role": "assistant", "content": ctx.text, "refusal": None, "annotations": []},
            "logprobs": None, "finish_reason": STOP_REASONS[ctx.stop_reason]}]
        return {"id": rid, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
                "choices": choices, "usage": self._usage(ctx), "service_tier": "default",
                "system_fingerprint": "fp_fake"}

    def stream(self, ctx, rid, pieces, empty):
        """(head, content, tail) lists of SSE frames."""
        def chunk(choices, **extra):
            c = {"id": rid, "object": "chat.completion.chunk", "created": ctx.created, "model": ctx.model,
                 "service_tier": "default", "system_fingerprint": "fp_fake", "choices": choices}
            if ctx.include_usage:
                c["usage"] = None
            c.update(extra)
            return _sse(c)

        def choice(delta, finish=None):
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

        tail = [_sse("[DONE]")]
        if ctx.include_usage:
            tail.insert(0, chunk([], usage=self._usage(ctx)))
        if empty:
            return [], [], [chunk([])] + tail
        head = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
        content = [chunk(choice({"content": p})) for p in pieces]
        return head, content, [chunk(choice({}, STOP_REASONS[ctx.stop_reason]))] + tail

    def garbage(self):
        return b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {"content": "oops\n\n'

    def models(self, names):
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 1700000000,
                                            "owned_by": "fake-models"} for n in sorted(names)]}


class _Anthropic:
    """Anthropic Messages."""

    name = "anthropic"
    request_id_header = "request-id"
    _errors = {
        400: ("invalid_request_error", "Invalid request."),
        401: ("authentication_error", "invalid x-api-key"),
        403: ("permission_error", "Your API key does not have permission to use the specified resource."),
        404: ("not_found_error", "model: {model}"),
        429: ("rate_limit_error", "This request would exceed the rate limit for your organization (org-fake) "
              "of 5 requests per minute. Please try again later."),
        500: ("api_error", "Internal server error"),
        503: ("api_error", "Service unavailable"),
        529: ("overloaded_error", "Overloaded"),
    }

    def error(self, status, message=None, *, model="", key="", retry_after=1):
        etype, text = self._errors.get(status, self._errors[500 if status >= 500 else 400])
        error = {"type": etype, "message": message or text.format(model=model)}
        return _Error(status, {"type": "error", "error": error, "request_id": None})  # id set when sent

    def authenticate(self, headers, key):
        given = headers.get("x-api-key")
        if given is None and headers.get("authorization", "").lower().startswith("bearer "):
            given = headers["authorization"][len("bearer "):].strip()  # the newest SDKs send keys so
        if given is None:
            raise self.error(401, "x-api-key header is required")
        if given != key:
            raise self.error(401)

    def validate(self, headers, body):
        version = headers.get("anthropic-version")
        if version is None:
            raise self.error(400, "anthropic-version: header is required")
        if version not in ANTHROPIC_VERSIONS:
            raise self.error(400, f"anthropic-version: invalid version {version!r}")
        if not isinstance(body, dict):
            raise self.error(400, "There was an issue with the JSON body of your request: it is not valid JSON.")
        for field in ("model", "max_tokens", "messages"):
            if field not in body:
                raise self.error(400, f"{field}: Field required")
        if isinstance(body["max_tokens"], bool) or not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
            raise self.error(400, "max_tokens: Input should be a valid integer greater than or equal to 1")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise self.error(400, "messages: at least one message is required")
        for i, m in enumerate(messages):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "system":
                raise self.error(400, 'messages: Unexpected role "system". The Messages API accepts a top-level '
                                 '`system` parameter, not "system" as an input message role.')
            if role not in {"user", "assistant"}:
                raise self.error(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
            content = m.get("content")
            if not isinstance(content, str) and not (
                    isinstance(content, list) and all(isinstance(b, dict) and "type" in b for b in content)):
                raise self.error(400, f"messages.{i}.content: Input should be a valid string or list of blocks")

    def prompt_chars(self, body):
        return _prompt_chars(body.get("system")) + sum(_prompt_chars(m.get("content")) for m in body["messages"])

    def wants_usage(self, body):
        return True

    def _message(self, ctx, rid, content, stop_reason, usage):
        return {"id": rid, "type": "message", "role": "assistant", "model": ctx.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": None, "usage": usage}

    def response(self, ctx, rid, empty):
        content = [] if empty else [{"type": "text", "text": ctx.text}]
        return self._message(ctx, rid, content, ctx.stop_reason,
                             {"input_tokens": ctx.input_tokens, "output_tokens": ctx.output_tokens})

    def stream(self, ctx, rid, pieces, empty):
        """(head, content, tail) lists of SSE frames."""
        start = _sse({"type": "message_start", "message": self._message(
            ctx, rid, [], None, {"input_tokens": ctx.input_tokens, "output_tokens": 1})}, "message_start")
        ping = _sse({"type": "ping"}, "ping")
        end = [_sse({"type": "message_delta", "delta": {"stop_reason": ctx.stop_reason, "stop_sequence": None},
                     "usage": {"output_tokens": ctx.output_tokens}}, "message_delta"),
               _sse({"type": "message_stop"}, "message_stop")]
        if empty:
            return [start, ping], [], end
        head = [start, _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                            "content_block_start"), ping]
        content = [_sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
                        "content_block_delta") for p in pieces]
        return head, content, [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop")] + end

    def garbage(self):
        return b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, "delta": {\n\n'

    def models(self, names):
        data = [{"type": "model", "id": n, "display_name": n, "created_at": "2025-01-01T00:00:00Z"}
                for n in sorted(names)]
        return {"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}


OPENAI, ANTHROPIC = _OpenAI(), _Anthropic()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def version_string(self):
        return "fake-models/1"

    @property
    def fake(self) -> "FakeModels":
        return self.server.fake

    def setup(self):
        super().setup()
        self.fake._connection_opened(self.connection)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        self.fake._connection_closed(self.connection)

    def log_message(self, format, *args):  # quiet: tests read the request log instead
        pass

    def do_GET(self):
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

    # --- plumbing --------------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("content-length") or 0))

    def _send(self, status: int, body: bytes, headers: dict | None = None, content_type="application/json",
              length: int | None = None):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            raise _StreamEnded()

    def _send_json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _peer_closed(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _check_alive(self):
        if self.fake._stopping.is_set() or self._peer_closed():
            raise _StreamEnded()

    def _pause(self, seconds: float):
        """Waits `seconds`, noticing a disconnect or a stop at once."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._check_alive()
            try:
                readable, _, _ = select.select([self.connection], [], [], min(left, 0.05))
            except (OSError, ValueError):
                raise _StreamEnded()
            if readable:  # EOF (checked next round) or stray bytes: don't spin on it
                self._check_alive()
                self.fake._stopping.wait(min(left, 0.05))
        self._check_alive()

    def _write_chunk(self, data: bytes):
        self._check_alive()
        try:
            self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except OSError:
            raise _StreamEnded()

    # --- requests --------------------------------------------------------------------------------

    def _dispatch(self):
        raw = self._read_body()
        path = urlsplit(self.path).path
        if path.startswith("/_fake/"):
            return self._control(path, raw)
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = None
        provider, api = self._route(path, headers)
        record = self.fake._log({
            "method": self.command, "path": self.path, "api": api, "headers": headers, "body": body,
            "raw_body": raw.decode("utf-8", "replace"),
            "stream": bool(isinstance(body, dict) and body.get("stream") is True),
        })
        try:
            self._serve(record, provider, api, path, headers, body)
        except _StreamEnded:
            self.close_connection = True
            self.fake._update(record, disconnected=not self.fake._stopping.is_set())
        finally:
            self.fake._update(record, finished=True)

    def _route(self, path, headers):
        if path == "/v1/chat/completions":
            return OPENAI, "openai"
        if path == "/v1/messages":
            return ANTHROPIC, "anthropic"
        anthropic_like = "x-api-key" in headers or "anthropic-version" in headers
        return (ANTHROPIC if anthropic_like else OPENAI), ("models" if path == "/v1/models" else None)

    def _serve(self, record, provider, api, path, headers, body):
        fake = self.fake
        request_id = "req_" + secrets.token_hex(12)
        rid_header = {provider.request_id_header: request_id}
        try:
            if api is None or (api == "models") != (self.command == "GET"):
                if provider is OPENAI:
                    raise provider.error(404, f"Invalid URL ({self.command} {path})")
                raise provider.error(404, "Not Found")
            provider.authenticate(headers, fake.key)
            if api == "models":
                fake._update(record, status=200)
                return self._send_json(200, provider.models(fake.models), rid_header)
            provider.validate(headers, body)
            model = body["model"]
            if model not in fake.models:
                raise provider.error(404, model=model)
            reply = fake._next_reply()
            fake._update(record, reply=reply)
            reply = reply or {"text": NO_SCRIPT_TEXT}
            if "status" in reply:
                retry_after = reply.get("retry_after", 1)
                err = provider.error(reply["status"], reply.get("message"), model=model, key=fake.key,
                                     retry_after=retry_after)
                if reply["status"] == 429:
                    err.headers["retry-after"] = f"{retry_after:g}"
                raise err
        except _Error as err:
            if "request_id" in err.body:
                err.body["request_id"] = request_id
            fake._update(record, status=err.status)
            return self._send_json(err.status, err.body, {**rid_header, **err.headers})
        self._reply(record, provider, body, model, reply, rid_header)

    def _reply(self, record, provider, body, model, reply, headers):
        malformed = reply.get("malformed")
        text = "" if malformed == "empty" else reply.get("text", "")
        ctx = _Ctx(model=model,
                   input_tokens=reply.get("input_tokens", estimate_tokens(provider.prompt_chars(body))),
                   output_tokens=reply.get("output_tokens", estimate_tokens(len(text))),
                   text=text, stop_reason=reply.get("stop_reason", "end_turn"),
                   include_usage=provider.wants_usage(body))
        rid = ("chatcmpl-" if provider is OPENAI else "msg_") + secrets.token_hex(12)
        self.fake._update(record, status=200)
        if malformed == "not_json":
            return self._send(200, NOT_JSON_BODY, headers)
        if not record["stream"] and malformed != "bad_sse":
            data = json.dumps(provider.response(ctx, rid, malformed == "empty")).encode()
            if malformed == "truncated":  # promise the whole body, send half of it, hang up
                self.close_connection = True
                return self._send(200, data[: len(data) // 2], headers, length=len(data))
            return self._send(200, data, headers)

        head, content, tail = provider.stream(ctx, rid, split_text(text, reply.get("chunks")), malformed == "empty")
        if malformed == "truncated":
            content, tail = content[: max(1, len(content) // 2)], []
        if malformed == "bad_sse":
            content = content[:1] + [provider.garbage()] + content[1:]
        self.send_response(200)
        for name, value in {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache",
                            "transfer-encoding": "chunked", **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        delay = reply.get("delay_s", 0)
        for frame in head:
            self._write_chunk(frame)
        for frame in content:
            self._write_chunk(frame)
            if delay:
                self._pause(delay)
        for frame in tail:
            self._write_chunk(frame)
        try:  # the last chunk of the chunked encoding
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            raise _StreamEnded()
        if malformed == "truncated":
            self.close_connection = True

    def _control(self, path, raw):
        fake = self.fake
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            return self._send_json(400, {"error": "the body is not JSON"})
        try:
            if path == "/_fake/requests" and self.command == "GET":
                return self._send_json(200, fake.requests)
            if path == "/_fake/script" and self.command == "GET":
                return self._send_json(200, fake.pending)
            if path == "/_fake/script" and self.command == "POST":
                fake.script(*(data if isinstance(data, list) else [data]))
                return self._send_json(200, {"queued": len(fake.pending)})
            if path == "/_fake/reset" and self.command == "POST":
                fake.reset()
                return self._send_json(200, {"ok": True})
            if path == "/_fake/models" and self.command == "GET":
                return self._send_json(200, sorted(fake.models))
            if path == "/_fake/models" and self.command == "POST":
                if not isinstance(data, list) or not all(isinstance(m, str) for m in data):
                    raise ValueError("POST a JSON list of model names")
                fake.models = set(data)
                return self._send_json(200, sorted(fake.models))
            return self._send_json(404, {"error": f"no control endpoint {self.command} {path}"})
        except ValueError as e:
            return self._send_json(400, {"error": str(e)})
        except _StreamEnded:
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # many clients may connect at once

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (OSError, _StreamEnded)):
            return  # a client went away: nothing to report
        super().handle_error(request, client_address)


class FakeModels:
    """The fake provider server. See the module documentation."""

    def __init__(self, key: str = DEFAULT_KEY, port: int = 0, host: str = "127.0.0.1",
                 models: set[str] | None = None):
        self.key = key
        self.models = set(DEFAULT_MODELS if models is None else models)
        self._host, self._port = host, port
        self._cond = threading.Condition()
        self._queue: list[dict] = []
        self._requests: list[dict] = []
        self._next_id = 1
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "FakeModels":
        if self._server is not None:
            raise RuntimeError("FakeModels is already started")
        self._server = _Server((self._host, self._port), _Handler)
        self._server.fake = self
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01},
                                        name=f"fake-models:{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """Stops serving, ends open connections (and streams) at once."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> "FakeModels":
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("FakeModels is not started")
        return self._port

    @property
    def url(self) -> str:
        """The server root, e.g. http://127.0.0.1:PORT."""
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base(self) -> str:
        """The OpenAI base URL (`{url}/v1`): a client posts to `{openai_base}/chat/completions`."""
        return self.url + "/v1"

    @property
    def anthropic_base(self) -> str:
        """The Anthropic base URL (`{url}`): a client posts to `{anthropic_base}/v1/messages`."""
        return self.url

    # --- scripting and the log -------------------------------------------------------------------

    def script(self, *replies: dict | str):
        """Appends replies to the queue (all validated first; ValueError names what is wrong)."""
        checked = [check_reply(r) for r in replies]
        with self._cond:
            self._queue.extend(checked)

    @property
    def pending(self) -> list[dict]:
        """Replies not yet used, in order."""
        with self._cond:
            return [dict(r) for r in self._queue]

    @property
    def requests(self) -> list[dict]:
        """Every provider request received so far, oldest first (copies)."""
        with self._cond:
            return [dict(r) for r in self._requests]

    def reset(self):
        """Empties the reply queue and the request log."""
        with self._cond:
            self._queue.clear()
            self._requests.clear()
            self._cond.notify_all()

    def wait_for(self, predicate, timeout: float = 5.0):
        """Blocks until `predicate(requests)` is truthy (re-checked whenever the log changes) and
        returns its value; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate([dict(r) for r in self._requests])
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"fake-models: condition not met within {timeout} s; "
                                       f"requests: {self._requests!r}")
                self._cond.wait(left)

    # --- used by the handler ---------------------------------------------------------------------

    def _next_reply(self) -> dict | None:
        with self._cond:
            return self._queue.pop(0) if self._queue else None

    def _log(self, fields: dict) -> dict:
        with self._cond:
            record = {"id": self._next_id, "time": time.time(), **fields, "reply": None, "status": None,
                      "disconnected": False, "finished": False}
            self._next_id += 1
            self._requests.append(record)
            self._cond.notify_all()
            return record

    def _update(self, record: dict, **fields):
        with self._cond:
            record.update(fields)
            self._cond.notify_all()

    def _connection_opened(self, conn):
        with self._cond:
            self._connections.add(conn)

    def _connection_closed(self, conn):
        with self._cond:
            self._connections.discard(conn)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description="Fake OpenAI / Anthropic model provider for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--key", default=DEFAULT_KEY, help="the API key clients must send")
    parser.add_argument("--model", action="append", help="an accepted model (repeat; default: a built-in set)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeModels(key=args.key, port=args.port, host=args.host, models=args.model) as fake:
        print(f"fake-models listening on {fake.url}", flush=True)
        print(f"  key {args.key}; OpenAI base {fake.openai_base}; Anthropic base {fake.anthropic_base}; "
              f"control {fake.url}/_fake/", file=sys.stderr, flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
