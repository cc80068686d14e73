"""MultiModal-GPT over HTTP: OpenAI's chat completions API, continuous batching, streamed answers, a web page.

    python serve.py                                   runs/demo or checkpoints/ (as chat.py finds them)
    python serve.py --ckpt runs/demo --port 8000 --slots 16 [--api-key KEY] [--host 0.0.0.0]

    POST /v1/chat/completions    messages (text and data: URL pictures), stream, max_tokens, temperature, top_p, ...
    GET  /v1/models[/ID]         the one model;  GET /health;  GET /metrics (Prometheus text)
    GET  /                       the chat page (page.html, page.js)

OpenAI's protocol (a body in, the engine's requests out; their outputs in, bodies and chunks out) is openai_api.py;
this file is the HTTP, the sockets and the threads. How it runs. One thread owns the model (Loop): between engine
steps it takes the requests that HTTP threads have queued, submits them to the engine (engine.py, `--slots` rows
decoded together), and hands on what they produced: every streamed answer's new text to the one thread that writes
all the streams (Streams: a step wakes one thread, not one per client), a plain answer's end to the HTTP thread that
waits for it. An HTTP thread (one per connection) reads and checks a request, renders the conversation on the
paper's template exactly as chat.py does, decodes its pictures and queues it; then it sends the answer, or a
stream's headers, and waits for the answer to be sent, watching for the client going away. A conversation sent again
with one more turn finds its prefix in a slot and feeds only the new tokens. A client that goes away has its request
cancelled at the next step. When every slot is busy, requests wait in a bounded queue; past it the answer is 429
with Retry-After. On the fast path (a GPU's default) the loop first compiles its steps for every kind of batch
(Engine.warm_up), and only then does the server listen: no answer waits on a compile later.

Nothing a client sends can stop the server: bad input is a 4xx with OpenAI's error shape naming the field, remote
picture URLs are refused (the server never reaches another host), local files only under --allowed-local-media-path,
pictures are checked for size before they are decoded, bodies past --max-body are refused, and a connection that
sends its headers slowly is timed out.
"""
import argparse
import hmac
import ipaddress
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import openai_api
import options
from engine import Engine, Output, Request
from openai_api import APIError, Completion, Model, Renderer, sse

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE = {"/": ("page.html", "text/html; charset=utf-8"), "/page.js": ("page.js", "text/javascript; charset=utf-8")}


@dataclass(eq=False)
class Stream:
    """A streamed answer, as Streams writes it: the bytes the client has not taken yet, the choices not finished,
    whether the last event is among the bytes, the socket (once its handler has sent the headers), since when the
    client's buffer has been full; `done` once it is all sent or the client is gone (from then on Streams leaves
    the socket alone)."""
    open: int
    pending: bytearray = field(default_factory=bytearray)
    ended: bool = False
    sock: socket.socket | None = None
    blocked: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class Job:
    """A completion being answered: what the engine runs (openai_api.Completion: its requests, one per choice) and
    how the answer goes back (a plain answer's end from the loop; a streamed one through its Stream)."""
    completion: Completion
    stream: Stream | None = None
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)   # a plain answer's end from the loop
    submitted: float = field(default_factory=time.perf_counter)
    last: float | None = None       # when its last tokens came, and how many it had then (for the latencies)
    tokens: int = 0
    unfinished: int = 0             # its requests the engine has not finished (the loop's count)

    def __post_init__(self):
        self.unfinished = len(self.completion.requests)
        if self.completion.stream:
            self.stream = Stream(self.unfinished)


# ----------------------------------------------------------------------------------------------------------------
# The loop that owns the model

class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float):
        self.sum, self.count = self.sum + value, self.count + 1
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        return [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)] + \
            [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]


