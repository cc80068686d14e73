"""The model's numerical contracts: LoRA, gates, language-only path, media masking, loss, checkpointing. (Cached
decoding: test_engine.py.)"""

import torch

import lora
import mmgpt
from conftest import tiny_model
from perceiver import GatedCrossAttentionBlock, make_picture_mask, media_index

TEXT = "hello <image> the cat sat on <image> a mat red dog and a blue square"


def two_image_input(tokenizer):
    ids = tokenizer.encode(TEXT)
    torch.manual_seed(1)
    return ids, torch.randn(1, 2, 3, 28, 28)


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
    mask = make_picture_mask(torch.tensor([[1, 1, 2, 2, 2, 0, 0]]), 3, 2 * 3, torch.float32)

    def attn_out(lat):
        return block.attn(x, block.attn.picture_kv(lat), mask)

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
    y = block(x, block.attn.picture_kv(latents), mask)
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
