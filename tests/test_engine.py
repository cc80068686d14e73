"""engine.py: decoding with slots. Answers are held against a full forward over the whole sequence (no cache) at
every step, and against the same request decoded alone: batched, joined mid-answer, cancelled, sampled with a
seed, reusing a slot's prefix, compiled."""
import copy
import dataclasses
import threading

import pytest
import torch
from torch._dynamo.utils import counters

import sampling
from conftest import PROMPTS, batch_input, full_forward_greedy, tiny_model
from engine import Detokenizer, Engine, Request, Sampling
from perceiver import GatedCrossAttentionBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def greedy(ids, pictures=None, n=10, **kw) -> Request:
    return Request(list(ids), [] if pictures is None else list(pictures), max_tokens=n,
                   sampling=Sampling(greedy=True), **kw)


def reference(model, tokenizer, ids, pictures, n, eos_id=-1) -> list[int]:
    images = None if pictures is None else pictures[None]
    return full_forward_greedy(model, list(ids), images, n, tokenizer.never_generate, eos_id)


def alone(model, tokenizer, requests, **kw) -> list[list[int]]:
    """Each request in an engine of its own."""
    out = []
    for r in requests:
        r = Request(r.ids, r.pictures, r.max_tokens, r.sampling, r.stop)
        out.append(Engine(model, tokenizer, slots=1, **kw).generate([r])[0].tokens)
    return out


def capture_logits(engine: Engine) -> list:
    """The logits each sampling call sees, recorded."""
    seen, choose = [], engine.runner.greedy

    def recording(logits, banned):
        seen.append(logits.clone())
        return choose(logits, banned)

    engine.runner.greedy = recording
    return seen


@pytest.mark.parametrize("attend_previous", [False, True])
def test_batched_equals_full_forward_and_alone(tokenizer, attend_previous):
    """Mixed prompt lengths, rows with one, two and no pictures, different max_tokens, a row that ends at EOS early;
    4 slots for 4 requests, then 2 slots for 4 (requests wait, slots are reused and swap places)."""
    model = tiny_model(tokenizer, attend_previous=attend_previous)
    prompts, images = batch_input(tokenizer)
    full = [reference(model, tokenizer, p, im, 10) for p, im in zip(prompts, images)]
    eos = full[1][3]        # row 1 ends after 3 tokens (and any other row that meets this token ends there too)
    assert eos not in full[1][:3]
    limits = [10, 10, 4, 7]
    want = [reference(model, tokenizer, p, im, n, eos) for p, im, n in zip(prompts, images, limits)]
    assert len(want[1]) == 3 and len(want[2]) <= 4
    for slots in (4, 2):
        e = Engine(model, tokenizer, slots=slots, eos_id=eos)
        done = e.generate([greedy(p, im, n) for p, im, n in zip(prompts, images, limits)])
        assert [r.tokens for r in done] == want
        assert [r.finish_reason for r in done] == ["stop" if len(w) < n else "length" for w, n in zip(want, limits)]
        assert [r.text for r in done] == [tokenizer.decode(w) for w in want]
        assert e.running == 0 and not e.waiting
    assert alone(model, tokenizer, [greedy(p, im, n) for p, im, n in zip(prompts, images, limits)], eos_id=eos) == want


def test_requests_that_arrive_together_are_prefilled_together_within_the_budget(tokenizer):
    """Requests admitted in one step have their pictures encoded in one pass and their prompts fed in one forward
    (padded to the longest), as many as rows x longest <= prefill_tokens allows; each answer is still its own."""
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    want = [reference(model, tokenizer, p, im, 5) for p, im in zip(prompts, images)]
    sizes = [len(p) for p in prompts]
    for budget in (512, 2 * max(sizes)):
        e = Engine(model, tokenizer, slots=4, eos_id=-1, prefill_tokens=budget)
        shapes, encoded = [], []
        prefill, encode = e.runner.prefill_step, model.encode_images
        e.runner.prefill_step = lambda m, step, ids, *a: shapes.append(tuple(ids.shape)) or prefill(m, step, ids, *a)
        model.encode_images = lambda images: encoded.append(images.shape[1]) or encode(images)
        try:
            done = e.generate([greedy(p, im, 5) for p, im in zip(prompts, images)])
        finally:
            del model.encode_images
        assert [r.tokens for r in done] == want
        assert encoded == [sum(len(im) for im in images if im is not None)]     # every picture in one pass
        assert len(shapes) == (1 if budget == 512 else 2)
        first = 0
        for n, T in shapes:         # rows in slot order, as many as fit; padded to the longest
            assert T == max(sizes[first:first + n]) and n * T <= budget
            if first + n < len(sizes):
                assert (n + 1) * max(T, sizes[first + n]) > budget
            first += n
        assert first == len(sizes)


