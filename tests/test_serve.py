"""serve.py over real sockets on 127.0.0.1: the `openai` client for what OpenAI's clients do, raw HTTP for what a
broken or hostile client does. The server runs in this process (serve.start: its loop and HTTP threads) on a tiny
model saved in the real formats; its greedy answers are held against chat.py's for the same conversation and
against the same request answered alone."""
import base64
import copy
import http.client
import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import chat
import openai_api
import serve
from conftest import tiny_release
from engine import Engine, Sampling
from openai_schema import validate

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Q1, Q2 = "what colour is the square?", "how many circles are there?"


@pytest.fixture(scope="module")
def files(tmp_path_factory, sp_model, tokenizer):
    return tiny_release(tmp_path_factory.mktemp("serve"), sp_model, tokenizer)


@contextmanager
def running(files, slots: int = 4, eos_id: int | None = None, **options):
    """The server on a free port; eos_id=-1: answers never end before max_tokens (the model's EOS is ignored)."""
    engine = Engine(files["model"], files["tokenizer"], slots=slots, eos_id=eos_id)
    server = serve.start(engine, files["transform"], quiet=True, **options)
    try:
        yield server
    finally:
        serve.stop(server, grace=0)


def port(server) -> int:
    return server.server_address[1]


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port(server)}/v1", api_key=key, max_retries=0, timeout=60)


def data_url(path_or_bytes) -> str:
    raw = open(path_or_bytes, "rb").read() if isinstance(path_or_bytes, str) else path_or_bytes
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def user(text: str, *pictures) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(p)}} for p in pictures]
            + [{"type": "text", "text": text}]}


def post(server, body, headers=None, path="/v1/chat/completions"):
    """Raw HTTP: (status, headers, parsed JSON or the text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port(server), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


def raw(server, data: bytes) -> tuple[int, dict]:
    """Bytes sent as they are; the response's status and JSON body."""
    s = socket.create_connection(("127.0.0.1", port(server)), timeout=10)
    s.sendall(data)
    r = http.client.HTTPResponse(s)
    r.begin()
    body = json.loads(r.read())
    s.close()
    return r.status, body


def chat_answers(files, rounds: list[tuple[str, list[str]]], n: int) -> list[str]:
    """chat.py's answers, greedy, to questions asked one after the other (each with the pictures it brings)."""
    c = chat.Chat(Engine(files["model"], files["tokenizer"]), files["transform"], n, Sampling(greedy=True))
    out = []
    for question, pictures in rounds:
        for p in pictures:
            c.add_picture(p)
        c.ask(question)
        out.append(c.parts[-1].turns[-1].answer)
    return out


def test_openai_client_plain_and_streamed_answers_equal_chat_py(files):
    want = chat_answers(files, [(Q1, [files["pic1"]]), (Q2, [])], 12)
    with running(files) as server:
        api = client(server)
        messages = [user(Q1, files["pic1"])]
        plain = api.chat.completions.create(model="mmgpt", messages=messages, max_tokens=12, temperature=0)
        assert plain.choices[0].message.content == want[0] and plain.choices[0].finish_reason in ("stop", "length")
        assert plain.object == "chat.completion" and plain.id.startswith("chatcmpl-") and plain.model == "mmgpt"
        assert plain.usage.prompt_tokens == len(files["tokenizer"].encode(chat_prompt(files, Q1)))
        assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
        chunks = list(api.chat.completions.create(model="mmgpt", messages=messages, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices == []
        assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want[0]
        assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        # The second round, the whole conversation sent again: its prefix is reused, the answer is chat.py's.
        messages += [{"role": "assistant", "content": want[0]}, user(Q2)]
        again = api.chat.completions.create(model="mmgpt", messages=messages, max_tokens=12, temperature=0)
        assert again.choices[0].message.content == want[1]
        assert again.usage.prompt_tokens_details.cached_tokens >= plain.usage.prompt_tokens
        # The exact prompt the model got (an extension the page uses): the template as chat.py renders it.
        status, _, body = post(server, {"messages": messages, "max_tokens": 2, "return_prompt": True})
        assert status == 200 and body["prompt"] == chat_prompt(files, Q1, want[0], Q2)
        [model] = api.models.list().data
        assert model.id == "mmgpt" and model.model_extra["max_model_len"] == 256


def chat_prompt(files, *turns) -> str:
    """The template string chat.py gives the model for these questions and answers about pic1."""
    c = chat.Chat(Engine(files["model"], files["tokenizer"]), files["transform"])
    c.add_picture(files["pic1"])
    questions, answers = turns[::2], list(turns[1::2]) + [""]
    for q, a in zip(questions, answers):
        c.parts[-1].turns.append(chat.Turn(q, a))
    return c.text()


def requests_of_all_kinds(files) -> list[dict]:
    """16 requests: pictures or none, one or two pictures, different lengths and limits."""
    out = []
    for i in range(16):
        pictures = [[], [files["pic1"]], [files["pic2"]], [files["pic1"], files["pic2"]]][i % 4]
        out.append({"model": "mmgpt", "messages": [user(f"{Q1} {'and more ' * (i % 5)}", *pictures)],
                    "max_tokens": 4 + i % 7, "temperature": 0})
    return out


def stream_text(server, body) -> tuple[str, str]:
    chunks = client(server).chat.completions.create(stream=True, **body)
    parts, finish = [], None
    for c in chunks:
        parts.append(c.choices[0].delta.content or "")
        finish = c.choices[0].finish_reason or finish
    return "".join(parts), finish


def streamed_at_once(server, bodies) -> list:
    """Each body streamed by a client of its own, all at once: (text, finish_reason) each."""
    got = [None] * len(bodies)
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, stream_text(server, bodies[i])))
               for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return got


