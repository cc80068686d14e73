"""The model's numerical contracts: caching, LoRA, gates, language-only path, media masking, loss, sampling."""

import pytest
import torch

import lora
import mmgpt
from conftest import full_forward_greedy, tiny_model
from perceiver import GatedCrossAttentionBlock, media_index

TEXT = "hello <image> the cat sat on <image> a mat red dog and a blue square"


def two_image_input(tokenizer):
    ids = tokenizer.encode(TEXT)
    torch.manual_seed(1)
    return ids, torch.randn(1, 2, 3, 28, 28)


def test_kv_cache_equals_full_forward_across_a_new_picture(tokenizer):
    model = tiny_model(tokenizer)
    ids, images = two_image_input(tokenizer)
    full = model(images, torch.tensor([ids]))[0]
    p1, p2 = [i for i, t in enumerate(ids) if t == tokenizer.image_id]
    cache = model.new_cache()
    # Round 1: up to just past the first picture. Round 2 brings the second picture, which changes the
    # picture of the tokens between the two: extend() must recompute them.
    first = model.extend(cache, ids[:p1 + 3], images[:, :1])
    torch.testing.assert_close(first, model(images[:, :1], torch.tensor([ids[:p1 + 3]]))[0, -1])
    last = model.extend(cache, ids[p1 + 3:p2 + 2], images[:, 1:])
    torch.testing.assert_close(last, full[p2 + 1], rtol=1e-5, atol=1e-5)
    for t in range(p2 + 2, len(ids)):  # token-by-token decoding
        step = model.extend(cache, [ids[t]])
        torch.testing.assert_close(step, full[t], rtol=1e-5, atol=1e-5)
    assert cache.ids == ids


def test_kv_cache_equals_full_forward_under_attend_previous(tokenizer):
    """Under attend_previous a new picture changes no earlier token: the cache is extended, never recomputed."""
    model = tiny_model(tokenizer, attend_previous=True)
    ids, images = two_image_input(tokenizer)
    x = torch.tensor([ids])
    full = model(images, x)[0]
    torch.testing.assert_close(full, model(images, x, attend_previous=True)[0])  # the model's rule by default
    assert not torch.allclose(full, model(images, x, attend_previous=False)[0])
    p1, p2 = [i for i, t in enumerate(ids) if t == tokenizer.image_id]
    cache, computed = model.new_cache(), []
    step = model.decode_step
    model.decode_step = lambda x, *rest: computed.append(x.shape[1]) or step(x, *rest)
    model.extend(cache, ids[:p1 + 3], images[:, :1])
    last = model.extend(cache, ids[p1 + 3:p2 + 2], images[:, 1:])
    torch.testing.assert_close(last, full[p2 + 1], rtol=1e-5, atol=1e-5)
    assert computed == [p1 + 3, p2 + 2 - (p1 + 3)]  # only the new tokens (the default rule redoes the last 2 too)
    for t in range(p2 + 2, len(ids)):
        torch.testing.assert_close(model.extend(cache, [ids[t]]), full[t], rtol=1e-5, atol=1e-5)
    assert cache.ids == ids


def test_kv_cache_language_only_then_picture(tokenizer):
    """A picture arriving after a language-only start turns on cross-attention for every earlier token."""
    model = tiny_model(tokenizer)
    ids, images = two_image_input(tokenizer)
    p1 = ids.index(tokenizer.image_id)
    cache = model.new_cache()
    model.extend(cache, ids[:p1])
    out = model.extend(cache, ids[p1:], images[:, :2])
    torch.testing.assert_close(out, model(images, torch.tensor([ids]))[0, -1], rtol=1e-5, atol=1e-5)


def test_lora_merged_equals_unmerged_and_zero_b_is_identity(tokenizer):
    model = tiny_model(tokenizer)
    ids, images = two_image_input(tokenizer)
    x = torch.tensor([ids])
    base = model(images, x)
    names = lora.inject(model, r=4, alpha=8, targets=lora.DEFAULT_TARGETS, within="layers.")
    assert len(names) == 4 * 4 + 2 * 5  # q/k/v/o in 4 layers; to_q, to_kv, to_out, ff.1, ff.3 in 2 blocks
    torch.testing.assert_close(model(images, x), base)  # B starts at zero
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.5)
    unmerged = model(images, x)
    assert (unmerged - base).abs().max() > 1e-2
    lora.merge(model)
    torch.testing.assert_close(model(images, x), unmerged, rtol=1e-4, atol=1e-4)
    lora.unmerge(model)
    torch.testing.assert_close(model(images, x), unmerged, rtol=1e-5, atol=1e-5)
    assert set(lora.lora_state_dict(model)) == {f"{n}.lora_{ab}" for n in names for ab in "AB"}


