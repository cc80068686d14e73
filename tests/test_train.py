"""train.py end to end on a tiny model: DDP accumulation, exact resume, SIGTERM, demo base and scoring."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import demo
import train
from conftest import ROOT, assert_same, lora_weights, run_train, train_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return train_base(tmp_path_factory.mktemp("train"))


def test_two_ranks_accumulating_k_equal_one_rank_accumulating_2k(base):
    # Gradients agree to float rounding (summation order differs); Adam divides by sqrt(v), which magnifies
    # rounding where a gradient is ~0, in proportion to the learning rate: hence a modest one here.
    one = run_train(base, base["tmp"] / "one", "--grad-accum", "4", "--max-steps", "2", "--lr", "3e-4")
    two = run_train(base, base["tmp"] / "two", "--grad-accum", "2", "--max-steps", "2", "--lr", "3e-4", nproc=2)
    assert "effective batch 8 = 1 ranks x 1 x 4" in one and "effective batch 8 = 2 ranks x 1 x 2" in two
    a, b = lora_weights(base["tmp"] / "one"), lora_weights(base["tmp"] / "two")
    assert any(k.endswith("lora_B") for k in a) and "perceiver.norm.weight" in a
    # It did train: every LoRA B left zero (the demo base's gates are open, so the cross-attention's too).
    assert all(v.abs().max() > 1e-4 for k, v in a.items() if k.endswith("lora_B"))
    assert_same(a, b)


def test_resume_continues_exactly(base):
    run_train(base, base["tmp"] / "straight", "--grad-accum", "2", "--max-steps", "4")
    run_train(base, base["tmp"] / "split", "--grad-accum", "2", "--max-steps", "2")
    out = run_train(base, base["tmp"] / "split", "--grad-accum", "2", "--max-steps", "4", "--resume")
    assert "resumed from" in out and "at step 2" in out
    assert_same(lora_weights(base["tmp"] / "straight"), lora_weights(base["tmp"] / "split"))
    losses = [[json.loads(line) for line in open(base["tmp"] / d / "metrics.jsonl")] for d in ("straight", "split")]
    assert [r["loss_vl"] for r in losses[0]] == pytest.approx([r["loss_vl"] for r in losses[1]], abs=1e-6)


def test_fast_path_two_ranks_equal_one_rank(base):
    fast = ("--fast", "--bucket", "32", "--max-steps", "2", "--lr", "3e-4")
    run_train(base, base["tmp"] / "fast_one", "--grad-accum", "4", *fast)
    run_train(base, base["tmp"] / "fast_two", "--grad-accum", "2", *fast, nproc=2)
    assert_same(lora_weights(base["tmp"] / "fast_one"), lora_weights(base["tmp"] / "fast_two"))


def test_fast_path_resume_continues_exactly(base):
    """--fast on the CPU: fp32 master copies in the optimizer and ckpt.pt, lengths padded to buckets."""
    run_train(base, base["tmp"] / "fast", "--grad-accum", "2", "--max-steps", "3", "--fast", "--bucket", "32")
    run_train(base, base["tmp"] / "fast_split", "--grad-accum", "2", "--max-steps", "1", "--fast", "--bucket", "32")
    out = run_train(base, base["tmp"] / "fast_split", "--grad-accum", "2", "--max-steps", "3", "--fast", "--bucket",
                    "32", "--resume")
    assert "at step 1" in out and "(fast path)" in out
    assert_same(lora_weights(base["tmp"] / "fast"), lora_weights(base["tmp"] / "fast_split"))
    records = [json.loads(line) for line in open(base["tmp"] / "fast" / "metrics.jsonl")]
    assert all(r["padding"] > 0 for r in records)  # --max-len 96: samples padded to 32 or 64 or 96


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(base):
    out = base["tmp"] / "term"
    proc = run_train(base, out, "--max-steps", "100000", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert "SIGTERM: stopped at step" in log
    step = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert f"stopped at step {step};" in log and step >= 1
    # ... and it goes on from there
    again = run_train(base, out, "--max-steps", str(step + 1), "--resume")
    assert f"at step {step}" in again and f"done: {step + 1} steps" in again


def test_missing_weights_say_where_to_get_them(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", "configs/mmgpt.json"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    assert "checkpoints/llama-7b_hf not found: it should hold LLaMA-7B" in done.stderr


def test_demo_base_starts_with_open_gates(base):
    ckpt = torch.load(base["openflamingo"], weights_only=True)
    gates = {k: float(v) for k, v in ckpt.items() if k.endswith(("attn_gate", "ff_gate"))}
    assert len(gates) == 2 * 8 and all(v == 1.0 for v in gates.values())  # 4 blocks, under both of OF's names


def test_demo_evaluation_scores_each_question_kind(base, monkeypatch):
    """A model that always answers "red": right exactly on the colour questions whose answer is red."""
    import checkpoints
    model, tokenizer, transform = checkpoints.load(base["llama"], base["openflamingo"], None, base["vision"],
                                                   base["vision_weights"])
    monkeypatch.setattr(train.Engine, "generate", lambda self, requests: [SimpleNamespace(text="red") for _ in requests])
    items = demo.eval_set(n=40, seed=1, pictures=str(base["tmp"] / "pictures"))
    out = train.evaluate(model, tokenizer, transform, [], items, 128, torch.autocast("cpu", enabled=False), "cpu")
    colour = [e for c, e in items if e in demo.COLOURS]
    assert 0 < colour.count("red") < len(colour)
    assert out["accuracy_colour"] == colour.count("red") / len(colour)
    assert out["accuracy"] == colour.count("red") / len(items)
    kinds = {k for k, answers in demo.ANSWERS.items() if any(e in answers for _, e in items)}
    assert {k for k in out if k.startswith("accuracy_")} == {f"accuracy_{k}" for k in kinds}
    assert all(out[f"accuracy_{k}"] == 0 for k in kinds - {"colour"})
    assert out["chance"] == demo.chance([e for _, e in items])


def test_the_media_rule_is_saved_with_the_run_and_used_by_its_model(base):
    """The demo trains with attend_previous; the paper's recipe keeps OpenFlamingo v1's rule, which the release
    weights need. lora.pt carries the rule, so chat.py decodes with the rule the weights were trained with."""
    import checkpoints
    paper = ["--config", base["config"], "--llama", base["llama"], "--openflamingo", base["openflamingo"]]
    assert train.parse_args([]).attend_previous is True
    assert train.parse_args(paper).attend_previous is False
    assert train.parse_args(paper + ["--attend-previous"]).attend_previous is True
    for flag, rule in (("--attend-previous", True), ("--no-attend-previous", False)):
        out = base["tmp"] / f"rule{rule}"
        run_train(base, out, "--max-steps", "1", flag)
        saved = torch.load(out / "lora.pt", weights_only=True)
        assert saved["settings"]["attend_previous"] is rule
        assert not any(n.startswith("vision.") for n in saved["weights"])  # no --vision-lr: the ViT stays frozen
        model, _, _ = checkpoints.load_run(str(out))
        assert model.cfg.attend_previous is rule


def test_vision_lr_trains_the_vit_and_saves_it_with_the_run(base):
    """On 2 ranks: DDP refuses trainable parameters that get no gradient, such as the ViT's ln_post and proj,
    which the encoder never uses (so they are not trained)."""
    import checkpoints
    out = base["tmp"] / "vit"
    run_train(base, out, "--max-steps", "2", "--vision-lr", "1e-2", nproc=2)
    saved = torch.load(out / "lora.pt", weights_only=True)["weights"]
    start = torch.load(base["vision_weights"], weights_only=True)
    vit = {n[len("vision.visual."):]: t for n, t in saved.items() if n.startswith("vision.")}
    assert vit.keys() == start.keys() - {"ln_post.weight", "ln_post.bias", "proj"}
    assert not torch.equal(vit["conv1.weight"], start["conv1.weight"])  # it moved ...
    model, _, _ = checkpoints.load_run(str(out))                                # ... and the run loads it back
    assert torch.equal(model.vision.visual.conv1.weight, vit["conv1.weight"])