def test_sixteen_concurrent_streams_get_what_they_get_alone(files):
    bodies = requests_of_all_kinds(files)
    with running(files, slots=1) as server:
        alone = [stream_text(server, b) for b in bodies]
    with running(files, slots=16) as server:
        got = streamed_at_once(server, bodies)
        assert got == alone and len(set(alone)) > 8
        assert server.loop.engine.running == 0


def test_on_the_fast_path_the_server_compiles_before_it_serves_and_not_after(files):
    """On the fast path (a GPU's default) serve.start lets no one in before the loop has compiled its steps
    (Engine.warm_up, in the loop's own thread: CUDA graphs are recorded per thread). Then requests of all kinds, 16
    at once, and a conversation's second round compile nothing, and get the eager server's answers. Traced with
    aot_eager here: inductor takes minutes on a CPU."""
    bodies = requests_of_all_kinds(files)
    second = {"model": "mmgpt", "max_tokens": 6, "temperature": 0, "messages": bodies[1]["messages"] + [
        {"role": "assistant", "content": "a square"}, user(Q2)]}

    def answers(server) -> list:
        return streamed_at_once(server, bodies) + [stream_text(server, bodies[1]), stream_text(server, second)]

    with running(files, slots=16) as server:
        want = answers(server)
    torch._dynamo.reset()
    counters.clear()
    model = copy.deepcopy(files["model"])       # (the fast path merges the LoRA into the weights)
    server = serve.start(Engine(model, files["tokenizer"], slots=16, fast=True, backend="aot_eager"),
                         files["transform"], quiet=True)
    try:
        compiled = counters["stats"]["unique_graphs"]
        assert compiled >= 8
        assert answers(server) == want and counters["stats"]["unique_graphs"] == compiled
        assert server.loop.engine.running == 0
    finally:
        serve.stop(server, grace=0)


def test_a_warm_up_that_fails_stops_the_start_and_leaves_no_thread(files, monkeypatch):
    """The fast path's compiling fails before serving (out of memory, say): serve.start raises that error, nothing
    listens, and the loop's and the stream writer's threads end."""
    engine = Engine(files["model"], files["tokenizer"], slots=2)

    def fail():
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(engine, "warm_up", fail)
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="out of memory"):
        serve.start(engine, files["transform"], quiet=True)
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not set(threading.enumerate()) - before


def bomb() -> bytes:
    """A PNG that declares 10,000 x 10,000 pixels in 70 bytes (the pixels themselves are not there)."""
    small = io.BytesIO()
    Image.new("RGB", (1, 1)).save(small, "PNG")
    raw = bytearray(small.getvalue())
    raw[16:24] = (10000).to_bytes(4, "big") * 2                         # IHDR: width, height
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")       # and its checksum
    return bytes(raw)


