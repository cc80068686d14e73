"""Shared test fixtures and helpers: a sentencepiece model trained here (LLaMA's settings), tiny model configs, and
the writers and inputs that several test files use."""
import json
import os
import random
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import checkpoints  # noqa: E402
import demo  # noqa: E402
import lora  # noqa: E402
import mmgpt  # noqa: E402
import train  # noqa: E402
from fake_release import fake_mmengine, peft_keys  # noqa: E402
from engine import Engine, Request, Sampling  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORDS = ("the a cat dog sat on mat red blue green yellow square circle triangle picture shows two three four "
         "what colour is shape how many left right top bottom there are answer response instruction image below "
         "describes task write that appropriately completes request ### : . , ? ! 0 1 2 3 4 5 6 7 8 9").split()


def train_sentencepiece(prefix: str, vocab_size: int = 400) -> str:
    """A BPE model with LLaMA's tokenizer settings (byte fallback, split digits, identity normalisation, extra
    whitespace kept, dummy prefix; unk 0, bos 1, eos 2). Trains in well under a second."""
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(2000)]
    lines += ["Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.", "### Image:", "### Instruction:", "### Response:", "### Input:"] * 20
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    return train_sentencepiece(str(tmp_path_factory.mktemp("sp") / "sp"))


@pytest.fixture(scope="session")
def tokenizer(sp_model) -> Tokenizer:
    return Tokenizer(sp_model)


TINY_VISION = mmgpt.PRESETS["tiny"]["vision"]


def tiny_config(tokenizer, **overrides) -> mmgpt.Config:
    return mmgpt.config("tiny", **{"vocab_size": tokenizer.vocab_size, "image_id": tokenizer.image_id, **overrides})


def tiny_model(tokenizer, seed: int = 0, gates: tuple = (0.7, -0.5), **overrides) -> mmgpt.MMGPT:
    """A random tiny model in eval mode; gates nonzero so that the pictures matter."""
    torch.manual_seed(seed)
    model = mmgpt.build(tiny_config(tokenizer, **overrides)).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.xattn is not None:
                layer.xattn.attn_gate.fill_(gates[0])
                layer.xattn.ff_gate.fill_(gates[1])
    return model


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model gains nothing from threads, and on a busy machine they cost seconds per forward. A module
    asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------
# Helpers shared by several test files

def write_vision(model, tmp_path, full_clip=True):
    cfg_path = tmp_path / "tiny-vit.json"
    cfg_path.write_text(json.dumps(dict(TINY_VISION, text_cfg={"context_length": 8, "vocab_size": 50, "width": 32,
                                                               "heads": 2, "layers": 1})))
    sd = {k: v.clone() for k, v in model.vision.visual.state_dict().items()}
    if full_clip:  # a whole CLIP state dict: the text tower's keys are ignored
        sd = {f"visual.{k}": v for k, v in sd.items()}
        sd.update({"token_embedding.weight": torch.zeros(50, 32), "logit_scale": torch.ones([])})
    weights = tmp_path / "tiny-vit.pt"
    torch.save(sd, weights)
    return str(cfg_path), str(weights)


def write_release(model, path, r, alpha):
    sd = {k: t.clone() for n, t in lora.lora_state_dict(model).items() for k in peft_keys(n)}
    for i in model.cfg.xattn_layers:  # ... and the frozen block weights
        for k, t in model.layers[i].xattn.state_dict().items():
            if ".lora_" not in k:
                sd[f"module.lang_encoder.base_model.model.gated_cross_attn_layers.{i}.{k}"] = t.clone()
    sd["module.lang_encoder.base_model.model.model.layers.0.decoder_layer.self_attn.rotary_emb.inv_freq"] = \
        torch.ones(model.cfg.head_dim // 2)
    with fake_mmengine() as ConfigDict:
        config = ConfigDict(lora=True, lora_r=r, lora_alpha=alpha, lora_dropout=0.0, vis=True, unfrozen=[],
                            lora_target_modules=list(lora.DEFAULT_TARGETS))
        torch.save({"model_state_dict": sd, "tuning_config": config}, path)


def tiny_release(tmp, sp_model, tokenizer, never_ends: bool = False, **overrides) -> dict:
    """A tiny model with LoRA and nonzero gates, written as an HF LLaMA dir, an OpenFlamingo checkpoint.pt, the
    MultiModal-GPT release .pt and a train.py run folder; two pictures and a broken one; the model read back.
    never_ends: the </s> row of lm_head is zero, so no greedy answer ends before max_tokens. overrides: config."""
    model = tiny_model(tokenizer, seed=8, **overrides)  # a random model whose greedy answers depend on the picture
    lora.inject(model, r=4, alpha=8, within="layers.")
    with torch.no_grad():
        for m in lora.lora_layers(model):
            m.lora_B.normal_(0, 0.3)
        if never_ends:
            model.lm_head.weight[tokenizer.eos_id] = 0
    f = {"llama": str(tmp / "llama"), "openflamingo": str(tmp / "checkpoint.pt"), "release": str(tmp / "release.pt"),
         "run": str(tmp / "run")}
    checkpoints.save_llama(model, f["llama"], sp_model)
    checkpoints.save_openflamingo(model, f["openflamingo"])
    write_release(model, f["release"], r=4, alpha=8)
    f["vision"], f["vision_weights"] = write_vision(model, tmp)
    os.makedirs(f["run"])
    checkpoints.save_lora(model, os.path.join(f["run"], "lora.pt"),
                          {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                           "lora_targets": list(lora.DEFAULT_TARGETS), "llama": f["llama"],
                           "openflamingo": f["openflamingo"], "vision": f["vision"],
                           "vision_weights": f["vision_weights"]})
    g = torch.Generator().manual_seed(0)
    for name in ("pic1", "pic2"):
        f[name] = str(tmp / f"{name}.png")
        Image.fromarray(torch.randint(0, 256, (30, 40, 3), generator=g, dtype=torch.uint8).numpy()).save(f[name])
    f["broken"] = str(tmp / "broken.png")
    with open(f["broken"], "wb") as fh:
        fh.write(b"not a picture")
    f["model"], f["tokenizer"], f["transform"] = checkpoints.load(
        f["llama"], f["openflamingo"], f["release"], f["vision"], f["vision_weights"])
    return f


def lora_model(tokenizer, **overrides):
    model = tiny_model(tokenizer, **overrides)
    torch.manual_seed(1)
    lora.inject(model, r=4, alpha=8, within="layers.")
    with torch.no_grad():  # B starts at zero: give it values so that A's gradients are not zero too
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.02)
    lora.mark_trainable(model)
    return model.train()


