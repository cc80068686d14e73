"""train.py's fast path on the CPU: compiled layers == eager, fp32 masters == plain AdamW, length buckets change
nothing but the shapes. (The same on CUDA in bf16: tests/test_gpu.py.)"""
import torch
from torch._dynamo.utils import counters

import train
from conftest import grads_after, lora_model, micro_batches


def test_length_buckets_pad_and_change_no_loss_or_gradient(tokenizer):
    model, batches = lora_model(tokenizer), micro_batches(tokenizer)
    plain, plain_grads = grads_after(model, batches)
    padded, padded_grads = grads_after(model, batches, bucket=16)
    assert train.to_device(batches[0][0], "cpu", 16, 64)[1].shape == (2, 32)  # 24 -> the next multiple of 16
    assert train.to_device(batches[0][0], "cpu", 128, 40)[1].shape == (2, 40)  # ... but never past max_len
    assert (plain.tokens, plain.padding) == (2 * (24 + 20 + 24 + 13), 2 * (4 + 11))
    assert (padded.tokens, padded.padding) == (plain.tokens, plain.padding + 4 * 2 * 8)
    for kind in ("lang", "vl"):
        torch.testing.assert_close(torch.stack(padded.losses[kind]), torch.stack(plain.losses[kind]))
    for n in plain_grads:
        torch.testing.assert_close(padded_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6)


def test_compiled_layers_equal_eager_and_compile_once_per_kind(tokenizer):
    """8 layers, cross-attention before 4 of them: a handful of graphs, not one per layer."""
    model = lora_model(tokenizer, n_layers=8, xattn_layers=(1, 3, 5, 7))
    batches = micro_batches(tokenizer, lengths=(20,))
    eager, eager_grads = grads_after(model, batches, bucket=32)
    counters.clear()
    torch._dynamo.reset()
    train.compile_layers(model)
    compiled, compiled_grads = grads_after(model, batches, bucket=32)
    again, _ = grads_after(model, batches, bucket=32)  # no recompilation: the same graphs again
    # first layer (its input needs no grad), plain layers, cross-attention layers without / with a picture
    assert 2 <= counters["stats"]["unique_graphs"] <= 4
    for kind in ("lang", "vl"):
        torch.testing.assert_close(torch.stack(compiled.losses[kind]), torch.stack(eager.losses[kind]))
        torch.testing.assert_close(torch.stack(again.losses[kind]), torch.stack(eager.losses[kind]))
    for n in eager_grads:
        torch.testing.assert_close(compiled_grads[n], eager_grads[n], rtol=1e-4, atol=1e-6)


def test_fp32_masters_equal_plain_adamw(tokenizer):
    """MasterAdamW with copies of an fp32 model (grads moved onto the masters, clipped there, AdamW on them,
    copied back) takes exactly the steps that AdamW on the parameters themselves takes."""
    a, b = lora_model(tokenizer), lora_model(tokenizer)
    named = {n: p for n, p in a.named_parameters() if p.requires_grad}
    masters = train.MasterAdamW([{"params": named}], lr=1e-2, copies=True)
    assert len(masters.pairs) == len(named) and all(m is not p for p, m in masters.pairs)
    sched_a = torch.optim.lr_scheduler.LambdaLR(masters, lambda s: train.cosine(s, 1, 10))
    trainable_b = [p for p in b.parameters() if p.requires_grad]
    plain = torch.optim.AdamW(trainable_b, lr=1e-2, weight_decay=0.0, fused=True)
    sched_b = torch.optim.lr_scheduler.LambdaLR(plain, lambda s: train.cosine(s, 1, 10))
    batches = micro_batches(tokenizer)
    for _ in range(3):
        train.train_iteration(train.WithLoss(a), batches, "cpu")
        norm_a = train.optimizer_step(masters, sched_a, max_norm=0.05)  # small: clipping is exercised
        assert all(p.grad is None for p in named.values())
        train.train_iteration(train.WithLoss(b), batches, "cpu")
        norm_b = float(torch.nn.utils.clip_grad_norm_(trainable_b, 0.05))
        plain.step()
        plain.zero_grad(set_to_none=True)
        sched_b.step()
        assert norm_a == norm_b > 0.05
    for (n, p), q in zip(named.items(), trainable_b):
        assert torch.equal(p, q), n
        assert torch.equal(masters.masters[n], p)