def bad_inputs(files) -> list[tuple]:
    """(body, status, param, code, words in the message) for what a broken client sends."""
    good = [user(Q1, files["pic1"])]
    png = open(files["pic1"], "rb").read()
    pic = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": Q1}]}]
    p = "messages[0].content[0].image_url"
    return [
        (b'{"messages": [', 400, None, "invalid_json", "not valid JSON"),
        (b"\xff\xfe", 400, None, "invalid_json", "not valid JSON"),
        ([1, 2], 400, None, "invalid_type", "JSON object"),
        ({}, 400, "messages", "invalid_value", "non-empty list"),
        ({"messages": "hi"}, 400, "messages", "invalid_value", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "invalid_value", "unknown role"),
        ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "invalid_type",
         "string or a list"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}, 400, "messages[0].content[0].type",
         "invalid_value", "unknown part type"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]}, 400,
         "messages[0].content[0].text", "invalid_type", "must be a string"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role", "invalid_value",
         "must answer a user message"),
        ({"messages": good + [{"role": "assistant", "content": "red"}]}, 400, "messages", "invalid_value",
         "last message"),
        ({"messages": [{"role": "user", "content": "what is <image> here"}]}, 400, "messages[0].content",
         "invalid_value", "control token"),
        ({"messages": good, "n": 17}, 400, "n", "invalid_value", "between 1 and 16"),
        ({"messages": good, "max_tokens": -3}, 400, "max_tokens", "invalid_value", "between 1"),
        ({"messages": good, "max_tokens": "many"}, 400, "max_tokens", "invalid_type", "an integer"),
        ({"messages": good, "max_tokens": 10 ** 12}, 400, "max_tokens", "invalid_value", "between 1"),
        ({"messages": good, "logit_bias": {"99999": 1}}, 400, "logit_bias", "invalid_value", "not a token id"),
        ({"messages": good, "logit_bias": {"5": 101}}, 400, "logit_bias", "invalid_value", "from -100 to 100"),
        ({"messages": good, "logit_bias": [5]}, 400, "logit_bias", "invalid_type", "an object"),
        ({"messages": good, "temperature": 1e9}, 400, "temperature", "invalid_value", "between 0 and 2"),
        ({"messages": good, "temperature": True}, 400, "temperature", "invalid_type", "a number"),
        ({"messages": good, "top_p": -1}, 400, "top_p", "invalid_value", "between 0 and 1"),
        ({"messages": good, "stream": "yes"}, 400, "stream", "invalid_type", "true or false"),
        ({"messages": good, "stop": ["a"] * 5}, 400, "stop", "invalid_value", "at most 4"),
        ({"messages": good, "top_logprobs": 2}, 400, "top_logprobs", "invalid_value", "needs 'logprobs'"),
        ({"messages": good, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "invalid_value",
         "between 0 and 20"),
        ({"messages": good, "tools": [{"type": "function"}]}, 400, "tools", "unsupported_parameter", "not supported"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": data_url(png), "detail": "huge"}}]}]}, 400, p + ".detail", "invalid_value", "auto, low or high"),
        ({"messages": good, "model": "gpt-4"}, 404, "model", "model_not_found", "does not exist"),
        ({"messages": pic("data:image/png;base64,@@not base64@@")}, 400, p, "invalid_image_url", "not valid base64"),
        ({"messages": pic(data_url(b"these bytes are no picture"))}, 400, p, "invalid_image",
         "unreadable picture: UnidentifiedImageError: cannot identify image file"),
        ({"messages": pic(data_url(png[:len(png) // 2]))}, 400, p, "invalid_image", "unreadable picture"),
        ({"messages": pic(data_url(bomb()))}, 400, p, "invalid_image", "10000 x 10000 pixels"),
        ({"messages": pic("https://example.com/cat.png")}, 400, p, "invalid_image_url", "not fetched"),
        ({"messages": pic(files["pic1"])}, 400, p, "invalid_image_url", "--allowed-local-media-path"),
        ({"messages": [user(Q1, *[files["pic1"]] * 17)]}, 400, "messages", "too_many_images", "at most 16"),
        ({"messages": [{"role": "user", "content": "a \ud800 b"}]}, 400, "messages[0].content", "invalid_value",
         "lone surrogate"),
        ({"messages": [user("the cat sat " * 200)]}, 400, "messages", "context_length_exceeded", "context holds"),
    ]


def assert_error(status, body, want_status, param, code, words):
    assert status == want_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert (body["error"]["param"], body["error"]["code"]) == (param, code), body
    assert words in body["error"]["message"], body


def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_goes_on(files):
    with running(files, slots=2, max_body=200_000) as server:
        good = {"messages": [user(Q1, files["pic1"])], "max_tokens": 3, "temperature": 0}
        want = post(server, good)[2]["choices"][0]["message"]["content"]
        for body, status, param, code, words in bad_inputs(files):
            got_status, _, got = post(server, body)
            assert_error(got_status, got, status, param, code, words)
            assert post(server, good)[2]["choices"][0]["message"]["content"] == want      # still answers
        # Too large a body is refused on its Content-Length, before it is read (here it is never sent).
        status, body = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 300000\r\n\r\n")
        assert_error(status, body, 413, None, "request_too_large", "300,000 bytes")
        status, body = raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert_error(status, body, 411, None, "length_required", "Content-Length")
        status, body = raw(server, b"BREW /pot HTTP/1.1\r\n\r\n")
        assert status == 501 and "error" in body
        status, body = raw(server, b"GET /nowhere HTTP/1.1\r\n\r\n")
        assert_error(status, body, 404, None, "not_found", "no such endpoint")
        assert post(server, good)[2]["choices"][0]["message"]["content"] == want
        assert server.loop.engine.running == 0 and server.loop.accepted == 0


def test_api_key_is_required_when_set(files):
    with running(files, api_key="s3cret") as server:
        for key in ("wrong", "s3cre", "s3cret!"):
            with pytest.raises(openai.AuthenticationError) as e:
                client(server, key).chat.completions.create(model="mmgpt", messages=[user(Q1)], max_tokens=2)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, _, body = post(server, {"messages": [user(Q1)]})
        assert_error(status, body, 401, None, "invalid_api_key", "API key")
        done = client(server, "s3cret").chat.completions.create(model="mmgpt", messages=[user(Q1)], max_tokens=2)
        assert done.usage.completion_tokens >= 1


def test_local_pictures_only_under_the_allowed_folder(files, tmp_path):
    inside = tmp_path / "media" / "p.png"
    inside.parent.mkdir()
    inside.write_bytes(open(files["pic1"], "rb").read())
    message = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                        {"type": "text", "text": Q1}]}]
    with running(files, media_dir=str(tmp_path / "media")) as server:
        via_file = post(server, {"messages": message(f"file://{inside}"), "max_tokens": 4, "temperature": 0})[2]
        via_data = post(server, {"messages": message(data_url(files["pic1"])), "max_tokens": 4, "temperature": 0})[2]
        assert via_file["choices"][0]["message"] == via_data["choices"][0]["message"]
        for url in (files["pic1"], f"{tmp_path}/media/../../{os.path.basename(files['pic1'])}"):
            status, _, body = post(server, {"messages": message(url)})
            assert_error(status, body, 400, "messages[0].content[0].image_url", "invalid_image_url", "no such picture")


def stream_raw(server, body: dict, receive_buffer: int | None = None) -> socket.socket:
    """A streamed request on a bare socket (a client that can be killed at any byte, or never read)."""
    s = socket.socket()
    if receive_buffer:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    s.settimeout(30)
    s.connect(("127.0.0.1", port(server)))
    data = json.dumps(body | {"stream": True}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return s


def test_requests_that_come_together_to_an_idle_server_start_in_one_step(files, monkeypatch):
    """Four requests whose bodies are all being read when the first is complete: the idle loop does not start the
    first alone but waits for the others, and all four are admitted (prefilled together) in its first step; each
    answer is what it is alone."""
    monkeypatch.setattr(serve.Loop, "gather", 5.0)     # the wait ends when the last is read, long before this
    bodies = requests_of_all_kinds(files)[:4]
    with running(files, slots=1) as server:
        alone = [post(server, b)[2]["choices"][0]["message"]["content"] for b in bodies]
    with running(files, slots=4) as server:
        engine, admitted = server.loop.engine, []
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda: (admitted.append(len(engine.waiting)), step())[1])
        sockets, rest = [], []
        for b in bodies:
            data = json.dumps(b).encode()
            s = socket.create_connection(("127.0.0.1", port(server)), timeout=30)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data[:-1])
            sockets.append(s)
            rest.append(data[-1:])
        deadline = time.time() + 10
        while server.loop.arriving < 4 and time.time() < deadline:   # all four are being read
            time.sleep(0.01)
        assert server.loop.arriving == 4 and not admitted
        for s, last in zip(sockets, rest):
            s.sendall(last)
        got = []
        for s in sockets:
            r = http.client.HTTPResponse(s)
            r.begin()
            got.append(json.loads(r.read())["choices"][0]["message"]["content"])
            s.close()
        assert admitted[0] == 4 and got == alone


def test_a_client_killed_mid_stream_frees_its_slot_and_changes_no_other(files):
    bodies = requests_of_all_kinds(files)[:3]
    with running(files, slots=1, eos_id=-1) as server:
        alone = [stream_text(server, b) for b in bodies]
    with running(files, slots=4, eos_id=-1) as server:
        got = [None] * 3
        threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, stream_text(server, bodies[i])))
                   for i in range(3)]
        killed = stream_raw(server, {"messages": [user(Q2, files["pic2"])], "max_tokens": 150, "temperature": 0})
        for t in threads:
            t.start()
        seen = b""
        while seen.count(b"data: ") < 4:         # the answer has begun
            more = killed.recv(4096)
            assert more, seen
            seen += more
        killed.close()
        for t in threads:
            t.join(60)
        assert got == alone
        deadline = time.time() + 10
        while server.loop.engine.running and time.time() < deadline:
            time.sleep(0.05)
        assert server.loop.engine.running == 0 and server.loop.accepted == 0
        # the killed request was cancelled, not run to its 150 tokens
        assert server.loop.counts["generation_tokens"] < sum(b["max_tokens"] for b in bodies) + 75


