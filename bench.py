"""Speed and memory of fine-tuning and chat at OpenFlamingo-9B shapes, with random weights.

    python bench.py                      # one GPU: LLaMA-7B + ViT-L/14 + 8 cross-attention blocks, LoRA r=16, bf16
    python bench.py --tiny               # the "bench-tiny" preset (32 layers, small widths) on the CPU, in seconds
    python bench.py --train-only --cuda-graphs --json out.json
    python bench.py --serve runs/demo    # serve.py's server on the demo model, 1/4/16/32 clients that stream
    python bench.py --release /work/release   # the release on a CPU: files written by fake_release.py, fp16/bf16/int8/int4

train: one iteration is what train.py runs for one optimizer step (train.train_iteration + train.optimizer_step,
the same functions) with one micro-batch pair: V language-only then V vision-language samples of --seq tokens,
the second half of each labelled (the answers), LoRA r=16 trainable. Rows: the paper's layout (1+1 x 512) on
the slow path (fp32 LoRA under autocast, eager) and on the fast path (bf16 + fp32 masters, compiled layers;
--cuda-graphs: also with CUDA graphs), the larger layouts of --layouts, and --long tokens with activation
checkpointing. Each row reports tokens/s, MFU against a bf16 matmul peak measured in the same run, peak memory,
the warm-up (compile) time, and on a GPU the kernels launched per iteration and the fraction of the step the GPU
is busy (torch.profiler). --tiny also counts the aten ops one iteration dispatches (a proxy for launches).
chat: the aten ops one decode step dispatches at batch 1 (eager; LoRA unmerged, then merged); chat.py's path (the
engine with one slot), eager, fast (LoRA merged, compiled, CUDA graphs) and --int8 (quantize.py): prefill of a
picture + 96-token prompt, decoding 128 tokens at batch 1, a second round's first token (its prefix reused), the
fraction of the weight-read limit (weight bytes per token against a device copy's bandwidth measured in the same
run); the engine decoding 1, 4, 16 and 32 requests at once (--concurrency): tokens/s in all and per request.

FLOPs counted per iteration (for MFU): frozen weights 4N per token (forward 2N + activation gradient 2N, no
weight gradient; lm_head only where a label is), LoRA 6 per parameter per token, causal attention (QK^T and AV:
2 * 2 * T * d / 2 per token and layer forward, x3 with backward), cross-attention against 64 latents likewise
(not causal), the ViT and perceiver forward (no backward: nothing upstream is trained).
"""
import argparse
import base64
import glob
import http.client
import json
import math
import os
import subprocess
import sys
import threading
import time
from contextlib import nullcontext

import torch
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import checkpoints
import fake_release
import lora
import mmgpt
import options
import quantize
import train
from engine import Engine, Request, Sampling

LABELLED = 0.5  # the fraction of tokens with a label (the answers) in the benchmark's samples


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


def train_flops(model: mmgpt.MMGPT, seq: int, n_vl: int, n_lang: int, labelled: float = LABELLED) -> float:
    cfg = model.cfg
    named = dict(model.named_parameters())
    lora_n = count(p for n, p in named.items() if ".lora_" in n)
    xattn_n = count(p for n, p in named.items() if ".xattn." in n and ".lora_" not in n)
    llama_n = count(p for n, p in named.items() if checkpoints.is_llama_param(n)
                    and n not in ("embed_tokens.weight", "lm_head.weight"))
    head_n = model.lm_head.weight.numel()
    vit_n = count(model.vision.parameters())
    perceiver_n = count(model.perceiver.parameters())
    patches = (cfg.vision["vision_cfg"]["image_size"] // cfg.vision["vision_cfg"]["patch_size"]) ** 2 + 1
    tokens_vl, tokens_lang = n_vl * seq, n_lang * seq
    attn = 3 * 2 * 2 * seq * cfg.dim / 2 * cfg.n_layers                       # per token, causal, fwd + bwd
    xattn = 3 * 2 * 2 * cfg.perceiver_latents * cfg.xattn_heads * cfg.xattn_dim_head * len(cfg.xattn_layers)
    flops = (tokens_vl + tokens_lang) * (4 * llama_n + attn) + (tokens_vl + tokens_lang) * 6 * lora_n
    flops += (tokens_vl + tokens_lang) * labelled * 4 * head_n   # logits only where a label is
    flops += tokens_vl * (4 * xattn_n + xattn)
    flops += n_vl * (2 * vit_n * patches + 2 * perceiver_n * (patches + cfg.perceiver_latents))
    return flops


def batches(cfg, n: int, seq: int):
    """One micro-batch pair (language-only, vision-language) as the loader makes it: the picture early in the
    prompt, as in the template, and labels on the last LABELLED of each sample (the answers)."""
    size = cfg.vision["vision_cfg"]["image_size"]
    g = torch.Generator().manual_seed(0)
    pair = []
    for kind in ("lang", "vl"):
        ids = torch.randint(3, cfg.image_id - 2, (n, seq), generator=g)
        if kind == "vl":
            ids[:, 20] = cfg.image_id
        labels = ids.clone()
        labels[:, :int(seq * (1 - LABELLED))] = -100
        pair.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                     "images": torch.randn(n, 1, 3, size, size, generator=g) if kind == "vl" else None})
    return [tuple(pair)]


def matmul_peak(device) -> float:
    """TFLOP/s of a large matmul in the training dtype on this device (the MFU denominator)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timed(lambda: a @ b, device, repeat=10, warmup=3) / 1e12


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched (what an eager GPU run launches kernels for)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def gpu_profile(fn) -> tuple[int, float]:
    """Kernels launched by fn() and the microseconds the GPU was busy (union of kernel intervals)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for a, b in kernels:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    return len(kernels), busy