def test_eager_steps_run_on_the_rows_and_columns_they_need(tokenizer):
    """Only compiled code needs few shapes: eagerly, 3 requests in 8 slots are prefilled as 3 rows of the longest
    prompt's length and decoded as 3 rows reading as many columns as the longest sequence holds."""
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    e = Engine(model, tokenizer, slots=8, eos_id=-1)
    prefills, decodes = [], []
    prefill, decode = e.runner.prefill_step, e.runner.decode_step
    e.runner.prefill_step = lambda m, step, ids, *a: prefills.append(tuple(ids.shape)) or prefill(m, step, ids, *a)
    e.runner.decode_step = lambda m, step, ids, *a: decodes.append(
        (ids.shape[0], step.width, max(len(s.ids) for s in e.slots[:e.running]))) or decode(m, step, ids, *a)
    done = e.generate([greedy(p, im, 4) for p, im in zip(prompts[:3], images[:3])])
    assert [r.tokens for r in done] == [reference(model, tokenizer, p, im, 4) for p, im in zip(prompts, images[:3])]
    assert prefills == [(3, max(len(p) for p in prompts[:3]))]
    assert len(decodes) == 3 and all(rows == 3 and width == longest + 1 for rows, width, longest in decodes)


def test_eos_and_the_limit_are_not_fed(tokenizer):
    """A slot caches the prompt and every answer token that was fed back: all of them after EOS (EOS itself is
    not cached), all but the last at the token limit (no forward is run for a token nobody reads)."""
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    e = Engine(model, tokenizer, slots=1, eos_id=-1)
    steps = []
    decode = e.runner.decode_step
    e.runner.decode_step = lambda *a: steps.append(1) or decode(*a)
    (r,) = e.generate([greedy(prompts[0], images[0], 6)])
    assert r.finish_reason == "length" and len(steps) == 5 and e.slots[0].ids == prompts[0] + r.tokens[:-1]
    eos = r.tokens[2]
    e = Engine(model, tokenizer, slots=1, eos_id=eos)
    (r,) = e.generate([greedy(prompts[0], images[0], 6)])
    assert r.finish_reason == "stop" and eos not in r.tokens and e.slots[0].ids == prompts[0] + r.tokens


def test_seeded_sampling_is_the_same_alone_and_batched(tokenizer):
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    settings = [Sampling(temperature=0.9, seed=1), Sampling(temperature=1.3, top_k=20, seed=2),
                Sampling(temperature=0.7, top_p=0.9, seed=3), Sampling(greedy=True)]
    requests = [Request(p, [] if im is None else list(im), 12, s) for p, im, s in zip(prompts, images, settings)]
    done = Engine(model, tokenizer, slots=4).generate(requests)
    assert [r.tokens for r in done] == alone(model, tokenizer, requests)
    assert done[3].tokens == reference(model, tokenizer, prompts[3], images[3], 12, tokenizer.eos_id)
    other = Engine(model, tokenizer, slots=1).generate([Request(prompts[0], list(images[0]), 12,
                                                                Sampling(temperature=0.9, seed=4))])[0]
    assert other.tokens != done[0].tokens   # another seed, another draw