def test_a_client_that_stops_reading_holds_up_no_other_and_is_let_go(files, monkeypatch):
    """One thread writes every stream, without blocking: a client that reads nothing while its answer fills the
    socket's buffers (small here: the server's a few KB) holds up no other stream; once it has taken nothing for
    Streams.stall seconds its connection is closed before the answer's end and its slot is free again."""
    bodies = requests_of_all_kinds(files)[:3]
    with running(files, slots=1, eos_id=-1) as server:
        alone = [stream_text(server, b) for b in bodies]
    setup = serve.Handler.setup

    def small_send_buffer(handler):
        setup(handler)
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    monkeypatch.setattr(serve.Handler, "setup", small_send_buffer)
    with running(files, slots=4, eos_id=-1) as server:
        threads_before = set(threading.enumerate())   # (a thread of the server before may still be ending)
        stuck = stream_raw(server, {"messages": [user(Q2, files["pic2"])], "max_tokens": 180, "temperature": 0},
                           receive_buffer=4096)
        deadline = time.time() + 30     # until its answer no longer fits (a job is in `unsent` before it is written)
        while not (blocked := [j for j in list(server.loop.streams.unsent) if j.blocked]) and time.time() < deadline:
            time.sleep(0.05)
        (job,) = blocked
        assert not job.done.is_set()
        got = [stream_text(server, b) for b in bodies]      # one after the other, while it is stuck
        assert got == alone and not job.done.is_set()
        monkeypatch.setattr(serve.Streams, "stall", 0.5)
        assert job.done.wait(10)
        received = b""
        while more := stuck.recv(65536):
            received += more
        stuck.close()
        assert received.startswith(b"HTTP/1.0 200") and b"data: {" in received and b"[DONE]" not in received
        deadline = time.time() + 10
        while (server.loop.accepted or set(threading.enumerate()) - threads_before) and time.time() < deadline:
            time.sleep(0.05)
        assert server.loop.engine.running == 0 and server.loop.accepted == 0
        assert not set(threading.enumerate()) - threads_before      # its connection's thread has ended


