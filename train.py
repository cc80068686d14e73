"""Joint LoRA fine-tuning of MultiModal-GPT (paper 4.1) on plain torch: DDP and manual gradient accumulation.

    torchrun --nproc_per_node 8 train.py --config configs/mmgpt.json    # the paper's run (weights in checkpoints/)
    python train.py                                                      # the demo: a tiny model, minutes on a CPU

Each iteration backpropagates one language-only batch, then one vision-language batch; gradients accumulate over
--grad-accum iterations with DDP's no_sync on all but the last backward, so ranks all-reduce once per optimizer
step. Gradients are clipped once per step. The effective batch is ranks x batch x accumulation x 2 (paper: 256).

Outputs in --out: lora.pt (final weights + the settings that rebuild the model: `checkpoints.load_run(out)`),
ckpt.pt (written atomically every --save-every steps and on SIGTERM/Ctrl-C; --resume continues from it exactly),
metrics.jsonl (one record per optimizer step and per evaluation). On several machines, and restarted by torchrun
when a worker dies, with `--resume auto`: README, "Train on several machines".
"""
import argparse
import datetime
import json
import math
import os
import random
import signal
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import conversation
import data
import demo
import lora as lora_lib
import checkpoints
import mmgpt
import options
from engine import Engine, Request, Sampling
from tokenizer import Tokenizer

PAPER = dict(out="runs/mmgpt", lr=1e-5, warmup=100, grad_accum=16, batch_size=1, max_len=512, epochs=1,
             eval_every=0, save_every=500, unfreeze=[], attend_previous=False)
MAX_BAD_STEPS = 5  # non-finite steps in a row before the run stops


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="data config JSON (default: the demo, configs/demo.json)")
    ap.add_argument("--llama", help=f"HF LLaMA directory (default with --config: {checkpoints.RELEASE['llama']})")
    ap.add_argument("--openflamingo",
                    help="OpenFlamingo checkpoint.pt (default with --config: "
                         f"{checkpoints.RELEASE['openflamingo']})")
    ap.add_argument("--lora", help="start from these LoRA weights (release .pt or a lora.pt of this project)")
    ap.add_argument("--vision", default="ViT-L-14", help="open_clip model name or model-config JSON")
    ap.add_argument("--vision-weights", default="openai", help="open_clip pretrained tag or local weights file")
    ap.add_argument("--out", help="output folder (demo: runs/demo, with --fusion prefix runs/demo-prefix; else "
                                  "runs/mmgpt)")
    ap.add_argument("--lr", type=float, help="peak learning rate (paper 1e-5; demo 2e-3, 5e-4 with --fusion prefix)")
    ap.add_argument("--warmup", type=int, help="linear warmup steps before the cosine decay")
    ap.add_argument("--grad-accum", type=int, help="iterations per optimizer step (paper 16)")
    ap.add_argument("--batch-size", type=int, help="samples of each kind per iteration and rank (paper 1)")
    ap.add_argument("--max-len", type=int, help="tokens per sample (paper 512)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--lora-targets", nargs="+", default=list(lora_lib.DEFAULT_TARGETS),
                    help="module-name suffixes that get LoRA")
    ap.add_argument("--unfreeze", nargs="*", help="parameter-name substrings trained in full besides the LoRA")
    ap.add_argument("--vision-lr", type=float,
                    help="also train the CLIP ViT in full, at this learning rate (default: frozen, as in the paper; "
                         "the demo trains its random ViT at 3e-4, at 1e-4 with --fusion prefix)")
    ap.add_argument("--epochs", type=float, help="passes over the vision-language data (sets the LR schedule)")
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--attend-previous", action=argparse.BooleanOptionalAction,
                    help="the media-masking rule: each token sees the picture before it, not the one after "
                         "(saved with the run; default: on for the demo, off for the release weights)")
    ap.add_argument("--fusion", choices=("xattn", "prefix"), default="xattn",
                    help="how pictures reach the decoder: xattn, Flamingo's gated cross-attention (the paper's); "
                         "prefix, Lynx's prefix-finetuning: each picture's perceiver latents, projected, as input "
                         "positions in place of <image>, no cross-attention blocks, the perceiver trained too "
                         "(saved with the run)")
    ap.add_argument("--media-augmentation", action="store_true",
                    help="OpenFlamingo's media-placement augmentation: half the VL batches use the other rule")
    ap.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps")
    ap.add_argument("--eval-every", type=int, help="evaluate every N optimizer steps (0: only at the end of the demo)")
    ap.add_argument("--eval-samples", type=int, default=64, help="held-out conversations (split off the VL data)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding pictures")
    ap.add_argument("--group-by-length", type=int, default=0, metavar="WINDOW",
                    help="sort each window of this many samples by length (less padding)")
    ap.add_argument("--skip-bad", action="store_true", help="skip unreadable records and pictures, and count them")
    ap.add_argument("--resume", nargs="?", const="always", choices=("always", "auto"),
                    help="continue from OUT/ckpt.pt; `--resume auto`: from it where it exists, else start afresh "
                         "(one command line for the first start and every restart, e.g. torchrun --max-restarts)")
    ap.add_argument("--rdzv-timeout", type=float, default=300, metavar="SECONDS",
                    help="how long the ranks wait for one another to form the process group before giving up "
                         "with what to check")
    ap.add_argument("--fast", action=argparse.BooleanOptionalAction,
                    help="the fast path (default: on with CUDA): bf16 weights with fp32 master copies in the "
                         "optimizer, each decoder layer compiled, lengths padded to multiples of --bucket")
    ap.add_argument("--bucket", type=int, default=128, help="fast path: pad lengths to multiples of this")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="fast path: compile with mode='reduce-overhead' (CUDA graphs; one per bucket)")
    args = ap.parse_args(argv)
    args.demo = args.config is None and not (args.llama or args.openflamingo or args.lora)
    args.fast = options.fast_of(args, options.device_of(args))
    defaults = demo.SETTINGS | (demo.PREFIX if args.fusion == "prefix" else {}) if args.demo else PAPER
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if not args.demo:
        if args.config is None:
            ap.error("--config is needed with --llama/--openflamingo/--lora (the demo takes no weight flags)")
        args.llama = args.llama or checkpoints.RELEASE["llama"]
        args.openflamingo = args.openflamingo or checkpoints.RELEASE["openflamingo"]
        for key in ("llama", "openflamingo", "lora"):
            path = getattr(args, key)
            if path and not os.path.exists(path):
                ap.error(f"{path} not found" + (f": it should hold {checkpoints.RELEASE_SOURCES[key]}"
                                                if path == checkpoints.RELEASE[key] else ""))
    return args


