"""The programs' shared flags and defaults (chat.py, eval.py, serve.py, bench.py; train.py's device): which weights,
on which device, in which dtype, whether the memory holds them, and how many cache slots the memory left holds.

Read top-down:
  add_weight_args, find_weights      the weight flags and where weights are looked for when none are given
  device_of, fast_of, dtype_of, ...  the device, the fast path and the weights' dtype when the flags say nothing
  Memory, weights_bytes, slot_bytes  what the machine holds and what a model and one cache slot take
  load_model                         checked against the memory before a weight is read, then loaded (checkpoints.py)
  cache_slots                        the engine's slots x max_len, sized to the memory the weights leave
"""
import inspect
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

import checkpoints
import lora as lora_lib
import quantize
from engine import Engine
from mmgpt import KVCache

DEMO_RUN = "runs/demo"  # where train.py's demo run goes
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GiB = 1 << 30


def add_weight_args(group):
    """The flags find_weights, load_model and cache_slots read."""
    group.add_argument("--ckpt", help="a train.py output folder (or its lora.pt), or a file convert.py wrote")
    group.add_argument("--llama", help="HF LLaMA directory (config.json, weights, tokenizer.model)")
    group.add_argument("--openflamingo", help="OpenFlamingo checkpoint.pt")
    group.add_argument("--lora", help="the MultiModal-GPT LoRA release .pt, or a train.py lora.pt")
    group.add_argument("--vision", default="ViT-L-14", help="open_clip model name or model-config JSON")
    group.add_argument("--vision-weights", default="openai", help="open_clip pretrained tag or a CLIP weights file")
    group.add_argument("--dtype", choices=tuple(DTYPES),
                       help="the weights' dtype (default: bf16 on a GPU; on a CPU fp32 for a small model, for a "
                            "large one fp16 on x86 (fbgemm's kernels), else bf16)")
    q = group.add_mutually_exclusive_group()
    q.add_argument("--int8", action="store_true",
                   help="decoder weights in int8 (LoRA merged first; quantize.py): half the memory of bf16")
    q.add_argument("--int4", action="store_true", help="decoder weights in 4 bits with a scale per --group-size inputs")
    group.add_argument("--group-size", type=int, default=128, choices=(32, 64, 128),
                       help="--int4's group of inputs sharing a scale (default 128)")
    group.add_argument("--memory-fraction", type=float, default=0.9,
                       help="the share of the memory available (host, or the GPU's) that the weights and the cache "
                            "may take (default 0.9)")


def find_weights(args) -> dict:
    """load() or load_run() arguments: from the flags, else the release layout, else runs/demo; else exit with
    what to pass and where the weights come from."""
    if args.ckpt and (args.llama or args.openflamingo or args.lora):
        raise SystemExit("error: give either --ckpt or --llama/--openflamingo/--lora, not both")
    if args.ckpt:
        return {"run": args.ckpt}
    if args.llama:
        return {"llama": args.llama, "openflamingo": args.openflamingo, "lora": args.lora}
    if args.openflamingo or args.lora:
        raise SystemExit("error: --openflamingo and --lora need --llama DIR (the LLaMA they were trained on)")
    release = checkpoints.RELEASE
    if all(os.path.exists(p) for p in release.values()):
        print(f"using {', '.join(release.values())}", file=sys.stderr)
        return dict(release)
    if os.path.isfile(os.path.join(DEMO_RUN, "lora.pt")):
        print(f"using {DEMO_RUN}", file=sys.stderr)
        return {"run": DEMO_RUN}
    found = "\n".join(f"  {p:42s} {'found' if os.path.exists(p) else 'MISSING'}: {checkpoints.RELEASE_SOURCES[k]}"
                      for k, p in release.items())
    raise SystemExit(
        f"error: no weights given and none found in {os.getcwd()}. Pass one of\n"
        f"  --ckpt RUN_DIR                               a train.py output folder (its lora.pt names its base model)\n"
        f"  --llama DIR --openflamingo FILE --lora FILE  the MultiModal-GPT release files\n"
        f"or put the release where the MultiModal-GPT README says, relative to the current directory:\n{found}\n"
        f"(the CLIP ViT-L/14 'openai' weights are fetched by open_clip on first use, or give --vision-weights FILE)\n"
        f"or train a model with train.py into {DEMO_RUN}/, which is looked for next.")