def test_busy_server_says_429_with_retry_after(files):
    with running(files, slots=1, eos_id=-1, max_waiting=0) as server:
        first = stream_raw(server, {"messages": [user(Q1)], "max_tokens": 150, "temperature": 0})
        first.recv(4096)
        status, headers, body = post(server, {"messages": [user(Q2)], "max_tokens": 2})
        assert_error(status, body, 429, None, "rate_limit_exceeded", "slots are busy")
        assert headers["Retry-After"] == "1"
        first.close()


def test_slow_headers_are_timed_out(files, monkeypatch):
    monkeypatch.setattr(serve.Handler, "timeout", 1)
    with running(files) as server:
        s = socket.create_connection(("127.0.0.1", port(server)), timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        t0 = time.time()
        for _ in range(6):               # a header byte every 0.4 s: each byte in time, the whole too slow
            try:
                s.sendall(b"X")
            except OSError:
                break
            time.sleep(0.4)
        assert s.recv(100) == b"" and time.time() - t0 < 3
        assert post(server, {"messages": [user(Q1)], "max_tokens": 2})[0] == 200


def test_connections_past_the_limit_get_503_and_the_server_goes_on(files):
    with running(files, max_connections=2) as server:
        idle = [socket.create_connection(("127.0.0.1", port(server)), timeout=10) for _ in range(2)]
        time.sleep(0.2)                      # two connections that send nothing hold both threads
        status, body = raw(server, b"GET /health HTTP/1.1\r\n\r\n")
        assert_error(status, body, 503, None, "too_many_connections", "too many connections")
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert raw(server, b"GET /health HTTP/1.1\r\n\r\n") == (200, {"status": "ok"})


def test_metrics_health_and_models(files):
    with running(files) as server:
        done = client(server).chat.completions.create(model="mmgpt", messages=[user(Q1)], max_tokens=3, temperature=0)
        conn = http.client.HTTPConnection("127.0.0.1", port(server), timeout=10)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        text = r.read().decode()
        assert r.getheader("Content-Type").startswith("text/plain")
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
        assert values["mmgpt_requests_running"] == "0" and values["mmgpt_requests_finished_total"] == "1"
        assert values["mmgpt_generation_tokens_total"] == str(done.usage.completion_tokens)
        assert values["mmgpt_time_to_first_token_seconds_count"] == "1"
        assert values['mmgpt_inter_token_latency_seconds_bucket{le="+Inf"}'] == \
            values["mmgpt_inter_token_latency_seconds_count"]
        assert "# TYPE mmgpt_time_to_first_token_seconds histogram" in text
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read()) == {"status": "ok"}