# ----------------------------------------------------------------------------------------------------------------
# Training

class Stop(Exception):
    """Raised out of the loop when SIGTERM/SIGINT arrived: save and exit cleanly."""

    def __init__(self, signal_name: str, step: int, bad_total: int):
        super().__init__(signal_name)
        self.step, self.bad_total = step, bad_total


def cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def rng_state() -> dict:
    """Every RNG's state as tensors and plain lists/ints, so that ckpt.pt loads with weights_only=True."""
    kind, keys, *rest = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": [kind, keys.tolist(), *rest]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # decoding changes shapes every step: compiled layers would recompile
def evaluate(model, tokenizer, transform, held_out, demo_items, max_len, autocast, device) -> dict:
    """Held-out loss; for the demo also exact-answer accuracy of greedy answers, and its chance level."""
    model.eval()
    losses = []
    for conv in held_out:
        rendered = data.render(conv, tokenizer, max_len)
        if rendered is None:
            continue
        ids, labels = (torch.tensor([x], device=device) for x in rendered)
        images = None if conv.image is None else transform(conversation.load_image(conv.image))[None, None].to(device)
        with autocast:
            losses.append(float(mmgpt.lm_loss(model(images, ids), labels)))
    out = {"eval_loss": sum(losses) / max(1, len(losses))}
    if demo_items:
        prompts = [tokenizer.encode(conversation.prompt(conv, open_last=True)) for conv, _ in demo_items]
        with autocast:      # a fresh engine: no decoding buffers stay on after the evaluation
            engine = Engine(model, tokenizer, slots=8, max_len=max(map(len, prompts)) + 12)
            done = engine.generate(Request(ids, [transform(conversation.load_image(conv.image))], max_tokens=12,
                                           sampling=Sampling(greedy=True))
                                   for ids, (conv, _) in zip(prompts, demo_items))
        out.update(demo.score([e for _, e in demo_items], [r.text for r in done]))
    model.train()
    return out


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step's work (bench.py times these very functions)

class WithLoss(nn.Module):
    """The model's training loss as a module's forward: DDP hooks forward, so the loss must run inside it."""

    def __init__(self, model: mmgpt.MMGPT):
        super().__init__()
        self.model = model

    def forward(self, images, input_ids, labels, attend_previous):
        return self.model.loss(images, input_ids, labels, attend_previous)