def without_xattn(model, tokenizer):
    """The same weights as a plain LLaMA (no cross-attention blocks at all)."""
    plain = tiny_model(tokenizer, xattn_layers=())
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".xattn." not in k})
    return plain


def test_zero_gates_equal_plain_llama(tokenizer):
    model = tiny_model(tokenizer, gates=(0.0, 0.0))
    ids, images = two_image_input(tokenizer)
    x = torch.tensor([ids])
    torch.testing.assert_close(model(images, x), without_xattn(model, tokenizer)(None, x))


def test_language_only_path_skips_cross_attention(tokenizer):
    model = tiny_model(tokenizer)  # nonzero gates: the FFW branch would change every token if it ran
    x = torch.tensor([tokenizer.encode("the cat sat on the mat")])
    torch.testing.assert_close(model(None, x), without_xattn(model, tokenizer)(None, x))
    assert (model(torch.zeros(1, 1, 3, 28, 28), x) - model(None, x)).abs().max() > 1e-3


def test_media_index_both_rules():
    I = 9  # image token id
    ids = torch.tensor([[5, I, 6, 7, I, 8, 9 - 1]])
    #                  a  <1>  b  c  <2>  d  e
    assert media_index(ids, I).tolist() == [[1, 1, 2, 2, 2, 0, 0]]
    assert media_index(ids, I, attend_previous=True).tolist() == [[0, 1, 1, 1, 2, 2, 2]]
    # Per sequence: the second row has one picture, so the text after it sees none.
    batch = torch.tensor([[5, I, 6, 7, I, 8], [5, 6, I, 7, 8, 5]])
    assert media_index(batch, I).tolist() == [[1, 1, 2, 2, 2, 0], [1, 1, 1, 0, 0, 0]]
    # A cached continuation numbered as part of the longer sequence.
    assert media_index(torch.tensor([[6, I, 7]]), I, images_before=1).tolist() == [[2, 2, 0]]


def test_cross_attention_sees_only_its_picture_and_zero_without_one():
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=16, dim_visual=8, heads=2, dim_head=4).eval()
    with torch.no_grad():
        block.attn_gate.fill_(1.0)
    x = torch.randn(1, 7, 16)
    latents = torch.randn(1, 2, 3, 8)
    index = torch.tensor([[1, 1, 2, 2, 2, 0, 0]])

    def attn_out(lat):
        return block.attn(x, block.attn.picture_kv(lat), index)

    base = attn_out(latents)
    changed2 = latents.clone()
    changed2[:, 1] += 1.0
    diff = (attn_out(changed2) - base).abs().amax(-1)[0]
    assert (diff[2:5] > 1e-4).all() and (diff[[0, 1, 5, 6]] == 0).all()
    changed1 = latents.clone()
    changed1[:, 0] += 1.0
    diff = (attn_out(changed1) - base).abs().amax(-1)[0]
    assert (diff[:2] > 1e-4).all() and (diff[2:] == 0).all()
    assert (base[0, 5:] == 0).all()  # tokens with no picture: zero cross-attention output
    # ... but the FFW branch still runs for them.
    with torch.no_grad():
        block.ff_gate.fill_(1.0)
    y = block(x, block.attn.picture_kv(latents), index)
    torch.testing.assert_close(y[0, 5:], x[0, 5:] + block.ff(x)[0, 5:] * torch.tanh(torch.tensor(1.0)))


def test_attend_previous_option_changes_which_tokens_see_pictures(tokenizer):
    model = tiny_model(tokenizer)
    ids, images = two_image_input(tokenizer)
    x = torch.tensor([ids])
    a, b = model(images, x), model(images, x, attend_previous=True)
    # Under attend_previous, tokens before the first picture see none; under the default rule they see it.
    p1 = ids.index(tokenizer.image_id)
    before = torch.tensor([ids[:p1]])
    torch.testing.assert_close(b[0, :p1], model(images[:, :1], before, attend_previous=True)[0])
    assert (a[0, :p1] - b[0, :p1]).abs().max() > 1e-4
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4


def test_padding_on_the_right_does_not_change_real_tokens(tokenizer):
    model = tiny_model(tokenizer)
    ids, images = two_image_input(tokenizer)
    short = tokenizer.encode("a cat <image> sat")
    batch = torch.full((2, len(ids)), tokenizer.pad_id)
    batch[0], batch[1, :len(short)] = torch.tensor(ids), torch.tensor(short)
    mask = (torch.arange(len(ids)) < torch.tensor([[len(ids)], [len(short)]])).long()
    # The second sequence has one picture; its second slot is zero padding that no token may see.
    other = torch.randn(1, 1, 3, 28, 28)
    batch_images = torch.cat([images, torch.cat([other, torch.zeros_like(other)], dim=1)])
    out = model(batch_images, batch, mask)
    torch.testing.assert_close(out[0], model(images, batch[:1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :len(short)], model(other, torch.tensor([short]))[0], rtol=1e-5, atol=1e-5)


def test_lm_loss_predicts_next_token_over_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[-100, 3, 4, -100, 7], [-100, -100, 1, 2, -100]])
    expected = []
    for b in range(2):
        for t in range(4):
            if labels[b, t + 1] != -100:
                expected.append(-logits[b, t].log_softmax(-1)[labels[b, t + 1]])
    torch.testing.assert_close(mmgpt.lm_loss(logits, labels), torch.stack(expected).mean())