class Loop(threading.Thread):
    """The one thread that runs the model: queued jobs in, engine steps, each job's Outputs out."""
    gather = 0.02     # seconds an idle loop waits, when a request comes, for those still being read (see run)

    def __init__(self, engine: Engine, max_waiting: int, streams: "Streams"):
        super().__init__(name="engine", daemon=True)
        self.engine, self.max_waiting, self.streams = engine, max_waiting, streams
        self.incoming: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.jobs: dict[Request, Job] = {}
        self.lock = threading.Lock()
        self.accepted = 0                 # jobs queued and not finished (read by HTTP threads for the 429)
        self.arriving = 0                 # requests being read and checked by HTTP threads (their first line is in)
        self.stopping = threading.Event()
        self.ready = threading.Event()    # set once the fast path has compiled its steps (see run)
        self.failed: Exception | None = None
        self.counts = {"prompt_tokens": 0, "cached_tokens": 0, "generation_tokens": 0, "requests_finished": 0}
        self.ttft = Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

    def offer(self, job: Job):
        """Queue a job, or refuse it (429) when every slot and the queue are taken."""
        with self.lock:
            if self.stopping.is_set():
                raise APIError(503, "the server is shutting down", None, "shutting_down")
            if self.accepted >= len(self.engine.slots) + self.max_waiting:
                raise APIError(429, f"all {len(self.engine.slots)} slots are busy and {self.max_waiting} requests "
                                    f"wait already; try again shortly", None, "rate_limit_exceeded")
            self.accepted += 1
        self.incoming.put(job)

    def arrive(self, n: int):
        with self.lock:
            self.arriving += n

    def run(self):
        try:    # on the fast path, compile before serving, in this thread: CUDA graphs are recorded per thread
            self.engine.warm_up()
        except Exception as e:      # (out of memory, say) start() raises it
            self.failed = e
        self.ready.set()
        if self.failed:
            return
        while True:
            idle = not self.engine.busy
            try:   # wait for work when there is none; else take what has come and go on
                jobs = [self.incoming.get(timeout=0.1) if idle else self.incoming.get_nowait()]
            except queue.Empty:
                jobs = []
            # Requests that come together (a client's batch, users at once) are prefilled together: an idle loop
            # does not start the first alone while others are still being read (their prefill would wait for its
            # step), but waits for them a little. A request that comes alone does not wait.
            deadline = time.monotonic() + self.gather
            while jobs and idle and self.arriving and time.monotonic() < deadline:
                time.sleep(0.0005)
            jobs += [self.incoming.get_nowait() for _ in range(self.incoming.qsize())]
            for job in jobs:
                self.submit(job)
            if self.stopping.is_set() and not self.engine.busy and self.incoming.empty():
                return
            if self.engine.busy:
                try:
                    outputs = self.engine.step()
                except Exception as e:   # out of memory, say: fail what was running, not the server
                    self.fail_all(e)
                    continue
                self.send([e for e in map(self.deliver, outputs) if e is not None])

    def submit(self, job: Job):
        requests = job.completion.requests
        try:
            for r in requests:
                self.engine.submit(r)
        except ValueError as e:
            self.cancel(job)
            self.send([self.finish(job, APIError(400, str(e), "messages", "invalid_value"))])
            return
        self.jobs.update((r, job) for r in requests)

    def cancel(self, job: Job):
        """End the job's requests at the engine's next step (from any thread)."""
        for r in job.completion.requests:
            self.engine.cancel(r)

    def send(self, events: list[tuple[Job, object]]):
        """Each job's event: the streamed answers' all together to Streams (a step wakes one thread, not one per
        client), a plain answer only its end (its last Output or an APIError)."""
        streamed = [(job, event) for job, event in events if job.stream]
        if streamed:
            self.streams.put(streamed)
        for job, event in events:
            if not job.stream:
                job.events.put(event)

    def deliver(self, out: Output) -> tuple[Job, object] | None:
        """The metrics for an Output, and the event it makes for its job (None: nothing to send)."""
        job = self.jobs.get(out.request)
        if job is None:
            return None
        now, r, requests = time.perf_counter(), out.request, job.completion.requests
        tokens = sum(len(x.tokens) for x in requests)
        if tokens > job.tokens:
            if job.last is None:
                self.ttft.observe(now - job.submitted)
            else:
                self.itl.observe((now - job.last) / (tokens - job.tokens))
            job.last, job.tokens = now, tokens
        if out.finished:
            del self.jobs[r]
            job.unfinished -= 1
            self.counts["generation_tokens"] += len(r.tokens)
        if not job.unfinished:
            self.counts["prompt_tokens"] += len(r.ids)       # the prompt once, whatever n is
            self.counts["cached_tokens"] += requests[0].cached
            self.counts["requests_finished"] += 1
            # A request cancelled at shutdown: its client hears why (one that went away hears nothing)
            cancelled = any(x.finish_reason == "cancelled" for x in requests)
            return self.finish(job, APIError(503, "the server stopped before the answer was finished", None,
                                             "shutting_down") if cancelled else out)
        return (job, out) if job.stream else None

    def finish(self, job: Job, last) -> tuple[Job, object]:
        with self.lock:
            self.accepted -= 1
        return job, last

    def fail_all(self, error: Exception):
        print(f"error in an engine step: {type(error).__name__}: {error}; the requests running were failed",
              file=sys.stderr, flush=True)
        jobs, self.jobs = list(dict.fromkeys(self.jobs.values())), {}
        self.engine.reset()
        self.send([self.finish(job, APIError(500, f"the model failed: {type(error).__name__}", None, "server_error"))
                   for job in jobs])

    def metrics(self) -> str:
        e = self.engine
        lines = ["# TYPE mmgpt_requests_running gauge", f"mmgpt_requests_running {e.running}",
                 "# TYPE mmgpt_requests_waiting gauge",
                 f"mmgpt_requests_waiting {len(e.waiting) + self.incoming.qsize()}",
                 "# TYPE mmgpt_slots gauge", f"mmgpt_slots {len(e.slots)}"]
        for name, value in self.counts.items():
            lines += [f"# TYPE mmgpt_{name}_total counter", f"mmgpt_{name}_total {value}"]
        lines += ["# HELP mmgpt_time_to_first_token_seconds from the request's arrival to its first token",
                  "# TYPE mmgpt_time_to_first_token_seconds histogram",
                  *self.ttft.lines("mmgpt_time_to_first_token_seconds"),
                  "# HELP mmgpt_inter_token_latency_seconds between a request's tokens",
                  "# TYPE mmgpt_inter_token_latency_seconds histogram",
                  *self.itl.lines("mmgpt_inter_token_latency_seconds")]
        return "\n".join(lines) + "\n"


