"""Checks tests/fake_models.py, the fake OpenAI / Anthropic provider, with plain urllib and
http.client clients: both APIs with and without streaming, usage numbers, every scripted error and
malformed mode, keys, models, the request log, the control endpoints and the script entry point.
Synchronisation is by reading the stream or `FakeModels.wait_for`, never by sleeping."""

import http.client
import json
import math
import pathlib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from fake_models import NO_SCRIPT_TEXT, FakeModels, check_reply, split_text

KEY = "sk-test-0123456789abcdef"
CODE = "```python\nprint('hello from the model')\n```"


@pytest.fixture
def fake():
    with FakeModels(key=KEY) as f:
        yield f


def call(url, body=None, headers=None, method=None, raw=None):
    """(status, headers, body bytes) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers, err.read()


def openai_body(**extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], **extra}


def anthropic_body(**extra):
    return {"model": "claude-haiku-4-5", "max_tokens": 256, "messages": [{"role": "user", "content": "hi"}], **extra}


def openai(fake, key=KEY, **extra):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return call(fake.openai_base + "/chat/completions", openai_body(**extra), headers)


def anthropic(fake, key=KEY, version="2023-06-01", body=None, **extra):
    headers = {"x-api-key": key} if key else {}
    if version:
        headers["anthropic-version"] = version
    return call(fake.anthropic_base + "/v1/messages", body or anthropic_body(**extra), headers)


API = {"openai": openai, "anthropic": anthropic}


def sse(raw: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) for each server-sent event in a complete stream."""
    events = []
    for block in raw.decode().split("\n\n"):
        if block:
            lines = block.split("\n")
            name = next((line[len("event: "):] for line in lines if line.startswith("event: ")), None)
            data = "\n".join(line[len("data: "):] for line in lines if line.startswith("data: "))
            events.append((name, data))
    return events


def openai_chunks(raw):
    """The parsed chunks of an OpenAI stream, checking it ends with [DONE]."""
    events = sse(raw)
    assert events[-1] == (None, "[DONE]")
    return [json.loads(data) for _, data in events[:-1]]


def streamed_text(api, raw):
    if api == "openai":
        return "".join(c["choices"][0]["delta"].get("content", "") for c in openai_chunks(raw) if c["choices"])
    return "".join(json.loads(d)["delta"]["text"] for name, d in sse(raw) if name == "content_block_delta")


# --- OpenAI Chat Completions ---------------------------------------------------------------------


def test_openai_non_streaming(fake):
    fake.script({"text": CODE})
    status, headers, body = openai(fake, temperature=0, max_completion_tokens=100)
    assert status == 200 and headers["content-type"] == "application/json" and headers["x-request-id"]
    reply = json.loads(body)
    assert reply["object"] == "chat.completion" and reply["model"] == "gpt-4o-mini"
    assert reply["id"].startswith("chatcmpl-") and isinstance(reply["created"], int)
    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": CODE, "refusal": None,
                                                          "annotations": []},
                                 "logprobs": None, "finish_reason": "stop"}]
    out = math.ceil(len(CODE) / 4)
    assert reply["usage"] == {"prompt_tokens": 1, "completion_tokens": out, "total_tokens": 1 + out}