def to_device(batch: dict, device, bucket: int = 0, max_len: int = 0):
    """A batch's images, ids and labels on the device. The loss needs no attention mask: the padding is on the
    right, causal attention never lets a real token see it, and it has no labels. With a bucket (the fast path)
    the length is padded up to a multiple of it (at most max_len), so that compiled code and CUDA graphs see a
    few shapes only."""
    ids, labels, images = batch["input_ids"], batch["labels"], batch["images"]
    if bucket:
        pad = min(max_len, -(-ids.shape[1] // bucket) * bucket) - ids.shape[1]
        ids, labels = F.pad(ids, (0, pad)), F.pad(labels, (0, pad), value=-100)
    return (None if images is None else images.to(device, non_blocking=True), ids.to(device, non_blocking=True),
            labels.to(device, non_blocking=True))


@dataclass
class Iteration:
    losses: dict[str, list[torch.Tensor]]  # kind ("lang", "vl") -> the detached loss of each of its micro-batches
    tokens: int                            # real tokens
    padding: int                           # padded positions computed on top of them


def train_iteration(step_fn, micro_batches, device, autocast=nullcontext(), bucket: int = 0,
                    max_len: int = 0) -> Iteration:
    """Forward and backward of one optimizer step: per micro-batch pair (language-only, vision-language) each
    loss / len(micro_batches) is backpropagated and gradients accumulate. step_fn is WithLoss(model), or DDP of
    it: then ranks all-reduce once, on the last backward, which is the vision-language one (it uses every
    trainable parameter; the language-only forward skips the cross-attention); the others run under no_sync."""
    ddp = isinstance(step_fn, DistributedDataParallel)
    out = Iteration({"lang": [], "vl": []}, 0, 0)
    for micro, pair in enumerate(micro_batches):
        for kind, batch in zip(("lang", "vl"), pair):
            last_backward = micro == len(micro_batches) - 1 and kind == "vl"
            images, ids, labels = to_device(batch, device, bucket, max_len)
            with step_fn.no_sync() if ddp and not last_backward else nullcontext():
                with autocast:
                    loss = step_fn(images, ids, labels, batch.get("attend_previous"))
                (loss / len(micro_batches)).backward()
            out.losses[kind].append(loss.detach())
            real = int(batch["attention_mask"].sum())
            out.tokens, out.padding = out.tokens + real, out.padding + ids.numel() - real
    return out


class MasterAdamW(torch.optim.AdamW):
    """AdamW on fp32 master copies of the trainable parameters.

    On the fast path the model trains in bf16, LoRA included (so its forward casts nothing); bf16 cannot hold
    small updates (a step of 1e-5 on a weight of 0.01 is below its resolution), so the optimizer keeps fp32
    masters: gradients are cast onto them, AdamW updates them, the parameters take the rounded result, and the
    checkpoints store the masters. Without `copies`, an fp32 parameter is its own master: plain AdamW.
    `named_groups`: param groups whose "params" is a {name: parameter} dict."""

    def __init__(self, named_groups: list[dict], lr: float, copies: bool):
        self.masters: dict[str, torch.Tensor] = {}
        self.pairs = []  # (parameter, its master) where they differ
        groups = []
        for group in named_groups:
            for n, p in group["params"].items():
                self.masters[n] = p.detach().float().clone() if copies or p.dtype != torch.float32 else p
                if self.masters[n] is not p:
                    self.pairs.append((p, self.masters[n]))
            groups.append({**group, "params": [self.masters[n] for n in group["params"]]})
        # fused: one kernel updates every tensor. torch's default is a loop of ~9 ops per tensor on the CPU (so
        # bench.py --tiny's op count overstated the GPU's launches) and, on a GPU, ~9 multi-tensor ops per chunk
        # of tensors: there fused saves tens of launches per step.
        super().__init__(groups, lr=lr, weight_decay=0.0, fused=True)

    @torch.no_grad()
    def grads_to_masters(self):
        for p, m in self.pairs:
            m.grad, p.grad = (None if p.grad is None else p.grad.float()), None

    @torch.no_grad()
    def masters_to_params(self):
        for p, m in self.pairs:
            p.copy_(m)


def optimizer_step(optimizer: MasterAdamW, scheduler, max_norm: float = 1.0) -> float:
    """Clip the gradients (in fp32, on the masters) and step, unless their norm is not finite (then the step
    is skipped; the same on every rank: gradients were all-reduced). Returns the norm."""
    optimizer.grads_to_masters()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(optimizer.masters.values()), max_norm))
    if math.isfinite(grad_norm):
        optimizer.step()
        optimizer.masters_to_params()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return grad_norm


def set_trained_dtype(model: nn.Module, dtype: torch.dtype):
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)


