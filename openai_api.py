"""OpenAI's chat completions protocol, as pure functions: a JSON body in, the engine's Requests out (parse); the
engine's Outputs in, the bodies and stream chunks OpenAI's clients read out; errors in OpenAI's shape. No sockets,
no threads: serve.py does the HTTP.

    model = Model("mmgpt", created, max_len, vocab_size)
    completion = parse(body, renderer, model)            # or an APIError naming the field
    completion.requests                                  # one engine Request per choice (n), sharing one prefill
    response(completion, tokenizer)                      # the plain answer, once every request has finished
    first_chunks(completion), chunks(completion, output, tokenizer), last_chunks(completion)     # a stream's

What is served and how (stop strings, logprobs, n, logit_bias, max_tokens, pictures): docs/api.md.
"""
import base64
import binascii
import io
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field

import torch

from conversation import HEADER, Conversation, DataError, Turn, layout, load_image
from engine import Output, Request, Sampling
from tokenizer import Tokenizer

MAX_PIXELS = 40_000_000     # a picture larger than this is refused before it is decoded (a "decompression bomb")
MAX_N = 16                  # choices per request


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 411: "invalid_request_error", 413: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------------------------
# A request body -> the engine's Requests (run in an HTTP thread)

def _number(body: dict, name: str, low: float, high: float, integer: bool = False, default=None):
    """body[name] as a number in [low, high] (JSON's true/false are not numbers), or default when absent/null."""
    value = body.get(name)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise APIError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not {json.dumps(value)}",
                       name, "invalid_type")
    if not low <= value <= high or (not integer and not math.isfinite(value)):
        raise APIError(400, f"'{name}' must be between {low} and {high}, not {value}", name, "invalid_value")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, not {json.dumps(value)}", name, "invalid_type")
    return bool(value)


