"""Lynx's prefix fusion (mmgpt.Config.fusion = "prefix"): each <image> is written picture_tokens times and those
positions take the picture's projected perceiver latents; no cross-attention blocks. Cached decoding is held
against a full forward, as for Flamingo's fusion; the picture's positions carry no loss; a run saves and loads."""
import base64
import copy
import json
import os
import subprocess
import sys

import openai
import pytest
import torch
from PIL import Image

import chat
import checkpoints
import data
import mmgpt
import serve
from conftest import PROMPTS, batch_input, full_forward_greedy, run_train, train_base
from conversation import Conversation, Turn, prompt
from engine import Engine, Request, Sampling

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def prefix(tokenizer):
    """A tiny prefix-fusion model and its tokenizer (4 positions per picture)."""
    torch.manual_seed(0)
    model = mmgpt.build(mmgpt.config("tiny", vocab_size=tokenizer.vocab_size, image_id=tokenizer.image_id,
                                     fusion="prefix")).eval()
    tok = copy.copy(tokenizer)
    tok.picture_tokens = model.cfg.picture_tokens
    return model, tok


def inputs(tok, tokenizer):
    """conftest's prompts and pictures, the prompts with each <image> written picture_tokens times."""
    return [tok.encode(p) for p in PROMPTS], batch_input(tokenizer)[1]


def greedy(ids, pictures, n) -> Request:
    return Request(list(ids), [] if pictures is None else list(pictures), n, Sampling(greedy=True))


def test_a_prefix_model_has_no_cross_attention_and_a_picture_fills_its_positions(prefix, tokenizer):
    model, tok = prefix
    assert model.cfg.xattn_layers == () and all(layer.xattn is None for layer in model.layers)
    assert tok.encode("a <image> b") == tokenizer.encode("a <image> b")[:2] * 0 + \
        tokenizer.encode("a")[:2] + [tok.image_id] * 4 + tokenizer.encode("b", bos=False)
    ids, spans = tok.encode_spans("a <image> b")
    assert ids == tok.encode("a <image> b") and spans[2:6] == [(2, 9)] * 4
    # The picture changes what follows it, and only through its positions
    g = torch.Generator().manual_seed(0)
    one, other = torch.randn(2, 1, 1, 3, 28, 28, generator=g)
    x = torch.tensor([tok.encode("a <image> b c")])
    with torch.no_grad():
        a, b = model(one, x), model(other, x)
    assert torch.equal(a[0, :2], b[0, :2]) and not torch.allclose(a[0, -1], b[0, -1])


@pytest.mark.parametrize("prefill_tokens", [512, 3])
def test_prefix_cached_decoding_equals_the_full_forward(prefix, tokenizer, prefill_tokens):
    """Batched (4 slots, then 2 for 4 requests) with one, two and no pictures; a prefill budget of 3 tokens cuts
    through a picture's positions."""
    model, tok = prefix
    prompts, images = inputs(tok, tokenizer)
    want = [full_forward_greedy(model, p, None if im is None else im[None], 8, tok.never_generate)
            for p, im in zip(prompts, images)]
    for slots in (4, 2):
        e = Engine(model, tok, slots=slots, eos_id=-1, prefill_tokens=prefill_tokens)
        assert [r.tokens for r in e.generate([greedy(p, im, 8) for p, im in zip(prompts, images)])] == want


def test_prefix_reuse_equals_a_fresh_prefill(prefix, tokenizer):
    """Round 2 reuses round 1's slot; the same text with another picture keeps only what precedes the picture;
    a slot cancelled in the middle of a picture's positions continues it."""
    model, tok = prefix
    prompts, images = inputs(tok, tokenizer)
    ids, pics = prompts[0], images[0]
    e = Engine(model, tok, slots=2, eos_id=-1)
    (first,) = e.generate([greedy(ids, pics, 5)])
    round2 = ids + first.tokens + tok.encode("and what colour is it", bos=False)
    (second,) = e.generate([greedy(round2, pics, 6)])
    assert second.cached == len(ids) + 4
    assert second.tokens == full_forward_greedy(model, round2, pics[None], 6, tok.never_generate)
    other = torch.randn_like(pics)
    (third,) = e.generate([greedy(round2, other, 6)])
    assert third.cached == ids.index(tok.image_id)
    assert third.tokens == full_forward_greedy(model, round2, other[None], 6, tok.never_generate)
    # A prefill stopped inside the picture: the slot holds part of its positions, the next request goes on from there
    e = Engine(model, tok, slots=1, eos_id=-1, prefill_tokens=ids.index(tok.image_id) + 2)
    r = e.submit(greedy(ids, pics, 5))
    e.step()
    e.cancel(r)
    e.step()
    assert e.slots[0].ids == ids[:ids.index(tok.image_id) + 2]
    (again,) = e.generate([greedy(ids, pics, 5)])
    assert again.cached == ids.index(tok.image_id) + 2 and again.tokens == first.tokens