def compile_layers(model: mmgpt.MMGPT, cuda_graphs: bool = False):
    """torch.compile each decoder layer. They share their code, and Dynamo guards on a module's type and tensor
    shapes, not its identity, so the 32 layers reuse a handful of graphs (first layer, plain, cross-attention;
    x a few lengths) instead of compiling 32 times; a whole-model graph would take minutes to compile."""
    for layer in model.layers:
        layer.compile(mode="reduce-overhead" if cuda_graphs else None)


# ----------------------------------------------------------------------------------------------------------------
# The recipe's steps

@dataclass
class Ranks:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def tagged(message: str) -> str:
    """The message with "[rank R/W] " before each line when there are several ranks (they share one console)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    return message if world == 1 else "\n".join(f"[rank {os.environ['RANK']}/{world}] {line}"
                                                 for line in message.split("\n"))


def log(ranks: Ranks, message: str, every_rank: bool = False):
    if ranks.main or every_rank:
        print(tagged(message), flush=True)


def fail(message: str):
    sys.exit(tagged(message))


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)  # for the slowest rank: loading the base, rank 0 evaluating


def setup(args) -> Ranks:
    """One process, or one rank of the process group that torchrun (or RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT set by hand or a scheduler) describes. Forming the group waits at most --rdzv-timeout, then says
    what to check; once formed, collectives wait COLLECTIVE_TIMEOUT."""
    device = torch.device(options.device_of(args))
    if "RANK" not in os.environ:
        return Ranks(device)
    cuda = device.type == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ["TORCHELASTIC_MAX_RESTARTS"]):
        # torchrun serves one store for the whole job, so a restarted group finds in it the keys that the group
        # that died wrote: Gloo's peer addresses, NCCL's unique id. A new rank may read them before its peer has
        # overwritten them and connect to a dead process ("Gloo connectFullMesh failed ... Connection refused";
        # pytorch#135712). Without the shared store every rendezvous round has its rank 0 serve a new, empty one.
        fail("torchrun --max-restarts: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun, and use c10d "
             "rendezvous (--standalone, or --rdzv-backend c10d): otherwise a restarted group reads the addresses "
             "of the group that died from torchrun's store and cannot connect")
    try:  # with device_id NCCL connects here too, so that every way of failing to meet ends within the timeout
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                                timeout=datetime.timedelta(seconds=args.rdzv_timeout))
    except RuntimeError as e:  # the store's DistStoreError / DistNetworkError, Gloo's and NCCL's own errors
        fail(f"the process group of {os.environ['WORLD_SIZE']} ranks did not form within --rdzv-timeout "
             f"{args.rdzv_timeout:g} s: {checkpoints.first_line(e)}\n"
             "check: every node was started, with the same --nnodes, --nproc-per-node, --rdzv-endpoint and --rdzv-id\n"
             f"check: MASTER_ADDR:MASTER_PORT ({os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}) is "
             "an address of rank 0's node that every node reaches (torchrun's c10d rendezvous takes that node's "
             "--local-addr, else its host name; its static one --master-addr), and no firewall stands between them\n"
             "check: NCCL_SOCKET_IFNAME (GPUs) or GLOO_SOCKET_IFNAME (CPUs) names the network interface the nodes "
             "share (NCCL_DEBUG=INFO shows the one NCCL took)")
    dist.set_timeout(COLLECTIVE_TIMEOUT)
    ranks = Ranks(device, dist.get_rank(), dist.get_world_size())
    log(ranks, f"in the process group: {socket.gethostname()}, {device}", every_rank=True)
    return ranks


def base_files(args, ranks: Ranks) -> dict:
    """The base model's files: the demo's (made by rank 0, then shared) or those the flags name."""
    if not args.demo:
        return {k: getattr(args, k) for k in ("llama", "openflamingo", "vision", "vision_weights")}
    box = [demo.make_base(args.out, args.seed) if ranks.main else None]
    if ranks.distributed:
        dist.broadcast_object_list(box)
    return {k: box[0][k] for k in ("llama", "openflamingo", "vision", "vision_weights")}


def make_model(args, ranks: Ranks):
    """The model with its LoRA, trainable parameters set; returns model, tokenizer, transform, the run's
    settings (saved with it; they rebuild the model) and the names of the parameters trained in full."""
    base = base_files(args, ranks)
    cuda = ranks.device.type == "cuda"
    frozen_dtype = options.train_dtype(ranks.device.type)
    model, tokenizer, transform = checkpoints.load(base["llama"], base["openflamingo"], args.lora, base["vision"],
                                                  base["vision_weights"], ranks.device, frozen_dtype,
                                                  args.attend_previous, args.fusion)
    lora_r, lora_alpha, targets = args.lora_r, args.lora_alpha, list(args.lora_targets)
    if args.lora:  # started from LoRA weights: train those (their rank, alpha and targets)
        first = lora_lib.lora_layers(model)[0]
        lora_r, lora_alpha, targets = first.r, first.alpha, lora_lib.targets_of(model)
    else:
        torch.manual_seed(args.seed)  # LoRA A's (and prefix_proj's) initial values: the same for every rank and run
        if model.prefix_proj is not None:
            model.prefix_proj.reset_parameters()
        lora_lib.inject(model, lora_r, lora_alpha, args.lora_dropout, targets, within="layers.")
    # --vision-lr: the ViT's parameters that the encoder uses. It stops before open_clip's ln_post and proj
    # (mmgpt.VisionEncoder): those would get no gradient, which DDP takes for an error.
    unfrozen = [n for n, _ in model.named_parameters() if n.startswith("vision.")
                and not n.startswith(("vision.visual.ln_post.", "vision.visual.proj"))] if args.vision_lr else []
    # Prefix fusion trains the projection and, as Lynx trains its resampler, the perceiver.
    also = ["perceiver.", "prefix_proj."] if args.fusion == "prefix" else []
    unfrozen += [n for n, _ in model.named_parameters()
                 if ".lora_" not in n and not n.startswith("vision.") and any(s in n for s in args.unfreeze + also)]
    # Slow path: trained weights in fp32 under autocast. Fast path: everything in the frozen weights' dtype (the
    # optimizer keeps fp32 masters), so nothing is cast per call.
    lora_lib.mark_trainable(model, unfrozen)
    set_trained_dtype(model, frozen_dtype if args.fast else torch.float32)
    model.train()
    model.grad_checkpointing = args.grad_checkpointing
    if args.fast and cuda:  # compiling on the CPU takes longer than it saves (tests compile on the CPU directly)
        compile_layers(model, args.cuda_graphs)
    settings = {"lora_r": lora_r, "lora_alpha": lora_alpha, "lora_dropout": args.lora_dropout,
                "lora_targets": targets, "unfreeze": args.unfreeze, "attend_previous": args.attend_previous,
                "fusion": args.fusion, **base}
    return model, tokenizer, transform, settings, unfrozen


def make_data(args, ranks: Ranks, tokenizer, transform):
    """The vision-language and language-only streams, the held-out conversations, the demo's scored questions."""
    mix = data.load_mix(args.config, skip_bad=args.skip_bad)
    held_out, demo_items = [], []
    if args.demo:
        demo_items = demo.eval_set(n=200, seed=args.seed + 1, pictures=demo.PICTURES)
        held_out = [conversation.Conversation(c.image, c.turns[:-1] + [conversation.Turn(c.turns[-1].question, a)])
                    for c, a in demo_items[:args.eval_samples]]
    elif args.eval_every:
        held_out, mix.vl = mix.vl[-args.eval_samples:], mix.vl[:-args.eval_samples]
    vl_stream, lang_stream = data.train_streams(
        mix, tokenizer, transform, batch_size=args.batch_size, rank=ranks.rank, world_size=ranks.world,
        seed=args.seed, max_len=args.max_len, num_workers=args.workers, group_window=args.group_by_length,
        skip_bad=args.skip_bad)
    if vl_stream is None or lang_stream is None:
        fail(f"{args.config}: the recipe needs both vision-language and language-only data")
    return vl_stream, lang_stream, held_out, demo_items


