"""On CUDA (marker gpu: `pytest -m gpu tests`; skipped without a GPU): train.py's fast path in bf16 against the
same computation in fp32 on the CPU, the demo end to end with its evaluation, the engine's fast path in bf16
against its eager path (one slot and four; also with --int8; warmed up in a thread of its own, as serve.py
does), and the cache under autocast."""
import copy
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch._dynamo.utils import counters

import lora
import quantize
import train
from conftest import batch_input, full_forward_greedy, grads_after, lora_model, micro_batches, tiny_model
from engine import Engine, Request, Sampling

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


def on_gpu(images, dtype=torch.bfloat16):
    return [None if im is None else im.to("cuda", dtype) for im in images]


def answers(engine: Engine, prompts, images, n: int = 12) -> list[list[int]]:
    return [r.tokens for r in engine.generate([Request(p, [] if im is None else list(im), n, Sampling(greedy=True))
                                               for p, im in zip(prompts, images)])]


def test_gpu_fast_engine_equals_eager_bf16(tokenizer):
    """Greedy token ids of the fast path (LoRA merged, a CUDA graph per batch and width bucket) equal the eager
    path's (merged too: merging in bf16 rounds the weights) on a tiny random model: one slot (the requests one
    after the other, a second round reusing the first's prefix) and four slots at once; no graph is skipped."""
    eager_model, fast_model = bf16_model(tokenizer), bf16_model(tokenizer)
    lora.merge(eager_model)
    prompts, images = batch_input(tokenizer)
    images = on_gpu(images)
    prompts.append(prompts[0] + tokenizer.encode("and <image> now", bos=False))
    images.append(torch.cat([images[0], images[3]]))
    counters.clear()
    for slots in (1, 4):
        want = answers(Engine(eager_model, tokenizer, slots, eos_id=-1), prompts, images)
        assert answers(Engine(fast_model, tokenizer, slots, eos_id=-1, fast=True), prompts, images) == want
    assert counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()


def test_gpu_warm_up_in_the_stepping_thread_then_traffic_compiles_nothing(tokenizer):
    """serve.py on a GPU: Engine.warm_up runs in the loop's thread (CUDA graphs are recorded per thread), then
    requests one, three and four at once in that thread compile nothing, skip no CUDA graph and give the eager
    path's ids. The pictures in fp32, as serve.py's transform gives them (the warm-up's are)."""
    eager_model, fast_model = bf16_model(tokenizer), bf16_model(tokenizer)
    lora.merge(eager_model)
    prompts, images = batch_input(tokenizer)
    images = on_gpu(images, torch.float32)
    want = [answers(Engine(eager_model, tokenizer, 4, eos_id=-1), prompts[:k], images[:k]) for k in (1, 3, 4)]
    torch._dynamo.reset()
    counters.clear()
    fast = Engine(fast_model, tokenizer, 4, eos_id=-1, fast=True)
    compiled, got, failed = [], [], []

    def loop():
        try:
            fast.warm_up()
            compiled.append(counters["stats"]["unique_graphs"])
            got.extend(answers(fast, prompts[:k], images[:k]) for k in (1, 3, 4))
        except Exception as e:
            failed.append(e)
    thread = threading.Thread(target=loop)
    thread.start()
    thread.join()
    assert not failed and got == want
    assert counters["stats"]["unique_graphs"] == compiled[0] and counters["inductor"]["cudagraph_skips"] == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", quantize.MODES)
def test_gpu_quantized_fast_engine_equals_its_eager(tokenizer, mode):
    """chat.py --int8 / --int4 on CUDA: the compiled path (CUDA graphs, the codes' conversion to bf16 inside the
    compiled matmuls) gives the same form's eager greedy ids."""
    eager, fast = (quantize.quantize(bf16_model(tokenizer), mode) for _ in range(2))
    prompts, images = batch_input(tokenizer)
    images = on_gpu(images)
    assert answers(Engine(fast, tokenizer, eos_id=-1, fast=True), prompts, images) == \
        answers(Engine(eager, tokenizer, eos_id=-1), prompts, images)
    torch._dynamo.reset()


def test_gpu_cache_under_autocast(tokenizer):
    """A fp32 model decoding under bf16 autocast (train.py's demo evaluation): the cache is made in bf16 and the
    answers equal a full forward's under the same autocast."""
    model = tiny_model(tokenizer).to("cuda")
    prompts, images = batch_input(tokenizer)
    images = [None if im is None else im.to("cuda") for im in images]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        engine = Engine(model, tokenizer, slots=4, eos_id=-1)
        got = answers(engine, prompts, images, 4)
        want = [full_forward_greedy(model, p, None if im is None else im[None], 4, tokenizer.never_generate)
                for p, im in zip(prompts, images)]
    assert engine.runner.cache.k.dtype == torch.bfloat16 and got == want
