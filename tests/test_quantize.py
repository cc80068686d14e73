"""quantize.py: the decoder's weights held in int8, 4-bit, bf16 or fbgemm's fp16 for decoding (chat.py, eval.py)."""
import pytest
import torch
from torch import nn

import lora
import quantize
from conftest import batch_input, full_forward_greedy, lora_model, one_at_a_time
from engine import Engine, Request, Sampling

pytestmark = pytest.mark.usefixtures("one_thread")
fbgemm = pytest.mark.skipif(not quantize.fbgemm_fp16(), reason="fbgemm's fp16 kernels need an x86 CPU with AVX2")


def test_each_row_is_rounded_to_its_own_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 10, generator=g) * torch.tensor([1, 10, 1e-3, 0, 5, 1.0])[:, None]
    b = torch.randn(6, generator=g)
    m = quantize.Int8Linear(w, b)
    assert m.codes.dtype == torch.int32 and m.codes.shape == (6, 3) and m.scales.shape == (6,)
    assert (m.out_features, m.in_features) == (6, 10)
    deq = m.unpacked(0, 6, torch.float32)
    assert (deq / m.scales[:, None]).round().abs().amax(1).tolist() == [127, 127, 127, 0, 127, 127]   # zero stays 0
    assert ((deq - w).abs() <= m.scales[:, None] / 2 * (1 + 1e-5)).all()   # off by at most half a step
    x = torch.randn(3, 10, generator=g)
    torch.testing.assert_close(m(x), x @ deq.T + b)
    bf16 = quantize.Int8Linear(w.bfloat16())
    assert bf16.scales.dtype == torch.bfloat16 and bf16(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("group_size", quantize.GROUP_SIZES)
def test_each_group_is_rounded_to_its_own_scale(group_size):
    """4-bit: one scale per group of inputs; inputs past a whole block are padded with zeros that stay zero."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 200, generator=g) * torch.linspace(0.01, 3, 200)
    w[2] = 0
    m = quantize.Int4Linear(w, None, group_size)
    block = max(group_size, 64)
    assert m.codes.shape == (5, -(-200 // block), block // 8) and m.scales.shape == (5, -(-200 // block) * block // group_size)
    deq = m.unpacked(0, 5, torch.float32)
    assert deq.shape == (5, 200) and (deq[2] == 0).all()
    step = m.scales.repeat_interleave(group_size, dim=1)[:, :200]
    assert ((deq - w).abs() <= step / 2 * (1 + 1e-5)).all()
    assert ((deq / step).round() - deq / step).abs().max() < 1e-4 and (deq / step).round().abs().max() <= 8


@pytest.mark.parametrize("mode,group_size", [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("bf16", 0)])
def test_packed_products_equal_the_unpacked_weights(mode, group_size):
    """A layer big enough for the compiled one-row kernel (a decode step, and row by row up to one_row_max rows) and
    the unpacked blocks (a prefill: compiled unpacking, oneDNN's product): each equals x @ W.T with W the layer's own
    unpacked weights (eager), to fp32 rounding."""
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(1100, 1000)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(1000, 1100, generator=g) * 0.05)
    m = quantize.quantize_linear(lin, mode, group_size or 128)
    assert m.fused
    w = m.unpacked(0, 1000, torch.float32)
    one, several = torch.randn(1, 1100, generator=g), torch.randn(3, m.one_row_max + 1, 1100, generator=g)
    torch.testing.assert_close(m(one), one @ w.T + lin.bias, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(m(several), several @ w.T + lin.bias, atol=2e-5, rtol=1e-5)
    if m.one_row_max > 1:
        few = torch.randn(m.one_row_max, 1100, generator=g)
        torch.testing.assert_close(m(few), torch.cat([m(row) for row in few.split(1)]), atol=0, rtol=0)
        torch.testing.assert_close(m(few), few @ w.T + lin.bias, atol=2e-5, rtol=1e-5)
    assert quantize.linear_bytes(1000, 1100, mode, group_size or 128, 4) == sum(
        t.numel() * t.element_size() for n, t in m.named_buffers() if n != "bias")


@pytest.mark.parametrize("onednn", [True, False])
def test_blocks_multiply_through_onednn_or_without_it(onednn, monkeypatch):
    """The several-row product, block by block: through oneDNN where PyTorch carries it, F.linear where not (an
    ARM build without it); either gives x @ W.T, for row counts that are no multiple of 8 and a last short block."""
    monkeypatch.setattr(quantize, "_ONEDNN", onednn)
    g = torch.Generator().manual_seed(5)
    m = quantize.Bf16Linear((torch.randn(quantize.BLOCK_ROWS + 3, 1024, generator=g) * 0.05).bfloat16())
    w = m.unpacked(0, m.out_features, torch.float32)
    for rows in (5, 13):
        x = torch.randn(rows, 1024, generator=g)
        torch.testing.assert_close(m.blocks(x), x @ w.T, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_long_rows_meet_several_weight_rows_at_once(mode):
    """Inputs longer than LONG_INPUTS (LLaMA's down projection: 11,008): the one-row kernel takes several rows of W
    per load of the row, and each output lands in its place: x @ W.T as for short rows."""
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(quantize.LONG_INPUTS + 8, 128)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, quantize.LONG_INPUTS + 8, generator=g) * 0.05)
    m = quantize.quantize_linear(lin, mode)
    assert m.fused and m.together == m.together_long > 1
    w = m.unpacked(0, 128, torch.float32)
    x = torch.randn(1, quantize.LONG_INPUTS + 8, generator=g)
    torch.testing.assert_close(m(x), x @ w.T + lin.bias, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 7), (3, 3)])
def test_int8_several_bf16_rows_go_through_pytorchs_kernel_in_the_packed_order(shape):
    """A bf16 model's prefill through _weight_int8pack_mm: its rows permuted to the codes' packed order give x @ W.T
    to bf16's rounding (a wrong order would be off by the size of the product itself), and the same as the one-row
    kernel row by row; 9 rows = 8 through that kernel (4 at a time) + the last through the one-row kernel."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(1024, 1024, generator=g) * 0.05
    m = quantize.Int8Linear(w.bfloat16(), torch.randn(1024, generator=g).bfloat16())
    assert m.fused
    deq = m.unpacked(0, 1024, torch.float32)
    x = torch.randn(*shape, 1024, generator=g).bfloat16()
    got = m(x)
    assert got.dtype == torch.bfloat16 and got.shape == (*shape, 1024)
    want = x.float() @ deq.T + m.bias.float()
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=1e-2)
    rows = torch.cat([m(row) for row in x.reshape(-1, 1, 1024)]).view(*shape, 1024)
    torch.testing.assert_close(got, rows, atol=2e-2, rtol=1e-2)
    assert ((got.float() - want).norm() / want.norm()) < 5e-3
    if x[..., 0].numel() % 4 == 1:
        assert torch.equal(got.view(-1, 1024)[-1], rows.view(-1, 1024)[-1])


def test_int8_many_bf16_rows_go_through_the_blocks(monkeypatch):
    """Past pack_rows_max bf16 rows (a long prefill), PyTorch's int8 kernel, whose time grows with the rows, gives way
    to the unpacked blocks; up to it, the blocks are not used. Either gives x @ W.T."""
    g = torch.Generator().manual_seed(6)
    m = quantize.Int8Linear((torch.randn(512, 1024, generator=g) * 0.05).bfloat16())
    deq, calls = m.unpacked(0, 512, torch.float32), []
    blocks = quantize.PackedLinear.blocks
    monkeypatch.setattr(quantize.PackedLinear, "blocks", lambda self, x: calls.append(len(x)) or blocks(self, x))
    for n in (m.pack_rows_max, m.pack_rows_max + 1):
        x = torch.randn(n, 1024, generator=g).bfloat16()
        torch.testing.assert_close(m(x).float(), x.float() @ deq.T, atol=2e-2, rtol=1e-2)
    assert calls == [m.pack_rows_max + 1]


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


@pytest.mark.parametrize("mode", ["int8", pytest.param("fp16", marks=fbgemm)])
def test_quantized_cached_decoding_equals_its_full_forward(tokenizer, mode):
    """The KV cache and the batched decoder run the int8 model (fp16: fbgemm's layers, the rest of the model in fp16
    as well, as a CPU loads --dtype fp16) as its full forward does."""
    model = lora_model(tokenizer).eval()
    model = quantize.quantize(model.half() if mode == "fp16" else model, mode)
    prompts, images = batch_input(tokenizer)
    if mode == "fp16":
        images = [None if im is None else im.half() for im in images]
    cached = one_at_a_time(model, tokenizer, prompts, images, eos_id=-1, n=6)
    for p, im, got in zip(prompts, images, cached):
        assert got == full_forward_greedy(model, p, None if im is None else im[None], 6, tokenizer.never_generate)
    batched = Engine(model, tokenizer, slots=4, eos_id=-1).generate(
        [Request(p, [] if im is None else list(im), 6, Sampling(greedy=True)) for p, im in zip(prompts, images)])
    assert [r.tokens for r in batched] == cached


@pytest.mark.parametrize("group_size", quantize.GROUP_SIZES)
def test_4bit_cached_decoding_equals_its_full_forward(tokenizer, group_size):
    """The 4-bit model through the KV cache and the batched decoder, as its full forward."""
    model = quantize.quantize(lora_model(tokenizer).eval(), "int4", group_size)
    assert isinstance(model.lm_head, quantize.Int4Linear) and model.lm_head.group_size == group_size
    prompts, images = batch_input(tokenizer)
    cached = one_at_a_time(model, tokenizer, prompts, images, eos_id=-1, n=4)
    for p, im, got in zip(prompts, images, cached):
        assert got == full_forward_greedy(model, p, None if im is None else im[None], 4, tokenizer.never_generate)


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_the_fast_path_traces_the_one_row_kernels_into_its_step(tokenizer, mode, monkeypatch):
    """chat.py --fast on a CPU: the engine's compiled step (traced here with aot_eager) takes each layer's fused
    one-row kernel into its own graph, and answers as the same layers do eagerly."""
    prompts, images = batch_input(tokenizer)
    requests = lambda: [Request(p, [] if im is None else list(im), 5, Sampling(greedy=True))
                        for p, im in zip(prompts[:3], images[:3])]
    eager = quantize.quantize(lora_model(tokenizer).eval(), mode, 32)
    monkeypatch.setattr(quantize, "FUSED_MIN_WEIGHTS", 0)       # the tiny model's layers take the fused kernels
    fast = quantize.quantize(lora_model(tokenizer).eval(), mode, 32)
    assert all(m.fused for m in fast.modules() if isinstance(m, quantize.PackedLinear))
    want = [r.tokens for r in Engine(eager, tokenizer, slots=2, eos_id=-1).generate(requests())]
    got = Engine(fast, tokenizer, slots=2, eos_id=-1, fast=True, backend="aot_eager").generate(requests())
    assert [r.tokens for r in got] == want


@fbgemm
@pytest.mark.parametrize("rows", [1, 9, 43])
def test_fp16_layers_multiply_by_their_fp16_weights(rows):
    """fbgemm's packed fp16 layer (a decode step, a re-sent round's few rows, a prompt): x @ W.T with W rounded to
    fp16 once, to fp32 rounding, in the input's dtype; fbgemm's packing gives back exactly those fp16 weights."""
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(300, 1100, generator=g) * 0.05, torch.randn(300, generator=g)
    m = quantize.Fp16Linear(w, b)
    assert torch.equal(torch.ops.quantized.linear_unpack_fp16(m.packed)[0], w.half().float())
    x = torch.randn(rows, 1100, generator=g)
    torch.testing.assert_close(m(x), x @ w.half().float().T + b, atol=2e-5, rtol=1e-5)
    assert m(x.half()).dtype == torch.float16 and m(x[None]).shape == (1, rows, 300)
    assert quantize.linear_bytes(300, 1100, "fp16") == 2 * 300 * 1100