def test_bounded_load_mixed_good_and_bad_leaks_nothing(files):
    """8 clients x 12 requests, a third of them bad: every good one gets its answer alone, every bad one its 4xx;
    afterwards no slot, queue entry or thread is left, and a second round does not grow the memory."""
    good = requests_of_all_kinds(files)[:6]
    bad = bad_inputs(files)
    with running(files, slots=1) as server:
        want = [stream_text(server, b) for b in good]
    with running(files, slots=4, max_waiting=64) as server:
        threads_before = set(threading.enumerate())
        failures = []

        def client_run(c: int):
            for k in range(12):
                i = (c * 12 + k)
                try:
                    if i % 3 == 2:
                        body, status, param, code, words = bad[i % len(bad)]
                        got_status, _, got = post(server, body)
                        assert_error(got_status, got, status, param, code, words)
                    else:
                        assert stream_text(server, good[i % 6]) == want[i % 6]
                except Exception as e:      # noqa: BLE001 (collected, then reported)
                    failures.append(f"client {c} request {k}: {type(e).__name__}: {e}")

        rss = []
        for _ in range(2):
            threads = [threading.Thread(target=client_run, args=(c,)) for c in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        assert not failures, failures[:3]
        deadline = time.time() + 5
        while set(threading.enumerate()) - threads_before and time.time() < deadline:
            time.sleep(0.05)
        assert not set(threading.enumerate()) - threads_before
        assert server.loop.engine.running == 0 and not server.loop.engine.waiting and server.loop.accepted == 0
        assert rss[1] - rss[0] < 50_000      # KiB: the second round takes no more memory than the first


def test_serve_py_prints_its_address_warns_without_a_key_and_stops_on_sigterm(files):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "serve.py", "--ckpt", files["run"], "--port", "0", "--host", "0.0.0.0",
                          "--model-name", "tiny", "--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        line = p.stdout.readline()
        address = re.search(r"http://0\.0\.0\.0:(\d+)", line)
        assert address, line + p.stderr.read()
        conn = http.client.HTTPConnection("127.0.0.1", int(address.group(1)), timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [user(Q1)], "max_tokens": 3}))
        assert json.loads(conn.getresponse().read())["model"] == "tiny"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        err = p.stderr.read()
        assert "warning: listening on 0.0.0.0 without --api-key" in err and "stopping" in err
    finally:
        p.kill()


# ----------------------------------------------------------------------------------------------------------------
# OpenAI's chat API to the letter: its schema, stop strings, logprobs, n, the evaluation harnesses, another client

