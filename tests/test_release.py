"""Loading the release's files (fake_release.py --preset small: its exact layout, a few hundred MB): bit for bit
what copying the files into a built model gives, in the memory of the weights alone (anonymous memory, measured in a
subprocess), quantized layer by layer; the memory check that refuses before a weight is read; the cache sized to
the memory the weights leave; the default dtype."""
import argparse
import copy
import os
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import fake_release
import lora
import mmgpt
import options
import quantize
from conftest import ROOT


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return fake_release.write(str(tmp_path_factory.mktemp("release")), "small")


def flags(release, *extra):
    ap = argparse.ArgumentParser()
    options.add_weight_args(ap)
    return ap.parse_args(["--llama", release["llama"], "--openflamingo", release["openflamingo"], "--lora",
                          release["lora"], "--vision", release["vision"], "--vision-weights",
                          release["vision_weights"], *extra])


def copied(release, dtype):
    """The loader before streaming: a model built (random values), every file copied in, the LoRA injected."""
    p = checkpoints.plan(release["llama"], release["openflamingo"], release["lora"], release["vision"],
                         release["vision_weights"])
    model = mmgpt.build(p.cfg, "cpu", dtype)
    with torch.no_grad():
        model.embed_tokens.weight[-3:] = 0
        model.lm_head.weight[-3:] = 0
    visual = model.vision.visual
    checkpoints.copy_into(visual, checkpoints.read_vision_weights(release["vision_weights"]), "vit",
                          dict(visual.named_parameters()))
    for path in checkpoints.llama_files(release["llama"]):
        shard = checkpoints.read_checkpoint(path)
        checkpoints.copy_into(model, {n: t for k, t in shard.items() if (n := checkpoints.our_name(k))}, path, [])
    checkpoints.copy_into(model, p.flamingo, "of", [])
    checkpoints.apply_lora(model, p.lora_weights, "lora")
    return model.requires_grad_(False).eval()


def test_streamed_load_equals_copying_into_a_built_model(release):
    reference = copied(release, torch.bfloat16)
    p = checkpoints.plan(release["llama"], release["openflamingo"], release["lora"], release["vision"],
                         release["vision_weights"])
    model = checkpoints.fill(p, "cpu", torch.bfloat16)[0]
    want = reference.state_dict()
    got = model.state_dict()
    assert got.keys() == want.keys() and len(lora.lora_layers(model)) == len(lora.lora_layers(reference))
    for k, t in got.items():
        assert t.dtype == want[k].dtype and torch.equal(t, want[k]), k
    # The buffers computed, not loaded: RoPE's tables and the fused layers' LoRA masks.
    assert all(torch.equal(b, dict(reference.named_buffers())[n]) for n, b in model.named_buffers())
    # Merged (and quantized) as the programs load it on a CPU in bf16 (checkpoints.decoding_forms: the decoder's layers
    # held by quantize.py, the ViT and perceiver in fp32): the same as merging and converting the copied models.
    lora.merge(reference)
    vision = {k: t for k, t in copied(release, torch.float32).state_dict().items()
              if k.startswith(("vision.", "perceiver."))}
    for form, group_size in (("bf16", 128), ("int4", 64)):
        want = quantize.quantize(copy.deepcopy(reference), form, group_size).state_dict() | vision
        got = checkpoints.fill(checkpoints.plan(release["llama"], release["openflamingo"], release["lora"],
                                                release["vision"], release["vision_weights"]), "cpu", torch.bfloat16,
                               merge=True, quantize_to=None if form == "bf16" else form, group_size=group_size)[0]
        assert isinstance(got.layers[0].mlp.down_proj, quantize.Int4Linear if form == "int4" else quantize.Bf16Linear)
        assert got.state_dict().keys() == want.keys()
        assert all(t.dtype == want[k].dtype and torch.equal(t, want[k]) for k, t in got.state_dict().items())


# Run in a process of its own: its anonymous memory (what the kernel cannot drop, unlike the mapped files' pages)
# is sampled from outside while it loads.
LOADER = """
import sys, time
import open_clip, tqdm, torch
import checkpoints, options, quantize
def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon:"))
print(anon(), flush=True)
sys.stdin.readline()
p = checkpoints.plan(*sys.argv[1:6])
mode = sys.argv[6] if sys.argv[6] != "none" else None
weights = options.weights_bytes(p.model, "cpu", torch.bfloat16, mode, 128)
model = checkpoints.fill(p, "cpu", torch.bfloat16, merge=True, quantize_to=mode)[0]
print(weights, anon(), flush=True)
"""


