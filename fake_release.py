"""Random weights in the MultiModal-GPT release's exact files and shapes, to measure loading and decoding at the
release's size on a machine that has not got the real weights (or to test the loaders on a small copy).

    python fake_release.py /work/release                  # LLaMA-7B, OpenFlamingo-9B, the LoRA, ViT-L/14 (~26 GB)
    python fake_release.py /tmp/small --preset small      # the same files at small widths (a few hundred MB)

Writes, under OUT, the layout the MultiModal-GPT README gives (checkpoints.RELEASE) plus the CLIP weights:
  checkpoints/llama-7b_hf/                  HF LLaMA: config.json, pytorch_model-0000N-of-0000M.bin (fp16, split at
                                            10 GB as transformers did), pytorch_model.bin.index.json, tokenizer.model
  checkpoints/OpenFlamingo-9B/checkpoint.pt perceiver, cross-attention blocks under both their names, 32003-row
                                            embeddings, rotary buffers; fp32 as the real one
  checkpoints/mmgpt-lora-v0-release.pt      {"model_state_dict", "tuning_config"}: peft keys under `module.`, r=16,
                                            the frozen cross-attention weights again (the same values), rotary buffers
  ViT-L-14.pt                               an open_clip CLIP state dict (visual.*), fp16 as OpenAI's
  vision.json (small preset only)           the small ViT's open_clip model config
One tensor is made at a time (a shard at a time is held, in its file's dtype), each from a generator seeded by its
name, so that the same weight written twice has the same values. The sentencepiece model (LLaMA's settings, 32,000
pieces) is trained on the Python standard library's sources, since LLaMA's own cannot be fetched.

Nothing here is a model anyone should use: the answers are noise. Loading and speed are what it is for.
"""
import argparse
import contextlib
import json
import os
import re
import sys
import types
import zlib

import sentencepiece as spm
import torch

import checkpoints
import lora
import mmgpt

# The small preset: the release's files, key layout and depth (32 layers, so that one layer is as small a part of
# the whole as at 7B) at widths that write and load in seconds.
SMALL_VISION = {"embed_dim": 256, "quick_gelu": True,
                "vision_cfg": {"image_size": 56, "layers": 2, "width": 256, "patch_size": 14, "head_width": 64}}
PRESETS = {
    "7b": dict(config={}, vocab=32000, vision="ViT-L-14", shard_bytes=10 * 10**9),
    "small": dict(config=dict(dim=512, n_layers=32, n_heads=8, hidden_dim=1408, perceiver_depth=2,
                              perceiver_latents=16, vision=SMALL_VISION), vocab=1000, vision=None,
                  shard_bytes=150 * 10**6),
}
LORA_R = 16


def random_tensor(name: str, shape, dtype) -> torch.Tensor:
    """N(0, 0.02) (norm weights: 1 + that), drawn from a generator seeded by the name: the same name, the same
    values, in whichever file and order it is written."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    t = torch.randn(shape, generator=g) * 0.02
    if re.search(r"(norm[^.]*|ln_\w+)\.weight$", name):
        t += 1
    return t.to(dtype)


def model_on_meta(preset: str, vocab: int) -> mmgpt.MMGPT:
    """The release's model laid out on the meta device (its names and shapes), LoRA injected as the release's."""
    p = PRESETS[preset]
    vision = dict(mmgpt.VIT_L_14, quick_gelu=True) if p["vision"] else p["config"]["vision"]
    cfg = mmgpt.Config(**{**p["config"], "vision": vision}, vocab_size=vocab + 3, image_id=vocab + 1)
    model = mmgpt.build(cfg, "meta")
    lora.inject(model, LORA_R, 16, within="layers.")
    return model


def write_llama(model: mmgpt.MMGPT, directory: str, vocab: int, shard_bytes: int):
    """The HF LLaMA directory's weights and config (the tokenizer is written by write_tokenizer)."""
    cfg = model.cfg
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
                   "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
                   "num_attention_heads": cfg.n_heads, "rms_norm_eps": cfg.norm_eps, "vocab_size": vocab,
                   "max_sequence_length": cfg.max_seq_len, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                   "hidden_act": "silu", "initializer_range": 0.02, "torch_dtype": "float16", "use_cache": True,
                   "tie_word_embeddings": False}, f, indent=2)
    shapes = {}     # HF name -> shape, in the files' order: embeddings, each layer, norm, lm_head
    for n, t in lora.file_tensors(model).items():
        if checkpoints.is_llama_param(n):
            shapes[checkpoints._hf_name(n)] = (vocab, *t.shape[1:]) if n in ("embed_tokens.weight",
                                                                             "lm_head.weight") else tuple(t.shape)
    for i in range(cfg.n_layers):
        shapes[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (cfg.head_dim // 2,)

    def place(k):   # embeddings, layer 0, 1, ..., the final norm, lm_head
        m = re.match(r"model\.layers\.(\d+)\.", k)
        return (1, int(m.group(1))) if m else (0 if k == "model.embed_tokens.weight" else 2 if "norm" in k else 3, 0)

    order = sorted(shapes, key=place)
    shards, size = [[]], 0
    for k in order:
        nbytes = 2 * torch.Size(shapes[k]).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    weight_map, total = {}, 0
    for i, keys in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        shard = {k: inv_freq(cfg) if k.endswith("inv_freq") else random_tensor(k, shapes[k], torch.float16)
                 for k in keys}
        torch.save(shard, os.path.join(directory, name))
        total += sum(t.nbytes for t in shard.values())
        weight_map.update({k: name for k in keys})
        print(f"  {name}: {len(keys)} tensors", file=sys.stderr, flush=True)
        del shard
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def inv_freq(cfg) -> torch.Tensor:
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))