class Renderer:
    """messages -> the template string and its pictures, as chat.py renders a conversation: a user message's
    pictures each open a `### Image:` block before its instruction (its text parts, joined by newlines; two user
    messages in a row are one), wherever they stand among its text parts (the paper's template puts the picture
    first); an assistant message is the answer to the instruction before it (null content: an empty answer); a
    system (or developer, OpenAI's newer name) message takes the place of the header line."""

    def __init__(self, tokenizer, transform, media_dir: str | None, max_pictures: int):
        self.tokenizer, self.transform = tokenizer, transform
        self.media_dir, self.max_pictures = media_dir, max_pictures

    def __call__(self, messages) -> tuple[str, list[torch.Tensor]]:
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list of messages", "messages", "invalid_value")
        header, rounds = HEADER, []        # rounds: [pictures, question, answer or None]
        seen = 0       # pictures so far (a count of this call's: one Renderer serves every HTTP thread)
        for i, m in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(m, dict):
                raise APIError(400, f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
            role, content = m.get("role"), m.get("content")
            if role == "assistant" and content is None:        # (an answer that was all tool calls, in OpenAI's)
                content = ""
            texts, pictures = self.content(content, f"{where}.content", pictures_ok=role == "user", seen=seen)
            seen += len(pictures)
            if role in ("system", "developer"):
                if i:
                    raise APIError(400, f"{where}: a system message must come first", f"{where}.role", "invalid_value")
                header = "\n".join(texts)
            elif role == "user":
                if rounds and rounds[-1][2] is None:          # a second user message in a row: the same turn
                    rounds[-1][0] += pictures
                    rounds[-1][1] = "\n".join(filter(None, [rounds[-1][1], *texts]))
                else:
                    rounds.append([pictures, "\n".join(texts), None])
            elif role == "assistant":
                if not rounds or rounds[-1][2] is not None:
                    raise APIError(400, f"{where}: an assistant message must answer a user message",
                                   f"{where}.role", "invalid_value")
                rounds[-1][2] = "\n".join(texts)
            else:
                raise APIError(400, f"{where}: unknown role {json.dumps(role)} (system, developer, user or assistant)",
                               f"{where}.role", "invalid_value")
        if not rounds or rounds[-1][2] is not None:
            raise APIError(400, "the last message must be the user's (the one to answer)", "messages",
                           "invalid_value")
        parts, pixels = [Conversation(None, [])], []
        for pictures, question, answer in rounds:
            for picture in pictures:
                if parts[-1].turns or parts[-1].image is not None:
                    parts.append(Conversation(None, []))
                parts[-1].image = f"picture {len(pixels) + 1}"
                pixels.append(picture)
            parts[-1].turns.append(Turn(question, answer or ""))
        return layout(parts, open_last=True, header=header)[0], pixels

    def content(self, content, where: str, pictures_ok: bool, seen: int) -> tuple[list[str], list[torch.Tensor]]:
        """A message's texts and decoded pictures (seen: those of the messages before it)."""
        if isinstance(content, str):
            return [self.text(content, where)], []
        if not isinstance(content, list):
            raise APIError(400, f"{where} must be a string or a list of parts", where, "invalid_type")
        texts, pictures = [], []
        for j, part in enumerate(content):
            here = f"{where}[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(self.text(part.get("text"), f"{here}.text"))
            elif kind == "image_url":
                if not pictures_ok:
                    raise APIError(400, f"{here}: only user messages may hold pictures", f"{here}.type",
                                   "invalid_value")
                if seen + len(pictures) >= self.max_pictures:     # counted before they are decoded
                    raise APIError(400, f"more than {self.max_pictures} pictures: the context holds at most "
                                        f"{self.max_pictures}", "messages", "too_many_images")
                url = part.get("image_url")
                if isinstance(url, dict):
                    if url.get("detail") not in (None, "auto", "low", "high"):
                        raise APIError(400, f"{here}.image_url.detail must be auto, low or high",
                                       f"{here}.image_url.detail", "invalid_value")
                    url = url.get("url")      # every picture is fitted to the vision tower's input whatever the detail
                pictures.append(self.picture(url, f"{here}.image_url"))
            else:
                raise APIError(400, f"{here}: unknown part type {json.dumps(kind)} (text or image_url)",
                               f"{here}.type", "invalid_value")
        return texts, pictures

    def text(self, text, where: str) -> str:
        if not isinstance(text, str):
            raise APIError(400, f"{where} must be a string", where, "invalid_type")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:      # JSON can spell a lone surrogate ("\\ud800"); it is no character
            raise APIError(400, f"{where}: a lone surrogate at character {e.start}", where, "invalid_value") from None
        special = [s for s in self.tokenizer.special if s in text]
        if special:
            raise APIError(400, f"{where} contains {special[0]}, which the model reads as a control token "
                                f"(pictures come as image_url parts)", where, "invalid_value")
        return text

    def picture(self, url, where: str) -> torch.Tensor:
        """A data: URL (or, under --allowed-local-media-path, a local file) -> the transformed picture."""
        if not isinstance(url, str):
            raise APIError(400, f"{where} must hold a URL string", where, "invalid_type")
        if url.startswith("data:"):
            meta, _, payload = url.partition(",")
            if not meta.endswith(";base64"):
                raise APIError(400, f"{where}: a data: URL must be base64 (data:image/png;base64,...)", where,
                               "invalid_image_url")
            try:
                source = io.BytesIO(base64.b64decode(payload, validate=True))
            except (binascii.Error, ValueError):
                raise APIError(400, f"{where}: the data: URL is not valid base64", where, "invalid_image_url") from None
        elif url.startswith(("http://", "https://")):
            raise APIError(400, f"{where}: remote picture URLs are not fetched (this server reaches no other host); "
                                f"send the picture itself as a data: URL", where, "invalid_image_url")
        else:
            source = self.local_file(url.removeprefix("file://"), where)
        try:
            return self.transform(load_image(source, max_pixels=MAX_PIXELS))
        except DataError as e:
            raise APIError(400, f"{where}: {e}", where, "invalid_image") from None

    def local_file(self, path: str, where: str) -> str:
        if self.media_dir is None:
            raise APIError(400, f"{where}: local files are read only under --allowed-local-media-path; send the "
                                f"picture as a data: URL", where, "invalid_image_url")
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.media_dir]) != self.media_dir or not os.path.isfile(real):
            raise APIError(400, f"{where}: no such picture under --allowed-local-media-path", where,
                           "invalid_image_url")
        return real