def test_sampler_draws_from_the_filtered_softmax():
    """sample() on one row of logits, 20,000 times with different seeds: the frequencies are softmax(logits / T);
    top-k, top-p and banned ids restrict the draw; greedy rows take the argmax."""
    n = 20000
    logits = torch.tensor([[0.0, 2.0, 1.5, 1.0, -1.0, 0.5]]).expand(n, -1)
    banned = torch.zeros(6, dtype=torch.bool)

    def draw(temperature=1.0, top_k=6, top_p=1.0, greedy=False, banned=banned):
        full = lambda v, dtype=torch.float: torch.full((n,), v, dtype=dtype)
        return sampling.sample(logits, banned, full(temperature), full(top_k, torch.long), full(top_p),
                                 full(greedy, torch.bool), torch.arange(n), full(3, torch.long))

    for t in (1.0, 0.5):
        freq = torch.bincount(draw(temperature=t), minlength=6) / n
        torch.testing.assert_close(freq, (logits[0] / t).softmax(-1), atol=0.012, rtol=0)
    assert set(draw(top_k=2).tolist()) == {1, 2}
    p = logits[0].softmax(-1)          # [.06, .43, .26, .16, .02, .10]: 0.43 + 0.26 < 0.75 <= + 0.16
    assert set(draw(top_p=0.75).tolist()) == {1, 2, 3}
    freq = torch.bincount(draw(top_p=0.75), minlength=6) / n
    torch.testing.assert_close(freq[1:4], p[1:4] / p[1:4].sum(), atol=0.012, rtol=0)
    no_1 = banned.clone()
    no_1[1] = True
    assert 1 not in draw(banned=no_1).tolist()
    assert set(draw(greedy=True, banned=no_1).tolist()) == {2}


def test_a_request_joining_or_cancelled_mid_answer_changes_no_other(tokenizer):
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    requests = [greedy(p, im, 12) for p, im in zip(prompts, images)]
    want = alone(model, tokenizer, requests, eos_id=-1)
    e = Engine(model, tokenizer, slots=3, eos_id=-1)
    a, b = e.submit(requests[0]), e.submit(requests[1])
    for _ in range(4):
        e.step()
    assert len(a.tokens) == 4     # the first step prefills (the first token), each later one decodes one more
    c = e.submit(requests[3])           # joins while a and b are mid-answer
    for _ in range(3):
        e.step()
    e.cancel(b)
    d = e.submit(requests[2])           # takes b's slot
    while e.busy:
        e.step()
    assert (a.tokens, c.tokens, d.tokens) == (want[0], want[3], want[2])
    assert b.finish_reason == "cancelled" and b.tokens == want[1][:len(b.tokens)] and 6 <= len(b.tokens) < 12
    assert e.running == 0 and all(s.request is None for s in e.slots)


def test_prefix_reuse_equals_a_fresh_prefill(tokenizer):
    """Round 2 of a conversation in the slot that answered round 1 feeds only its new tokens, and its cache, logits
    and answer equal a fresh engine's; the same text with another picture keeps only what precedes the picture."""
    model = tiny_model(tokenizer, seed=3)
    prompts, images = batch_input(tokenizer)
    ids, pics = prompts[0], images[0]      # "the cat sat on <image> a mat"
    e = Engine(model, tokenizer, slots=2, eos_id=-1)
    (first,) = e.generate([greedy(ids, pics, 6)])
    round2 = ids + first.tokens + tokenizer.encode("and what colour is it", bos=False)
    seen = capture_logits(e)
    attended = []       # round 2's tokens come after the picture: by the default rule none sees it
    hooks = [b.attn.register_forward_hook(lambda *_: attended.append(1)) for b in model.modules()
             if isinstance(b, GatedCrossAttentionBlock)]
    (second,) = e.generate([greedy(round2, pics, 6)])
    for h in hooks:
        h.remove()
    assert second.cached == len(ids) + 5    # everything that was fed in round 1
    assert not attended     # so its prefill, as its decode steps, runs the blocks' FFW only
    fresh = Engine(model, tokenizer, slots=1, eos_id=-1)
    fresh_seen = capture_logits(fresh)
    (want,) = fresh.generate([greedy(round2, pics, 6)])
    assert second.tokens == want.tokens == reference(model, tokenizer, round2, pics, 6)
    torch.testing.assert_close(seen[0], fresh_seen[0], rtol=1e-5, atol=1e-5)
    slot = next(s for s in e.slots if s.ids[:len(round2)] == round2)
    n = len(round2) + 5
    torch.testing.assert_close(e.runner.cache.k[:, slot.index, :, :n], fresh.runner.cache.k[:, 0, :, :n], rtol=1e-5,
                               atol=1e-6)
    # The same text with another picture: only what precedes <image> is shared; the answer is that picture's.
    other = torch.randn_like(pics)
    (third,) = e.generate([greedy(round2, other, 6)])
    assert third.cached == 0    # by the default rule even the text before <image> sees the picture after it
    assert third.tokens == reference(model, tokenizer, round2, other, 6)
    assert not torch.allclose(seen[6], seen[0])    # the first-token logits with each picture