def iteration_fn(model, device, micro_batches, fast: bool, seq: int):
    """One training iteration exactly as train.py runs it (slow or fast path); returns the callable."""
    train.set_trained_dtype(model, model.lm_head.weight.dtype if fast else torch.float32)
    optimizer = train.MasterAdamW([{"params": {n: p for n, p in model.named_parameters() if p.requires_grad}}],
                                  lr=1e-5, copies=fast)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and not fast else nullcontext()
    step_fn = train.WithLoss(model)

    def iteration():
        train.train_iteration(step_fn, micro_batches, device, autocast, 128 if fast else 0, seq)
        train.optimizer_step(optimizer, scheduler)
    return iteration


def bench_train(model, device, seq, n, checkpointing, fast, repeat, peak_tflops, cuda_graphs=False,
                count_ops=False) -> dict:
    model.train()
    model.grad_checkpointing = checkpointing
    micro_batches = batches(model.cfg, n, seq)
    iteration = iteration_fn(model, device, micro_batches, fast, seq)
    reset_peak(device)
    t0 = time.perf_counter()
    iteration()  # compiles on the fast path (a new length or layout may recompile)
    sync(device)
    warmup_s = time.perf_counter() - t0
    seconds = timed(iteration, device, repeat)
    tokens = 2 * n * seq
    flops = train_flops(model, seq, n, n)
    row = {"seq": seq, "layout": f"{n}+{n}", "checkpointing": checkpointing, "fast": fast,
           "cuda_graphs": cuda_graphs, "seconds": seconds, "warmup_s": warmup_s,
           "tokens_per_s": tokens / seconds, "tflops": flops / seconds / 1e12,
           "mfu": flops / seconds / 1e12 / peak_tflops, "peak_gib": peak_gib(device), "kernels": None,
           "gpu_busy": None, "aten_ops": None}
    if device.type == "cuda":
        kernels, busy_us = gpu_profile(iteration)
        row.update(kernels=kernels, gpu_busy=busy_us / 1e6 / seconds)
    if count_ops:
        with OpCounter() as counter:
            iteration()
        row["aten_ops"] = counter.ops
    model.zero_grad(set_to_none=True)
    return row


def copy_bandwidth(device) -> float | None:
    """Bytes per second of a big device-to-device copy (read + write), measured now: the decode step's limit."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, repeat=10)
    return 2 * 2**30 / seconds


def decode_bytes(model) -> int:
    """The bytes of weights one decoded token reads: the decoder's (LLaMA's and the cross-attention blocks'; the
    picture's keys/values are cached) and lm_head's, as they are held (int8 + scales after quantize.quantize; a
    merged LoRA layer reads its weight, not its factors)."""
    merged = {f"{n}.{f}" for n, m in model.named_modules() if isinstance(m, lora.LoRALinear) and m.merged
              for f in ("lora_A", "lora_B")}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return packed_bytes(model) + sum(t.numel() * t.element_size() for n, t in tensors
                                     if n.startswith(("layers.", "norm.", "lm_head.")) and not n.endswith(".mask")
                                     and n not in merged)


def packed_bytes(model) -> int:
    """The bytes of the weights fbgemm holds packed (quantize.Fp16Linear: fp16), which are no tensor of the model."""
    return sum(2 * m.out_features * m.in_features for m in model.modules() if isinstance(m, quantize.Fp16Linear))


class Tokenizer:
    """What the engine needs of a tokenizer, for random weights: no EOS (every answer runs to its limit), nothing
    banned, and a decode of about a real one's cost (a character per id)."""
    eos_id, never_generate = -1, []

    def decode(self, ids) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def requests(cfg, device, n: int, prompt_len: int, new_tokens: int, dtype) -> list[Request]:
    """n greedy requests of a picture + prompt_len tokens, each with a picture of its own (no prefix reuse)."""
    size = cfg.vision["vision_cfg"]["image_size"]
    return [Request([1] + [100 + b % 50] * 10 + [cfg.image_id] + [200 + (i + b) % 50 for i in range(prompt_len - 12)],
                    [torch.randn(3, size, size, device=device, dtype=dtype)], new_tokens, Sampling(greedy=True))
            for b in range(n)]


def decode_rate(engine: Engine, batch: list[Request], device) -> float:
    """Tokens per second over the batch once every request has its first token (the prefills excluded)."""
    for r in batch:
        engine.submit(r)
    while any(not r.tokens for r in batch):
        engine.step()
    sync(device)
    t0, n0 = time.perf_counter(), sum(len(r.tokens) for r in batch)
    while engine.busy:
        engine.step()
    sync(device)
    return (sum(len(r.tokens) for r in batch) - n0) / (time.perf_counter() - t0)


def ops_per_token(model, device, steps: int = 10) -> float:
    """aten ops one eager decode step of a one-slot engine (chat.py's) dispatches."""
    engine = Engine(model, Tokenizer(), slots=1)
    (r,) = [engine.submit(r) for r in requests(model.cfg, device, 1, 96, steps + 4, model.lm_head.weight.dtype)]
    engine.step()
    engine.step()
    with OpCounter() as counter:
        for _ in range(steps):
            engine.step()
    assert len(r.tokens) == steps + 2     # the first step prefills (the first token), each later one decodes one
    return counter.ops / steps