@dataclass
class Model:
    """The served model as the API names it, and what a request is checked against."""
    name: str
    created: int
    max_len: int                    # the context, in tokens
    vocab_size: int
    cap_max_tokens: bool = True     # max_tokens past what the context has left: that many (True) or a 400

    def card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "mmgpt",
                "max_model_len": self.max_len}


@dataclass(eq=False)
class Completion:
    """A checked chat completion request: the engine's requests (one per choice) and how the answer is shaped."""
    requests: list[Request]
    prompt: str
    model: str
    stream: bool
    include_usage: bool
    return_prompt: bool
    logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def parse(body, renderer: Renderer, model: Model) -> Completion:
    """A request body -> a Completion, or the APIError that names what is wrong with it."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object", None, "invalid_type")
    if body.get("model") not in (None, model.name):
        raise APIError(404, f"the model {json.dumps(body['model'])} does not exist (this server has "
                            f"{json.dumps(model.name)})", "model", "model_not_found")
    for name in ("tools", "functions", "response_format"):
        if body.get(name) not in (None, [], {"type": "text"}):
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        if _number(body, name, -2, 2, default=0) != 0:
            raise APIError(400, f"'{name}' is not supported by this server", name, "unsupported_parameter")
    n = _number(body, "n", 1, MAX_N, integer=True, default=1)
    stream = _flag(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", "stream_options", "invalid_type")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop",
                       "invalid_value")
    logprobs, top = _flag(body, "logprobs"), _number(body, "top_logprobs", 0, 20, integer=True)
    if top is not None and not logprobs:
        raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs", "invalid_value")
    temperature = _number(body, "temperature", 0, 2, default=1.0)
    seed = _number(body, "seed", -(1 << 63), (1 << 64) - 1 - MAX_N, integer=True)
    max_tokens = None
    for name in ("max_completion_tokens", "max_tokens"):
        max_tokens = max_tokens or _number(body, name, 1, 1 << 31, integer=True)
    bias = _logit_bias(body.get("logit_bias"), model.vocab_size)
    text, pictures = renderer(body.get("messages"))
    ids = renderer.tokenizer.encode(text)
    room = model.max_len - len(ids)
    if room < 1 or (max_tokens or 0) > room and not model.cap_max_tokens:
        raise APIError(400, f"this model's context holds {model.max_len} tokens; the messages take {len(ids)}"
                            + (f" and max_tokens asks for {max_tokens} more" if room >= 1 else ""),
                       "messages", "context_length_exceeded")
    requests = []
    for i in range(n):      # choice i draws with seed + i: a seeded request is reproducible, its choices differ
        sampling = Sampling(temperature=temperature, greedy=temperature == 0,
                            top_p=_number(body, "top_p", 0, 1, default=1.0) or 1e-9,
                            top_k=_number(body, "top_k", 0, 1 << 31, integer=True, default=0),
                            seed=None if seed is None else seed + i)
        # The answer ends before a control token's string, should the model spell one: the conversation comes
        # back as text next time, and there it would become a control token.
        requests.append(Request(ids, pictures, min(max_tokens or room, room), sampling,
                                stop=tuple(stop) + tuple(renderer.tokenizer.special), logit_bias=bias,
                                top_logprobs=(top or 0) if logprobs else None, shares=requests[0] if i else None))
    return Completion(requests, text, model.name, stream, _flag(options, "include_usage"),
                      _flag(body, "return_prompt"), logprobs)


def _logit_bias(value, vocab_size: int) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in -100..100}."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise APIError(400, "'logit_bias' must be an object of token ids and biases", "logit_bias", "invalid_type")
    for key, b in value.items():
        if not key.isdigit() or not int(key) < vocab_size:
            raise APIError(400, f"'logit_bias': {json.dumps(key)} is not a token id (0..{vocab_size - 1})",
                           "logit_bias", "invalid_value")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise APIError(400, f"'logit_bias': the bias of token {key} must be a number from -100 to 100, not "
                                f"{json.dumps(b)}", "logit_bias", "invalid_value")
    return {int(key): float(b) for key, b in value.items()}


# ----------------------------------------------------------------------------------------------------------------
# The engine's answers -> OpenAI's bodies

def usage(c: Completion) -> dict:
    """The prompt counted once, whatever n is."""
    prompt, done = len(c.requests[0].ids), sum(len(r.tokens) for r in c.requests)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": c.requests[0].cached}}


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The UTF-8 bytes a token stands for (a byte-fallback token: its one byte; a word piece: its text, with the
    space sentencepiece writes as U+2581)."""
    sp = tokenizer.sp
    if token >= sp.vocab_size():
        return tokenizer.special_str[token].encode()
    piece = sp.id_to_piece(token)
    if sp.is_byte(token):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def logprobs_body(tokenizer: Tokenizer, entries) -> dict:
    """OpenAI's choice logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...], "refusal": null}."""
    def entry(token: int, logprob: float) -> dict:
        data = token_bytes(tokenizer, token)
        return {"token": data.decode("utf-8", "backslashreplace"), "logprob": logprob, "bytes": list(data)}

    content = [entry(e.token, e.logprob) | {"top_logprobs": [entry(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def response(c: Completion, tokenizer: Tokenizer) -> dict:
    """The plain answer, once every choice has finished."""
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": logprobs_body(tokenizer, r.logprobs) if c.logprobs else None,
                "finish_reason": r.finish_reason} for i, r in enumerate(c.requests)]
    body = {"id": c.id, "object": "chat.completion", "created": c.created, "model": c.model, "choices": choices,
            "usage": usage(c)}
    return body | ({"prompt": c.prompt} if c.return_prompt else {})


def chunk(c: Completion, choices: list[dict], **extra) -> dict:
    return {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model,
            "choices": choices, **extra}


def first_chunks(c: Completion) -> list[dict]:
    """A stream's first chunk of each choice: the role."""
    return [chunk(c, [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                       "finish_reason": None}], **({"prompt": c.prompt} if c.return_prompt else {}))
            for i in range(len(c.requests))]


def chunks(c: Completion, out: Output, tokenizer: Tokenizer) -> list[dict]:
    """The chunks of an Output: its text and its tokens' logprobs, then its finish_reason if it finished."""
    i, data = c.requests.index(out.request), []
    if out.text or out.logprobs:
        logprobs = logprobs_body(tokenizer, out.logprobs) if c.logprobs else None
        data.append(chunk(c, [{"index": i, "delta": {"content": out.text}, "logprobs": logprobs,
                               "finish_reason": None}]))
    if out.finished:
        data.append(chunk(c, [{"index": i, "delta": {}, "logprobs": None, "finish_reason": out.request.finish_reason}]))
    return data


def last_chunks(c: Completion) -> list[dict]:
    """After every choice's end: the usage, when asked for."""
    return [chunk(c, [], usage=usage(c))] if c.include_usage else []


def sse(body: dict | str) -> bytes:
    """A server-sent event: a JSON body, or the "[DONE]" that ends a stream."""
    return b"data: " + (body if isinstance(body, str) else json.dumps(body)).encode() + b"\n\n"


def models(model: Model, name: str = "") -> dict:
    """GET /v1/models (name ""): the list of the one model; GET /v1/models/{name}: its card."""
    if not name:
        return {"object": "list", "data": [model.card()]}
    if name != model.name:
        raise APIError(404, f"the model {json.dumps(name)} does not exist (this server has {json.dumps(model.name)})",
                       "model", "model_not_found")
    return model.card()