def test_openai_streaming_with_usage(fake):
    fake.script({"text": CODE, "chunks": 3, "input_tokens": 11, "output_tokens": 7})
    status, headers, raw = openai(fake, stream=True, stream_options={"include_usage": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    chunks = openai_chunks(raw)
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "gpt-4o-mini" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    first, *content, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert [c["choices"][0]["delta"]["content"] for c in content] == split_text(CODE, 3)
    assert all(c["choices"][0]["finish_reason"] is None and c["usage"] is None for c in [first, *content])
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 11, "completion_tokens": 7,
                                                         "total_tokens": 18}
    assert streamed_text("openai", raw) == CODE


def test_openai_streaming_without_usage(fake):
    fake.script({"text": "x" * 40})
    _, _, raw = openai(fake, stream=True)
    chunks = openai_chunks(raw)
    assert all("usage" not in c and c["choices"] for c in chunks)
    assert len(chunks) == 2 + math.ceil(40 / 16)  # role, pieces of about 16 characters, finish
    assert streamed_text("openai", raw) == "x" * 40


def test_openai_computed_usage_counts_every_prompt_text(fake):
    fake.script({"text": "0123456789"})
    messages = [{"role": "system", "content": "s" * 6},
                {"role": "user", "content": [{"type": "text", "text": "u" * 20}]},
                {"role": "assistant", "content": "a" * 5}, {"role": "user", "content": "q" * 9}]
    _, _, body = openai(fake, messages=messages)
    assert json.loads(body)["usage"] == {"prompt_tokens": math.ceil(40 / 4), "completion_tokens": 3,
                                         "total_tokens": 13}


# --- Anthropic Messages --------------------------------------------------------------------------


def test_anthropic_non_streaming(fake):
    fake.script({"text": CODE, "input_tokens": 42, "output_tokens": 9})
    status, headers, body = anthropic(fake, system="Write Python.",
                                      messages=[{"role": "user", "content": [{"type": "text", "text": "plot"}]}])
    assert status == 200 and headers["request-id"].startswith("req_")
    reply = json.loads(body)
    assert reply["id"].startswith("msg_")
    del reply["id"]
    assert reply == {"type": "message", "role": "assistant", "model": "claude-haiku-4-5",
                     "content": [{"type": "text", "text": CODE}], "stop_reason": "end_turn", "stop_sequence": None,
                     "usage": {"input_tokens": 42, "output_tokens": 9}}


def test_anthropic_streaming(fake):
    fake.script({"text": CODE, "chunks": 4})
    status, headers, raw = anthropic(fake, stream=True, system="s" * 10,
                                     messages=[{"role": "user", "content": "u" * 30}])
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse(raw)
    names = [name for name, _ in events]
    assert names == ["message_start", "content_block_start", "ping"] + ["content_block_delta"] * 4 + [
        "content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(d) for _, d in events]
    assert all(d["type"] == name for name, d in zip(names, data))
    start = data[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["model"] == "claude-haiku-4-5"
    assert start["usage"] == {"input_tokens": math.ceil(40 / 4), "output_tokens": 1}
    assert data[1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert [d["delta"] for d in data[3:7]] == [{"type": "text_delta", "text": t} for t in split_text(CODE, 4)]
    assert all(d["index"] == 0 for d in data[3:8])
    assert data[8] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": math.ceil(len(CODE) / 4)}}
    assert streamed_text("anthropic", raw) == CODE


@pytest.mark.parametrize("api", API)
def test_stop_reason_max_tokens(fake, api):
    fake.script({"text": "cut", "stop_reason": "max_tokens"})
    reply = json.loads(API[api](fake)[2])
    assert (reply["choices"][0]["finish_reason"] if api == "openai" else reply["stop_reason"]) == \
        ("length" if api == "openai" else "max_tokens")


@pytest.mark.parametrize("api", API)
def test_no_script_says_so(fake, api):
    status, _, body = API[api](fake)
    reply = json.loads(body)
    text = reply["choices"][0]["message"]["content"] if api == "openai" else reply["content"][0]["text"]
    assert status == 200 and text == NO_SCRIPT_TEXT and "No scripted reply" in text
    assert fake.requests[-1]["reply"] is None


# --- keys, models and request validation ---------------------------------------------------------


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("key", ["sk-test-wrong-key-99999", None])
def test_wrong_or_missing_key_is_refused_before_the_script(fake, api, key):
    fake.script({"text": "unused"})
    status, _, body = API[api](fake, key=key, stream=True)
    err = json.loads(body)
    assert status == 401 and KEY not in body.decode()
    if api == "openai":
        assert err["error"]["type"] == "invalid_request_error" and set(err["error"]) == {"message", "type", "param",
                                                                                         "code"}
        assert err["error"]["code"] == ("invalid_api_key" if key else None)
        if key:
            assert "Incorrect API key provided: sk-" in err["error"]["message"] and key not in err["error"]["message"]
    else:
        assert err["type"] == "error" and err["error"]["type"] == "authentication_error"
    assert fake.pending == [{"text": "unused"}] and fake.requests[-1]["status"] == 401


@pytest.mark.parametrize("api", API)
def test_unknown_model_is_404_before_the_script(fake, api):
    fake.script({"text": "ok"})
    status, _, body = API[api](fake, model="no-such-model")
    err = json.loads(body)
    assert status == 404 and "no-such-model" in err["error"]["message"]
    if api == "openai":
        assert err["error"]["code"] == "model_not_found" and err["error"]["type"] == "invalid_request_error"
    else:
        assert err["error"]["type"] == "not_found_error" and err["request_id"].startswith("req_")
    assert len(fake.pending) == 1
    fake.models = {"no-such-model"}
    assert API[api](fake, model="no-such-model")[0] == 200 and API[api](fake)[0] == 404


def test_anthropic_takes_bearer_keys_and_the_newer_version(fake):
    """The newest official Anthropic SDKs send the key as a bearer token and version 2026-10-21."""
    fake.script("via bearer")
    status, _, body = call(fake.anthropic_base + "/v1/messages", anthropic_body(),
                           {"authorization": f"Bearer {KEY}", "anthropic-version": "2026-10-21"})
    assert status == 200 and json.loads(body)["content"][0]["text"] == "via bearer"
    status, _, body = anthropic(fake, version="2024-02-30")
    assert status == 400 and "anthropic-version" in json.loads(body)["error"]["message"]
    assert call(fake.anthropic_base + "/v1/messages", anthropic_body(),
                {"authorization": "Bearer nope", "anthropic-version": "2023-06-01"})[0] == 401


def test_requests_that_break_the_api_rules_get_400(fake):
    fake.script({"text": "ok"})
    checks = [
        (anthropic(fake, version=None), "anthropic-version: header is required"),
        (anthropic(fake, body={"model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "x"}]}),
         "max_tokens: Field required"),
        (anthropic(fake, messages=[{"role": "system", "content": "x"}]), 'Unexpected role "system"'),
        (call(fake.openai_base + "/chat/completions", {"model": "gpt-4o"}, {"authorization": f"Bearer {KEY}"}),
         "Missing required parameter: 'messages'."),
        (call(fake.openai_base + "/chat/completions", raw=b"{not json", headers={"authorization": f"Bearer {KEY}"}),
         "We could not parse the JSON body"),
    ]
    for (status, _, body), message in checks:
        err = json.loads(body)["error"]
        assert status == 400 and err["type"] == "invalid_request_error" and message in err["message"]
    assert len(fake.pending) == 1


def test_unknown_paths_and_model_lists(fake):
    status, _, body = call(fake.url + "/v1/completions", openai_body(), {"authorization": f"Bearer {KEY}"})
    assert status == 404 and json.loads(body)["error"]["message"] == "Invalid URL (POST /v1/completions)"
    status, _, body = call(fake.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"})
    listing = json.loads(body)
    assert status == 200 and listing["object"] == "list" and "gpt-4o" in {m["id"] for m in listing["data"]}
    status, _, body = call(fake.url + "/v1/models", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    listing = json.loads(body)
    assert status == 200 and listing["has_more"] is False
    assert {"type": "model", "id": "claude-haiku-4-5"}.items() <= listing["data"][
        [m["id"] for m in listing["data"]].index("claude-haiku-4-5")].items()
    assert call(fake.url + "/v1/models", headers={"x-api-key": "bad"})[0] == 401


# --- scripted errors -----------------------------------------------------------------------------

OPENAI_ERRORS = {401: ("invalid_request_error", "invalid_api_key"), 404: ("invalid_request_error", "model_not_found"),
                 429: ("requests", "rate_limit_exceeded"), 500: ("server_error", None), 529: ("server_error", None)}
ANTHROPIC_ERRORS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 500: "api_error",
                    529: "overloaded_error"}


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("status", [401, 404, 429, 500, 529])
def test_scripted_errors(fake, api, status):
    fake.script({"status": status, "retry_after": 3}, {"text": "after the error"})
    got, headers, body = API[api](fake, stream=True)
    err = json.loads(body)
    assert got == status and headers["content-type"] == "application/json"
    if api == "openai":
        assert (err["error"]["type"], err["error"]["code"]) == OPENAI_ERRORS[status] and err["error"]["message"]
    else:
        assert err["type"] == "error" and err["error"]["type"] == ANTHROPIC_ERRORS[status]
        assert err["request_id"] == headers["request-id"]
    assert headers.get("retry-after") == ("3" if status == 429 else None)
    assert streamed_text(api, API[api](fake, stream=True)[2]) == "after the error"


def test_scripted_error_message_and_default_retry_after(fake):
    fake.script({"status": 529, "message": "busy, busy"}, {"status": 429})
    assert json.loads(anthropic(fake)[2])["error"]["message"] == "busy, busy"
    assert openai(fake)[1]["retry-after"] == "1"


# --- malformed replies ---------------------------------------------------------------------------


@pytest.mark.parametrize("api", API)
@pytest.mark.parametrize("stream", [False, True])
def test_malformed_not_json(fake, api, stream):
    fake.script({"text": CODE, "malformed": "not_json"})
    status, _, body = API[api](fake, stream=stream)
    assert status == 200
    with pytest.raises(ValueError):
        json.loads(body)


@pytest.mark.parametrize("api", API)
def test_malformed_bad_sse(fake, api):
    fake.script({"text": CODE, "chunks": 3, "malformed": "bad_sse"})
    events = sse(API[api](fake, stream=True)[2])
    bad = []
    for _, data in events:
        try:
            json.loads(data)
        except ValueError:
            bad.append(data)
    assert len(bad) == 1 + (api == "openai")  # OpenAI's terminator, [DONE], is not JSON either
    assert events[-1] == ((None, "[DONE]") if api == "openai" else ("message_stop", '{"type":"message_stop"}'))


@pytest.mark.parametrize("api", API)
def test_malformed_truncated_stream(fake, api):
    fake.script({"text": CODE, "chunks": 4, "malformed": "truncated"})
    status, _, raw = API[api](fake, stream=True)
    events = sse(raw)
    assert status == 200 and events
    assert all(data != "[DONE]" and name != "message_stop" and name != "message_delta" for name, data in events)
    if api == "openai":
        text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for _, d in events)
        assert all(json.loads(d)["choices"][0]["finish_reason"] is None for _, d in events)
    else:
        text = "".join(json.loads(d)["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == "".join(split_text(CODE, 4)[:2])


@pytest.mark.parametrize("api", API)
def test_malformed_truncated_body(fake, api):
    fake.script({"text": CODE, "malformed": "truncated"})
    with pytest.raises(http.client.IncompleteRead):
        API[api](fake)


@pytest.mark.parametrize("api", API)
def test_malformed_empty(fake, api):
    fake.script({"text": CODE, "malformed": "empty"}, {"text": CODE, "malformed": "empty"})
    reply = json.loads(API[api](fake)[2])
    assert (reply["choices"] if api == "openai" else reply["content"]) == []
    raw = API[api](fake, stream=True, stream_options={"include_usage": True})[2] if api == "openai" else \
        API[api](fake, stream=True)[2]
    if api == "openai":
        chunks = openai_chunks(raw)
        assert chunks and all(c["choices"] == [] for c in chunks) and chunks[-1]["usage"]["completion_tokens"] == 0
    else:
        assert [n for n, _ in sse(raw)] == ["message_start", "ping", "message_delta", "message_stop"]
    assert streamed_text(api, raw) == ""


# --- streaming behaviour -------------------------------------------------------------------------


def open_stream(fake, api):
    """An http.client response to a streaming request, unread."""
    conn = http.client.HTTPConnection("127.0.0.1", fake.port, timeout=5)
    if api == "openai":
        conn.request("POST", "/v1/chat/completions", json.dumps(openai_body(stream=True)),
                     {"authorization": f"Bearer {KEY}", "content-type": "application/json"})
    else:
        conn.request("POST", "/v1/messages", json.dumps(anthropic_body(stream=True)),
                     {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"})
    return conn, conn.getresponse()


@pytest.mark.parametrize("api", API)
def test_stream_arrives_piece_by_piece_and_a_disconnect_is_recorded(fake, api):
    fake.script({"text": "a" * 20, "chunks": 20, "delay_s": 0.2})
    conn, resp = open_stream(fake, api)
    while b'"content"' not in (line := resp.readline()) and b"text_delta" not in line:
        assert line, "the stream ended before its first piece"
    assert fake.requests[-1]["finished"] is False  # 19 more pieces, 0.2 s apart, are still to come
    resp.close()
    conn.close()
    record = fake.wait_for(lambda reqs: reqs[-1]["finished"] and reqs[-1], timeout=3)
    assert record["disconnected"] is True and record["status"] == 200


def test_complete_stream_is_not_marked_disconnected(fake):
    fake.script("done")
    anthropic(fake, stream=True)
    record = fake.wait_for(lambda reqs: reqs[-1]["finished"] and reqs[-1])
    assert record["disconnected"] is False and record["reply"] == {"text": "done"}


def test_stop_ends_a_slow_stream_at_once():
    fake = FakeModels(key=KEY).start()
    fake.script({"text": "b" * 50, "chunks": 50, "delay_s": 1})
    conn, resp = open_stream(fake, "anthropic")
    resp.readline()
    started = time.monotonic()
    fake.stop()
    assert time.monotonic() - started < 2
    with pytest.raises((http.client.IncompleteRead, OSError)):
        while resp.read(1024):
            pass
    conn.close()
    assert fake.requests[-1]["disconnected"] is False


def test_concurrent_requests_each_get_one_reply(fake):
    fake.script(*[f"reply {i}" for i in range(16)])
    texts = []

    def ask(i):
        api = "openai" if i % 2 else "anthropic"
        texts.append(streamed_text(api, API[api](fake, stream=True)[2]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(texts) == sorted(f"reply {i}" for i in range(16)) and fake.pending == []
    assert len(fake.requests) == 16


# --- the request log and the control endpoints ---------------------------------------------------


def test_request_log_shows_what_the_client_sent(fake):
    fake.script({"text": "one"})
    anthropic(fake, system="be brief", messages=[{"role": "user", "content": "context and question"}])
    openai(fake, key="sk-other-key-000000")
    first, second = fake.requests
    assert first["method"] == "POST" and first["path"] == "/v1/messages" and first["api"] == "anthropic"
    assert first["body"]["system"] == "be brief" and first["body"]["messages"][0]["content"] == "context and question"
    assert first["headers"]["anthropic-version"] == "2023-06-01" and first["headers"]["content-type"] == \
        "application/json"
    assert all(name == name.lower() for name in first["headers"])
    assert [name for name, value in first["headers"].items() if KEY in value] == ["x-api-key"]
    assert KEY not in first["raw_body"] and KEY not in first["path"]
    assert first["reply"] == {"text": "one"} and first["status"] == 200 and first["stream"] is False
    assert second["api"] == "openai" and second["status"] == 401 and second["reply"] is None
    assert second["headers"]["authorization"] == "Bearer sk-other-key-000000"
    assert first["id"] < second["id"] and first["time"] <= second["time"]
    fake.wait_for(lambda reqs: all(r["finished"] for r in reqs))
    status, _, body = call(fake.url + "/_fake/requests")
    assert status == 200 and json.loads(body) == fake.requests


def test_control_endpoints(fake):
    status, _, body = call(fake.url + "/_fake/script", [{"text": "first"}, {"status": 500}])
    assert status == 200 and json.loads(body) == {"queued": 2}
    assert json.loads(call(fake.url + "/_fake/script", {"text": "third", "chunks": 2})[2]) == {"queued": 3}
    assert json.loads(call(fake.url + "/_fake/script")[2]) == [{"text": "first"}, {"status": 500},
                                                               {"text": "third", "chunks": 2}]
    status, _, body = call(fake.url + "/_fake/script", [{"text": "ok"}, {"colour": "blue"}])
    assert status == 400 and "colour" in json.loads(body)["error"] and len(fake.pending) == 3  # all or nothing
    assert json.loads(openai(fake)[2])["choices"][0]["message"]["content"] == "first"
    assert openai(fake)[0] == 500
    assert json.loads(call(fake.url + "/_fake/models", ["m1"])[2]) == ["m1"] and fake.models == {"m1"}
    assert json.loads(call(fake.url + "/_fake/models")[2]) == ["m1"]
    assert call(fake.url + "/_fake/reset", method="POST")[0] == 200
    assert fake.requests == [] and fake.pending == []
    assert json.loads(call(fake.url + "/_fake/requests")[2]) == []
    assert call(fake.url + "/_fake/nothing")[0] == 404


@pytest.mark.parametrize("reply", [{"txt": "x"}, {"status": 418}, {"malformed": "weird"}, {"chunks": 0},
                                   {"delay_s": -1}, {"input_tokens": "3"}, {"text": 3}, ["text"]])
def test_invalid_replies_are_refused(reply):
    with pytest.raises(ValueError):
        check_reply(reply)


def test_split_text():
    assert split_text("abcdefghij", 3) == ["abcd", "efg", "hij"]
    assert split_text("ab", 5) == ["a", "b"] and split_text("", 3) == []
    assert split_text("x" * 33) == ["x" * 11] * 3


def test_urls_and_context_manager():
    with FakeModels() as f:
        assert f.url == f"http://127.0.0.1:{f.port}" and f.port > 0
        assert f.openai_base == f.url + "/v1" and f.anthropic_base == f.url
    with pytest.raises(RuntimeError):
        f.url


def test_runs_as_a_script():
    script = pathlib.Path(__file__).with_name("fake_models.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0", "--key", KEY], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("fake-models listening on http://127.0.0.1:")
        url = line.split()[-1]
        call(url + "/_fake/script", [{"text": "from the script"}])
        status, _, body = call(url + "/v1/chat/completions", openai_body(), {"authorization": f"Bearer {KEY}"})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "from the script"
    finally:
        proc.terminate()
        assert proc.wait(5) == 0