def xattn_weights(model: mmgpt.MMGPT) -> dict[str, tuple]:
    """The frozen cross-attention blocks' parameters (our names, no LoRA) and their shapes."""
    return {n: tuple(t.shape) for n, t in lora.file_tensors(model).items() if ".xattn." in n and ".lora_" not in n}


def write_openflamingo(model: mmgpt.MMGPT, path: str):
    """OpenFlamingo-9B's checkpoint.pt: perceiver, cross-attention blocks (both names, one tensor), embeddings."""
    sd = {}
    for n, t in lora.file_tensors(model).items():
        if not checkpoints.is_flamingo_param(n):
            continue
        value = random_tensor(n, tuple(t.shape), torch.float32)
        sd.update({k: value for k in checkpoints.openflamingo_keys(n)})
    for i in range(model.cfg.n_layers):
        sd[f"lang_encoder.model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = inv_freq(model.cfg)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(sd, path)


@contextlib.contextmanager
def fake_mmengine():
    """Classes pickled under mmengine's ConfigDict / addict's Dict names, so that a file can hold a tuning_config
    as the release's does without mmengine installed (checkpoints reads them back as plain dicts)."""
    class Dict(dict):
        def __getstate__(self):
            return self

        def __setstate__(self, state):
            self.update(state)

    class ConfigDict(Dict):
        pass

    Dict.__module__, Dict.__qualname__ = "addict.addict", "Dict"
    ConfigDict.__module__, ConfigDict.__qualname__ = "mmengine.config.config", "ConfigDict"
    modules = {name: types.ModuleType(name) for name in ("addict", "addict.addict", "mmengine", "mmengine.config",
                                                          "mmengine.config.config")}
    modules["addict.addict"].Dict = Dict
    modules["mmengine.config.config"].ConfigDict = ConfigDict
    sys.modules.update(modules)
    try:
        yield ConfigDict
    finally:
        for name in modules:
            del sys.modules[name]


def peft_keys(name: str) -> list[str]:
    """Our LoRA name -> its keys in the release (DDP `module.`, peft `base_model.model.`, FlamingoLayer wrapping);
    a cross-attention block's also under the blocks' alias (the same tensor)."""
    i, xattn, path, ab = re.match(r"layers\.(\d+)\.(xattn\.)?(.*)\.(lora_[AB])$", name).groups()
    base = "module.lang_encoder.base_model.model."
    if not xattn:
        return [f"{base}model.layers.{i}.decoder_layer.{path}.{ab}.default.weight"]
    return [f"{base}model.layers.{i}.gated_cross_attn_layer.{path}.{ab}.default.weight",
            f"{base}gated_cross_attn_layers.{i}.{path}.{ab}.default.weight"]


def write_lora(model: mmgpt.MMGPT, path: str):
    """The MultiModal-GPT LoRA release: A and B under both names of the cross-attention blocks, the frozen
    cross-attention weights under the alias (the values checkpoint.pt holds), rotary buffers, the tuning_config."""
    base = "module.lang_encoder.base_model.model."
    sd = {}
    for n, t in lora.file_tensors(model).items():
        if ".lora_" in n:
            value = random_tensor(n, tuple(t.shape), torch.float32)
            sd.update({k: value for k in peft_keys(n)})
    for n, shape in xattn_weights(model).items():
        i, rest = re.match(r"layers\.(\d+)\.xattn\.(.*)", n).groups()
        sd[f"{base}gated_cross_attn_layers.{i}.{rest}"] = random_tensor(n, shape, torch.float32)
    for i in range(model.cfg.n_layers):
        sd[f"{base}model.layers.{i}.decoder_layer.self_attn.rotary_emb.inv_freq"] = inv_freq(model.cfg)
    with fake_mmengine() as ConfigDict:
        config = ConfigDict(lora=True, lora_r=LORA_R, lora_alpha=16, lora_dropout=0.0, vis=True, unfrozen=[],
                            lora_target_modules=list(lora.DEFAULT_TARGETS))
        torch.save({"model_state_dict": sd, "tuning_config": config}, path)


def write_vision(model: mmgpt.MMGPT, path: str):
    """A CLIP state dict of the vision tower (visual.* keys, as open_clip's), fp16 as OpenAI's release."""
    sd = {f"visual.{n}": random_tensor(f"visual.{n}", tuple(t.shape), torch.float16)
          for n, t in model.vision.visual.state_dict().items()}
    torch.save(sd, path)


def text_lines(limit: int = 40 << 20):
    """Lines of the Python standard library's sources: text every machine with Python has (up to `limit` bytes)."""
    root, size = os.path.dirname(os.__file__), 0
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            size += len(line)
                            yield line.rstrip("\n")
            except (UnicodeDecodeError, OSError):
                continue
            if size > limit:
                return


def write_tokenizer(path: str, vocab: int):
    """A BPE sentencepiece model with LLaMA's settings (byte fallback, split digits, identity normalisation,
    whitespace kept, dummy prefix; unk 0, bos 1, eos 2) and its number of pieces."""
    prefix = path.removesuffix(".model")
    spm.SentencePieceTrainer.train(
        sentence_iterator=text_lines(), model_prefix=prefix, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=2_000_000,
        shuffle_input_sentence=True, num_threads=os.cpu_count(), minloglevel=2)
    os.remove(prefix + ".vocab")


def files(out: str, preset: str = "7b") -> dict:
    """The paths of the release's files under `out`, as chat.py's flags name them."""
    p = PRESETS[preset]
    paths = {k: os.path.join(out, v) for k, v in checkpoints.RELEASE.items()}
    paths["vision_weights"] = os.path.join(out, "ViT-L-14.pt" if p["vision"] else "vit.pt")
    paths["vision"] = p["vision"] or os.path.join(out, "vision.json")
    return paths


def write(out: str, preset: str = "7b") -> dict:
    """Every file of the release under `out`; returns the paths as chat.py's flags name them."""
    p = PRESETS[preset]
    model = model_on_meta(preset, p["vocab"])
    paths = files(out, preset)
    steps = [("tokenizer.model", lambda: write_tokenizer(os.path.join(paths["llama"], "tokenizer.model"), p["vocab"])),
             ("LLaMA", lambda: write_llama(model, paths["llama"], p["vocab"], p["shard_bytes"])),
             ("OpenFlamingo", lambda: write_openflamingo(model, paths["openflamingo"])),
             ("LoRA", lambda: write_lora(model, paths["lora"])),
             ("CLIP", lambda: write_vision(model, paths["vision_weights"]))]
    os.makedirs(paths["llama"], exist_ok=True)
    if not p["vision"]:
        with open(paths["vision"], "w") as f:
            json.dump(p["config"]["vision"], f)
    for what, step in steps:
        print(f"writing {what}", file=sys.stderr, flush=True)
        step()
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the folder to write (made if missing)")
    ap.add_argument("--preset", choices=tuple(PRESETS), default="7b", help="7b: the release's shapes; small: tests'")
    args = ap.parse_args(argv)
    paths = write(args.out, args.preset)
    print("python chat.py PICTURE " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in paths.items()))


if __name__ == "__main__":
    main()
