"""openai_api.py without a socket: bodies in, the engine's Requests out; Outputs in, bodies and chunks out, each held
to OpenAI's published schema (openai_schema.py); requests shaped exactly as lmms-eval and VLMEvalKit build them."""
import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

import openai_api
from engine import Output, TokenLogprob
from openai_api import APIError, Model, Renderer
from openai_schema import validate

Q = "what colour is the square?"


@pytest.fixture(scope="module")
def renderer(tokenizer):
    # pictures become (3, 2, 2) means of their pixels: enough to tell them apart
    transform = lambda im: torch.from_numpy(np.asarray(im.convert("RGB").resize((2, 2)), dtype=np.float32)) \
        .permute(2, 0, 1)
    return Renderer(tokenizer, transform, None, max_pictures=4)


def model(**kw) -> Model:
    return Model("mmgpt", 1, kw.pop("max_len", 256), kw.pop("vocab_size", 403), **kw)


def picture_url(colour, kind="PNG", mime="png") -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(out, kind)
    return f"data:image/{mime};base64," + base64.b64encode(out.getvalue()).decode()


def image(url, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def text(t) -> dict:
    return {"type": "text", "text": t}


def test_n_choices_share_one_prefill_with_seed_plus_i(renderer):
    c = openai_api.parse({"messages": [{"role": "user", "content": Q}], "n": 3, "seed": 7, "temperature": 0.5,
                          "max_tokens": 5, "logprobs": True, "top_logprobs": 2, "logit_bias": {"17": -100, "5": 2.5}},
                         renderer, model())
    first = c.requests[0]
    assert [r.sampling.seed for r in c.requests] == [7, 8, 9] and [r.shares for r in c.requests] == [None, first, first]
    assert all(r.ids == first.ids and r.max_tokens == 5 and r.top_logprobs == 2 for r in c.requests)
    assert first.logit_bias == {17: -100.0, 5: 2.5} and c.logprobs
    plain = openai_api.parse({"messages": [{"role": "user", "content": Q}]}, renderer, model())
    assert len(plain.requests) == 1 and plain.requests[0].top_logprobs is None and not plain.logprobs
    assert plain.requests[0].sampling.seed is None


def test_max_tokens_is_capped_to_the_context_left_or_refused(renderer):
    body = {"messages": [{"role": "user", "content": Q}], "max_tokens": 4096}
    (r,) = openai_api.parse(body, renderer, model()).requests
    assert r.max_tokens == 256 - len(r.ids)
    with pytest.raises(APIError) as e:
        openai_api.parse(body, renderer, model(cap_max_tokens=False))
    assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "context_length_exceeded")
    assert "max_tokens asks for 4096" in e.value.message
    body["max_tokens"] = 256 - len(r.ids)
    assert openai_api.parse(body, renderer, model(cap_max_tokens=False)).requests[0].max_tokens == body["max_tokens"]


def test_developer_is_system_and_an_assistant_null_is_an_empty_answer(renderer):
    rest = [{"role": "user", "content": Q}, {"role": "assistant", "content": None}, {"role": "user", "content": "and?"}]
    system = openai_api.parse({"messages": [{"role": "system", "content": "Be brief."}] + rest}, renderer, model())
    developer = openai_api.parse({"messages": [{"role": "developer", "content": "Be brief."}] + rest}, renderer,
                                 model())
    assert developer.prompt == system.prompt and system.prompt.startswith("Be brief.")
    empty = openai_api.parse({"messages": rest[:1] + [{"role": "assistant", "content": ""}] + rest[2:]}, renderer,
                             model())
    assert empty.prompt == system.prompt.replace("Be brief.", openai_api.HEADER)


def test_pictures_render_as_the_template_wants_wherever_they_stand(renderer):
    """Text first and the pictures after it (lmms-eval), or pictures first: the same prompt, each picture in its
    `### Image:` block before the instruction; image_url.detail is accepted (every picture is fitted the same)."""
    red, blue = picture_url("red"), picture_url("blue")
    after = openai_api.parse({"messages": [{"role": "user", "content": [text(Q), image(red), image(blue)]}]},
                             renderer, model())
    before = openai_api.parse({"messages": [{"role": "user", "content": [image(red, detail="low"),
                                                                          image(blue, detail="high"), text(Q)]}]},
                              renderer, model())
    assert after.prompt == before.prompt and after.prompt.count("### Image:\n<image>") == 2
    assert after.prompt.index("<image>") < after.prompt.index(Q)
    (a,), (b,) = after.requests, before.requests
    assert a.ids == b.ids and all(torch.equal(x, y) for x, y in zip(a.pictures, b.pictures))
    assert not torch.equal(a.pictures[0], a.pictures[1])


