"""Speed and memory of fine-tuning and chat at OpenFlamingo-9B shapes, with random weights.

    python bench.py                      # one GPU: LLaMA-7B + ViT-L/14 + 8 cross-attention blocks, LoRA r=16, bf16
    python bench.py --tiny               # the same code on a tiny model on the CPU, in seconds (CI runs this)
    python bench.py --json out.json

train: one iteration = V vision-language samples + V language samples of --seq tokens (forward + backward,
LoRA trainable), for each micro-batch layout and option (activation checkpointing, torch.compile).
chat: chat.py's path, eager and fast (LoRA merged, compiled, CUDA graphs): prefill of a picture + 96-token prompt,
decoding 128 tokens at batch 1, a second round's first token, the fraction of the weight-read limit (weight bytes
per token against a device copy's bandwidth measured in the same run); generate_batch decoding at batch 8 and 32.

FLOPs counted per iteration (for MFU): frozen weights 4N per token (forward 2N + activation gradient 2N, no
weight gradient), LoRA 6 per parameter per token, causal attention (QK^T and AV: 2 * 2 * T * d / 2 per token
and layer forward, x3 with backward), cross-attention against 64 latents likewise (not causal), the ViT and
perceiver forward (no backward: nothing upstream is trained).
"""
import argparse
import json
import time
from contextlib import nullcontext

import torch

import chat
import checkpoints
import lora
import mmgpt

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, datasheet


def config(tiny: bool) -> mmgpt.Config:
    if not tiny:
        return mmgpt.Config()  # LLaMA-7B, ViT-L/14 (quick GELU), cross-attention before layers 3, 7, ..., 31
    vision = {"embed_dim": 32, "quick_gelu": True, "vision_cfg": {"image_size": 28, "layers": 2, "width": 64,
                                                                  "patch_size": 14}}
    return mmgpt.Config(vocab_size=512, image_id=509, dim=128, n_layers=4, n_heads=4, hidden_dim=256,
                        max_seq_len=1024, perceiver_depth=2, perceiver_latents=8, vision=vision)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat: int, warmup: int = 2) -> float:
    """Median seconds of fn() after warmup."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def count(params) -> int:
    return sum(p.numel() for p in params)


def train_flops(model: mmgpt.MMGPT, seq: int, n_vl: int, n_lang: int) -> float:
    cfg = model.cfg
    named = dict(model.named_parameters())
    lora_n = count(p for n, p in named.items() if ".lora_" in n)
    xattn_n = count(p for n, p in named.items() if ".xattn." in n and ".lora_" not in n)
    llama_n = count(p for n, p in named.items() if checkpoints.is_llama_param(n) and n != "embed_tokens.weight")
    vit_n = count(model.vision.parameters())
    perceiver_n = count(model.perceiver.parameters())
    patches = (cfg.vision["vision_cfg"]["image_size"] // cfg.vision["vision_cfg"]["patch_size"]) ** 2 + 1
    tokens_vl, tokens_lang = n_vl * seq, n_lang * seq
    attn = 3 * 2 * 2 * seq * cfg.dim / 2 * cfg.n_layers                       # per token, causal, fwd + bwd
    xattn = 3 * 2 * 2 * cfg.perceiver_latents * cfg.xattn_heads * cfg.xattn_dim_head * len(cfg.xattn_layers)
    flops = (tokens_vl + tokens_lang) * (4 * llama_n + attn) + (tokens_vl + tokens_lang) * 6 * lora_n
    flops += tokens_vl * (4 * xattn_n + xattn)
    flops += n_vl * (2 * vit_n * patches + 2 * perceiver_n * (patches + cfg.perceiver_latents))
    return flops


def bench_train(model, cfg, device, seq, n_vl, n_lang, checkpointing, compiled, repeat):
    model.train()
    model.grad_checkpointing = checkpointing
    size = cfg.vision["vision_cfg"]["image_size"]
    g = torch.Generator(device="cpu").manual_seed(0)
    vl_ids = torch.randint(0, cfg.image_id - 2, (n_vl, seq), generator=g).to(device)
    vl_ids[:, 20] = cfg.image_id  # the picture early in the prompt, as in the template
    lang_ids = torch.randint(0, cfg.image_id - 2, (n_lang, seq), generator=g).to(device)
    images = torch.randn(n_vl, 1, 3, size, size, generator=g).to(device)
    if compiled:  # compile each decoder layer (the ViT and the perceiver run once per picture)
        for layer in model.layers:
            layer.forward = torch.compile(layer.forward)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        for imgs, ids in ((None, lang_ids), (images, vl_ids)):  # the language sample first, as train.py does
            with autocast:
                loss = mmgpt.lm_loss(model(imgs, ids), ids)
            loss.backward()

    reset_peak(device)
    seconds = timed(step, device, repeat)
    model.zero_grad(set_to_none=True)
    if compiled:
        for layer in model.layers:
            del layer.forward  # back to the class's method
    return seconds, peak_gib(device)


def copy_bandwidth(device) -> float | None:
    """Bytes per second of a big device-to-device copy (read + write), measured now: the decode step's limit."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeat=10)
    del src, dst
    return 2 * 2**30 / seconds