@pytest.mark.parametrize("attend_previous", [False, True])
def test_a_later_picture_recomputes_what_the_masking_rule_changes(tokenizer, attend_previous):
    """Default rule: a new picture changes the picture of the tokens after the previous one, which are fed again;
    attend_previous: nothing earlier changes. A picture after a language-only start changes everything."""
    model = tiny_model(tokenizer, attend_previous=attend_previous)
    ids = tokenizer.encode("the cat sat on <image> a mat red dog and a blue square")
    more = tokenizer.encode("and <image> now what", bos=False)
    g = torch.Generator().manual_seed(5)
    pics = torch.randn(2, 3, 28, 28, generator=g)
    e = Engine(model, tokenizer, slots=1, eos_id=-1)
    (first,) = e.generate([greedy(ids, pics[:1], 4)])
    full = ids + first.tokens + more
    (second,) = e.generate([greedy(full, pics, 5)])
    p1 = ids.index(tokenizer.image_id)
    assert second.cached == (len(ids) + 3 if attend_previous else p1 + 1)
    assert second.tokens == reference(model, tokenizer, full, pics, 5)
    words = tokenizer.encode("the cat sat on", bos=True)
    e = Engine(model, tokenizer, slots=1, eos_id=-1)
    e.generate([greedy(words, None, 3)])
    (third,) = e.generate([greedy(words + more, pics[:1], 5)])
    assert third.cached == 0 and third.tokens == reference(model, tokenizer, words + more, pics[:1], 5)


def test_stop_strings_and_banned_tokens(tokenizer):
    """Generation ends at the token that would complete a stop string (not part of the answer) and the text before
    the stop string's first character; banned ids are never drawn even when they are by far the most likely; EOS
    ends an answer and is not part of it."""
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    (free,) = Engine(model, tokenizer, eos_id=-1).generate([greedy(prompts[2], None, 10)])
    stop = tokenizer.decode(free.tokens[:5])[-3:]    # ends inside token 4 (or 5)
    (cut,) = Engine(model, tokenizer, eos_id=-1).generate([greedy(prompts[2], None, 10, stop=(stop,))])
    assert cut.finish_reason == "stop" and stop not in cut.text
    assert stop in tokenizer.decode(free.tokens[:len(cut.tokens) + 1])
    assert cut.tokens == free.tokens[:len(cut.tokens)] and cut.text == free.text[:free.text.index(stop)]
    bias = torch.zeros(model.cfg.vocab_size)
    bias[tokenizer.never_generate] = 100.0      # every banned id is by far the most likely one
    biased_head(model, bias)
    for how in (Sampling(greedy=True), Sampling(top_k=5, seed=0), Sampling(temperature=0.8, top_p=0.9, seed=1)):
        (r,) = Engine(model, tokenizer, eos_id=-1).generate([Request(prompts[2], [], 12, how)])
        assert len(r.tokens) == 12 and not set(r.tokens) & set(tokenizer.never_generate)
    bias[tokenizer.eos_id] = 50.0
    biased_head(model, bias)
    (r,) = Engine(model, tokenizer).generate([greedy(prompts[2], None, 5)])
    assert r.tokens == [] and r.finish_reason == "stop"


def biased_head(model, bias):
    """Replace lm_head by one whose logits are `bias` plus a little of the real signal."""
    head = torch.nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 0.01)
        head.bias.copy_(bias)
    model.lm_head = head