def test_harness_requests_as_lmms_eval_and_vlmevalkit_build_them(renderer, tokenizer):
    """lmms-eval's openai_compatible (lmms_eval/models/simple/openai_compatible.py): one user message, the text then
    each picture as a PNG data URL, max_tokens 1024 (at most 4096), temperature 0. VLMEvalKit's OpenAIWrapper
    (vlmeval/api/gpt.py): text and JPEG pictures with detail "low" in their order, n 1, temperature 0, max_tokens
    2048. Both parse to the greedy request of the template's prompt, max_tokens capped to the context left."""
    lmms_eval = {"messages": [{"role": "user", "content": [text(Q), image(picture_url("red"))]}],
                 "model": "mmgpt", "max_tokens": 1024, "temperature": 0}
    vlmevalkit = {"model": "mmgpt", "messages": [{"role": "user", "content": [
        text(Q), image(picture_url("red", "JPEG", "jpeg"), detail="low")]}], "max_tokens": 2048, "n": 1,
        "temperature": 0}
    for body in (lmms_eval, vlmevalkit):
        c = openai_api.parse(body, renderer, model())
        (r,) = c.requests
        assert r.sampling.greedy and r.max_tokens == 256 - len(r.ids) and len(r.pictures) == 1
        assert r.ids == tokenizer.encode(c.prompt) and c.prompt.endswith(f"### Instruction:\n{Q}\n\n### Response:\n")


def finished(c, texts, tokens, logprobs=None):
    for r, t, k in zip(c.requests, texts, tokens):
        r.text, r.tokens, r.finish_reason = t, k, "stop"
        r.logprobs = logprobs or []
    return c


def test_every_body_and_chunk_is_valid_against_openais_schema(renderer, tokenizer):
    c = openai_api.parse({"messages": [{"role": "user", "content": Q}], "n": 2, "logprobs": True, "top_logprobs": 2,
                          "stream": True, "stream_options": {"include_usage": True}}, renderer, model())
    lp = [TokenLogprob(40, -0.5, [(40, -0.5), (259, -1.25)]), TokenLogprob(tokenizer.image_id - 5, -2.0, [])]
    finished(c, ["a cat", "a"], [[40, 41], [40]], lp)
    body = openai_api.response(c, tokenizer)
    validate(body, "CreateChatCompletionResponse")
    assert [ch["message"] for ch in body["choices"]] == [{"role": "assistant", "content": t, "refusal": None}
                                                         for t in ("a cat", "a")]
    assert body["usage"] == {"prompt_tokens": len(c.requests[0].ids), "completion_tokens": 3,
                             "total_tokens": len(c.requests[0].ids) + 3, "prompt_tokens_details": {"cached_tokens": 0}}
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert entry["bytes"] == list(entry["token"].encode()) and entry["logprob"] == -0.5
    assert [t["logprob"] for t in entry["top_logprobs"]] == [-0.5, -1.25]
    out = Output(c.requests[1], "a", True, tuple(lp[:1]))
    chunks = openai_api.first_chunks(c) + openai_api.chunks(c, out, tokenizer) + openai_api.last_chunks(c)
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
    assert [ch["index"] for chunk in chunks[:-1] for ch in chunk["choices"]] == [0, 1, 1, 1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    plain = finished(openai_api.parse({"messages": [{"role": "user", "content": Q}]}, renderer, model()), ["a"], [[40]])
    validate(openai_api.response(plain, tokenizer), "CreateChatCompletionResponse")
    assert openai_api.response(plain, tokenizer)["choices"][0]["logprobs"] is None
    validate(openai_api.models(model()), "ListModelsResponse")
    validate(openai_api.models(model(), "mmgpt"), "Model")
    with pytest.raises(APIError) as e:
        openai_api.models(model(), "gpt-4")
    validate(e.value.body(), "ErrorResponse")
    assert e.value.status == 404 and e.value.body()["error"]["type"] == "invalid_request_error"


def test_token_bytes_are_what_the_token_spells(tokenizer):
    for word in ("the cat", "é", "🙂"):
        ids = tokenizer.encode(word, bos=False)
        assert b"".join(openai_api.token_bytes(tokenizer, t) for t in ids).decode().strip() == word