# ----------------------------------------------------------------------------------------------------------------
# Defaults

def device_of(args) -> str:
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def fast_of(args, device: str) -> bool:
    """The fast path (compiled, CUDA graphs) is on by default on a GPU only: on a CPU compiling costs more than
    it saves."""
    return args.fast if args.fast is not None else device.startswith("cuda")


def train_dtype(device: str) -> torch.dtype:
    """The frozen weights' dtype in training: bf16 on a GPU (never an fp32 copy of the frozen 8B), fp32 on a CPU
    (its bf16 matmuls have no hardware behind them on most CPUs)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


# Decoding reads every weight once per token: a model past a few hundred MB is bound by those bytes, and 16-bit
# weights halve them (on a CPU without 16-bit arithmetic too, each converted to fp32 in registers). On an x86 CPU
# fp16, as fbgemm's kernels multiply it (quantize.Fp16Linear), also runs a prompt and a batch at the fp32 GEMM's
# rate. A small model is bound by the calls, and fp32 skips the conversions.
SMALL_MODEL_BYTES = 1 << 30


def dtype_of(args, device: str, parameters: int) -> tuple[torch.dtype, str]:
    """The weights' dtype and why (one line)."""
    if args.dtype == "fp16" and not device.startswith("cuda") and not quantize.fbgemm_fp16():
        raise SystemExit("error: --dtype fp16 on a CPU runs fbgemm's fp16 kernels, which this CPU or PyTorch build "
                         "lacks (an x86 CPU with AVX2 has them): use --dtype bf16")
    if args.dtype:
        return DTYPES[args.dtype], f"dtype {args.dtype} (--dtype)"
    if device.startswith("cuda"):
        return torch.bfloat16, "dtype bf16 (the default on a GPU; --dtype to choose)"
    gb = parameters * 4 / 1e9
    if parameters * 4 < SMALL_MODEL_BYTES:
        return torch.float32, (f"dtype fp32 (the default on a CPU for a small model, {gb:.2f} GB in fp32: its "
                               f"decoding is bound by calls, not bytes; --dtype to choose)")
    if args.int8 or getattr(args, "int4", False):
        return torch.bfloat16, ("dtype bf16 for what is not quantized (the default beside --int8 / --int4 on a CPU: "
                                "their several-row kernels take bf16 rows; --dtype to choose)")
    if not quantize.fbgemm_fp16():
        return torch.bfloat16, (f"dtype bf16 (the default on a CPU for a large model, {gb:.1f} GB in fp32: decoding "
                                f"reads every weight per token, and bf16 reads half the bytes; --dtype to choose)")
    return torch.float16, (f"dtype fp16 (the default on an x86 CPU for a large model, {gb:.1f} GB in fp32: decoding "
                           f"reads every weight per token, fp16 reads half the bytes, and fbgemm's fp16 kernels run "
                           f"prompts at the fp32 GEMM's rate; --dtype to choose)")


# ----------------------------------------------------------------------------------------------------------------
# Memory