def test_detokenizer_streams_exactly_what_decode_gives(tokenizer):
    """Characters of several bytes come as byte tokens (sentencepiece's byte fallback): a piece is emitted only
    when whole, and the pieces add up to tokenizer.decode of all the ids; also for ids that are not valid UTF-8."""
    for text in ("naïve café, 漢字 and 🙂 ü", "the cat ✓✓ sat"):
        ids = tokenizer.encode(text, bos=False)
        assert len(ids) > len(text.split())     # byte tokens among them
        d = Detokenizer(tokenizer)
        pieces = [d.add(t) for t in ids]
        assert not any(p.endswith("\ufffd") for p in pieces) and "".join(pieces) + d.flush() == text
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(3, tokenizer.image_id - 1, (30,), generator=g).tolist()
        d = Detokenizer(tokenizer)
        assert "".join(d.add(t) for t in ids) + d.flush() == tokenizer.decode(ids)


def test_bad_requests_are_refused_at_submit(tokenizer):
    model = tiny_model(tokenizer)
    e = Engine(model, tokenizer, slots=1, max_len=40, max_pictures=1)
    pic = torch.zeros(3, 28, 28)
    cases = [(Request([1] * 35, max_tokens=6), "pass the context of 40"),
             (Request([1, tokenizer.image_id], [], 4), "1 <image> tokens but 0 pictures"),
             (Request([1, tokenizer.image_id] * 2, [pic, pic], max_tokens=4), "at most 1"),
             (Request([1], max_tokens=0), "max_tokens >= 1")]
    for request, message in cases:
        with pytest.raises(ValueError, match=message):
            e.submit(request)
    (done,) = e.generate([Request([1, 5], max_tokens=2)])
    with pytest.raises(ValueError, match="runs once"):
        e.submit(done)
    assert not e.busy
    with pytest.raises(ValueError, match="context holds 256"):
        Engine(model, tokenizer, max_len=257)


def test_compiled_equals_eager(tokenizer):
    """The fast path with the CPU inductor backend, one slot (prefill padded to a length bucket, the decode step,
    the sampler and the ViT compiled): the same ids and close logits. Batched with 4 slots and mixed requests,
    traced with aot_eager (the same full graphs, without inductor's minutes of compiling here)."""
    prompts, images = batch_input(tokenizer)

    def requests(rows=slice(None)):
        return [greedy(p, im, 8) for p, im in zip(prompts[rows], images[rows])]

    want = [reference(tiny_model(tokenizer), tokenizer, p, im, 8) for p, im in zip(prompts, images)]
    fast = Engine(tiny_model(tokenizer), tokenizer, slots=1, eos_id=-1, fast=True, prefill_tokens=32)
    seen = capture_logits(fast)
    assert [r.tokens for r in fast.generate(requests(slice(2, None)))] == want[2:]
    eager = Engine(tiny_model(tokenizer), tokenizer, slots=1, eos_id=-1)
    eager_seen = capture_logits(eager)
    eager.generate(requests(slice(2, None)))
    torch.testing.assert_close(torch.cat(seen), torch.cat(eager_seen), rtol=1e-4, atol=1e-4)
    traced = Engine(tiny_model(tokenizer), tokenizer, slots=4, eos_id=-1, fast=True, backend="aot_eager",
                    prefill_tokens=16)

    def sampled():
        return [Request(p, [] if im is None else list(im), 8, Sampling(temperature=0.8, seed=i))
                for i, (p, im) in enumerate(zip(prompts, images))]

    assert [r.tokens for r in traced.generate(requests() + sampled())] == \
        want + alone(tiny_model(tokenizer), tokenizer, sampled(), eos_id=-1)


