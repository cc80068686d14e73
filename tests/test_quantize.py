"""quantize.py: weight-only int8 for decoding (chat.py / eval.py --int8)."""
import pytest
import torch
from torch import nn

import lora
import quantize
from conftest import batch_input, full_forward_greedy, lora_model, one_at_a_time
from engine import Engine, Request, Sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def test_each_row_is_rounded_to_its_own_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g) * torch.tensor([1, 10, 1e-3, 0, 5, 1.0])[:, None]
    b = torch.randn(6, generator=g)
    m = quantize.Int8Linear(w, b)
    assert m.weight.dtype == torch.int8 and m.scales.shape == (6,) and (m.out_features, m.in_features) == (6, 10)
    assert m.weight.abs().amax(1).tolist() == [127, 127, 127, 0, 127, 127]   # each row its full range; zero stays 0
    deq = m.weight.float() * m.scales[:, None]
    assert ((deq - w).abs() <= m.scales[:, None] / 2 * (1 + 1e-5)).all()   # off by at most half a step
    x = torch.randn(3, 10, generator=g)
    torch.testing.assert_close(m(x), x @ deq.T + b)
    bf16 = quantize.Int8Linear(w.bfloat16())
    assert bf16.scales.dtype == torch.bfloat16 and bf16(x.bfloat16()).dtype == torch.bfloat16


def test_the_decoder_is_quantized_and_its_logits_barely_move(tokenizer):
    """LoRA merged, then every linear layer of the decoder (self-attention, MLP, cross-attention blocks) and
    lm_head in int8; the ViT and the perceiver untouched; the logits within 1% (relative) of the merged model's."""
    model = lora_model(tokenizer).eval()
    decoder = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, lora.LoRALinear))
               and n.startswith(("layers.", "lm_head"))]
    vision = {n: p.clone() for n, p in model.named_parameters() if n.startswith(("vision.", "perceiver."))}
    prompts, images = batch_input(tokenizer)
    ids, image = torch.tensor([prompts[3]]), images[3][None]
    with torch.no_grad():
        before = model(image, ids)
        quantize.quantize(model)
        after = model(image, ids)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, quantize.Int8Linear)) == sorted(decoder)
    assert len(decoder) == 4 * 4 + 2 * 5 + 1      # 4 layers x (qkv, o, gate_up, down); 2 x-attn blocks x 5; lm_head
    assert not lora.lora_layers(model)
    assert all(torch.equal(p, vision[n]) for n, p in model.named_parameters() if n in vision) and len(vision) > 10
    rel = ((after - before).norm() / before.norm()).item()
    assert 0 < rel < 0.01


def test_quantized_cached_decoding_equals_its_full_forward(tokenizer):
    """The KV cache and the batched decoder run the int8 model as its full forward does."""
    model = quantize.quantize(lora_model(tokenizer).eval())
    prompts, images = batch_input(tokenizer)
    cached = one_at_a_time(model, tokenizer, prompts, images, eos_id=-1, n=6)
    for p, im, got in zip(prompts, images, cached):
        assert got == full_forward_greedy(model, p, None if im is None else im[None], 6, tokenizer.never_generate)
    batched = Engine(model, tokenizer, slots=4, eos_id=-1).generate(
        [Request(p, [] if im is None else list(im), 6, Sampling(greedy=True)) for p, im in zip(prompts, images)])
    assert [r.tokens for r in batched] == cached