def biased_head(model, bias):
    """Replace lm_head by one whose logits are `bias` plus a little of the real signal."""
    head = torch.nn.Linear(model.cfg.dim, model.cfg.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight * 0.01)
        head.bias.copy_(bias)
    model.lm_head = head


def test_generation_never_emits_special_tokens_and_stops_at_eos(tokenizer):
    model = tiny_model(tokenizer)
    bias = torch.zeros(model.cfg.vocab_size)
    bias[tokenizer.never_generate] = 100.0  # every forbidden token is by far the most likely one
    biased_head(model, bias)
    ids = tokenizer.encode("the cat")
    for kwargs in ({"greedy": True}, {"temperature": 1.0, "top_k": 5}, {"temperature": 0.8, "top_p": 0.9}):
        out = list(mmgpt.generate(model, model.new_cache(), ids, max_new_tokens=12, eos_id=tokenizer.eos_id,
                                  banned=tokenizer.never_generate, generator=torch.Generator().manual_seed(0),
                                  **kwargs))
        assert len(out) == 12 and not set(out) & set(tokenizer.never_generate)
    bias[tokenizer.eos_id] = 50.0
    biased_head(model, bias)
    cache = model.new_cache()
    assert list(mmgpt.generate(model, cache, ids, max_new_tokens=5, eos_id=tokenizer.eos_id,
                               banned=tokenizer.never_generate, greedy=True)) == []
    assert cache.ids == ids  # EOS is not cached: the caller closes the answer with </s> in its next text


def test_greedy_generation_equals_full_forward_argmax(tokenizer):
    model = tiny_model(tokenizer)
    ids, images = two_image_input(tokenizer)
    cache = model.new_cache()
    out = list(mmgpt.generate(model, cache, ids, images, max_new_tokens=10, eos_id=-1,
                              banned=tokenizer.never_generate, greedy=True))
    seq = list(ids) + full_forward_greedy(model, list(ids), images, 10, tokenizer.never_generate)
    assert out == seq[len(ids):]
    assert cache.ids == seq


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([0.0, 5.0, 4.0, 3.0, -1.0])
    g = torch.Generator().manual_seed(0)
    picks = {mmgpt.sample(logits, [], top_k=2, generator=g) for _ in range(200)}
    assert picks == {1, 2}
    # probs ~ [.004, .66, .24, .09, .002]: top_p=0.8 keeps the first two by mass
    picks = {mmgpt.sample(logits, [], top_p=0.8, generator=g) for _ in range(200)}
    assert picks == {1, 2}
    assert mmgpt.sample(logits, [1], greedy=True) == 2


def test_grad_checkpointing_gives_the_same_gradients(tokenizer):
    model = tiny_model(tokenizer)
    lora.inject(model, r=4, alpha=8, within="layers.")
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.1)
    lora.mark_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids, images = two_image_input(tokenizer)
    x = torch.tensor([ids])
    model.train()
    grads = []
    for ckpt in (False, True):
        model.grad_checkpointing = ckpt
        for p in trainable:
            p.grad = None
        mmgpt.lm_loss(model(images, x), x).backward()
        grads.append([p.grad.clone() for p in trainable])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_cache_overflow_and_truncate_keep_the_cache_valid(tokenizer):
    model = tiny_model(tokenizer)
    ids, images = two_image_input(tokenizer)
    p1, p2 = [i for i, t in enumerate(ids) if t == tokenizer.image_id]
    cache = model.new_cache(len(ids))
    model.extend(cache, ids[:p2 + 1], images)
    with pytest.raises(ValueError, match="cannot extend a context"):
        model.extend(cache, ids[p2 + 1:] + [5])
    assert cache.ids == ids[:p2 + 1] and cache.picture_kv[1][0].shape[2] == 2  # untouched
    cache.truncate(p1 + 2)  # back to before the second picture: its keys/values go too
    assert cache.picture_kv[1][0].shape[2] == 1
    out = model.extend(cache, ids[p1 + 2:], images[:, 1:])
    torch.testing.assert_close(out, model(images, torch.tensor([ids]))[0, -1], rtol=1e-5, atol=1e-5)