def test_the_fast_path_compiles_a_few_graphs_not_one_per_bucket(tokenizer):
    """8 slots, prompts and answers of many lengths: batch buckets 1 to 8, widths 64 to 256, prefill lengths 16 to
    64, rows with and without pictures. The compiled steps give the eager ids, and the shapes that vary become
    symbolic after their second size: about a dozen graphs where one per shape would be twice as many."""
    prompts, images = batch_input(tokenizer)

    def requests():
        return [Request(prompts[k % 4] + tokenizer.encode(" the cat" * (8 * k), bos=False),
                        [] if images[k % 4] is None else list(images[k % 4]), 20 + 10 * k, Sampling(greedy=True))
                for k in range(8)]

    counters.clear()
    torch._dynamo.reset()
    fast = Engine(tiny_model(tokenizer), tokenizer, slots=8, eos_id=-1, fast=True, backend="aot_eager",
                  prefill_tokens=64)
    got = [r.tokens for r in fast.generate(requests())]
    assert got == [r.tokens for r in Engine(tiny_model(tokenizer), tokenizer, slots=8, eos_id=-1).generate(requests())]
    assert counters["stats"]["unique_graphs"] <= 16


def test_prompts_of_every_length_compile_the_prefill_step_three_times(tokenizer):
    """One slot, prompts of 11 to 129 tokens each on an empty slot (prefill lengths 16 to 128, widths 64 to 192):
    the prefill step compiles for the first prompt, again when the length and then the width take a second size
    (symbolic from there on), and no more; the greedy sampler once. Were the length fixed in the compiled code,
    every length bucket would compile again (6 graphs)."""
    words = tokenizer.encode(" the cat sat on a mat and the dog ran to it" * 30, bos=False)

    def requests():
        return [Request([tokenizer.bos_id] + words[:n], [], 1, Sampling(greedy=True)) for n in (10, 20, 40, 70, 128)]

    counters.clear()
    torch._dynamo.reset()
    fast = Engine(tiny_model(tokenizer), tokenizer, slots=1, eos_id=-1, fast=True, backend="aot_eager",
                  prefill_tokens=128)
    got = []
    for request in requests():
        fast.reset()        # nothing reused: the whole prompt is prefilled
        got += fast.generate([request])
    assert counters["stats"]["unique_graphs"] == 4
    want = Engine(tiny_model(tokenizer), tokenizer, slots=1, eos_id=-1).generate(requests())
    assert [r.tokens for r in got] == [r.tokens for r in want] and [r.cached for r in got] == [0] * 5


@pytest.mark.parametrize("overrides", [{"attend_previous": True}, {"fusion": "prefix"}],
                         ids=["attend-previous", "prefix-fusion"])
def test_after_warm_up_traffic_compiles_nothing(tokenizer, overrides):
    """Engine.warm_up (serve.py runs it before it serves) compiles what traffic needs: afterwards one request, then
    three, then every slot at once, with pictures and without, greedy and sampled, and a conversation's second
    round (its prefix reused) compile no graph, and their answers are the eager engine's. It leaves the slots
    empty. Without it the same traffic compiles about a dozen graphs, each a stall of seconds to minutes. (The
    default masking rule: tests/test_serve.py, where serve.py runs it.)"""
    tok = copy.copy(tokenizer)
    tok.picture_tokens = tiny_model(tokenizer, **overrides).cfg.picture_tokens
    prompts, images = [tok.encode(p) for p in PROMPTS], batch_input(tokenizer)[1]
    words = tok.encode(" and what about the dog" * 12, bos=False)

    def request(k, sampled=False, more=0):
        pictures = [] if images[k % 4] is None else list(images[k % 4])
        sampling = Sampling(temperature=0.8, seed=k) if sampled else Sampling(greedy=True)
        return Request(prompts[k % 4] + words[:more], pictures, 6, sampling)

    def traffic(engine) -> list[list[int]]:
        waves = [[request(1)], [request(k) for k in range(3)], [request(k, more=9 * k) for k in range(4)],
                 [request(k, sampled=True) for k in range(3)], [request(3, sampled=True)]]
        answers = [r.tokens for wave in waves for r in engine.generate(wave)]
        first = engine.generate([request(1, more=5)])[0]
        again = Request(first.ids + first.tokens + words[:40], first.pictures, 6, Sampling(greedy=True))
        answers.append(engine.generate([again])[0].tokens)
        assert again.cached > 0 or overrides.get("fusion")     # (prefix fusion reuses nothing past a picture)
        return answers

    torch._dynamo.reset()
    counters.clear()
    fast = Engine(tiny_model(tokenizer, **overrides), tok, slots=4, eos_id=-1, fast=True, backend="aot_eager")
    fast.warm_up()
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 8 and not fast.busy and all(not s.ids and not s.pictures for s in fast.slots)
    got = traffic(fast)
    assert counters["stats"]["unique_graphs"] == compiled
    assert got == traffic(Engine(tiny_model(tokenizer, **overrides), tok, slots=4, eos_id=-1))