def bench_chat(model, device, fast: bool, prompt_len=96, new_tokens=128, question_len=20) -> dict:
    """chat.py's path (an engine of one slot, as chat.py makes it), timed: the prefill of a picture + prompt_len
    tokens to its first token, decoding new_tokens at batch 1, and a second round's first token (the slot keeps
    the first round: only the question is fed)."""
    model.eval()
    dtype = model.lm_head.weight.dtype if not hasattr(model.lm_head, "scales") else model.lm_head.scales.dtype
    row = {"fast": fast}
    t0 = time.perf_counter()
    engine = Engine(model, Tokenizer(), slots=1, fast=fast)
    if fast:
        engine.generate(requests(model.cfg, device, 2, prompt_len, 4, dtype))   # compiles
        sync(device)
        row["warmup_s"] = time.perf_counter() - t0
    reset_peak(device)
    row["prefill_ms"] = timed(lambda: engine.generate(requests(model.cfg, device, 1, prompt_len, 1, dtype)), device,
                              repeat=5) * 1e3
    row["decode_tokens_per_s"] = sorted(decode_rate(engine, requests(model.cfg, device, 1, prompt_len, new_tokens,
                                                                     dtype), device) for _ in range(3))[1]

    def second_round():
        (first,) = engine.generate(requests(model.cfg, device, 1, prompt_len, 16, dtype))
        again = Request(first.ids + first.tokens + [300 + i for i in range(question_len)], first.pictures, 1,
                        Sampling(greedy=True))
        sync(device)
        t0 = time.perf_counter()
        engine.generate([again])
        sync(device)
        assert again.cached == prompt_len + 15
        return time.perf_counter() - t0

    row["second_round_first_token_ms"] = sorted(second_round() for _ in range(3))[1] * 1e3
    row["peak_gib"] = peak_gib(device)
    return row


def bench_engine(model, device, concurrency: int, fast: bool, prompt_len=96, new_tokens=128) -> dict:
    """The engine with `concurrency` slots decoding as many requests at once: tokens/s over all of them and per
    request, the prefills excluded."""
    engine = Engine(model, Tokenizer(), slots=concurrency, fast=fast)
    dtype = model.lm_head.weight.dtype if not hasattr(model.lm_head, "scales") else model.lm_head.scales.dtype
    if fast:
        engine.generate(requests(model.cfg, device, concurrency, prompt_len, 4, dtype))   # compiles
    reset_peak(device)
    rate = sorted(decode_rate(engine, requests(model.cfg, device, concurrency, prompt_len, new_tokens, dtype), device)
                  for _ in range(5))[2]    # the median of five (a shared machine is noisy)
    return {"concurrency": concurrency, "fast": fast, "decode_tokens_per_s": rate,
            "per_request_tokens_per_s": rate / concurrency, "peak_gib": peak_gib(device)}


# ----------------------------------------------------------------------------------------------------------------
# Serving (--serve RUN): serve.py's server in this process, clients that stream over HTTP on 127.0.0.1

