"""On CUDA (marker gpu: `pytest -m gpu tests`; skipped without a GPU): train.py's fast path in bf16 against the
same computation in fp32 on the CPU, the demo end to end with its evaluation, chat's fast path in bf16 against
its eager path (also with --int8), batched generation, and the cache under autocast."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import chat
import lora
import mmgpt
import quantize
import train
from conftest import batch_input, grads_after, lora_model, micro_batches, one_at_a_time, tiny_model

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_fast_training_step_on_cuda_matches_fp32_on_cpu(tokenizer, cuda_graphs):
    cpu = lora_model(tokenizer)
    gpu = copy.deepcopy(cpu).to("cuda", torch.bfloat16)
    train.compile_layers(gpu, cuda_graphs)
    batches = micro_batches(tokenizer)
    want, want_grads = grads_after(cpu, batches)
    for _ in range(3):  # CUDA graphs record on the first calls, then replay
        got, got_grads = grads_after(gpu, batches, bucket=16, device="cuda")
    for kind in ("lang", "vl"):
        torch.testing.assert_close(torch.stack(got.losses[kind]).float().cpu(), torch.stack(want.losses[kind]),
                                   rtol=2e-2, atol=2e-2)
    for n, g in want_grads.items():
        err = (got_grads[n].float().cpu() - g).norm() / g.norm()
        assert err < 5e-2, (n, float(err))
    torch._dynamo.reset()


def test_demo_trains_and_evaluates_on_cuda(tmp_path):
    done = subprocess.run([sys.executable, "train.py", "--max-steps", "5", "--out", str(tmp_path / "demo")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "on cuda (fast path)" in done.stdout and "done: 5 steps" in done.stdout and "accuracy" in done.stdout


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


def test_gpu_int8_fast_chat_equals_int8_eager(tokenizer):
    """chat.py --int8 on CUDA: the compiled path (CUDA graphs, the int8 -> bf16 conversion inside the compiled
    matmuls) gives the int8 eager path's greedy ids."""
    eager, fast = (quantize.quantize_int8(bf16_model(tokenizer)) for _ in range(2))
    chat.make_fast(fast)
    prompts, images = batch_input(tokenizer)
    images = on_gpu(images)
    assert one_at_a_time(fast, tokenizer, prompts, images, -1, 12) == \
        one_at_a_time(eager, tokenizer, prompts, images, -1, 12)


def test_gpu_cache_under_autocast(tokenizer):
    """A fp32 model decoding under bf16 autocast (train.py's demo evaluation): the cache is made in bf16
    and decoding runs."""
    model = tiny_model(tokenizer).to("cuda")
    prompts, images = batch_input(tokenizer)
    images = [None if im is None else im.to("cuda") for im in images]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = one_at_a_time(model, tokenizer, prompts, images, -1, 4)
    assert model.layers[0].self_attn.k_cache.dtype == torch.bfloat16 and list(map(len, got)) == [4] * len(prompts)