def bench_chat(model, cfg, device, fast: bool, prompt_len=96, new_tokens=128, question_len=20) -> dict:
    """chat.py's own path (chat.make_fast, mmgpt.generate on a cache of the model's whole context), timed: the
    prefill of a picture + prompt_len tokens, decoding new_tokens at batch 1, and a second round's first token."""
    model.eval()
    size = cfg.vision["vision_cfg"]["image_size"]
    prompt = [1] + [100] * 10 + [cfg.image_id] + [200 + i % 50 for i in range(prompt_len - 12)]
    question = [300 + i for i in range(question_len)]
    image = torch.randn(1, 1, 3, size, size, device=device, dtype=model.embed_tokens.weight.dtype)
    row = {"fast": fast}
    if fast:
        t0 = time.perf_counter()
        chat.make_fast(model)
        cache = model.new_cache()
        list(mmgpt.generate(model, cache, prompt, image, max_new_tokens=4, eos_id=-1, banned=[], greedy=True))
        list(mmgpt.generate(model, cache, question, max_new_tokens=2, eos_id=-1, banned=[], greedy=True))
        sync(device)
        row["warmup_s"] = time.perf_counter() - t0
    cache = model.new_cache()
    reset_peak(device)

    def prefill():
        cache.reset()
        model.extend(cache, prompt, image)

    row["prefill_ms"] = timed(prefill, device, repeat=5) * 1e3

    def decode():  # seconds per token after the first (the first comes with the prefill)
        cache.reset()
        tokens = mmgpt.generate(model, cache, prompt, image, max_new_tokens=new_tokens, eos_id=-1, banned=[],
                                greedy=True)
        next(tokens)
        t0 = time.perf_counter()
        n = sum(1 for _ in tokens)
        return (time.perf_counter() - t0) / n

    row["decode_tokens_per_s"] = 1 / sorted(decode() for _ in range(3))[1]

    def second_round():  # the time to the first token of a question asked after an answer (the cache kept)
        cache.reset()
        list(mmgpt.generate(model, cache, prompt, image, max_new_tokens=16, eos_id=-1, banned=[], greedy=True))
        sync(device)
        t0 = time.perf_counter()
        next(mmgpt.generate(model, cache, question, max_new_tokens=1, eos_id=-1, banned=[], greedy=True))
        return time.perf_counter() - t0

    row["second_round_first_token_ms"] = sorted(second_round() for _ in range(3))[1] * 1e3
    row["peak_gib"] = peak_gib(device)
    return row