def test_prefix_compiled_equals_eager(prefix, tokenizer):
    model, tok = prefix
    prompts, images = inputs(tok, tokenizer)
    requests = lambda: [greedy(p, im, 5) for p, im in zip(prompts, images)]
    eager = [r.tokens for r in Engine(copy.deepcopy(model), tok, slots=4, eos_id=-1).generate(requests())]
    fast = Engine(copy.deepcopy(model), tok, slots=4, eos_id=-1, fast=True)
    assert [r.tokens for r in fast.generate(requests())] == eager


def test_the_pictures_positions_carry_no_loss(prefix):
    model, tok = prefix
    ids, labels = data.render(Conversation("x.png", [Turn("What is it?", "a cat")]), tok)
    where = [i for i, t in enumerate(ids) if t == tok.image_id]
    assert len(where) == 4 and where == list(range(where[0], where[0] + 4))
    assert all(labels[i] == -100 for i in where)
    assert tok.decode([t for t, y in zip(ids, labels) if y != -100]) == "a cat</s>"


def test_the_demo_with_prefix_fusion_has_its_own_rates_and_folder():
    """`python train.py --fusion prefix` is the demo with the learning rates measured for prefix fusion, in a folder
    of its own (it never overwrites runs/demo); flags still win, and cross-attention's demo is unchanged."""
    import train
    xattn, prefix = train.parse_args([]), train.parse_args(["--fusion", "prefix"])
    assert (xattn.lr, xattn.vision_lr, xattn.out) == (2e-3, 3e-4, "runs/demo")
    assert (prefix.lr, prefix.vision_lr, prefix.out) == (5e-4, 1e-4, "runs/demo-prefix")
    assert (prefix.epochs, prefix.unfreeze, prefix.attend_previous) == (xattn.epochs, xattn.unfreeze, True)
    mine = train.parse_args(["--fusion", "prefix", "--lr", "1e-3", "--out", "runs/x"])
    assert (mine.lr, mine.vision_lr, mine.out) == (1e-3, 1e-4, "runs/x")


def test_prefix_training_lowers_the_loss_saves_and_loads(tmp_path):
    """train.py --fusion prefix on the demo's base: the loss goes down; lora.pt says prefix and holds the
    projection and the perceiver; load_run rebuilds the model, whose cached decoding is its full forward; chat.py,
    serve.py (the openai client) and eval.py answer with it."""
    base = train_base(tmp_path)
    out = tmp_path / "run"
    run_train(base, out, "--fusion", "prefix", "--grad-accum", "1", "--max-steps", "12")
    losses = [json.loads(line)["loss_vl"] for line in open(out / "metrics.jsonl") if '"loss_vl"' in line]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3])
    saved = torch.load(os.path.join(out, "lora.pt"), weights_only=True)
    assert saved["settings"]["fusion"] == "prefix"
    assert {"prefix_proj.weight", "prefix_proj.bias", "perceiver.latents"} <= set(saved["weights"])
    model, tok, transform = checkpoints.load_run(str(out))
    assert model.cfg.fusion == "prefix" and tok.picture_tokens == model.cfg.perceiver_latents
    torch.testing.assert_close(model.prefix_proj.weight, saved["weights"]["prefix_proj.weight"])
    pictures = torch.randn(1, 3, model.cfg.vision["vision_cfg"]["image_size"], model.cfg.vision["vision_cfg"][
        "image_size"])
    ids = tok.encode("<image>\n\n### Instruction:\nWhat shape is it?\n\n### Response:\n")
    (r,) = Engine(model, tok, eos_id=-1).generate([greedy(ids, pictures, 6)])
    assert r.tokens == full_forward_greedy(model, ids, pictures[None], 6, tok.never_generate)
    # chat.py, serve.py and eval.py on the run
    picture = tmp_path / "p.png"
    Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()).save(picture)
    c = chat.Chat(Engine(model, tok), transform, 6, Sampling(greedy=True))
    c.add_picture(str(picture))
    assert c.ask("What shape is it?") is not None
    said = c.parts[-1].turns[-1].answer
    server = serve.start(Engine(model, tok, slots=2), transform, quiet=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="none")
        url = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
        answer = client.chat.completions.create(model="mmgpt", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What shape is it?"}]}])
    finally:
        serve.stop(server, grace=0)
    assert answer.choices[0].message.content == said
    asked = tok.encode(prompt(Conversation("p.png", [Turn("What shape is it?", "")])))
    assert answer.usage.prompt_tokens == len(asked) and asked.count(tok.image_id) == model.cfg.perceiver_latents
    done = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), "--task", "demo", "--ckpt", str(out),
                           "--limit", "4", "--out", str(tmp_path / "eval")], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert json.load(open(tmp_path / "eval" / "summary.json"))["items"] == 4