def anon_peak(release, mode: str) -> tuple[int, int, int]:
    """(anonymous memory before loading, its peak while loading, the loaded weights' bytes)."""
    files = [release[k] for k in ("llama", "openflamingo", "lora", "vision", "vision_weights")]
    child = subprocess.Popen([sys.executable, "-c", LOADER, *files, mode], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    base = int(child.stdout.readline())
    child.stdin.write("go\n")
    child.stdin.flush()
    peak = 0
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as f:
                peak = max(peak, next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:")))
        except (OSError, StopIteration):
            break
        time.sleep(0.002)
    out = child.stdout.read().split()
    assert child.wait() == 0
    weights, end = int(out[0]), int(out[1])
    return base, max(peak, end), weights


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_loading_takes_the_memory_of_the_weights(release, mode):
    base, peak, weights = anon_peak(release, mode)
    bf16 = options.weights_bytes(checkpoints.plan(release["llama"], release["openflamingo"], release["lora"],
                                                  release["vision"], release["vision_weights"]).model,
                                 "cpu", torch.bfloat16, None, 128)
    assert weights < bf16 if mode != "none" else weights == bf16
    assert bf16 > 200e6         # large enough for the margin to be measured
    # The chosen form's bytes and the margin the issue allows loading bf16 (0.3 of its bytes): never a full bf16
    # copy beside the quantized one.
    assert peak - base < weights + 0.3 * bf16, ((peak - base) / weights, (peak - base) / bf16)


def test_the_memory_check_refuses_before_reading_a_weight(release, tmp_path, monkeypatch, capsys):
    args = flags(release)
    p = checkpoints.plan(release["llama"], release["openflamingo"], release["lora"], release["vision"],
                         release["vision_weights"])
    slot = options.slot_bytes(p.cfg, p.cfg.max_seq_len, torch.float32)

    def need(mode):
        w = options.weights_bytes(p.model, "cpu", torch.float32, mode, 128)
        return w + slot + options.margin_of(w)

    # Room for int8, not for fp32 (the small model's default on a CPU); the shards are garbage: nothing is read.
    broken = tmp_path / "llama"
    broken.mkdir()
    for name in os.listdir(release["llama"]):
        data = open(os.path.join(release["llama"], name), "rb").read()
        (broken / name).write_bytes(b"\0" * len(data) if name.endswith(".bin") else data)
    args.llama = str(broken)
    budget = (need("int8") + need(None)) // 2
    monkeypatch.setattr(options, "available_bytes", lambda device: budget)
    args.memory_fraction = 1.0
    with pytest.raises(SystemExit) as e:
        options.load_model(args, "cpu")
    msg, gib = str(e.value), options.GiB
    assert f"needs {need(None) / gib:.1f} GiB" in msg and f"{budget / gib:.1f} GiB is available" in msg \
        and f"Fits: --int8 ({need('int8') / gib:.1f} GiB), --int4 ({need('int4') / gib:.1f} GiB)." in msg
    assert "dtype fp32 (the default on a CPU for a small model" in capsys.readouterr().err
    # A budget nothing fits in says so; with room, the same broken files are read and named.
    args.memory_fraction = 1e-3
    with pytest.raises(SystemExit, match=r"Nothing fits: --int8 needs .* GiB, --int4 needs .* GiB"):
        options.load_model(args, "cpu")
    args.memory_fraction = 1.0
    monkeypatch.setattr(options, "available_bytes", lambda device: 10 * need(None))
    with pytest.raises(SystemExit, match=r"pytorch_model-00001-of-000\d\d\.bin: (not a readable|cannot be read)"):
        options.load_model(args, "cpu")


def test_the_cache_is_sized_to_the_memory_left(release, capsys):
    model, _, _, memory = options.load_model(flags(release, "--dtype", "bf16"), "cpu")
    one = options.slot_bytes(model.cfg, model.cfg.max_seq_len, torch.bfloat16)
    engine_cache = mmgpt.KVCache(model.cfg, 3, model.cfg.max_seq_len, options.PICTURES, torch.bfloat16, "cpu")
    assert sum(b.nbytes for b in engine_cache.buffers()) == 3 * one     # what the engine allocates
    fitting = options.Memory(memory.weights + memory.margin + int(3.5 * one), memory.weights, memory.margin)
    assert options.cache_slots(model, fitting, 16, "--slots") == (3, model.cfg.max_seq_len)
    printed = f"cache: 3 slots x {model.cfg.max_seq_len} tokens ({3 * one / options.GiB:.2f} GiB): 16 asked (--slots)"
    assert printed + ", 3 fit" in capsys.readouterr().err
    assert options.cache_slots(model, fitting, 2) == (2, model.cfg.max_seq_len)
    tight = options.Memory(memory.weights + memory.margin + one // 2, memory.weights, memory.margin)
    with pytest.raises(SystemExit, match=f"not even one {model.cfg.max_seq_len}-token cache slot"):
        options.cache_slots(model, tight, 1)


def test_default_dtype_follows_the_size():
    args = argparse.Namespace(dtype=None)
    seven_b = sum(t.numel() for t in mmgpt.build(mmgpt.config("7b"), "meta").parameters())
    assert options.dtype_of(args, "cpu", seven_b)[0] == torch.bfloat16
    assert options.dtype_of(args, "cpu", 30_000_000)[0] == torch.float32
    assert options.dtype_of(args, "cuda", 30_000_000)[0] == torch.bfloat16
    args.dtype = "fp16"
    assert options.dtype_of(args, "cpu", seven_b) == (torch.float16, "dtype fp16 (--dtype)")