def test_the_fast_path_runs_in_a_thread_of_its_own(tokenizer):
    """serve.py steps its engine in a thread that did not make it, and Dynamo's settings are per thread (torch
    2.14): the steps may compile as many graphs there as the engine allows where it was made, not Dynamo's default 8
    a function, past which a step fails. Engines of 1 to 10 slots (a cache of another shape: every step compiles
    again) stepped in a new thread give the eager ids."""
    prompts, images = batch_input(tokenizer)
    prompt, picture = prompts[0], images[0]
    model = tiny_model(tokenizer)

    def request():
        return greedy(prompt, picture, 3)

    want = Engine(model, tokenizer, eos_id=-1).generate([request()])[0].tokens
    torch._dynamo.reset()
    engines = [Engine(model, tokenizer, slots=slots, eos_id=-1, fast=True, backend="eager") for slots in range(1, 11)]
    got, failed = [], []

    def run():
        try:
            got.extend(engine.generate([request()])[0].tokens for engine in engines)
        except Exception as e:
            failed.append(e)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert not failed and got == [want] * 10


def streamed(engine, request) -> list[str]:
    """The text each step let out."""
    engine.submit(request)
    pieces = []
    while engine.busy:
        pieces += [out.text for out in engine.step() if out.request is request]
    return pieces


def test_stop_strings_end_the_text_at_their_first_character_and_stream_nothing_taken_back(tokenizer):
    """A stop string that spans two tokens, one inside a token, several at once: the answer is the text before the
    first character of the first to appear (as OpenAI's); what comes out step by step is a prefix of it at every
    step (a tail that could begin a stop string waits until it cannot), and joined it is the answer."""
    model = tiny_model(tokenizer)
    prompts, _ = batch_input(tokenizer)
    (free,) = Engine(model, tokenizer, eos_id=-1).generate([greedy(prompts[2], None, 24)])
    text = free.text
    ends = [len(tokenizer.decode(free.tokens[:i + 1])) for i in range(24)]     # where each token's text ends
    # the last character of a token and the first of the next; what lies strictly inside a token of 3 characters
    # or more (each where it first appears in the answer)
    k, spanning = next((k, s) for k, e in enumerate(ends[:-1]) if text.find(s := text[e - 1:e + 1]) == e - 1)
    inside = next(s for a, b in zip(ends, ends[1:]) if b - a >= 3 and text.find(s := text[a + 1:b - 1]) == a + 1)
    for stop in ((spanning,), (inside,), ("zzz", spanning, "qq", inside)):
        out = streamed(Engine(model, tokenizer, eos_id=-1), greedy(prompts[2], None, 24, stop=stop))
        want = text[:min(text.index(s) for s in stop if s in text)]
        assert "".join(out) == want
        assert all(want.startswith("".join(out[:i])) for i in range(len(out)))
    # the request ends at the token that completes the stop string: its tokens are those before it
    (cut,) = Engine(model, tokenizer, eos_id=-1).generate([greedy(prompts[2], None, 24, stop=(spanning,))])
    assert cut.finish_reason == "stop" and cut.tokens == free.tokens[:k + 1] and cut.text == text[:ends[k] - 1]
    # a tail that could begin a stop string but does not is let out in the end
    (held,) = Engine(model, tokenizer, eos_id=-1).generate([greedy(prompts[2], None, 24, stop=(text[-1] + "\x00",))])
    assert held.text == text and held.finish_reason == "length"