def available_bytes(device: str) -> int:
    """What the process may still take: a GPU's free memory; on the host MemAvailable (/proc/meminfo), or the
    cgroup's limit less its use when that is smaller."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    with open("/proc/meminfo") as f:
        free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass  # no cgroup v2 limit readable: MemAvailable it is
    return free


def weights_bytes(model: nn.Module, device: str, dtype: torch.dtype, quantize_to: str | None, group_size: int) -> int:
    """The bytes a model laid out on the meta device (checkpoints.plan) will hold once loaded: its weights in
    `dtype` (checkpoints.decoding_forms: on a CPU a 16-bit model's ViT and perceiver in fp32), LoRA in fp32 (merged,
    still held, unless its layer is quantized), quantized layers as quantize.py holds them."""
    total = 0
    quantize_to, vision_dtype = checkpoints.decoding_forms(device, dtype, quantize_to)
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        held = vision_dtype if name.split(".")[0] in ("vision", "perceiver") else dtype
        if quantize_to and quantize.is_quantized(name) and isinstance(m, (nn.Linear, lora_lib.LoRALinear)):
            out_features, in_features = m.weight.shape
            total += quantize.linear_bytes(out_features, in_features, quantize_to, group_size, dtype.itemsize)
            own = {"bias": m.bias} if m.bias is not None else {}
        total += sum(t.numel() * (t.element_size() if ".lora_" in f".{n}" else held.itemsize) for n, t in own.items())
    return total


PICTURES = inspect.signature(Engine).parameters["max_pictures"].default   # pictures a slot holds


def slot_bytes(cfg, max_len: int, dtype: torch.dtype) -> int:
    """One cache slot of max_len tokens (and its pictures' keys/values), as the engine allocates it."""
    cache = KVCache(cfg, 1, max_len, PICTURES, dtype, "meta")
    return sum(b.numel() * b.element_size() for b in cache.buffers())


@dataclass
class Memory:
    """What the weights may take and what they leave to the cache: memory-fraction x the memory available before
    loading, less the weights and a working margin (the activations of a step, the interpreter's own growth)."""
    budget: int
    weights: int
    margin: int

    @property
    def for_cache(self) -> int:
        return self.budget - self.weights - self.margin


def margin_of(weights: int) -> int:
    return weights // 20 + GiB // 4


def check_memory(p: "checkpoints.Plan", args, device: str, dtype: torch.dtype, quantize_to: str | None) -> Memory:
    """Exit with what is needed, what is available and which flag fits, before a weight is read, when the weights
    and one full-context cache slot cannot fit; else the memory's split."""
    available = available_bytes(device)
    budget = int(available * args.memory_fraction)
    slot = slot_bytes(p.cfg, p.cfg.max_seq_len, dtype)

    def need(mode):
        w = checkpoints.converted_bytes(p) if p.converted else \
            weights_bytes(p.model, device, dtype, mode, args.group_size)
        return w, w + slot + margin_of(w)

    weights, needed = need(quantize_to)
    if needed > budget:
        smaller = () if p.converted else \
            quantize.MODES[quantize.MODES.index(quantize_to) + 1:] if quantize_to else quantize.MODES
        sizes = {m: need(m)[1] for m in smaller}     # quantize.MODES: from the largest form to the smallest
        fits = [f"--{m} ({n / GiB:.1f} GiB)" for m, n in sizes.items() if n <= budget]
        others = [f"--{m} needs {n / GiB:.1f} GiB" for m, n in sizes.items()]
        where = "the GPU's free memory" if device.startswith("cuda") else "MemAvailable / the cgroup's limit"
        form = quantize_to or {v: k for k, v in DTYPES.items()}[dtype]
        raise SystemExit(
            f"error: the model does not fit: it needs {needed / GiB:.1f} GiB ({weights / GiB:.1f} GiB of weights in "
            f"{form}, {slot / GiB:.2f} GiB for one {p.cfg.max_seq_len}-token cache slot, "
            f"{margin_of(weights) / GiB:.1f} GiB of margin) and {budget / GiB:.1f} GiB is available ({available / GiB:.1f} GiB, {where}, x "
            f"--memory-fraction {args.memory_fraction:g}). "
            + (f"Fits: {', '.join(fits)}." if fits else
               f"{p.converted['path']} is converted: convert.py --int8 or --int4 writes a smaller form." if p.converted
               else f"Nothing fits: {', '.join(others) or 'no smaller form'}; free memory, or use a machine with more."))
    return Memory(budget, weights, margin_of(weights))


def load_model(args, device: str):
    """(model, tokenizer, image_transform, memory) for decoding, from the weight flags: checked against the memory
    before a weight is read, loaded module by module with the LoRA merged into the weights (a model that only
    decodes never needs the factors apart, and each adapted layer is then one matmul, not three) and quantized as
    --int8 / --int4 ask; a file that is missing or cannot be used, or a model that cannot fit, ends the program in
    one line."""
    weights = find_weights(args)
    quantize_to = "int8" if args.int8 else "int4" if getattr(args, "int4", False) else None
    try:
        if "run" in weights:
            p = checkpoints.plan_run(weights["run"])
        else:
            p = checkpoints.plan(**weights, vision=args.vision, vision_weights=args.vision_weights)
        if p.converted:
            dtype, quantize_to, why = converted_form(p, args)
        else:
            dtype, why = dtype_of(args, device, sum(t.numel() for t in p.model.parameters()))
        print(why, file=sys.stderr, flush=True)
        if getattr(args, "fast", None) and checkpoints.decoding_forms(device, dtype, quantize_to)[0] == "fp16":
            raise SystemExit("error: --fast compiles the decoder as one graph, which fbgemm's packed fp16 layers "
                             "(fp16 on a CPU) cannot enter: --no-fast, or --dtype bf16")
        memory = check_memory(p, args, device, dtype, quantize_to)
        model, tokenizer, transform = checkpoints.fill(p, device, dtype, merge=True, quantize_to=quantize_to,
                                                       group_size=args.group_size, progress=True)
    except (OSError, ValueError) as e:   # FileNotFoundError, CheckpointError (a ValueError), ...
        raise SystemExit(f"error: {e}") from None
    return model, tokenizer, transform, memory


def converted_form(p: "checkpoints.Plan", args) -> tuple[torch.dtype, str, str]:
    """(dtype, the layers' form, why) of a convert.py file: as it holds them; a flag asking for another form exits."""
    form, path = p.converted["form"], p.converted["path"]
    layers = form["layers"] + (f" (group {form['group_size']})" if form["layers"] == "int4" else "")
    dtype = {v: k for k, v in DTYPES.items()}[form["dtype"]]
    asked = "int8" if args.int8 else "int4" if getattr(args, "int4", False) else None
    if (args.dtype and args.dtype != dtype) or (asked and asked != form["layers"]):
        raise SystemExit(f"error: {path} holds the decoder's linear layers in {layers}, its other weights in {dtype} "
                         f"(convert.py): drop --dtype / --int8 / --int4, or convert again for another form")
    return form["dtype"], form["layers"], (f"weights as {path} holds them (convert.py): the decoder's linear layers in "
                                           f"{layers}, its other weights in {dtype}")


def cache_slots(model, memory: Memory, slots: int, what: str = "") -> tuple[int, int]:
    """(slots, max_len) of the engine's cache: as many full-context slots as asked that fit in the memory the
    weights leave, printed; exit when not even one fits."""
    max_len = model.cfg.max_seq_len
    one = slot_bytes(model.cfg, max_len, model.activation_dtype())
    fit = max(memory.for_cache, 0) // one
    if fit < 1:
        raise SystemExit(f"error: not even one {max_len}-token cache slot ({one / GiB:.2f} GiB) fits in the "
                         f"{max(memory.for_cache, 0) / GiB:.2f} GiB the weights leave ({memory.budget / GiB:.1f} GiB "
                         f"budget, --memory-fraction; {memory.weights / GiB:.1f} GiB of weights, "
                         f"{memory.margin / GiB:.1f} GiB margin): raise --memory-fraction or use --int8 / --int4")
    chosen = min(slots, fit)
    print(f"cache: {chosen} slot{'s'[:chosen != 1]} x {max_len} tokens ({chosen * one / GiB:.2f} GiB): {slots} asked"
          f"{f' ({what})' if what else ''}, {fit} fit in the {memory.for_cache / GiB:.1f} GiB the weights leave",
          file=sys.stderr, flush=True)
    return chosen, max_len