def events(server, body: dict, headers: dict | None = None) -> list[dict]:
    """A streamed answer read with httpx and this reader of server-sent events (not the openai package): every
    chunk valid against OpenAI's schema, the stream ended by `data: [DONE]`."""
    with httpx.stream("POST", f"http://127.0.0.1:{port(server)}/v1/chat/completions", json=body | {"stream": True},
                      headers=headers, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert data[-1] == "[DONE]" and all(line.startswith("{") for line in data[:-1])
    chunks = [json.loads(line) for line in data[:-1]]
    for c in chunks:
        validate(c, "CreateChatCompletionStreamResponse")
    return chunks


def joined(chunks: list[dict]) -> dict[int, dict]:
    """Per choice index: its text, finish_reason and logprobs content, as a client puts the chunks together."""
    out = {}
    for c in chunks:
        for ch in c["choices"]:
            got = out.setdefault(ch["index"], {"text": "", "finish_reason": None, "logprobs": []})
            got["text"] += ch["delta"].get("content") or ""
            got["finish_reason"] = ch["finish_reason"] or got["finish_reason"]
            got["logprobs"] += (ch.get("logprobs") or {}).get("content") or []
    return out


def answer(server, body: dict) -> dict:
    """A plain answer read with httpx, valid against OpenAI's schema."""
    r = httpx.post(f"http://127.0.0.1:{port(server)}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    validate(r.json(), "CreateChatCompletionResponse")
    return r.json()


def test_every_body_is_valid_against_openais_schema(files):
    """Plain, streamed (every chunk, then data: [DONE]), n = 3, logprobs on, /v1/models, /v1/models/{id}, and every
    4xx: each body valid against the published schema (tests/openai_schemas.json, its commit named there)."""
    base = {"messages": [user(Q1, files["pic1"])], "max_tokens": 4, "temperature": 0}
    with running(files, slots=4) as server:
        for extra in ({}, {"n": 3}, {"logprobs": True, "top_logprobs": 3}, {"n": 2, "logprobs": True, "seed": 1,
                                                                            "temperature": 0.8}):
            body = answer(server, base | extra)
            assert all(ch["message"]["refusal"] is None for ch in body["choices"])
            assert [ch["index"] for ch in body["choices"]] == list(range(extra.get("n", 1)))
            assert all((ch["logprobs"] is None) != ("logprobs" in extra) for ch in body["choices"])
            chunks = events(server, base | extra | {"stream_options": {"include_usage": True}})
            assert {i: (x["text"], x["finish_reason"]) for i, x in joined(chunks).items()} == \
                {ch["index"]: (ch["message"]["content"], ch["finish_reason"]) for ch in body["choices"]}
            assert [chunks[-1]["usage"][k] for k in ("prompt_tokens", "completion_tokens")] == \
                [body["usage"][k] for k in ("prompt_tokens", "completion_tokens")]
        models = httpx.get(f"http://127.0.0.1:{port(server)}/v1/models").json()
        validate(models, "ListModelsResponse")
        card = client(server).models.retrieve("mmgpt")
        assert card.id == "mmgpt" and card.object == "model"
        r = httpx.get(f"http://127.0.0.1:{port(server)}/v1/models/mmgpt")
        validate(r.json(), "Model")
        r = httpx.get(f"http://127.0.0.1:{port(server)}/v1/models/gpt-4")
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        validate(r.json(), "ErrorResponse")
        for body, status, *_ in bad_inputs(files):
            got_status, _, got = post(server, body)
            assert got_status == status
            validate(got, "ErrorResponse")
            assert got["error"]["type"] == "invalid_request_error"


def test_stop_strings_end_the_answer_at_their_first_character_streamed_or_not(files):
    """Stop strings found in a free answer's tokens: one spanning two tokens, one inside a token, several at once.
    Plain and streamed answers are the text before the first one's first character; the streamed text, read chunk by
    chunk, never shows what the final answer lacks."""
    base = {"messages": [user(Q2)], "max_tokens": 24, "temperature": 0}
    tokenizer = files["tokenizer"]
    with running(files, slots=2, eos_id=-1) as server:
        text = answer(server, base)["choices"][0]["message"]["content"]
        (free,) = Engine(files["model"], tokenizer, eos_id=-1).generate(
            openai_api.parse(base, server.renderer, server.model).requests)
        assert free.text == text
        ends = [len(tokenizer.decode(free.tokens[:i + 1])) for i in range(24)]     # where each token's text ends
        ends = ends[:next((i for i in range(24) if "\ufffd" in tokenizer.decode(free.tokens[:i + 1])), 24)]
        # the last character of a token and the first of the next; what lies strictly inside a token of 3 characters
        # or more (each where it first appears in the answer)
        spanning = next(s for e in ends[1:-1] if text.find(s := text[e - 1:e + 1]) == e - 1)
        inside = next(s for a, b in zip(ends, ends[1:]) if b - a >= 3 and text.find(s := text[a + 1:b - 1]) == a + 1)
        for stop in ([spanning], inside, ["@@", inside, spanning]):
            want = text[:min(text.index(s) for s in ([stop] if isinstance(stop, str) else stop) if s in text)]
            plain = answer(server, base | {"stop": stop})["choices"][0]
            assert (plain["message"]["content"], plain["finish_reason"]) == (want, "stop")
            chunks = events(server, base | {"stop": stop})
            assert joined(chunks)[0]["text"] == want and joined(chunks)[0]["finish_reason"] == "stop"
            seen = ""
            for c in chunks:
                seen += "".join(ch["delta"].get("content") or "" for ch in c["choices"])
                assert want.startswith(seen)


def test_n_answers_share_one_prefill_and_each_is_its_own_request(files):
    """n = 4 greedy: four equal answers, the one n = 1 gives; n = 4 seeded: the same again, and choice i is the
    request sent alone with seed + i. The prompt is prefilled once (its tokens fed once) and counted once in
    usage; streamed, each chunk names its choice and the choices' texts are the plain answer's."""
    base = {"messages": [user(Q1, files["pic1"])], "max_tokens": 6}
    with running(files, slots=4, eos_id=-1) as server:
        prefill, fed = server.loop.engine.runner.prefill, []
        server.loop.engine.runner.prefill = lambda chunks: fed.append(sum(len(c.ids) for c in chunks)) or \
            prefill(chunks)
        four = answer(server, base | {"temperature": 0, "n": 4})     # on slots that hold nothing yet
        one = answer(server, base | {"temperature": 0})
        assert fed == [four["usage"]["prompt_tokens"], 1] and one["usage"]["prompt_tokens"] == fed[0]   # one prefill
        assert [c["message"]["content"] for c in four["choices"]] == [one["choices"][0]["message"]["content"]] * 4
        assert four["usage"]["completion_tokens"] == 4 * one["usage"]["completion_tokens"]
        seeded = base | {"temperature": 1.0, "n": 4, "seed": 11}
        got = [c["message"]["content"] for c in answer(server, seeded)["choices"]]
        assert [c["message"]["content"] for c in answer(server, seeded)["choices"]] == got and len(set(got)) > 1
        alone = [answer(server, base | {"temperature": 1.0, "seed": 11 + i})["choices"][0]["message"]["content"]
                 for i in range(4)]
        assert got == alone
        streamed = joined(events(server, seeded))
        assert [streamed[i]["text"] for i in range(4)] == got


def test_logprobs_streamed_equal_plain_and_name_the_most_likely(files):
    """Greedy: each token's top alternatives are sorted and the chosen token is the first of them; the streamed
    chunks carry the same logprobs as the plain answer; the tokens' bytes spell the answer (where they make whole
    characters: the answer of a random model has byte tokens that do not)."""
    body = {"messages": [user(Q1, files["pic1"])], "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 5}
    with running(files, slots=2, eos_id=-1) as server:
        plain = answer(server, body)["choices"][0]
        content = plain["logprobs"]["content"]
        assert len(content) == 8
        for t in content:
            top = [x["logprob"] for x in t["top_logprobs"]]
            assert len(top) == 5 and top == sorted(top, reverse=True) and t["top_logprobs"][0]["token"] == t["token"]
            assert t["logprob"] == top[0] <= 0
        spelled = b"".join(bytes(t["bytes"]) for t in content).decode("utf-8", "replace")
        assert spelled.replace("\ufffd", "").strip() == plain["message"]["content"].replace("\ufffd", "").strip()
        streamed = joined(events(server, body))[0]["logprobs"]     # (the prompt reused: the same up to rounding)
        assert [(t["token"], t["bytes"], [x["token"] for x in t["top_logprobs"]]) for t in streamed] == \
            [(t["token"], t["bytes"], [x["token"] for x in t["top_logprobs"]]) for t in content]
        assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(streamed, content))


def test_the_harnesses_requests_as_they_send_them(files):
    """lmms-eval's openai_compatible (the openai package, OPENAI_API_KEY, one user message: the text then a PNG
    data URL, max_tokens 1024, temperature 0, 64 at once) and VLMEvalKit's OpenAIWrapper (a POST to the full URL,
    an sk- key, JPEG pictures with detail "low", n 1, max_tokens 2048): every answer is the one the same question
    gets alone, max_tokens capped to the context left."""
    png = open(files["pic1"], "rb").read()
    jpeg = io.BytesIO()
    Image.open(files["pic1"]).convert("RGB").save(jpeg, "JPEG")
    questions = [f"{Q1} {'and more ' * (i % 4)}" for i in range(64)]
    lmms_eval = lambda q: {"messages": [{"role": "user", "content": [
        {"type": "text", "text": q}, {"type": "image_url", "image_url": {"url": data_url(png)}}]}],
        "model": "mmgpt", "max_tokens": 1024, "temperature": 0}
    vlmevalkit = lambda q: {"model": "mmgpt", "messages": [{"role": "user", "content": [
        {"type": "text", "text": q}, {"type": "image_url", "image_url": {
            "url": "data:image/jpeg;base64," + base64.b64encode(jpeg.getvalue()).decode(), "detail": "low"}}]}],
        "max_tokens": 2048, "n": 1, "temperature": 0}
    key = "sk-mmgpt-test"
    with running(files, slots=8, eos_id=-1, api_key=key, max_waiting=64) as server:
        api = client(server, key)
        alone = {q: api.chat.completions.create(**lmms_eval(q)).choices[0].message.content for q in questions[:4]}
        got = [None] * 64

        def ask(i):
            got[i] = api.chat.completions.create(**lmms_eval(questions[i]))
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert [g.choices[0].message.content for g in got] == [alone[q] for q in questions[:4]] * 16
        assert all(g.choices[0].finish_reason == "length" and g.usage.prompt_tokens + g.usage.completion_tokens == 256
                   for g in got)
        url = f"http://127.0.0.1:{port(server)}/v1/chat/completions"
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        r = httpx.post(url, headers=headers, content=json.dumps(vlmevalkit(questions[0])), timeout=120)
        assert r.status_code == 200
        validate(r.json(), "CreateChatCompletionResponse")
        want = api.chat.completions.create(**vlmevalkit(questions[0]))
        assert r.json()["choices"][0]["message"]["content"] == want.choices[0].message.content
        assert want.usage.prompt_tokens + want.usage.completion_tokens == 256     # 2048 capped to the context left