def make_optimizer(model, args, total: int):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    groups = [{"params": {n: p for n, p in params.items() if not n.startswith("vision.")}}]
    if args.vision_lr:  # a ViT trained from random weights (the demo's) wants its own, lower rate
        groups.append({"params": {n: p for n, p in params.items() if n.startswith("vision.")}, "lr": args.vision_lr})
    optimizer = MasterAdamW(groups, lr=args.lr, copies=args.fast)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine(s, args.warmup, total))
    return optimizer, scheduler


@dataclass
class Run:
    """What the setup steps build and the loop, the checkpoints and the end use."""
    args: argparse.Namespace
    ranks: Ranks
    model: mmgpt.MMGPT
    tokenizer: Tokenizer
    transform: object
    settings: dict          # saved with the run: they rebuild its model
    unfrozen: list          # parameters trained in full besides the LoRA
    streams: tuple          # (vision-language, language-only)
    held_out: list
    demo_items: list
    optimizer: "MasterAdamW"
    scheduler: object
    total: int              # optimizer steps of the schedule
    autocast: object
    ckpt_path: str


def save_checkpoint(run: Run, step: int, bad_total: int):
    """ckpt.pt: everything --resume needs to continue exactly (the fp32 masters, optimizer, schedule, stream
    positions, every rank's RNG states)."""
    states = [None] * run.ranks.world
    if run.ranks.distributed:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if run.ranks.main:
        checkpoints.save_train_state({
            "step": step, "bad_steps": bad_total, "world": run.ranks.world, "batch_size": run.args.batch_size,
            "grad_accum": run.args.grad_accum, "settings": run.settings,
            "trainable": {n: m.detach().cpu() for n, m in run.optimizer.masters.items()},
            "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "vl_stream": run.streams[0].state_dict(), "lang_stream": run.streams[1].state_dict(), "rng": states},
            run.ckpt_path)


def resume(run: Run) -> tuple[int, int] | None:
    """--resume: load ckpt.pt into the optimizer (masters, then parameters), schedule, streams and RNGs; returns
    (step, non-finite steps so far), or None where `--resume auto` finds no checkpoint (a first start). Every rank
    reads the file, so every rank must find the same one."""
    path, ranks, args = run.ckpt_path, run.ranks, run.args
    ckpt = checkpoints.read_train_state(path) if os.path.isfile(path) else None  # nothing in it can run code
    found = None if ckpt is None else ckpt["step"]
    steps = [found]
    if ranks.distributed:
        steps = [None] * ranks.world
        dist.all_gather_object(steps, found)
    if len(set(steps)) > 1:  # ranks on a node that does not see --out, or sees an older copy of it
        where = {}
        for rank, s in enumerate(steps):
            where.setdefault("no file" if s is None else f"step {s}", []).append(rank)
        fail(f"--resume: the ranks found different checkpoints at {path} ("
             + "; ".join(f"{what} on ranks {', '.join(map(str, r))}" for what, r in where.items())
             + "): --out must be one folder that every node sees (a shared filesystem)")
    if ckpt is None:
        if args.resume == "always":
            fail(f"--resume: {path} not found")
        return None
    if ckpt["world"] * ckpt["batch_size"] * ckpt["grad_accum"] != ranks.world * args.batch_size * args.grad_accum:
        fail(f"--resume: {path} was written with another effective batch")
    with torch.no_grad():
        for n, t in ckpt["trainable"].items():
            run.optimizer.masters[n].copy_(t)
    run.optimizer.masters_to_params()
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.streams[0].load_state_dict(ckpt["vl_stream"])
    run.streams[1].load_state_dict(ckpt["lang_stream"])
    set_rng_state(ckpt["rng"][ranks.rank] if ranks.rank < len(ckpt["rng"]) else ckpt["rng"][0])
    return ckpt["step"], ckpt["bad_steps"]


def evaluate_run(run: Run, step: int, metrics) -> dict:
    """Rank 0 evaluates (held-out loss; the demo's accuracy) and records it."""
    record = {"step": step, **evaluate(run.model, run.tokenizer, run.transform, run.held_out, run.demo_items,
                                       run.args.max_len, run.autocast, run.ranks.device)}
    write(metrics, record)
    return record


def next_batch(it) -> dict:
    batch = next(it)
    while batch is None:  # every picture was unreadable (--skip-bad): take the next batch, so that every rank
        batch = next(it)  # still makes the backward DDP waits for
    return batch


def mean_losses(losses: dict[str, list[torch.Tensor]], ranks: Ranks) -> dict[str, float]:
    """{"loss_lang": ..., "loss_vl": ...}: the mean over micro-batches and ranks (each has as many)."""
    means = torch.stack([torch.stack(losses[k]).mean() for k in losses])
    if ranks.distributed:
        dist.all_reduce(means)
        means /= ranks.world
    return {f"loss_{k}": v for k, v in zip(losses, means.tolist())}


class StopSignal:
    """SIGTERM/SIGINT handler: remembers the signal; the loop saves and exits cleanly after the current step."""

    def __init__(self):
        self.signum = 0
        signal.signal(signal.SIGTERM, self)
        signal.signal(signal.SIGINT, self)

    def __call__(self, signum, frame):
        self.signum = signum

    def agreed(self, ranks: Ranks) -> str | None:
        """The signal's name once any rank has caught one, on every rank: a scheduler's SIGTERM reaches the ranks
        at different moments, and a rank that stopped alone would wait in the checkpoint's collective while the
        others wait in the next step's."""
        signum = torch.tensor(self.signum, device=ranks.device)
        if ranks.distributed:
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return signal.Signals(int(signum)).name if signum else None


def open_metrics(path: str, start: int):
    """metrics.jsonl for appending, from optimizer step `start` on. The records after it (a resumed run went on
    past its checkpoint before it was stopped; a fresh start keeps none) and a torn last line (killed mid-write)
    are dropped first: the run writes those steps again, so the file reads as one uninterrupted run's."""
    if os.path.isfile(path):
        kept = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not line.endswith("\n") or record.get("step", 0) > start:
                    break
                kept.append(line)
        checkpoints.atomic_write(path, lambda f: f.write("".join(kept).encode()))
    return open(path, "a", encoding="utf-8")


def write(metrics, record: dict):
    """One whole line, on disk before training goes on: a crash leaves at most a torn last line."""
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()
        os.fsync(metrics.fileno())


@contextmanager
def holding(model, tensors: dict[str, torch.Tensor]):
    """Inside the block the named parameters hold `tensors` (the fp32 masters, for lora.pt), then their own."""
    params = dict(model.named_parameters())
    own = {n: params[n].data for n in tensors}
    for n, t in tensors.items():
        params[n].data = t
    try:
        yield
    finally:
        for n, t in own.items():
            params[n].data = t


def main(argv=None):
    args = parse_args(argv)
    try:
        fine_tune(args, setup(args))
    finally:
        # Every way out (done, stopped by a signal, failed) tears the process group down first: left to the
        # interpreter's exit, gloo's threads may abort the process (SIGABRT, "terminate called without an active
        # exception") when the other ranks have gone or are going.
        if dist.is_initialized():
            dist.destroy_process_group()


def fine_tune(args, ranks: Ranks):
    """This rank's part of the run: the model and data, the loop, then the checkpoint, lora.pt and the evaluation."""
    os.makedirs(args.out, exist_ok=True)
    # -- the model, the data, the optimizer ----------------------------------------------------------------------
    model, tokenizer, transform, settings, unfrozen = make_model(args, ranks)
    vl_stream, lang_stream, held_out, demo_items = make_data(args, ranks, tokenizer, transform)
    total = max(1, int(args.epochs * vl_stream.steps_per_epoch) // args.grad_accum)
    optimizer, scheduler = make_optimizer(model, args, total)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if ranks.device.type == "cuda" and not args.fast \
        else nullcontext()  # the fast path's model is all bf16: nothing to cast
    run = Run(args, ranks, model, tokenizer, transform, settings, unfrozen, (vl_stream, lang_stream), held_out,
              demo_items, optimizer, scheduler, total, autocast, os.path.join(args.out, "ckpt.pt"))
    # -- state: resumed, or seeded -------------------------------------------------------------------------------
    resumed = resume(run) if args.resume else None
    step, bad_total = resumed or (0, 0)
    if resumed:
        log(ranks, f"resumed from {run.ckpt_path} at step {step}")
    else:
        if args.resume:
            log(ranks, f"--resume auto: no {run.ckpt_path} yet, starting afresh")
        torch.manual_seed(args.seed + ranks.rank)
        random.seed(args.seed + ranks.rank)
        np.random.seed(args.seed + ranks.rank)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(ranks, f"{'demo: ' if args.demo else ''}{trainable / 1e6:.2f} M trainable parameters ({len(unfrozen)} "
        f"tensors in full); {len(vl_stream.dataset)} vision-language + {len(lang_stream.dataset)} language samples; "
        f"effective batch {ranks.world * args.batch_size * args.grad_accum * 2} = {ranks.world} ranks x "
        f"{args.batch_size} x {args.grad_accum} accumulation x 2 kinds; {min(total, args.max_steps or total)} of "
        f"{total} optimizer steps on {ranks.device}" + (" (fast path)" if args.fast else ""))
    # -- the loop ------------------------------------------------------------------------------------------------
    metrics = open_metrics(os.path.join(args.out, "metrics.jsonl"), step) if ranks.main else None
    started = time.time()
    try:
        step, bad_total, last, tokens_seen = train(run, step, bad_total, metrics)
    except Stop as s:
        save_checkpoint(run, s.step, s.bad_total)
        log(ranks, f"{s}: stopped at step {s.step}; {run.ckpt_path} written, continue with --resume")
        return
    except torch.OutOfMemoryError:
        fail("out of memory: try --grad-checkpointing, a smaller --max-len or --batch-size "
             "(the effective batch is kept by raising --grad-accum)")
    # -- the end -------------------------------------------------------------------------------------------------
    save_checkpoint(run, step, bad_total)  # so that a run cut short by --max-steps can go on with --resume
    if ranks.main:
        with holding(model, optimizer.masters):  # lora.pt in fp32
            checkpoints.save_lora(model, os.path.join(args.out, "lora.pt"), settings, unfrozen)
    if ranks.distributed:
        dist.barrier()
    if ranks.main:
        final = evaluate_run(run, step, metrics) if held_out or demo_items else {}
        metrics.close()
        if args.demo:  # a few held-out pictures to chat about
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            for i, (conv, _) in enumerate(demo_items[-4:]):
                conversation.load_image(conv.image).save(os.path.join(args.out, "samples", f"{i}.png"))
        skipped = vl_stream.skipped + lang_stream.skipped
        log(ranks, f"done: {step} steps, {tokens_seen:,} tokens in {(time.time() - started) / 60:.1f} min; "
            f"final loss_vl {last.get('loss_vl', float('nan')):.4f}, "
            f"loss_lang {last.get('loss_lang', float('nan')):.4f}"
            + "".join(f", {k} {v:.3f}" for k, v in final.items() if k != "step")
            + (f"; {bad_total} steps skipped (non-finite)" if bad_total else "")
            + (f"; {skipped} samples skipped (unreadable)" if skipped else "")
            + f"\noutputs in {args.out}/: lora.pt (chat: python chat.py --ckpt {args.out}"
            + (f" {args.out}/samples/0.png" if args.demo else "") + "), metrics.jsonl")


def train(run: Run, step: int, bad_total: int, metrics):
    """The loop: optimizer steps from `step` to the last; checkpoints and evaluations on their schedule.
    Returns (step, non-finite steps, the last step's record, tokens seen); raises Stop on SIGTERM/SIGINT."""
    args, ranks = run.args, run.ranks
    steps = min(run.total, args.max_steps or run.total)
    step_fn = WithLoss(run.model)
    if ranks.distributed:  # only the trainable parameters are reduced: DDP skips those that don't require grad
        step_fn = DistributedDataParallel(step_fn, device_ids=[ranks.device] if ranks.device.type == "cuda" else None,
                                          broadcast_buffers=False)
    vl_iter, lang_iter = (iter(s) for s in run.streams)
    aug_rng = random.Random(args.seed)
    stop = StopSignal()
    bar = tqdm(total=steps, initial=step, disable=not ranks.main, dynamic_ncols=True)
    bad_in_a_row, tokens_seen, last = 0, 0, {}
    while step < steps:
        t0 = time.time()
        micro_batches = [(next_batch(lang_iter), next_batch(vl_iter)) for _ in range(args.grad_accum)]
        for _, vl in micro_batches:  # OpenFlamingo's media-placement augmentation: the other rule, half the time
            if args.media_augmentation and aug_rng.random() < 0.5:
                vl["attend_previous"] = not args.attend_previous
        done = train_iteration(step_fn, micro_batches, ranks.device, run.autocast,
                               args.bucket if args.fast else 0, args.max_len)
        losses = mean_losses(done.losses, ranks)
        grad_norm = optimizer_step(run.optimizer, run.scheduler)
        bad_in_a_row = 0 if math.isfinite(grad_norm) else bad_in_a_row + 1
        if bad_in_a_row:
            bad_total += 1
            log(ranks, f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_total} so far)")
        step += 1
        tokens_seen += done.tokens * ranks.world
        last = {"step": step, **losses, "lr": run.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                "tokens_per_s": done.tokens * ranks.world / (time.time() - t0), "padding": done.padding / done.tokens}
        write(metrics, last)
        bar.update(1)
        bar.set_postfix(vl=f"{last['loss_vl']:.3f}", lang=f"{last['loss_lang']:.3f}", lr=f"{last['lr']:.2e}",
                        tok_s=f"{last['tokens_per_s']:.0f}", pad=f"{last['padding']:.0%}")
        if bad_in_a_row >= MAX_BAD_STEPS:
            log(ranks, f"stopping: {MAX_BAD_STEPS} optimizer steps in a row had non-finite losses or gradients "
                f"(lower --lr?); the last good checkpoint is {run.ckpt_path}")
            sys.exit(1)
        if args.save_every and step % args.save_every == 0 and step < steps:
            save_checkpoint(run, step, bad_total)
        if args.eval_every and step % args.eval_every == 0 and step < steps and (run.held_out or run.demo_items):
            if ranks.main:
                record = evaluate_run(run, step, metrics)
                bar.write(tagged("eval " + " ".join(f"{k} {v:.4g}" for k, v in record.items())))
            if ranks.distributed:
                dist.barrier()
        if name := stop.agreed(ranks):
            bar.close()
            raise Stop(name, step, bad_total)
    bar.close()
    return step, bad_total, last, tokens_seen


if __name__ == "__main__":
    try:
        main()
    except (checkpoints.CheckpointError, data.DataError, FileNotFoundError) as e:  # the user's files: named
        fail(f"error: {e}")
