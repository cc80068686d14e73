"""Batched greedy generation (generate_batch) and the KV cache under autocast and on the compiled fast path."""
import pytest
import torch

import mmgpt
from conftest import batch_input, one_at_a_time, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("attend_previous", [False, True])
def test_batched_ids_equal_one_at_a_time(tokenizer, attend_previous):
    """Mixed prompt lengths (left padding), rows with one, two and no pictures, a row that ends at EOS early."""
    model = tiny_model(tokenizer, attend_previous=attend_previous)
    prompts, images = batch_input(tokenizer)
    alone = one_at_a_time(model, tokenizer, prompts, images, eos_id=-1)
    eos = alone[1][3]   # row 1 ends after 3 tokens (and any other row that meets this token ends there too)
    assert eos not in alone[1][:3]
    alone = one_at_a_time(model, tokenizer, prompts, images, eos_id=eos)
    assert len(alone[1]) == 3 and max(map(len, alone)) == 10
    batched = mmgpt.generate_batch(model, prompts, images, max_new_tokens=10, eos_id=eos,
                                   banned=tokenizer.never_generate)
    assert batched == alone
    # A batch of one row and a batch of language-only rows (no cross-attention at all) agree too.
    assert mmgpt.generate_batch(model, prompts[3:], images[3:], max_new_tokens=10, eos_id=eos,
                                banned=tokenizer.never_generate) == alone[3:]
    assert mmgpt.generate_batch(model, prompts[2:3] * 2, [None, None], max_new_tokens=10, eos_id=eos,
                                banned=tokenizer.never_generate) == alone[2:3] * 2


def test_batched_bad_input_is_named(tokenizer):
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    with pytest.raises(ValueError, match="prompt 1: 2 <image> tokens but 1 pictures"):
        mmgpt.generate_batch(model, prompts, [images[0], images[0], None, images[3]], max_new_tokens=4, eos_id=2,
                             banned=[])


def test_cache_is_made_in_the_autocast_dtype(tokenizer):
    """A fp32 model decoding under bf16 autocast (train.py's demo evaluation on a GPU): the cache takes the
    activations' dtype, and cached decoding equals a full forward under the same autocast."""
    model = tiny_model(tokenizer)
    prompts, images = batch_input(tokenizer)
    ids, image = prompts[0], images[0][None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache()
        logits = model.extend(cache, ids, image)
        assert model.layers[0].self_attn.k_cache.dtype == torch.bfloat16
        step = model.extend(cache, [5])
        full = model(image, torch.tensor([ids + [5]]))[0]
    torch.testing.assert_close(logits.float(), full[-2].float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(step.float(), full[-1].float(), rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="can no longer be extended"):   # fp32 now: this bf16 cache cannot go on
        model.extend(cache, [6])
    logits = model.extend(model.new_cache(), ids, image)                 # a new one is made in fp32
    assert model.layers[0].self_attn.k_cache.dtype == torch.float32
    torch.testing.assert_close(logits, model(image, torch.tensor([ids]))[0, -1], rtol=1e-5, atol=1e-5)


def test_an_older_cache_cannot_be_extended_after_a_newer_one_took_the_buffers(tokenizer):
    model = tiny_model(tokenizer)
    old = model.new_cache()
    model.extend(old, [1, 5, 6])
    model.extend(model.new_cache(), [1, 7])
    with pytest.raises(ValueError, match="a newer one"):
        model.extend(old, [8])


def test_compiled_decoding_equals_eager(tokenizer):
    """The fast path with the CPU inductor backend at batch 1 (prefill padded to a bucket, the decode step and the
    ViT compiled): greedy ids equal the eager path's and the logits agree. Batched, traced with aot_eager (the
    same full graphs, without inductor's minutes of compiling here)."""
    eager, fast, traced = tiny_model(tokenizer), tiny_model(tokenizer), tiny_model(tokenizer)
    fast.compile_decoding(buckets=(16, 32))
    traced.compile_decoding(backend="aot_eager", buckets=(16, 32))
    prompts, images = batch_input(tokenizer)
    ids, image = prompts[3], images[3][None]
    a = eager.extend(eager.new_cache(), ids, image)
    torch.testing.assert_close(fast.extend(fast.new_cache(), ids, image), a, rtol=1e-4, atol=1e-4)
    assert fast.layers[0].self_attn.k_cache.shape[2] == fast.cfg.max_seq_len
    assert one_at_a_time(fast, tokenizer, prompts[3:], images[3:], -1, 8) == \
        one_at_a_time(eager, tokenizer, prompts[3:], images[3:], -1, 8)
    kwargs = dict(max_new_tokens=6, eos_id=-1, banned=tokenizer.never_generate)
    assert mmgpt.generate_batch(traced, prompts, images, **kwargs) == \
        mmgpt.generate_batch(eager, prompts, images, **kwargs)