def micro_batches(tokenizer, n=2, lengths=(20, 13)):
    """Loader-style pairs (language-only, vision-language): right padding, labels on the answers only."""
    g = torch.Generator().manual_seed(2)
    pairs = []
    for length in lengths:
        pair = []
        for kind in ("lang", "vl"):
            ids = torch.randint(3, tokenizer.image_id - 1, (n, 24), generator=g)
            mask = torch.zeros_like(ids)
            mask[0, :24], mask[1, :length] = 1, 1
            ids[mask == 0] = tokenizer.pad_id
            labels = torch.where(mask.bool(), ids, -100)
            labels[:, :6] = -100
            images = None
            if kind == "vl":
                ids[:, 2] = tokenizer.image_id
                images = torch.randn(n, 1, 3, 28, 28, generator=g)
            pair.append({"input_ids": ids, "labels": labels, "attention_mask": mask, "images": images})
        pairs.append(tuple(pair))
    return pairs


def grads_after(model, batches, bucket=0, device="cpu"):
    done = train.train_iteration(train.WithLoss(model), batches, device, bucket=bucket, max_len=64)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return done, grads


PROMPTS = ["the cat sat on <image> a mat", "<image> red <image> blue square", "what colour is the dog",
           "a picture shows two three four circles on the left <image> and"]


def batch_input(tokenizer):
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    g = torch.Generator().manual_seed(3)
    images = [torch.randn(p.count(tokenizer.image_id), 3, 28, 28, generator=g) if tokenizer.image_id in p else None
              for p in prompts]
    return prompts, images


def full_forward_greedy(model, ids, images, n, banned, eos_id=-1) -> list[int]:
    """Greedy decoding with a full forward (no cache) over the whole sequence at every step: what cached
    decoding is held against."""
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(images, torch.tensor([ids + out]))[0, -1].float()
            logits[banned] = -float("inf")
            token = int(logits.argmax())
            if token == eos_id:
                break
            out.append(token)
    return out


def one_at_a_time(model, tokenizer, prompts, images, eos_id, n=10) -> list[list[int]]:
    """Greedy answers, each prompt decoded alone by an engine of one slot."""
    return [Engine(model, tokenizer, eos_id=eos_id).generate([Request(p, [] if im is None else list(im), n,
                                                                      Sampling(greedy=True))])[0].tokens
            for p, im in zip(prompts, images)]


# ----------------------------------------------------------------------------------------------------------------
# train.py end to end: the demo's random base, a few samples, tiny settings

def train_base(tmp) -> dict:
    """The demo's random base model in the real formats, and a small demo data config, in the folder tmp."""
    paths = demo.make_base(str(tmp), seed=0)
    config = tmp / "tiny.json"
    config.write_text(json.dumps({"seed": 0, "demo": {"vl": 48, "lang": 24, "seed": 0}}))
    return {**paths, "config": str(config), "tmp": tmp}


def train_command(base, out, *extra, launcher=(sys.executable,)) -> list[str]:
    """train.py on that base, writing to out, started by `launcher` (python, or torchrun and its flags)."""
    return [*launcher, os.path.join(ROOT, "train.py"), "--config", base["config"], "--llama", base["llama"],
            "--openflamingo", base["openflamingo"], "--vision", base["vision"], "--vision-weights",
            base["vision_weights"], "--out", str(out), "--lr", "3e-3", "--warmup", "1", "--batch-size", "1",
            "--max-len", "96", "--workers", "0", "--lora-r", "4", "--unfreeze", "perceiver.norm", *extra]


def torchrun(*flags) -> list[str]:
    """torchrun, run by this Python (a fresh venv's torchrun script may not be on PATH)."""
    return [sys.executable, "-m", "torch.distributed.run", *flags]


def train_env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)


def run_train(base, out, *extra, nproc=1, **popen):
    """train.py to its end, in one process or `nproc` ranks; returns what it wrote. Given Popen's arguments, the
    running process instead."""
    launcher = torchrun("--standalone", f"--nproc_per_node={nproc}") if nproc > 1 else (sys.executable,)
    cmd = train_command(base, out, *extra, launcher=launcher)
    if popen:
        return subprocess.Popen(cmd, cwd=ROOT, env=train_env(), **popen)
    done = subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def lora_weights(out) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(out, "lora.pt"), weights_only=True)["weights"]


def assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < tol, k


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped without it); run them with `pytest -m gpu tests`")


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
