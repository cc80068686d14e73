"""Joint LoRA fine-tuning of MultiModal-GPT (paper 4.1) on plain torch: DDP and manual gradient accumulation.

    torchrun --nproc_per_node 8 train.py --config configs/mmgpt.json    # the paper's run (weights in checkpoints/)
    python train.py                                                      # the demo: a tiny model, minutes on a CPU

Each iteration backpropagates one language-only batch, then one vision-language batch; gradients accumulate over
--grad-accum iterations with DDP's no_sync on all but the last backward, so ranks all-reduce once per optimizer
step. Gradients are clipped once per step. The effective batch is ranks x batch x accumulation x 2 (paper: 256).

Outputs in --out: lora.pt (final weights + the settings that rebuild the model: `checkpoints.load_run(out)`),
ckpt.pt (written atomically every --save-every steps and on SIGTERM/Ctrl-C; --resume continues from it exactly),
metrics.jsonl (one record per optimizer step and per evaluation).
"""
import argparse
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import demo
import lora as lora_lib
import checkpoints
import mmgpt

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
    ap.add_argument("--out", help="output folder (demo: runs/demo, else runs/mmgpt)")
    ap.add_argument("--lr", type=float, help="peak learning rate (paper 1e-5; demo 2e-3)")
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
                         "the demo trains its random ViT at 3e-4)")
    ap.add_argument("--epochs", type=float, help="passes over the vision-language data (sets the LR schedule)")
    ap.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule is kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--attend-previous", action=argparse.BooleanOptionalAction,
                    help="the media-masking rule: each token sees the picture before it, not the one after "
                         "(saved with the run; default: on for the demo, off for the release weights)")
    ap.add_argument("--media-augmentation", action="store_true",
                    help="OpenFlamingo's media-placement augmentation: half the VL batches use the other rule")
    ap.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps")
    ap.add_argument("--eval-every", type=int, help="evaluate every N optimizer steps (0: only at the end of the demo)")
    ap.add_argument("--eval-samples", type=int, default=64, help="held-out conversations (split off the VL data)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding pictures")
    ap.add_argument("--group-by-length", type=int, default=0, metavar="WINDOW",
                    help="sort each window of this many samples by length (less padding)")
    ap.add_argument("--skip-bad", action="store_true", help="skip unreadable records and pictures, and count them")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    args = ap.parse_args(argv)
    args.demo = args.config is None and not (args.llama or args.openflamingo or args.lora)
    for k, v in (demo.SETTINGS if args.demo else PAPER).items():
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


def open_metrics(path: str, resume_step: int | None):
    """metrics.jsonl for appending. On --resume, the records after the checkpoint's step (the run went on past
    it before it was stopped) and a torn last line (killed mid-write) are dropped first: the resumed run writes
    those steps again, so the file reads as one uninterrupted run's."""
    if resume_step is not None and os.path.isfile(path):
        kept = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
                if not line.endswith("\n") or record.get("step", 0) > resume_step:
                    break
                kept.append(line)
        checkpoints.atomic_write(path, lambda f: f.write("".join(kept).encode()))
    return open(path, "a", encoding="utf-8")


def write_metrics(f, record: dict):
    """One whole line, on disk before training goes on: a crash leaves at most a torn last line."""
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


@torch.no_grad()
def evaluate(model, tokenizer, transform, held_out, demo_items, max_len, autocast, device) -> dict:
    """Held-out loss; for the demo also exact-answer accuracy of greedy answers, and its chance level."""
    model.eval()
    losses = []
    for conv in held_out:
        rendered = data.render(conv, tokenizer, max_len)
        if rendered is None:
            continue
        ids, labels = (torch.tensor([x], device=device) for x in rendered)
        images = None if conv.image is None else transform(data.load_image(conv.image))[None, None].to(device)
        with autocast:
            losses.append(float(mmgpt.lm_loss(model(images, ids), labels)))
    out = {"eval_loss": sum(losses) / max(1, len(losses))}
    if demo_items:
        answers = []
        for conv, _ in demo_items:
            ids = tokenizer.encode(data.prompt(conv, open_last=True))
            image = transform(data.load_image(conv.image))[None, None].to(device)
            with autocast:
                answer = list(mmgpt.generate(model, model.new_cache(len(ids) + 16), ids, image, max_new_tokens=12,
                                             eos_id=tokenizer.eos_id, banned=tokenizer.never_generate, greedy=True))
            answers.append(tokenizer.decode(answer))
        out.update(demo.score([e for _, e in demo_items], answers))
    model.train()
    return out


