"""CUDA paths (marker gpu: `pytest -m gpu tests`; skipped without a GPU): chat's fast path in bf16 against its
eager path, batched generation, the cache under autocast."""
import pytest
import torch

import chat
import lora
import mmgpt
from conftest import tiny_model
from test_generate import batch_input, one_at_a_time

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]


def bf16_model(tokenizer):
    model = tiny_model(tokenizer).to("cuda", torch.bfloat16)
    lora.inject(model, r=4, alpha=8, within="layers.")
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.3)
    return model.to("cuda")


def on_gpu(images):
    return [None if im is None else im.to("cuda", torch.bfloat16) for im in images]


def test_gpu_fast_chat_path_equals_eager_bf16(tokenizer):
    """Greedy token ids of the fast path (LoRA merged, CUDA graphs) equal the eager path's (merged too: merging
    in bf16 rounds the weights) on a tiny random model, batch 1 over two rounds and batched."""
    eager, fast = bf16_model(tokenizer), bf16_model(tokenizer)
    lora.merge(eager)
    chat.make_fast(fast)
    prompts, images = batch_input(tokenizer)
    images = on_gpu(images)
    for model in (eager, fast):
        model.answers = one_at_a_time(model, tokenizer, prompts, images, -1, 12)
        cache = model.new_cache()
        model.rounds = [list(mmgpt.generate(model, cache, ids, None if im is None else im[None], max_new_tokens=8,
                                            eos_id=-1, banned=tokenizer.never_generate, greedy=True))
                        for ids, im in ((prompts[0], images[0]), (tokenizer.encode("and <image>", bos=False),
                                                                  images[0][:1]))]
        model.batched = mmgpt.generate_batch(model, prompts, images, max_new_tokens=12, eos_id=-1,
                                             banned=tokenizer.never_generate)
    assert fast.answers == eager.answers and fast.rounds == eager.rounds
    assert fast.batched == eager.batched == eager.answers


def test_gpu_cache_under_autocast(tokenizer):
    """A fp32 model decoding under bf16 autocast (train.py's demo evaluation): the cache is made in bf16
    and decoding runs."""
    model = tiny_model(tokenizer).to("cuda")
    prompts, images = batch_input(tokenizer)
    images = [None if im is None else im.to("cuda") for im in images]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = one_at_a_time(model, tokenizer, prompts, images, -1, 4)
    assert model.layers[0].self_attn.k_cache.dtype == torch.bfloat16 and list(map(len, got)) == [4] * len(prompts)
