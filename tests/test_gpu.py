"""On CUDA (skipped elsewhere; `pytest -m gpu tests`): the fast path in bf16 against the same computation in
fp32 on the CPU, and the demo end to end with its evaluation."""
import copy
import os
import subprocess
import sys

import pytest
import torch

import train
from test_fast import grads_after, lora_model, micro_batches

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