def bench_batch(model, cfg, device, batch: int, prompt_len=96, new_tokens=128) -> dict:
    """mmgpt.generate_batch (what eval.py runs): decode tokens/s over the batch, the prefill subtracted."""
    size = cfg.vision["vision_cfg"]["image_size"]
    prompts = [[1] + [100 + b] * 10 + [cfg.image_id] + [200 + (i + b) % 50 for i in range(prompt_len - 12)]
               for b in range(batch)]
    images = [torch.randn(1, 3, size, size, device=device, dtype=model.embed_tokens.weight.dtype)] * batch
    reset_peak(device)

    def run(n):
        return lambda: mmgpt.generate_batch(model, prompts, images, max_new_tokens=n, eos_id=-1, banned=[])

    seconds = timed(run(new_tokens), device, repeat=3, warmup=1) - timed(run(1), device, repeat=3, warmup=1)
    return {"batch": batch, "decode_tokens_per_s": batch * (new_tokens - 1) / seconds, "peak_gib": peak_gib(device)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (seconds)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default 512; tiny: 64)")
    ap.add_argument("--layouts", default="1,4", help="samples per kind per micro-step to try, e.g. 1,2,4")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--long", type=int, default=2048, help="also train at this length with checkpointing (0: no)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--chat-only", action="store_true", help="skip the training figures")
    ap.add_argument("--batches", default="8,32", help="generate_batch sizes to time (fast path; empty: none)")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq = args.seq or (64 if args.tiny else 512)
    repeat = 3 if args.tiny else 5
    cfg = config(args.tiny)
    torch.manual_seed(0)
    model = mmgpt.build(cfg, device, dtype)      # made directly on the device in bf16: no fp32 copy
    lora.inject(model, r=16, alpha=16, within="layers.")
    model.requires_grad_(False)
    for n, p in model.named_parameters():
        if ".lora_" in n:
            p.requires_grad_(True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    n_params = count(model.parameters())
    n_lora = count(p for p in model.parameters() if p.requires_grad)
    print(f"device {name}; {n_params / 1e9:.3f} B parameters, {n_lora / 1e6:.2f} M trainable (LoRA r=16)")

    results = {"device": name, "params": n_params, "trainable": n_lora, "train": [], "chat": [], "batch": []}
    variants = [(False, False), (True, False)] + ([] if args.no_compile else [(False, True)])
    runs = [(seq, int(v), ck, co) for v in args.layouts.split(",") for ck, co in variants]
    if args.long and not args.tiny:
        runs.append((args.long, 1, True, False))
    for s, v, ckpt, comp in ([] if args.chat_only else runs):
        try:
            seconds, peak = bench_train(model, cfg, device, s, v, v, ckpt, comp, repeat)
        except torch.OutOfMemoryError:
            print(f"train seq {s} {v}+{v} ckpt={ckpt} compile={comp}: out of memory")
            torch.cuda.empty_cache()
            continue
        tokens = 2 * v * s
        flops = train_flops(model, s, v, v)
        row = {"seq": s, "layout": f"{v}+{v}", "checkpointing": ckpt, "compile": comp, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
               "mfu": flops / seconds / 1e12 / peak_tflops if peak_tflops else None, "peak_gib": peak}
        results["train"].append(row)
    # Bytes read per decoded token: every LLaMA weight, and the cross-attention FFWs (the to_q/to_out too; the
    # picture's keys/values are cached).
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if (checkpoints.is_llama_param(n) and n != "embed_tokens.weight") or ".xattn." in n)
    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_gb_s"] = bandwidth and bandwidth / 1e9
    for fast in [False] + ([] if args.no_compile else [True]):
        row = bench_chat(model, cfg, device, fast)
        row["weights_gb_per_token"] = weight_bytes / 1e9
        row["bandwidth_fraction"] = weight_bytes * row["decode_tokens_per_s"] / bandwidth if bandwidth else None
        results["chat"].append(row)
        print(f"chat {row}", flush=True)
    for batch in ([] if args.no_compile else [int(b) for b in args.batches.split(",") if b]):
        results["batch"].append(bench_batch(model, cfg, device, batch))
        print(f"batch {results['batch'][-1]}", flush=True)

    def fmt(x, spec):
        return "-" if x is None else format(x, spec)

    if results["train"]:
        print(f"\n{'train':<8}{'seq':>6}{'layout':>8}{'ckpt':>6}{'compile':>8}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}"
              f"{'peak GiB':>10}")
        for r in results["train"]:
            print(f"{'':<8}{r['seq']:>6}{r['layout']:>8}{str(r['checkpointing']):>6}{str(r['compile']):>8}"
                  f"{r['tokens_per_s']:>10,.0f}{r['tflops']:>9.1f}{fmt(r['mfu'], '.1%'):>7}{fmt(r['peak_gib'], '.1f'):>10}")
    print(f"\n{'chat':<8}{'fast':>6}{'prefill ms':>12}{'decode tok/s':>14}{'2nd round ms':>14}{'of limit':>10}"
          f"{'peak GiB':>10}{'warm-up s':>11}   (copy bandwidth {fmt(results['copy_bandwidth_gb_s'], ',.0f')} GB/s)")
    for r in results["chat"]:
        print(f"{'':<8}{str(r['fast']):>6}{r['prefill_ms']:>12.1f}{r['decode_tokens_per_s']:>14.1f}"
              f"{r['second_round_first_token_ms']:>14.1f}{fmt(r['bandwidth_fraction'], '.0%'):>10}"
              f"{fmt(r['peak_gib'], '.1f'):>10}{fmt(r.get('warmup_s'), '.0f'):>11}")
    for r in results["batch"]:
        print(f"{'batch':<8}{r['batch']:>6}{'':>12}{r['decode_tokens_per_s']:>14.1f}{'':>24}"
              f"{fmt(r['peak_gib'], '.1f'):>10}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