def main(argv=None):
    args = parse_args(argv)
    distributed = "RANK" in os.environ
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    main_rank = rank == 0
    log = print if main_rank else (lambda *a, **k: None)
    os.makedirs(args.out, exist_ok=True)

    # -- model ---------------------------------------------------------------------------------------------------
    if args.demo:
        base = demo.make_base(args.out, args.seed) if main_rank else None
        if distributed:
            box = [base]
            dist.broadcast_object_list(box)
            base = box[0]
        args.llama, args.openflamingo = base["llama"], base["openflamingo"]
        args.vision, args.vision_weights = base["vision"], base["vision_weights"]
    cuda = device.type == "cuda"
    frozen_dtype = torch.bfloat16 if cuda else torch.float32   # never an fp32 copy of the frozen 8B on a GPU
    model, tokenizer, transform = checkpoints.load(args.llama, args.openflamingo, args.lora, args.vision,
                                                  args.vision_weights, device, frozen_dtype, args.attend_previous)
    if args.lora:  # started from LoRA weights: train those (their rank, alpha and targets)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, lora_lib.LoRALinear)}
        first = next(iter(layers.values()))
        # Targets as name suffixes ("self_attn.q_proj", "xattn.ff.1"): what inject() needs to rebuild the same set.
        args.lora_r, args.lora_alpha = first.r, first.alpha
        args.lora_targets = lora_lib.targets_of(model)
    else:
        torch.manual_seed(args.seed)  # LoRA A's initial values: the same for every rank and every run
        lora_lib.inject(model, args.lora_r, args.lora_alpha, args.lora_dropout, args.lora_targets, within="layers.")
    unfrozen = [n for n, _ in model.named_parameters() if n.startswith("vision.")] if args.vision_lr else []
    unfrozen += [n for n, _ in model.named_parameters()
                 if ".lora_" not in n and not n.startswith("vision.") and any(s in n for s in args.unfreeze)]
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n or n in unfrozen)
        if p.requires_grad:
            p.data = p.data.float()  # trained weights in fp32; the frozen ones stay in bf16
    model.train()
    model.grad_checkpointing = args.grad_checkpointing
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Only the trainable parameters are reduced: DDP skips parameters that don't require grad.
    ddp = DistributedDataParallel(model, device_ids=[device] if cuda else None, broadcast_buffers=False) \
        if distributed else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    # -- data ----------------------------------------------------------------------------------------------------
    mix = data.load_mix(args.config, skip_bad=args.skip_bad)
    held_out, demo_items = [], []
    if args.demo:
        demo_items = demo.eval_set(n=200, seed=args.seed + 1, pictures=demo.PICTURES)
        held_out = [data.Conversation(c.image, c.turns[:-1] + [data.Turn(c.turns[-1].question, a)])
                    for c, a in demo_items[:args.eval_samples]]
    elif args.eval_every:
        held_out, mix.vl = mix.vl[-args.eval_samples:], mix.vl[:-args.eval_samples]
    vl_stream, lang_stream = data.train_streams(
        mix, tokenizer, transform, batch_size=args.batch_size, rank=rank, world_size=world, seed=args.seed,
        max_len=args.max_len, num_workers=args.workers, group_window=args.group_by_length, skip_bad=args.skip_bad)
    if vl_stream is None or lang_stream is None:
        sys.exit(f"{args.config}: the recipe needs both vision-language and language-only data")
    total = max(1, int(args.epochs * vl_stream.steps_per_epoch) // args.grad_accum)
    steps = min(total, args.max_steps or total)

    params = dict(model.named_parameters())
    groups = [{"params": [p for n, p in params.items() if p.requires_grad and not n.startswith("vision.")]}]
    if args.vision_lr:  # the demo's random ViT: held-out accuracy 0.765 at step 250 with 3e-4, 0.605 with 1e-3
        groups.append({"params": list(model.vision.parameters()), "lr": args.vision_lr})
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine(s, args.warmup, total))
    settings = {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
                "lora_targets": list(args.lora_targets), "unfreeze": args.unfreeze,
                "attend_previous": args.attend_previous, "llama": args.llama,
                "openflamingo": args.openflamingo, "vision": args.vision, "vision_weights": args.vision_weights}
    step, bad_in_a_row, bad_total = 0, 0, 0
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if args.resume:
        if not os.path.isfile(ckpt_path):
            sys.exit(f"--resume: {ckpt_path} not found")
        ckpt = checkpoints.read_train_state(ckpt_path)  # nothing in it can run code
        if ckpt["world"] * ckpt["batch_size"] * ckpt["grad_accum"] != world * args.batch_size * args.grad_accum:
            sys.exit(f"--resume: {ckpt_path} was written with another effective batch")
        with torch.no_grad():
            for n, t in ckpt["trainable"].items():
                params[n].copy_(t)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        vl_stream.load_state_dict(ckpt["vl_stream"])
        lang_stream.load_state_dict(ckpt["lang_stream"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        step, bad_total = ckpt["step"], ckpt["bad_steps"]
        log(f"resumed from {ckpt_path} at step {step}")
    else:
        torch.manual_seed(args.seed + rank)
        random.seed(args.seed + rank)
        np.random.seed(args.seed + rank)

    def save_checkpoint():
        states = [None] * world
        if distributed:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if main_rank:
            checkpoints.save_train_state({
                "step": step, "bad_steps": bad_total, "world": world, "batch_size": args.batch_size,
                "grad_accum": args.grad_accum, "settings": settings,
                "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "vl_stream": vl_stream.state_dict(), "lang_stream": lang_stream.state_dict(), "rng": states},
                ckpt_path)

    stop = {"signal": None}

    def on_signal(signum, frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    effective = world * args.batch_size * args.grad_accum * 2
    log(f"{'demo: ' if args.demo else ''}{sum(p.numel() for p in trainable) / 1e6:.2f} M trainable parameters "
        f"({len(unfrozen)} tensors in full); {len(vl_stream.dataset)} vision-language + {len(lang_stream.dataset)} "
        f"language samples; effective batch {effective} = {world} ranks x {args.batch_size} x {args.grad_accum} "
        f"accumulation x 2 kinds; {steps} of {total} optimizer steps on {device}")
    metrics = open_metrics(os.path.join(args.out, "metrics.jsonl"), step if args.resume else None) \
        if main_rank else None
    vl_iter, lang_iter = iter(vl_stream), iter(lang_stream)
    bar = tqdm(total=steps, initial=step, disable=not main_rank, dynamic_ncols=True)
    started, tokens_seen, last = time.time(), 0, {}
    aug_rng = random.Random(args.seed)
    try:
        while step < steps:
            t0, tokens = time.time(), 0
            sums = torch.zeros(4, device=device)  # loss_vl sum, vl batches, loss_lang sum, lang batches
            for micro in range(args.grad_accum):
                for kind, it in (("lang", lang_iter), ("vl", vl_iter)):
                    batch = next(it)
                    while batch is None:  # every picture was unreadable (--skip-bad): take the next batch, so
                        batch = next(it)  # that every rank still makes the backward DDP waits for
                    # One all-reduce per optimizer step: on the last backward, which is the vision-language one
                    # (it uses every trainable parameter; the language-only forward skips the cross-attention).
                    last_backward = micro == args.grad_accum - 1 and kind == "vl"
                    sync = nullcontext() if ddp is None or last_backward else ddp.no_sync()
                    ids = batch["input_ids"].to(device, non_blocking=True)
                    images = None if batch["images"] is None else batch["images"].to(device, non_blocking=True)
                    flip = kind == "vl" and args.media_augmentation and aug_rng.random() < 0.5
                    attend_previous = not args.attend_previous if flip else None  # None: the model's own rule
                    with sync:
                        with autocast:
                            logits = (ddp or model)(images, ids, batch["attention_mask"].to(device), attend_previous)
                            loss = mmgpt.lm_loss(logits, batch["labels"].to(device))
                        (loss / args.grad_accum).backward()
                    i = 0 if kind == "vl" else 2
                    sums[i] += loss.detach()
                    sums[i + 1] += 1
                    tokens += int(batch["attention_mask"].sum())
            if distributed:
                dist.all_reduce(sums)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            if torch.isfinite(grad_norm):  # the same on every rank: gradients were all-reduced
                optimizer.step()
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                bad_total += 1
                log(f"step {step + 1}: non-finite loss or gradient, step skipped ({bad_total} so far)")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            tokens_seen += tokens * world
            sums = sums.tolist()
            last = {"step": step, "loss_vl": sums[0] / max(1, sums[1]), "loss_lang": sums[2] / max(1, sums[3]),
                    "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
                    "tokens_per_s": tokens * world / (time.time() - t0)}
            if main_rank:
                write_metrics(metrics, last)
                bar.update(1)
                bar.set_postfix(vl=f"{last['loss_vl']:.3f}", lang=f"{last['loss_lang']:.3f}", lr=f"{last['lr']:.2e}",
                                tok_s=f"{last['tokens_per_s']:.0f}")
            if bad_in_a_row >= MAX_BAD_STEPS:
                log(f"stopping: {MAX_BAD_STEPS} optimizer steps in a row had non-finite losses or gradients "
                    f"(lower --lr?); the last good checkpoint is {ckpt_path}")
                sys.exit(1)
            if args.save_every and step % args.save_every == 0 and step < steps:
                save_checkpoint()
            if args.eval_every and step % args.eval_every == 0 and step < steps and (held_out or demo_items):
                if main_rank:
                    record = {"step": step, **evaluate(model, tokenizer, transform, held_out, demo_items,
                                                       args.max_len, autocast, device)}
                    write_metrics(metrics, record)
                    bar.write("eval " + " ".join(f"{k} {v:.4g}" for k, v in record.items()))
                if distributed:
                    dist.barrier()
            if stop["signal"]:
                raise Stop(stop["signal"])
    except Stop as s:
        save_checkpoint()
        bar.close()
        log(f"{s}: stopped at step {step}; {ckpt_path} written, continue with --resume")
        return
    except torch.OutOfMemoryError:
        sys.exit("out of memory: try --grad-checkpointing, a smaller --max-len or --batch-size "
                 "(the effective batch is kept by raising --grad-accum)")
    bar.close()

    # -- the end -------------------------------------------------------------------------------------------------
    save_checkpoint()  # so that a run cut short by --max-steps can go on with --resume
    if main_rank:
        checkpoints.save_lora(model, os.path.join(args.out, "lora.pt"), settings, unfrozen)
    if distributed:
        dist.barrier()
    final = {}
    if main_rank and (held_out or demo_items):
        final = {"step": step, **evaluate(model, tokenizer, transform, held_out, demo_items, args.max_len,
                                          autocast, device)}
        write_metrics(metrics, final)
    if main_rank and args.demo:  # a few held-out pictures to chat about
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        for i, (conv, _) in enumerate(demo_items[-4:]):
            data.load_image(conv.image).save(os.path.join(args.out, "samples", f"{i}.png"))
    if main_rank:
        metrics.close()
        took = time.time() - started
        print(f"done: {step} steps, {tokens_seen:,} tokens in {took / 60:.1f} min; final loss_vl "
              f"{last.get('loss_vl', float('nan')):.4f}, loss_lang {last.get('loss_lang', float('nan')):.4f}"
              + "".join(f", {k} {v:.3f}" for k, v in final.items() if k != "step")
              + (f"; {bad_total} steps skipped (non-finite)" if bad_total else "")
              + (f"; {vl_stream.skipped + lang_stream.skipped} samples skipped (unreadable)"
                 if vl_stream.skipped + lang_stream.skipped else "")
              + f"\noutputs in {args.out}/: lora.pt (chat: python chat.py --ckpt {args.out}"
              + (f" {args.out}/samples/0.png" if args.demo else "") + "), metrics.jsonl")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (checkpoints.CheckpointError, data.DataError, FileNotFoundError) as e:  # the user's files: named
        sys.exit(f"error: {e}")