class Streams(threading.Thread):
    """The one thread that writes every streamed answer, so that an engine step wakes one thread and not one per
    client: threads woken for every token slow the engine's step on a few cores (what they do is little; being
    woken is not). It writes without blocking: a client that reads slowly keeps its bytes here until it takes them,
    and one that has taken nothing for `stall` seconds is let go (its handler then cancels the request)."""
    stall = 30.0

    def __init__(self, tokenizer):
        super().__init__(name="streams", daemon=True)
        self.tokenizer = tokenizer
        self.incoming: queue.SimpleQueue[list[tuple[Job, object]] | None] = queue.SimpleQueue()
        self.unsent: set[Stream] = set()

    def put(self, events: list[tuple[Job, object]] | None):
        """(job, Output or APIError) pairs; (job, None) when its handler hands over the socket; None: the server
        has stopped."""
        self.incoming.put(events)

    def run(self):
        while True:
            try:      # with bytes left unsent, come back for them soon even when nothing new comes
                events = self.incoming.get(timeout=0.05 if self.unsent else None)
            except queue.Empty:
                events = []
            if events is None:
                break
            for job, event in events:
                if not job.stream.done.is_set():
                    if event is not None:
                        job.stream.pending += self.encode(job, event)
                    self.unsent.add(job.stream)
            for stream in list(self.unsent):
                self.write(stream)
        for stream in self.unsent:      # the server has stopped: what its clients have not taken is dropped
            stream.done.set()

    def encode(self, job: Job, event) -> bytes:
        stream, c = job.stream, job.completion
        if isinstance(event, APIError):
            stream.ended = True
            return sse(event.body()) + sse("[DONE]")
        data = b"".join(map(sse, openai_api.chunks(c, event, self.tokenizer)))
        stream.open -= event.finished
        if not stream.open:
            stream.ended = True
            data += b"".join(map(sse, openai_api.last_chunks(c))) + sse("[DONE]")
        return data

    def write(self, stream: Stream):
        """Send what the client takes now. The stream is done when all is sent after its last event, when the
        client has gone away, or when it has taken nothing for `stall` seconds."""
        if stream.done.is_set():    # its handler failed before it handed over the socket
            return self.unsent.discard(stream)
        if stream.sock is None:     # its handler is still sending the headers
            return
        try:
            if stream.pending:
                del stream.pending[:stream.sock.send(stream.pending)]
            stream.blocked = None
        except BlockingIOError:     # the client's buffer is full: it has not read what it was sent
            stream.blocked = stream.blocked or time.monotonic()
            if time.monotonic() - stream.blocked < self.stall:
                return
            stream.ended, stream.pending = True, bytearray()
        except OSError:             # the client has gone away
            stream.ended, stream.pending = True, bytearray()
        if stream.pending:
            return
        self.unsent.discard(stream)
        if stream.ended:
            stream.done.set()