def test_logprobs_are_the_full_forwards_log_softmax_alone_or_batched_and_cost_nothing_unasked(tokenizer):
    """Greedy: each token's logprob is a full forward's log-softmax at its position; the top alternatives are the
    most likely of the ids that can be generated, sorted, the chosen one first. Batched beside other requests they
    are what they are alone; a request that does not ask gets none (and its batch does not compute them)."""
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    ask = lambda i: greedy(prompts[i], images[i], 6, top_logprobs=3)
    e_banned = torch.zeros(model.cfg.vocab_size, dtype=torch.bool)
    e_banned[tokenizer.never_generate] = True
    (alone_,) = Engine(model, tokenizer, eos_id=-1).generate([ask(0)])
    with torch.no_grad():
        for k, lp in enumerate(alone_.logprobs):
            logp = model(images[0][None], torch.tensor([prompts[0] + alone_.tokens[:k]]))[0, -1].float().log_softmax(-1)
            assert lp.token == alone_.tokens[k] and abs(lp.logprob - logp[lp.token].item()) < 1e-4
            ids, values = zip(*lp.top)
            assert list(values) == sorted(values, reverse=True) and ids[0] == lp.token    # greedy: the most likely
            assert list(ids) == logp.masked_fill(e_banned, -float("inf")).topk(3).indices.tolist()
    e = Engine(model, tokenizer, slots=4, eos_id=-1)
    calls = []
    logprobs = e.runner.logprobs
    e.runner.logprobs = lambda *a: calls.append(1) or logprobs(*a)
    plain = e.generate([greedy(prompts[1], images[1], 6), greedy(prompts[2], None, 6)])
    assert not calls and all(r.logprobs == [] for r in plain)
    done = e.generate([greedy(prompts[1], images[1], 6), ask(0), greedy(prompts[3], images[3], 6, top_logprobs=0)])
    for a, b in zip(done[1].logprobs, alone_.logprobs, strict=True):     # (the same up to float rounding)
        assert a.token == b.token and [i for i, _ in a.top] == [i for i, _ in b.top]
        assert abs(a.logprob - b.logprob) < 1e-5 and all(abs(x - y) < 1e-5 for (_, x), (_, y) in zip(a.top, b.top))
    assert done[0].logprobs == [] and len(done[2].logprobs) == 6 and all(lp.top == [] for lp in done[2].logprobs)


def test_logit_bias_forces_and_bans_ids(tokenizer):
    model = tiny_model(tokenizer)
    prompts, _ = batch_input(tokenizer)
    (free,) = Engine(model, tokenizer, eos_id=-1).generate([greedy(prompts[2], None, 6)])
    word = tokenizer.encode(" cat", bos=False)[-1]
    e = Engine(model, tokenizer, slots=2, eos_id=-1)
    forced, banned = e.generate([greedy(prompts[2], None, 6, logit_bias={word: 100}),
                                 greedy(prompts[2], None, 6, logit_bias={t: -100 for t in set(free.tokens)})])
    assert forced.tokens == [word] * 6 and not set(banned.tokens) & set(free.tokens)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        e.submit(greedy(prompts[2], None, 6, logit_bias={model.cfg.vocab_size: 1}))


def test_requests_sharing_a_prompt_prefill_it_once(tokenizer):
    """n answers to one prompt (serve.py's n): the first request prefills, the others copy its slot's keys/values
    and draw their first tokens from its logits; each answer equals that request run alone (greedy and seeded),
    with pictures and without. One fewer slot than requests: the last waits and prefills on its own."""
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    for ids, pics in ((prompts[0], images[0]), (prompts[2], None)):
        pics = [] if pics is None else list(pics)
        make = lambda seed: Request(list(ids), pics, 8, Sampling(temperature=0.9, seed=seed))
        want = [Engine(model, tokenizer, eos_id=-1).generate([make(s)])[0].tokens for s in range(4)]
        for slots in (4, 3):
            e = Engine(model, tokenizer, slots=slots, eos_id=-1)
            fed = []
            prefill = e.runner.prefill
            e.runner.prefill = lambda chunks: fed.append(sum(len(c.ids) for c in chunks)) or prefill(chunks)
            first = make(0)
            done = e.generate([first] + [dataclasses.replace(make(s), shares=first) for s in range(1, 4)])
            assert [r.tokens for r in done] == want and len(set(map(tuple, want))) > 1
            assert sum(fed) == len(ids) if slots == 4 else len(ids) < sum(fed) < 2 * len(ids)   # (a prefix reused)