def stream(port: int, body: dict) -> dict:
    """One streamed chat completion as a client sees it: when it was sent, when each piece of text came, the
    answer and its tokens (the usage chunk)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body | {"stream": True, "stream_options": {
        "include_usage": True}}), {"Content-Type": "application/json"})
    response, times, text, tokens = conn.getresponse(), [], "", 0
    assert response.status == 200, response.read()
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        chunk = json.loads(line[6:])
        tokens = chunk["usage"]["completion_tokens"] if chunk.get("usage") else tokens
        for c in chunk["choices"]:
            if c["delta"].get("content"):
                times.append(time.perf_counter())
                text += c["delta"]["content"]
    conn.close()
    return {"sent": sent, "times": times, "text": text, "tokens": tokens}


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99, nearest rank."""
    v = sorted(values)
    return v[(len(v) - 1) // 2], v[min(len(v) - 1, math.ceil(0.99 * len(v)) - 1)]


def latency_row(name: str, answers: list[dict], seconds: float) -> dict:
    """tokens/s over all answers and per client, p50/p99 of the time to the first text and between pieces."""
    ttft = [a["times"][0] - a["sent"] for a in answers]
    itl = [b - a for x in answers for a, b in zip(x["times"], x["times"][1:])]
    tokens = sum(a["tokens"] for a in answers)
    return {"clients": name, "tokens_per_s": tokens / seconds, "ttft_ms": [t * 1e3 for t in percentiles(ttft)],
            "itl_ms": [t * 1e3 for t in percentiles(itl)], "answers": len(answers)}


def wave(port: int, bodies: list[list[dict]]) -> tuple[list[list[dict]], float]:
    """In the clients' process: a thread per client, each streaming its bodies one after the other; the answers
    and the seconds they all took."""
    answers = [[] for _ in bodies]
    threads = [threading.Thread(target=lambda k=k: answers[k].extend(stream(port, b) for b in bodies[k]))
               for k in range(len(bodies))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - t0


def resend(port: int, bodies: list[dict], questions: list[str]) -> list[tuple[dict, dict, dict]]:
    """In the clients' process: each conversation's first round, then the whole conversation sent again with one
    more turn (as a stateless API is used); for each, the two answers and the second round's body."""
    rounds = []
    for body, question in zip(bodies, questions):
        one = stream(port, body)
        again = body | {"messages": body["messages"] + [{"role": "assistant", "content": one["text"]},
                                                        {"role": "user", "content": question}]}
        rounds.append((one, stream(port, again), again))
    return rounds


def bench_serving(run: str, device, concurrencies: list[int], results: dict, new_tokens: int = 64,
                  fast: bool | None = None):
    """The demo model (a train.py run) served as serve.py serves it to 1, 4, 16, 32 streaming clients at once
    (clients in a process of their own, as they would be; each run on a server that has cached nothing), each asking
    about the demo's pictures (answers run to new_tokens: </s> is banned, as the demo's own answers are a word or
    two); chat.py's way (one Chat, the same questions one after the other); a conversation's second round re-sent
    whole against its first and against a server that has cached nothing (answers as the demo gives them, ended by
    </s>); and what OpenAI's options cost: logprobs with the top 5 at the largest concurrency, n = 4 against n = 1.
    This times; the answers are checked by tests/test_bench.py on the same clients. fast: the engines' fast path
    (default: on a GPU, as chat.py and serve.py decide); then each run counts once it compiles nothing."""
    import multiprocessing

    import chat
    import demo
    import serve
    flags = argparse.ArgumentParser()
    options.add_weight_args(flags)
    model, tokenizer, transform, _ = options.load_model(flags.parse_args(["--ckpt", run]), str(device))  # as serve.py
    pictures = sorted(glob.glob(os.path.join(run, "samples", "*.png")))
    if not pictures:
        raise SystemExit(f"{run}/samples/: no pictures (a train.py demo run writes them)")
    questions = [q for qs in demo.QUESTIONS.values() for q in qs]
    no_end = dict(eos_id=-1, banned=[*tokenizer.never_generate, tokenizer.eos_id])
    fast = device.type == "cuda" if fast is None else fast

    def ask(i: int) -> dict:
        """chat.py's way: its Chat on a fresh conversation, the question's answer as a client sees it."""
        picture, question = serving_case(i, pictures, questions)
        c = chat.Chat(Engine(model, tokenizer, fast=fast, **no_end), transform, new_tokens, Sampling(greedy=True))
        c.add_picture(pictures[picture])
        a = {"sent": time.perf_counter(), "times": [], "text": ""}

        def on_text(text):
            if text:
                a["times"].append(time.perf_counter())
                a["text"] += text
        a["tokens"] = len(c.ask(questions[question], on_text))
        return a

    def compiling(fn):
        """fn()'s result, and whether it compiled anything."""
        graphs = counters["stats"]["unique_graphs"]
        result = fn()
        return result, counters["stats"]["unique_graphs"] != graphs

    def without_compiling(run):
        """run() -> (result, compiled); on the fast path again while it compiled (at most 5 times), and the run that
        did not is the one that counts: which shapes a run takes depends on how its requests happen to be batched,
        and a compile takes seconds. Compiled code is shared by every engine, what a slot caches is not."""
        for _ in range(5 if fast else 1):
            result, compiled = run()
            if not compiled:
                break
        return result

    def chat_py() -> tuple[list[dict], float]:
        t0 = time.perf_counter()
        return [ask(i) for i in range(8)], time.perf_counter() - t0

    def row(name: str, answers, seconds: float) -> dict:
        results["serve"].append(latency_row(name, answers, seconds))
        print(f"serve {results['serve'][-1]}", flush=True)
        return results["serve"][-1]

    body = lambda i, **extra: serving_body(i, pictures, questions, new_tokens) | extra
    # chat.py's way, as chat.py runs (every core): the questions one after the other
    row("chat.py", *without_compiling(lambda: compiling(chat_py)))
    if device.type == "cpu":
        torch.set_num_threads(serve.cpu_threads())      # as serve.py runs
    slots = max(concurrencies + [4])
    with multiprocessing.get_context("spawn").Pool(1) as clients:
        def on_a_fresh_server(slots: int, options: dict, job, *args):
            """A job of the clients' process against a server that has cached nothing (on the fast path it compiles
            its steps before it listens: that is not the job's)."""
            def run():
                server = serve.start(Engine(model, tokenizer, slots=slots, fast=fast, **options), transform, quiet=True)
                try:
                    return compiling(lambda: clients.apply(job, (server.server_address[1], *args)))
                finally:
                    serve.stop(server, grace=0)
            return without_compiling(run)

        def clients_at_once(c: int, **extra) -> tuple[list[dict], float]:
            """c clients streaming at once, 8 questions in all (at least 2 each)"""
            per_client = max(2, 8 // c)
            answers, seconds = on_a_fresh_server(slots, no_end, wave, [
                [body(k * per_client + j, **extra) for j in range(per_client)] for k in range(c)])
            return [a for x in answers for a in x], seconds

        for c in concurrencies:
            row(str(c), *clients_at_once(c))
        # What OpenAI's options cost: logprobs (the top 5) at the largest concurrency; n = 4 against n = 1 (one client,
        # sampled with a seed: the choices differ)
        c = max(concurrencies)
        results["logprobs"] = {"off": results["serve"][-1]["tokens_per_s"],
                               "top 5": row(f"{c}, logprobs", *clients_at_once(c, logprobs=True,
                                                                               top_logprobs=5))["tokens_per_s"]}
        results["n"] = {}
        for n in (1, 4):
            answers, seconds = clients_at_once(1, n=n, temperature=1.0, seed=0)
            results["n"][n] = {"tokens_per_s": row(f"1, n={n}", answers, seconds)["tokens_per_s"],
                               "seconds_per_request": seconds / len(answers)}
        rounds = on_a_fresh_server(4, {}, resend, [body(100 + i) for i in range(8)],
                                   [questions[(101 + i) % len(questions)] for i in range(8)])
        first, second, cold = [], [], []
        for one, two, again in rounds:      # each second round sent again to a server that has cached nothing
            (([a],), _) = on_a_fresh_server(1, {}, wave, [[again]])
            for times, x in ((first, one), (second, two), (cold, a)):
                times.append(x["times"][0] - x["sent"])
    results["resend_ttft_ms"] = {name: percentiles(t)[0] * 1e3 for name, t in
                                 (("first round", first), ("sent again", second), ("sent again, cold", cold))}
    print(f"\n{'clients':<15}{'tok/s':>9}{'per client':>12}{'TTFT p50':>10}{'p99 ms':>8}{'ITL p50':>9}{'p99 ms':>8}")
    for r in results["serve"]:
        n = 1 if r["clients"] == "chat.py" else int(r["clients"].split(",")[0])
        print(f"{r['clients']:<15}{r['tokens_per_s']:>9.1f}{r['tokens_per_s'] / n:>12.1f}{r['ttft_ms'][0]:>10.1f}"
              f"{r['ttft_ms'][1]:>8.1f}{r['itl_ms'][0]:>9.1f}{r['itl_ms'][1]:>8.1f}")
    t, lp, n = results["resend_ttft_ms"], results["logprobs"], results["n"]
    print(f"a conversation sent again with one more turn: time to first token {t['sent again']:.1f} ms (p50), "
          f"{t['sent again'] / t['first round']:.2f}x its first round's, {t['sent again'] / t['sent again, cold']:.2f}x "
          f"the same messages' on a server that has cached nothing")
    print(f"logprobs with the top 5: {lp['top 5'] / lp['off']:.2f}x the tokens/s without ({c} clients); n = 4: "
          f"{n[4]['seconds_per_request'] / n[1]['seconds_per_request']:.2f}x the time of n = 1 per request, "
          f"{n[4]['tokens_per_s'] / n[1]['tokens_per_s']:.2f}x its tokens/s")


def serving_case(i: int, pictures: list, questions: list) -> tuple[int, int]:
    """bench_serving's i-th question: (its picture, its question), every pair once before any comes again."""
    return i % len(pictures), i // len(pictures) % len(questions)


def serving_body(i: int, pictures: list[str], questions: list[str], new_tokens: int) -> dict:
    """bench_serving's i-th request: the picture (a data: URL) and the question of serving_case(i), greedy."""
    picture, question = serving_case(i, pictures, questions)
    url = "data:image/png;base64," + base64.b64encode(open(pictures[picture], "rb").read()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": questions[question]}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": new_tokens, "temperature": 0}


def bench_model(tiny: bool, device) -> mmgpt.MMGPT:
    """OpenFlamingo-9B's shapes (or the bench-tiny preset) with random weights and LoRA r=16 trainable, made on
    the device in its dtype (bf16 on a GPU): never an fp32 copy."""
    torch.manual_seed(0)
    model = mmgpt.build(mmgpt.config("bench-tiny" if tiny else "7b"), device,
                        options.train_dtype(device.type))
    lora.inject(model, r=16, alpha=16, within="layers.")
    lora.mark_trainable(model)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the bench-tiny preset on the CPU (seconds)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sample (default 512; tiny: 64)")
    ap.add_argument("--layouts", default="1,4", help="samples per kind per micro-batch to try on the fast path")
    ap.add_argument("--long", type=int, default=2048, help="also train at this length with checkpointing (0: no)")
    ap.add_argument("--cuda-graphs", action="store_true", help="also the training fast path with CUDA graphs")
    ap.add_argument("--concurrency", default="1,4,16,32", help="requests decoded at once by the engine (empty: none)")
    ap.add_argument("--train-only", action="store_true", help="skip chat")
    ap.add_argument("--chat-only", action="store_true", help="skip training")
    ap.add_argument("--serve", metavar="RUN", help="only serving: serve.py's server with this train.py run (the "
                                                   "demo: runs/demo), streaming clients at --concurrency")
    ap.add_argument("--release", metavar="DIR", help="only the release on this CPU: the files fake_release.py "
                                                      "wrote in DIR, loaded in each of --forms")
    ap.add_argument("--forms", default=("fp16," if quantize.fbgemm_fp16() else "") + "bf16,int8,int4",
                    help="with --release: fp16 (where fbgemm runs: the default), bf16, int8, int4")
    ap.add_argument("--group-size", type=int, default=128, help="with --release: int4's group size")
    ap.add_argument("--keep-converted", action="store_true", help="with --release: keep each form's converted file")
    ap.add_argument("--release-child", metavar="FORM", help=argparse.SUPPRESS)   # one form, in its own process
    ap.add_argument("--release-stage", choices=("files", "converted"), help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    if args.release:
        results = {"device": "cpu", "threads": torch.get_num_threads()}
        if args.release_child:
            results = release_child(args.release, args.release_child, args.group_size, args.release_stage)
        else:
            bench_release(args.release, args.forms.split(","), args.group_size, results, args.keep_converted)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    if args.serve:
        device = torch.device(options.device_of(args))
        results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "serve": []}
        bench_serving(args.serve, device, concurrencies, results)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    cuda = device.type == "cuda"
    seq = args.seq or (64 if args.tiny else 512)
    repeat = 3 if args.tiny else 5
    model = bench_model(args.tiny, device)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak_tflops = matmul_peak(device)
    n_params = count(model.parameters())
    n_lora = count(p for p in model.parameters() if p.requires_grad)
    print(f"device {name}; {n_params / 1e9:.3f} B parameters, {n_lora / 1e6:.2f} M trainable (LoRA r=16); "
          f"measured matmul peak {peak_tflops:.1f} TFLOP/s", flush=True)
    results = {"device": name, "params": n_params, "trainable": n_lora, "matmul_tflops": peak_tflops,
               "train": [], "chat": [], "engine": []}
    if not args.chat_only:
        bench_training(model, device, args, seq, repeat, peak_tflops, results)
        if not args.train_only:  # chat gets a fresh model: the training rows compiled its layers
            del model
            torch._dynamo.reset()
            if cuda:
                torch.cuda.empty_cache()
            model = bench_model(args.tiny, device)
    if not args.train_only:
        bench_chatting(model, device, args, results)
    if args.tiny and results["train"]:
        print(f"\naten ops per training iteration (1+1 x {seq}, 32 layers): {results['train'][0]['aten_ops']:,}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def bench_training(model, device, args, seq, repeat, peak_tflops, results):
    """(seq, samples per kind, checkpointing, fast path): the slow path first (the fast one compiles the layers).
    On the CPU train.py's fast path does not compile, so --tiny times the slow path only."""
    cuda = device.type == "cuda"
    layouts = [int(v) for v in args.layouts.split(",")]
    if args.tiny:
        runs = [(seq, v, ck, False) for v in layouts for ck in (False, True)]
    else:
        runs = [(seq, 1, False, False)] + [(seq, v, False, True) for v in layouts]
        runs += [(args.long, 1, True, True)] if args.long else []
    for graphs in [False] + ([True] if args.cuda_graphs and cuda else []):
        if cuda:
            torch._dynamo.reset()
            train.compile_layers(model, cuda_graphs=graphs)
        for s, v, ckpt, fast in runs:
            if graphs and not fast:
                continue
            try:
                with nullcontext() if fast else torch.compiler.set_stance("force_eager"):
                    row = bench_train(model, device, s, v, ckpt, fast, repeat, peak_tflops, graphs,
                                      count_ops=args.tiny and (s, v, ckpt) == (seq, 1, False))
            except Exception as e:  # out of memory, or a compile failure: report it and go on with the others
                print(f"train seq {s} {v}+{v} ckpt={ckpt} fast={fast} graphs={graphs}: {type(e).__name__}: "
                      f"{str(e)[:300]}", flush=True)
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            results["train"].append(row)
            print_train(row, header=len(results["train"]) == 1)


def bench_chatting(model, device, args, results):
    """The aten ops of a decode step at batch 1 (eager, LoRA unmerged and merged); then, the LoRA merged as the
    programs load it, chat.py's path eager and (on a GPU) fast; the engine at the concurrencies of --concurrency
    (fast on a GPU); last, as quantization replaces the weights, --int8 (fast on a GPU, eager elsewhere)."""
    cuda = device.type == "cuda"
    bandwidth = copy_bandwidth(device)
    results["copy_bandwidth_gb_s"] = bandwidth and bandwidth / 1e9

    def chat_row(fast: bool, int8: bool):
        row = bench_chat(model, device, fast)
        weights = decode_bytes(model)
        row |= {"int8": int8, "weights_gb_per_token": weights / 1e9}
        row["bandwidth_fraction"] = weights * row["decode_tokens_per_s"] / bandwidth if bandwidth else None
        results["chat"].append(row)
        print(f"chat {row}", flush=True)

    model.eval()
    results["ops_per_token"] = {"unmerged": ops_per_token(model, device)}
    lora.merge(model)      # as options.load_model gives chat.py, eval.py and serve.py their model
    results["ops_per_token"]["merged"] = ops_per_token(model, device)
    print(f"ops per token {results['ops_per_token']}", flush=True)
    chat_row(False, int8=False)
    for c in [int(c) for c in args.concurrency.split(",") if c]:
        results["engine"].append(bench_engine(model, device, c, fast=cuda))
        print(f"engine {results['engine'][-1]}", flush=True)
    if cuda:
        chat_row(True, int8=False)
    quantize.quantize(model)
    chat_row(cuda, int8=True)
    print(f"\n{'chat':<8}{'fast':>6}{'int8':>6}{'prefill ms':>12}{'decode tok/s':>14}{'2nd round ms':>14}"
          f"{'of limit':>10}{'peak GiB':>10}{'warm-up s':>11}   (copy bandwidth {fmt(results['copy_bandwidth_gb_s'], ',.0f')} GB/s)")
    for r in results["chat"]:
        print(f"{'':<8}{str(r['fast']):>6}{str(r['int8']):>6}{r['prefill_ms']:>12.1f}{r['decode_tokens_per_s']:>14.1f}"
              f"{r['second_round_first_token_ms']:>14.1f}{fmt(r['bandwidth_fraction'], '.0%'):>10}"
              f"{fmt(r['peak_gib'], '.1f'):>10}{fmt(r.get('warmup_s'), '.0f'):>11}")
    base = results["engine"][0]["decode_tokens_per_s"] if results["engine"] else None
    print(f"\n{'engine':<8}{'requests':>9}{'fast':>6}{'tok/s':>10}{'per request':>13}{'x 1 request':>13}{'peak GiB':>10}")
    for r in results["engine"]:
        print(f"{'':<8}{r['concurrency']:>9}{str(r['fast']):>6}{r['decode_tokens_per_s']:>10.1f}"
              f"{r['per_request_tokens_per_s']:>13.1f}{r['decode_tokens_per_s'] / base:>13.1f}"
              f"{fmt(r['peak_gib'], '.1f'):>10}")
    print(f"\naten ops per decoded token at batch 1 (eager): {results['ops_per_token']['unmerged']:,.0f} with LoRA "
          f"unmerged, {results['ops_per_token']['merged']:,.0f} merged")


# ----------------------------------------------------------------------------------------------------------------
# The release on a machine without a GPU (--release DIR): release-shaped files (fake_release.py) loaded as chat.py
# loads them, in bf16, int8 and int4, each in a child process of its own (its peak memory is the load's alone)

RELEASE_PROMPT = 43         # prompt tokens of the first round (the template, a picture, a short question)


def read_bandwidth() -> float:
    """Bytes per second the CPU reads: the sum of 2 GiB of fp32, best of five."""
    x = torch.ones(2**29)
    seconds = min(timed(lambda: x.sum(), torch.device("cpu"), repeat=1, warmup=1) for _ in range(5))
    return x.numel() * 4 / seconds


def gemm_rate(dtype: torch.dtype, rows: int = 1024) -> float:
    """FLOP/s of a (rows x 4,096) by (4,096 x 11,008) product: LLaMA-7B's MLP, the best rate a prefill can reach."""
    x, w = torch.randn(rows, 4096, dtype=dtype), torch.randn(11008, 4096, dtype=dtype)
    seconds = min(timed(lambda: torch.nn.functional.linear(x, w), torch.device("cpu"), repeat=2) for _ in range(3))
    return 2 * rows * 4096 * 11008 / seconds


def layer_errors(seed: int = 0) -> dict:
    """Relative error of each form's layer output against bf16's, on LLaMA-7B's layer shapes: weights drawn as
    N(0, 0.02) (random ones: real weights have heavier tails), inputs N(0, 1), 8 rows."""
    g = torch.Generator().manual_seed(seed)
    errors = {}
    for out_features, in_features in ((12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)):
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * 0.02)
        linear.to(torch.bfloat16)
        x = torch.randn(8, in_features, generator=g)
        want = x @ linear.weight.float().T
        for form, group_size in [("int8", 0)] + [("int4", gs) for gs in quantize.GROUP_SIZES]:
            got = x @ quantize.quantize_linear(linear, form, group_size or 128).unpacked(0, out_features, torch.float32).T
            name = form if form == "int8" else f"int4/{group_size}"
            errors.setdefault(name, []).append(((got - want).norm() / want.norm()).item())
    return {k: max(v) for k, v in errors.items()}


def rss_anon(pid: int | str) -> int:
    """Anonymous resident memory of a process: what the kernel cannot drop (a mapped file's pages it can)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def release_flags(directory: str, form: str, group_size: int) -> list[str]:
    """chat.py's flags for the files fake_release.py wrote in directory (its 7b preset, or its small one)."""
    f = fake_release.files(directory, "small" if os.path.exists(os.path.join(directory, "vision.json")) else "7b")
    form_flags = {"fp16": ["--dtype", "fp16"], "bf16": ["--dtype", "bf16"], "int8": ["--int8"],
                  "int4": ["--int4", "--group-size", str(group_size)]}
    return ["--llama", f["llama"], "--openflamingo", f["openflamingo"], "--lora", f["lora"], "--vision", f["vision"],
            "--vision-weights", f["vision_weights"]] + form_flags[form]


def bench_release(directory: str, forms: list[str], group_size: int, results: dict, keep: bool = False):
    """Per form (fp16 / bf16 / int8 / int4), two children: one loads the release's files as the programs do and
    converts them (convert.py's file), one maps the converted file and times decoding; fp16, which has no file form,
    one child that times decoding as loaded. The machine's read bandwidth and GEMM rates are measured in the same
    run, before the children. keep: leave the converted files in directory."""
    bandwidth = read_bandwidth()
    gemm = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
    results |= {"read_gb_s": bandwidth / 1e9, "gemm_gflop_s": {k: v / 1e9 for k, v in gemm.items()}, "release": [],
                "layer_error": layer_errors()}
    print(f"CPU: reads {bandwidth / 1e9:.1f} GB/s; GEMM {gemm['fp32'] / 1e9:.0f} GFLOP/s fp32, "
          f"{gemm['bf16'] / 1e9:.0f} bf16 (1,024 x 4,096 by 4,096 x 11,008)", flush=True)
    print("layer output error against bf16 (relative, the worst of LLaMA-7B's 4 layer shapes): " +
          ", ".join(f"{k} {v:.2%}" for k, v in results["layer_error"].items()), flush=True)
    for form in forms:
        converted, row = os.path.join(directory, f"converted-{form}.pt"), {}
        for stage in ("files",) if form == "fp16" else ("files", "converted"):
            out = os.path.join(directory, f"bench-{form}-{stage}.json")
            child = subprocess.run([sys.executable, __file__, "--release", directory, "--release-child", form,
                                    "--release-stage", stage, "--group-size", str(group_size), "--json", out])
            if child.returncode:
                print(f"{form}, {stage}: the child failed (exit {child.returncode})", flush=True)
                break
            with open(out) as f:
                row |= json.load(f)
        if not keep and os.path.exists(converted):
            os.remove(converted)
        if "decode_tokens_per_s" not in row:
            continue
        row |= {"peak_over_weights": row["load_peak_anon_bytes"] / row["held_bytes"],
                "ceiling_tokens_per_s": bandwidth / row["bytes_per_token"]}
        row["of_ceiling"] = row["decode_tokens_per_s"] / row["ceiling_tokens_per_s"]
        row["vit_of_gemm"] = row["vit_flop"] / row["vit_s"] / gemm["fp32"]
        row["prefill_of_gemm"] = row["prefill_flop"] / row["prefill_s"] / gemm["fp32"]
        results["release"].append(row)
        print(f"release {row}", flush=True)
    print(f"\n{'form':<6}{'load s':>8}{'peak GB':>9}{'x held':>8}{'write s':>9}{'map s':>7}{'anon GB':>9}"
          f"{'decode tok/s':>14}{'ceiling':>9}{'of it':>7}{'ViT s':>7}{'prompt tok/s':>14}{'1st token s':>13}"
          f"{'re-sent s':>11}{'x4 tok/s':>10}{'x8 tok/s':>10}")
    for r in results["release"]:
        print(f"{r['form']:<6}{r['load_s']:>8.1f}{r['load_peak_anon_bytes'] / 1e9:>9.2f}{r['peak_over_weights']:>8.2f}"
              f"{fmt(r.get('write_s'), '.1f'):>9}{fmt(r.get('map_s'), '.2f'):>7}"
              f"{fmt(r['map_peak_anon_bytes'] / 1e9 if 'map_s' in r else None, '.2f'):>9}"
              f"{r['decode_tokens_per_s']:>14.2f}{r['ceiling_tokens_per_s']:>9.2f}{r['of_ceiling']:>7.0%}"
              f"{r['vit_s']:>7.2f}{r['prompt_tokens_per_s']:>14.1f}{r['first_token_s']:>13.1f}"
              f"{r['resent_first_token_s']:>11.2f}{fmt(r.get('engine_4'), '.2f'):>10}{fmt(r.get('engine_8'), '.2f'):>10}")


def token_weights(model) -> int:
    """Weights each text token is multiplied by: the decoder's linear layers and lm_head (the cross-attention
    blocks' keys/values come from the picture's latents, once per picture)."""
    return sum(m.in_features * m.out_features for n, m in model.named_modules()
               if quantize.is_quantized(n) and hasattr(m, "in_features") and not n.endswith("to_kv"))


def loaded(flags: list[str]):
    """options.load_model on these flags, timed, its peak of anonymous memory above the interpreter's sampled:
    (model, tokenizer, seconds, peak bytes)."""
    parser = argparse.ArgumentParser()
    options.add_weight_args(parser)
    args = parser.parse_args(flags)
    before, peak, loading = rss_anon(os.getpid()), [0], threading.Event()

    def sample():       # the loader's anonymous memory, every 10 ms (the loading threads let this one run)
        while not loading.wait(0.01):
            peak[0] = max(peak[0], rss_anon(os.getpid()))

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    model, tokenizer, _, _ = options.load_model(args, "cpu")
    seconds = time.perf_counter() - t0
    loading.set()
    sampler.join()
    return model, tokenizer, seconds, max(peak[0], rss_anon(os.getpid())) - before


def release_child(directory: str, form: str, group_size: int, stage: str) -> dict:
    """In a child, one stage of a form: "files" loads the release's files as chat.py does and writes the converted
    file (convert.py's); "converted" maps that file and times chat.py's path on it (release_speed)."""
    converted = os.path.join(directory, f"converted-{form}.pt")
    if stage == "converted":
        model, _, seconds, peak = loaded(["--ckpt", converted])
        return {"map_s": seconds, "map_peak_anon_bytes": peak} | release_speed(model)
    model, tokenizer, seconds, peak = loaded(release_flags(directory, form, group_size))
    row = {"form": form, "group_size": group_size if form == "int4" else None, "load_s": seconds,
           "held_bytes": packed_bytes(model) + sum(t.numel() * t.element_size()
                                                   for t in [*model.parameters(), *model.buffers()]),
           "load_peak_anon_bytes": peak, "bytes_per_token": decode_bytes(model)}
    if form == "fp16":      # fbgemm's packing has no file form (convert.py): timed as loaded
        return row | release_speed(model)
    t0 = time.perf_counter()
    checkpoints.save_converted(model, tokenizer, form, group_size, converted)
    return row | {"write_s": time.perf_counter() - t0, "converted_bytes": os.path.getsize(converted)}


def release_speed(model, concurrencies=(4, 8)) -> dict:
    """chat.py's path (an engine of one slot): the picture alone, the first round's first token, decoding at batch
    1, a re-sent round's first token; then the engine decoding 4 and 8 requests at once."""
    row, cpu, cfg = {}, torch.device("cpu"), model.cfg
    size = cfg.vision["vision_cfg"]["image_size"]
    picture = torch.randn(1, 1, 3, size, size)
    t0 = time.perf_counter()
    engine = Engine(model, Tokenizer(), slots=max(concurrencies), max_len=256)
    ask = lambda n: requests(cfg, cpu, 1, RELEASE_PROMPT, n, torch.float32)[0]
    engine.generate([ask(2)])                           # compiles the one-row kernels of every shape, maps the pages
    engine.reset()
    row["first_use_s"] = time.perf_counter() - t0
    with torch.no_grad():
        row["vit_s"] = timed(lambda: model.encode_images(picture), cpu, repeat=2, warmup=1)
    patches = (size // cfg.vision["vision_cfg"]["patch_size"]) ** 2 + 1
    row["vit_flop"] = 2 * (patches * count(model.vision.parameters())
                           + cfg.perceiver_latents * count(model.perceiver.parameters()))
    first = ask(17)
    t0 = time.perf_counter()
    engine.submit(first)
    while not first.tokens:
        engine.step()
    row["first_token_s"] = time.perf_counter() - t0
    steps = []          # a token per step: the median step, as this machine's neighbours come and go
    while engine.busy:
        t0 = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - t0)
    row["decode_tokens_per_s"] = 1 / sorted(steps)[len(steps) // 2]
    row["decode_mean_tokens_per_s"] = len(steps) / sum(steps)
    row["prefill_s"] = row["first_token_s"] - row["vit_s"]
    row["prompt_tokens_per_s"] = RELEASE_PROMPT / row["prefill_s"]
    row["prefill_flop"] = 2 * RELEASE_PROMPT * token_weights(model)
    again = Request(first.ids + first.tokens + [300 + i for i in range(8)], first.pictures, 1, Sampling(greedy=True))
    t0 = time.perf_counter()
    engine.generate([again])
    row["resent_first_token_s"] = time.perf_counter() - t0
    row["resent_cached"] = again.cached
    for c in concurrencies:
        engine.reset()
        row[f"engine_{c}"] = decode_rate(engine, requests(cfg, cpu, c, RELEASE_PROMPT, 9, torch.float32), cpu)
    return row


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_train(r: dict, header: bool):
    if header:
        print(f"\n{'train':<6}{'seq':>6}{'layout':>7}{'ckpt':>6}{'path':>7}{'tok/s':>9}{'TFLOP/s':>9}{'MFU':>7}"
              f"{'peak GiB':>9}{'warm-up s':>10}{'kernels':>9}{'GPU busy':>9}")
    path = "graphs" if r["cuda_graphs"] else "fast" if r["fast"] else "slow"
    print(f"{'':<6}{r['seq']:>6}{r['layout']:>7}{str(r['checkpointing']):>6}{path:>7}{r['tokens_per_s']:>9,.0f}"
          f"{r['tflops']:>9.1f}{r['mfu']:>7.1%}{fmt(r['peak_gib'], '.1f'):>9}{r['warmup_s']:>10.1f}"
          f"{fmt(r['kernels'], ',d'):>9}{fmt(r['gpu_busy'], '.0%'):>9}", flush=True)


if __name__ == "__main__":
    main()