# ----------------------------------------------------------------------------------------------------------------
# HTTP

class Handler(BaseHTTPRequestHandler):
    """One connection. The server (Server) holds the loop, the renderer and the settings."""
    server: "Server"
    timeout = 10          # seconds a connection may take to send its request line and headers (slowloris)
    error_content_type = "application/json"

    def handle_one_request(self):
        """The request line and headers must all come within `timeout` seconds, not merely each byte of them."""
        self.deadline = threading.Timer(self.timeout, self.too_slow)
        self.deadline.start()
        try:
            super().handle_one_request()
        finally:
            self.deadline.cancel()
            self.done_reading()

    reading = False

    def parse_request(self) -> bool:
        self.server.loop.arrive(1)        # its request line is in: an idle loop waits a little for it (Loop.run)
        self.reading = True
        ok = super().parse_request()      # reads the headers
        self.deadline.cancel()
        return ok

    def done_reading(self):
        """The request has been read and checked (queued, refused, or not one for the loop)."""
        if self.reading:
            self.reading = False
            self.server.loop.arrive(-1)

    def too_slow(self):
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def log_message(self, format, *args):   # one line per request on stderr, as http.server does, unless quiet
        if not self.server.quiet:
            super().log_message(format, *args)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a malformed request line, headers too long): in OpenAI's shape too."""
        self.close_connection = True
        self.reply(APIError(code, message or self.responses.get(code, ("error",))[0]))

    headers_sent = False

    def end_headers(self):
        self.headers_sent = True
        super().end_headers()

    def reply(self, error_or_body, status: int = 200, headers: dict | None = None):
        if isinstance(error_or_body, APIError):
            status, body = error_or_body.status, error_or_body.body()
            headers = {"Retry-After": "1"} if status == 429 else headers
        else:
            body = error_or_body
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        self.send_response(status)
        self.send_header("Content-Type", (headers or {}).pop("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def authorised(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {key}".encode())

    def do_GET(self):
        try:
            self.route_get()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def route_get(self):
        path = self.path.partition("?")[0]
        if path in PAGE:
            name, kind = PAGE[path]
            try:
                with open(os.path.join(HERE, name), "rb") as f:
                    return self.reply(f.read(), headers={"Content-Type": kind})
            except OSError:
                return self.reply(APIError(404, f"{name} is missing beside serve.py", None, "not_found"))
        if path == "/health":
            return self.reply({"status": "ok"})
        models = path == "/v1/models" or path.startswith("/v1/models/")
        if (models or path == "/metrics") and not self.authorised():
            return self.reply(APIError(401, "a wrong or missing API key (Authorization: Bearer KEY)", None,
                                       "invalid_api_key"))
        if models:
            try:
                return self.reply(openai_api.models(self.server.model, path.removeprefix("/v1/models").lstrip("/")))
            except APIError as e:
                return self.reply(e)
        if path == "/metrics":
            return self.reply(self.server.loop.metrics().encode(),
                              headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        self.reply(APIError(404, f"no such endpoint: GET {path}", None, "not_found"))

    def do_POST(self):
        try:
            self.route_post()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        except Exception:       # a bug, not the client's fault: say so, keep serving
            traceback.print_exc()
            if not self.headers_sent:
                self.reply(APIError(500, "the server failed on this request", None, "server_error"))

    def route_post(self):
        if self.path.partition("?")[0] != "/v1/chat/completions":
            return self.reply(APIError(404, f"no such endpoint: POST {self.path}", None, "not_found"))
        if not self.authorised():
            return self.reply(APIError(401, "a wrong or missing API key (Authorization: Bearer KEY)", None,
                                       "invalid_api_key"))
        try:
            job = Job(openai_api.parse(self.read_json(), self.server.renderer, self.server.model))
            self.server.loop.offer(job)
        except APIError as e:
            return self.reply(e)
        finally:
            self.done_reading()
        try:
            self.answer(job)
        finally:   # whatever ended the answer (the client went away, a write failed): its slots are freed
            self.server.loop.cancel(job)
            if job.stream:
                job.stream.done.set()   # (one that failed before its socket was handed over: Streams drops it)

    def read_json(self):
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked" or length is None:
            self.close_connection = True
            raise APIError(411, "send the body with a Content-Length", None, "length_required")
        try:
            length = int(length)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "Content-Length is not a number", None, "invalid_value") from None
        if length > self.server.max_body:
            self.close_connection = True     # the body is not read: the connection cannot be reused
            raise APIError(413, f"the body has {length:,} bytes; this server takes at most "
                                f"{self.server.max_body:,} (--max-body)", None, "request_too_large")
        self.connection.settimeout(self.server.body_timeout)
        raw = self.rfile.read(length)
        if len(raw) < length:
            self.close_connection = True
            raise APIError(400, "the body ended before Content-Length bytes", None, "invalid_value")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None

    def next_event(self, job: Job):
        """A plain answer's end from the loop (its last Output or an APIError); None if the client has gone away."""
        while True:
            try:
                return job.events.get(timeout=0.25)
            except queue.Empty:
                if self.client_gone():
                    return None

    def client_gone(self) -> bool:
        """A closed connection reads as ready with no bytes (a client may still send bytes: they are not ours)."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, 0x2) == b""      # MSG_PEEK
        except BlockingIOError:     # (a stream's socket is non-blocking) nothing to read after all
            return False
        except OSError:
            return True

    def answer(self, job: Job):
        if not job.stream:
            out = self.next_event(job)
            if isinstance(out, APIError):
                self.reply(out)
            elif out is not None:
                self.reply(openai_api.response(job.completion, self.server.renderer.tokenizer))
            return
        self.close_connection = True     # the stream ends when the connection closes (HTTP/1.0)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.write(b"".join(map(sse, openai_api.first_chunks(job.completion))))
        # The rest is Streams' to write, on the socket made non-blocking; this thread only watches for the client
        # going away, and returns (the connection is closed) once Streams is done with the socket.
        self.connection.setblocking(False)
        job.stream.sock = self.connection
        self.server.loop.streams.put([(job, None)])
        while not job.stream.done.wait(0.25):
            if self.client_gone():
                self.server.loop.cancel(job)


class Server(ThreadingHTTPServer):
    """A thread per connection, at most max_connections at once: past them a connection is answered 503 and
    closed at once (a flood of connections takes no thread, and no memory, from those being served)."""
    daemon_threads = True
    request_queue_size = 1024     # the listen backlog (socketserver's 5 resets a burst of clients' connections)
    BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n\r\n"
            + json.dumps(APIError(503, "too many connections; try again shortly", None, "too_many_connections")
                         .body()).encode())

    def __init__(self, address, loop: Loop, renderer: Renderer, model: Model, api_key: str | None = None,
                 max_body: int = 20 << 20, body_timeout: float = 30.0, quiet: bool = False, max_connections: int = 256):
        super().__init__(address, Handler)
        self.loop, self.renderer, self.model, self.api_key = loop, renderer, model, api_key
        self.max_body, self.body_timeout, self.quiet = max_body, body_timeout, quiet
        self.connections = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            try:
                request.sendall(self.BUSY)
            except OSError:
                pass
            return self.shutdown_request(request)
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


def start(engine: Engine, transform, host: str = "127.0.0.1", port: int = 0, *, model_name: str = "mmgpt",
          max_waiting: int = 64, cap_max_tokens: bool = True, **server_options) -> Server:
    """The server and its loop running in threads of this process (serve.py's main, bench.py and the tests); on the
    fast path it listens, and returns, once the loop has compiled its steps. cap_max_tokens: a max_tokens past what
    the context has left is that many (else a 400)."""
    streams = Streams(engine.tokenizer)
    streams.start()
    loop = Loop(engine, max_waiting, streams)
    loop.start()
    loop.ready.wait()       # no one is let in before the fast path has compiled its steps
    if loop.failed:
        streams.put(None)
        raise loop.failed
    media = server_options.pop("media_dir", None)
    renderer = Renderer(engine.tokenizer, transform, media and os.path.realpath(media), engine.max_pictures)
    model = Model(model_name, int(time.time()), engine.max_len, engine.cfg.vocab_size, cap_max_tokens)
    server = Server((host, port), loop, renderer, model, **server_options)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def stop(server: Server, grace: float):
    """Stop taking requests; let those running finish for up to `grace` seconds, then cancel them."""
    server.shutdown()
    loop = server.loop
    loop.stopping.set()
    deadline = time.monotonic() + grace
    while loop.is_alive() and time.monotonic() < deadline:
        loop.join(0.1)
    for job in list(loop.jobs.values()):
        loop.cancel(job)
    loop.join(10)
    loop.streams.put(None)
    server.server_close()


def loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:      # a host name
        return False


def cpu_threads() -> int:
    """The threads the model gets on a CPU: all cores but one. The HTTP threads (and, often, the clients) need a
    core too, and OpenMP's workers stall when one of them is preempted (bench.py --serve measures it)."""
    return max(1, len(os.sched_getaffinity(0)) - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_weight_args(ap.add_argument_group(
        "weights (as chat.py; none: checkpoints/ as the MultiModal-GPT README lays it out, then runs/demo)"))
    s = ap.add_argument_group("serving")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--slots", type=int, default=16,
                   help="requests decoded at once (at most: as many as the memory holds)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests that may wait for a slot (then 429)")
    s.add_argument("--api-key", help="clients must send Authorization: Bearer KEY (default: none asked)")
    s.add_argument("--max-body", type=int, default=20 << 20, help="the largest request body in bytes (413)")
    s.add_argument("--max-connections", type=int, default=256, help="connections served at once (then 503)")
    s.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="pictures may also name local files under DIR (default: data: URLs only)")
    s.add_argument("--model-name", default="mmgpt", help="the model's name in the API (default: mmgpt)")
    s.add_argument("--refuse-long-max-tokens", action="store_true",
                   help="a max_tokens past what the context has left is a 400, as OpenAI's (default: capped to it, "
                        "as the evaluation harnesses need)")
    s.add_argument("--device", help="default: cuda when there is one, else cpu")
    s.add_argument("--fast", action=argparse.BooleanOptionalAction, default=None,
                   help="decoding compiled, with CUDA graphs (default: on with a GPU)")
    s.add_argument("--grace", type=float, default=10.0, help="seconds running answers get to finish at shutdown")
    s.add_argument("--quiet", action="store_true", help="no line per request on stderr")
    args = ap.parse_args(argv)
    if min(args.slots, args.max_body, args.max_connections) < 1 or args.max_waiting < 0:
        ap.error("--slots, --max-body and --max-connections must be at least 1, --max-waiting at least 0")
    if args.allowed_local_media_path and not os.path.isdir(args.allowed_local_media_path):
        ap.error(f"--allowed-local-media-path {args.allowed_local_media_path}: no such folder")

    device = options.device_of(args)
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
    model, tokenizer, transform, memory = options.load_model(args, device)
    slots, max_len = options.cache_slots(model, memory, args.slots, "--slots")
    fast = options.fast_of(args, device)
    engine = Engine(model, tokenizer, slots=slots, max_len=max_len, fast=fast)
    name = args.model_name
    if fast:
        print("compiling the decoding steps before serving: once per start, quicker once torch has them cached "
              "on disk (--no-fast: eager, nothing to compile)", file=sys.stderr, flush=True)
    server = start(engine, transform, args.host, args.port, model_name=name, max_waiting=args.max_waiting,
                   cap_max_tokens=not args.refuse_long_max_tokens,
                   api_key=args.api_key, max_body=args.max_body, media_dir=args.allowed_local_media_path,
                   quiet=args.quiet, max_connections=args.max_connections)
    host, port = server.server_address[:2]
    if args.api_key is None and not loopback(args.host):
        print(f"warning: listening on {host} without --api-key: anyone who can reach this machine can use the model",
              file=sys.stderr, flush=True)
    print(f"serving {name} on http://{host}:{port} ({slots} slots{', fast path' if fast else ''}): the page "
          f"at /, the API at /v1/chat/completions; Ctrl-C stops", flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    print("stopping: the answers running get a moment to finish", file=sys.stderr, flush=True)
    stop(server, args.grace)


if __name__ == "__main__":
    main()
