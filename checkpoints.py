"""Every weight file mmgpt reads or writes, read safely (no file a user hands in can run code).

Read top-down:
  read_checkpoint                    torch / safetensors files: weights_only, or a restricted unpickler for the
                                     release's pickled mmengine config; never arbitrary code
  our_name, check_keys, copy_into    the HF-LLaMA / OpenFlamingo / peft key layouts -> this model's names
  llama_*, read_openflamingo, ...    HF LLaMA directories, OpenFlamingo checkpoint.pt, LoRA files, CLIP weights
  plan, fill, load                   MultiModal-GPT from the files users have, mapped and filled module by module
                                     (cast, LoRA merged, quantized as they arrive): (model, tokenizer, transform)
  save_*, RELEASE, plan_run/load_run the same layouts written back; where the release lives; train.py's run folders
  save_converted, fill_converted     convert.py's files: the decoding model as held, mapped back and used in place
"""
import ctypes
import json
import math
import mmap
import os
import pickle
import re
import sys
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
from tqdm import tqdm

import lora as lora_lib
import quantize
from mmgpt import MMGPT, Config, build, rope_tables
from tokenizer import Tokenizer

class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the keys."""


def _some(keys, n: int = 6) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


class _PlainDict(dict):
    """Stands in for mmengine's ConfigDict (an addict Dict) in the MultiModal-GPT release file."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors (torch's own storage handling wraps this class) and plain containers, nothing else."""
    TENSORS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
               ("collections", "OrderedDict")}
    DICTS = {("mmengine.config.config", "ConfigDict"), ("addict.addict", "Dict")}

    def find_class(self, module, name):
        if (module, name) in self.DICTS:
            return _PlainDict
        if (module, name) in self.TENSORS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


class _restricted_pickle:  # what torch.load wants as a pickle_module
    Unpickler = _RestrictedUnpickler
    load = None


def read_checkpoint(path: str):
    """A torch file, read with weights_only=True; a file that holds other objects (the release's pickled mmengine
    config) is read by a restricted unpickler that only rebuilds plain containers and tensors. A .safetensors
    file is read by read_safetensors. A missing, truncated or corrupt file is a CheckpointError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    import zipfile
    mmap_ = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_)
    except pickle.UnpicklingError:
        pass  # objects besides tensors and containers: only the restricted unpickler may rebuild them
    except Exception as e:  # torch raises RuntimeError, EOFError, ValueError ... for a truncated or corrupt file
        raise CheckpointError(f"{path}: not a readable torch file (truncated or corrupt?): {first_line(e)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle, mmap=mmap_)
    except Exception as e:
        what = str(e) if isinstance(e, pickle.UnpicklingError) else first_line(e)
        raise CheckpointError(f"{path}: cannot be read safely: {what}") from None


def first_line(e: Exception) -> str:
    return f"{type(e).__name__}: " + (str(e).strip().splitlines() or [""])[0][:300]


# The safetensors format: 8 bytes (little-endian header length), a JSON header {name: {dtype, shape,
# data_offsets}} (plus an optional "__metadata__"), then the tensors' raw little-endian bytes. Plain data only.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, memory-mapped copy-on-write (nothing is read until used)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its header)")
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file, or truncated (a header of {n} bytes in a "
                                  f"file of {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
        header.pop("__metadata__", None)
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else b""
    body = memoryview(buffer)[8 + n:]
    tensors = {}
    for name, info in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r}: bad header entry {str(info)[:200]} (dtypes known: "
                                  f"{', '.join(SAFETENSORS_DTYPES)})") from None
        count = math.prod(shape)
        if min(shape, default=0) < 0 or not 0 <= start <= end <= len(body) \
                or end - start != count * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {[start, end]} do not hold {shape} "
                                  f"{info['dtype']} in a body of {len(body)} bytes (truncated file?)")
        tensors[name] = torch.frombuffer(body, dtype=dtype, count=count, offset=start).reshape(shape) if count \
            else torch.empty(shape, dtype=dtype)
    return tensors


def save_safetensors(tensors: dict[str, torch.Tensor], path: str):
    """Write tensors in the safetensors format (atomically); read_safetensors and HF's loaders read it."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the body starts 8-byte aligned, so tensors can be mapped in place

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    atomic_write(path, write)


def our_name(key: str) -> str | None:
    """A key of the HF-LLaMA / OpenFlamingo / MultiModal-GPT (peft inside DDP) layouts -> this model's parameter
    name; None for buffers that carry nothing (rotary inv_freq)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    k = key.removeprefix("module.").removeprefix("lang_encoder.").removeprefix("base_model.model.")
    # OpenFlamingo keeps each cross-attention block under two names; both map to the same parameter.
    k = re.sub(r"^gated_cross_attn_layers\.(\d+)\.", r"model.layers.\1.gated_cross_attn_layer.", k)
    k = k.replace(".decoder_layer.", ".").replace(".gated_cross_attn_layer.", ".xattn.")
    k = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", k)
    return k.removeprefix("model.")


def _hf_name(name: str) -> str:
    """This model's LLaMA parameter name -> HF's."""
    return name if name == "lm_head.weight" else "model." + name


def is_llama_param(name: str) -> bool:
    return not name.startswith(("vision.", "perceiver.", "prefix_proj.")) and ".xattn." not in name \
        and ".lora_" not in name


def is_flamingo_param(name: str) -> bool:
    """What OpenFlamingo trained: perceiver, cross-attention blocks, input embeddings."""
    return (name.startswith("perceiver.") or ".xattn." in name or name == "embed_tokens.weight") \
        and ".lora_" not in name


def check_keys(params: dict, tensors: dict, path: str, required):
    """A file's tensors (our names, fused projections by their parts' names: lora.file_layout) against the
    parameters they go into; an error names the file and every bad key. Embedding and lm_head rows may number V
    (sentencepiece) instead of V + 3: the added tokens' rows then stay as they are."""
    unknown = [k for k in tensors if k not in params]
    missing = [k for k in required if k not in tensors]
    wrong = [f"{k} {tuple(t.shape)} (model: {tuple(params[k].shape)})" for k, t in tensors.items()
             if k in params and t.shape != params[k].shape
             and not (k in ("embed_tokens.weight", "lm_head.weight") and t.shape[1:] == params[k].shape[1:]
                      and t.shape[0] == params[k].shape[0] - 3)]
    problems = [f"{what}: {_some(keys)}" for what, keys in
                (("unknown keys", unknown), ("missing keys", missing), ("wrong shapes", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))


def copy_into(model: nn.Module, tensors: dict, path: str, required) -> set[str]:
    """Copy tensors (checked by check_keys) into the model's parameters."""
    params = lora_lib.file_tensors(model)
    check_keys(params, tensors, path, required)
    with torch.no_grad():
        for k, t in tensors.items():
            params[k][: t.shape[0]].copy_(t)
    return set(tensors)


def read_json(path: str) -> dict:
    """A JSON object from a file; a missing, undecodable or malformed file is named."""
    try:
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a JSON file: {e}") from None
    if not isinstance(c, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return c


def llama_files(directory: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(directory, index)
        if os.path.isfile(p):
            index = read_json(p)
            if not isinstance(index.get("weight_map"), dict):
                raise CheckpointError(f"{p}: missing field 'weight_map' (a sharded checkpoint's index)")
            return [os.path.join(directory, str(s)) for s in sorted(set(index["weight_map"].values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    raise FileNotFoundError(f"{directory}: no LLaMA weights (model.safetensors, pytorch_model.bin, or a sharded "
                            f"index model.safetensors.index.json / pytorch_model.bin.index.json)")


def llama_config(directory: str) -> dict:
    """Config fields read off an HF LLaMA config.json."""
    path = os.path.join(directory, "config.json")
    c = read_json(path)
    try:
        if c.get("num_key_value_heads", c["num_attention_heads"]) != c["num_attention_heads"]:
            raise CheckpointError(f"{path}: grouped-query attention (num_key_value_heads) is not LLaMA-7B's layout")
        return dict(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                    hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                    rope_theta=c.get("rope_theta", 10000.0),
                    max_seq_len=c.get("max_position_embeddings", c.get("max_sequence_length", 2048)))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from None


def tensor_dict(obj, path: str, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors ({what})")
    return obj


def read_openflamingo(path: str) -> dict[str, torch.Tensor]:
    sd = tensor_dict(read_checkpoint(path), path, "OpenFlamingo checkpoint.pt")
    return {n: t for k, t in sd.items() if (n := our_name(k)) is not None}


def flamingo_layout(tensors: dict[str, torch.Tensor], path: str) -> dict:
    """Where the cross-attention blocks sit, the perceiver's depth and latents, and the head counts (heads of
    64 dimensions, as OpenFlamingo's) and FFW width, read off the keys and shapes."""
    layers = sorted({int(m.group(1)) for k in tensors if (m := re.match(r"layers\.(\d+)\.xattn\.", k))})
    depth = len({m.group(1) for k in tensors if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    if not layers or not depth or "perceiver.latents" not in tensors:
        raise CheckpointError(f"{path}: no cross-attention blocks or perceiver found; keys look like: {_some(tensors)}")
    try:
        xattn_q = tensors[f"layers.{layers[0]}.xattn.attn.to_q.weight"]
        perceiver_q = tensors["perceiver.layers.0.0.to_q.weight"]
        ff = tensors[f"layers.{layers[0]}.xattn.ff.1.weight"]
    except KeyError as e:
        raise CheckpointError(f"{path}: missing keys: {e}") from None
    return dict(xattn_layers=tuple(layers), perceiver_depth=depth,
                perceiver_latents=tensors["perceiver.latents"].shape[0],
                xattn_heads=xattn_q.shape[0] // 64, perceiver_heads=perceiver_q.shape[0] // 64,
                ff_mult=ff.shape[0] // ff.shape[1])


@dataclass
class LoRAWeights:
    r: int
    alpha: float
    dropout: float
    targets: tuple
    tensors: dict          # our names -> tensors: lora_A/lora_B, plus any parameters trained in full
    settings: dict         # this project's files: how the run was set up (what it was trained on, etc.)


def read_lora(path: str, ckpt=None) -> LoRAWeights:
    """This project's lora.pt, or the MultiModal-GPT release (peft keys under `module.`, a pickled tuning_config);
    ckpt: the file already read."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    if isinstance(ckpt, dict) and ckpt.get("format") == "mmgpt-lora":
        try:
            s = ckpt["settings"]
            return LoRAWeights(s["lora_r"], s["lora_alpha"], s.get("lora_dropout", 0.0), tuple(s["lora_targets"]),
                               tensor_dict(ckpt["weights"], path, "lora.pt weights"), s)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: a damaged lora.pt: missing or bad field {e}") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path}: neither this project's lora.pt nor a MultiModal-GPT checkpoint "
                              f"(no 'model_state_dict')")
    sd = tensor_dict(ckpt["model_state_dict"], path, "MultiModal-GPT model_state_dict")
    tensors = {n: t for k, t in sd.items() if (n := our_name(k)) is not None}
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: expected lora_A tensors of one rank, found ranks {sorted(ranks) or 'none'}")
    tc = ckpt.get("tuning_config") or {}
    targets = sorted({k.rsplit(".", 1)[0] for k in tensors if ".lora_" in k})
    targets = tuple(tc.get("lora_target_modules") or sorted({t.split(".", 2)[-1] for t in targets}))
    return LoRAWeights(ranks.pop(), float(tc.get("lora_alpha", 16)), float(tc.get("lora_dropout", 0.0)), targets,
                       tensors, {})


def apply_lora(model: "MMGPT", weights: LoRAWeights, path: str, dtype=torch.float32):
    """Inject LoRA layers (inject_lora) into a built model and load their weights, held in `dtype` (default fp32,
    the files' precision, whatever the frozen weights' dtype)."""
    names = inject_lora(model, weights, dtype)
    copy_into(model, weights.tensors, path, [f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")])
    return names


def vision_model_config(vision: str, weights: str | None) -> dict:
    """open_clip model config by name or JSON path, with the activation the weights were trained with.

    OpenAI's CLIP uses QuickGELU, and OpenFlamingo was trained on OpenAI's ViT-L/14. open_clip's own configs
    don't say so (its 'openai' tag does), so QuickGELU is used when the tag says so, when a local file is an
    OpenAI TorchScript archive, or when a local file is given for a model OpenAI released. A model-config JSON
    with an explicit "quick_gelu" key is taken at its word.
    """
    import open_clip
    from_json = vision.endswith(".json") or os.path.isfile(vision)
    if from_json:
        with open(vision) as f:
            cfg = json.load(f)
    else:
        cfg = open_clip.get_model_config(vision)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {vision!r}: give a name open_clip knows "
                             f"(e.g. ViT-L-14) or the path of an open_clip model-config JSON")
    if "vision_cfg" not in cfg or "embed_dim" not in cfg:
        raise ValueError(f"{vision}: an open_clip model config needs 'embed_dim' and 'vision_cfg'")
    out = {"embed_dim": cfg["embed_dim"], "vision_cfg": cfg["vision_cfg"], "quick_gelu": cfg.get("quick_gelu", False)}
    if weights and not os.path.isfile(weights):
        tag = open_clip.get_pretrained_cfg(vision, weights)
        out["quick_gelu"] = out["quick_gelu"] or tag.get("quick_gelu", False)
        out["preprocess"] = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag}
    elif weights and not (from_json and "quick_gelu" in cfg):
        openai_model = not from_json and open_clip.get_pretrained_cfg(vision, "openai")
        out["quick_gelu"] = out["quick_gelu"] or bool(openai_model) or is_torchscript(weights)
    return out


def is_torchscript(path: str) -> bool:
    import zipfile
    return zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist())


def vision_weights_file(vision: str, weights: str) -> str:
    if os.path.isfile(weights):
        return weights
    import open_clip
    tag = open_clip.get_pretrained_cfg(vision, weights)
    if not tag:
        raise FileNotFoundError(f"vision weights {weights!r}: neither a file nor an open_clip pretrained tag of {vision}")
    try:
        return open_clip.download_pretrained(tag)
    except Exception as e:
        raise FileNotFoundError(f"could not fetch open_clip weights {vision}/{weights} ({type(e).__name__}: {e}); "
                                f"pass the path of a local CLIP weights file instead") from None


def read_vision_weights(path: str) -> dict[str, torch.Tensor]:
    """A full CLIP state dict (visual.* keys) or a visual-only one; OpenAI's TorchScript archives too."""
    if is_torchscript(path):
        try:
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable TorchScript archive: {first_line(e)}") from None
    else:
        sd = read_checkpoint(path)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    sd = tensor_dict(sd, path, "CLIP weights")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def image_transform_for(vision_cfg: dict):
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    size = vision_cfg["vision_cfg"]["image_size"]
    pp = merge_preprocess_dict(PreprocessCfg(size=size), vision_cfg.get("preprocess", {}))
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


def read_tokenizer(path: str) -> Tokenizer:
    """LLaMA's tokenizer.model (+ MultiModal-GPT's 3 added tokens); a file that is not one is named."""
    try:
        return Tokenizer(path)
    except (RuntimeError, OSError) as e:  # sentencepiece's word for a file that is not a model
        raise CheckpointError(f"{path}: not a sentencepiece model: {first_line(e)}") from None


# ----------------------------------------------------------------------------------------------------------------
# Loading in the memory the weights take. The model is laid out on the meta device (no memory, no random values),
# every file is mapped, and module by module each is made real, filled from whichever files hold its tensors and,
# for decoding, its LoRA merged and its weights quantized before the next: the process holds the chosen form's bytes
# plus one layer, never a full fp32 copy and never two forms of every layer.

@dataclass
class Plan:
    """What load() knows before it reads a weight: the config, the tokenizer, the model laid out on the meta device
    (LoRA injected), the OpenFlamingo checkpoint mapped, the LoRA file read (it is small), the others' paths. fill
    makes its model real: a plan is filled once."""
    cfg: Config
    model: MMGPT
    tokenizer: Tokenizer
    vision_cfg: dict
    llama: str
    vision: str
    vision_weights: str | None
    openflamingo: str | None
    flamingo: dict | None
    lora: str | None
    lora_weights: LoRAWeights | None
    lora_names: list
    converted: dict | None = None    # a convert.py file's form and weights (mapped): fill_converted places them


def plan(llama=None, openflamingo=None, lora=None, vision="ViT-L-14", vision_weights="openai",
         attend_previous: bool = False, fusion: str = "xattn", lora_weights: LoRAWeights | None = None) -> Plan:
    """The files' config and layout, read without reading a weight (see load for the arguments); lora_weights:
    the LoRA file already read."""
    if llama is None:
        raise ValueError("load() needs llama=DIR, an HF LLaMA directory")
    tokenizer_file = os.path.join(llama, "tokenizer.model")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"{tokenizer_file}: no such file (the LLaMA directory must hold tokenizer.model)")
    tokenizer = read_tokenizer(tokenizer_file)
    flamingo = read_openflamingo(openflamingo) if openflamingo else None
    vcfg = vision_model_config(vision, vision_weights)
    cfg = Config(**llama_config(llama), vocab_size=tokenizer.vocab_size, image_id=tokenizer.image_id, vision=vcfg,
                 attend_previous=attend_previous, fusion=fusion,
                 **(flamingo_layout(flamingo, openflamingo) if flamingo else {}))
    tokenizer.picture_tokens = cfg.picture_tokens
    if flamingo and fusion == "prefix":
        flamingo = {k: t for k, t in flamingo.items() if ".xattn." not in k}
    model = build(cfg, "meta")
    weights = lora_weights or (read_lora(lora) if lora else None)
    names = inject_lora(model, weights) if weights else []
    return Plan(cfg, model, tokenizer, vcfg, llama, vision, vision_weights, openflamingo, flamingo, lora, weights,
                names)


def inject_lora(model: MMGPT, weights: LoRAWeights, dtype=torch.float32) -> list[str]:
    """LoRA layers as the file's (into the language model only, as MultiModal-GPT does), A and B in `dtype`."""
    return lora_lib.inject(model, weights.r, weights.alpha, weights.dropout, weights.targets, within="layers.",
                           dtype=dtype)


def fill(p: Plan, device="cpu", dtype=torch.float32, merge: bool = False, quantize_to: str | None = None,
         group_size: int = 128, progress: bool = False):
    """The model of a plan, its weights in `dtype` (LoRA in fp32) on `device`; merge: LoRA folded into the weights
    (a model that only decodes); quantize_to: quantize.MODES, the decoder's linear layers and lm_head quantized as
    they are filled (LoRA merged first). Returns (model, tokenizer, image_transform)."""
    if p.converted:
        return fill_converted(p, device)
    model = p.model
    sources = {}    # a parameter's name in files -> its tensors (mapped), in the order they are copied: later win

    def add(tensors: dict, path: str, module: nn.Module, prefix: str, required):
        check_keys(lora_lib.file_tensors(module), tensors, path, required)
        for k, t in tensors.items():
            sources.setdefault(prefix + k, []).append(t)

    if p.vision_weights:
        path = vision_weights_file(p.vision, p.vision_weights)
        visual = model.vision.visual
        add(read_vision_weights(path), path, visual, "vision.visual.", dict(visual.named_parameters()))
    for path in llama_files(p.llama):
        shard = tensor_dict(read_checkpoint(path), path, "LLaMA weights")
        add({n: t for k, t in shard.items() if (n := our_name(k)) is not None}, path, model, "", [])
    missing = [n for n in lora_lib.file_tensors(model) if is_llama_param(n) and n not in sources]
    if missing:
        raise CheckpointError(f"{p.llama}: missing keys: {_some(_hf_name(n) for n in missing)}")
    if p.flamingo:
        add(p.flamingo, p.openflamingo, model, "", [n for n, _ in model.named_parameters() if is_flamingo_param(n)])
    if p.lora_weights:
        add(p.lora_weights.tensors, p.lora, model, "",
            [f"{n}.{ab}" for n in p.lora_names for ab in ("lora_A", "lora_B")])
    if not all(n in sources for n in lora_lib.file_tensors(model)):
        # Weights no file holds (no OpenFlamingo, no CLIP weights, a prefix projection): random, as build() makes them.
        model = build(p.cfg, device, dtype)
        if p.lora_weights:
            inject_lora(model, p.lora_weights)
    merge = merge or quantize_to is not None
    quantize_to, vision_dtype = decoding_forms(device, dtype, quantize_to) if merge else (quantize_to, dtype)
    bar = tqdm(total=sum(t.nbytes for ts in sources.values() for t in ts), unit="B", unit_scale=True,
               desc="loading", disable=not progress or None, file=sys.stderr)
    # By name, not by module: a layer replaced (made real, quantized) must not be kept alive by a list of them.
    # Layers to quantize go first, lm_head (the largest) leading: quantizing a layer briefly holds a few fp32 copies
    # of it, the largest while little else is held, the last before the parts kept in full precision are.
    names = [n for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    names.sort(key=lambda n: (not quantize_to or not quantize.is_quantized(n), n != "lm_head"))
    with torch.no_grad(), bar:
        for name in names:
            held = vision_dtype if name.split(".")[0] in ("vision", "perceiver") else dtype
            module = fill_module(name, model.get_submodule(name), sources, device, held, merge, quantize_to,
                                 group_size, bar)
            if name:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, module)
            if merge:
                give_back_freed()
        quantize.finish_packing(model)
        give_back_freed()
    if model.rope_cos.is_meta:
        model.rope_cos, model.rope_sin = rope_tables(p.cfg, device)
    model.requires_grad_(False)
    return model.eval(), p.tokenizer, image_transform_for(p.vision_cfg)


def decoding_forms(device, dtype: torch.dtype, quantize_to: str | None) -> tuple[str | None, torch.dtype]:
    """How a model that only decodes holds its weights: (the decoder's linear layers' form for quantize.py, the ViT's
    and perceiver's dtype). On a CPU a bf16 model's layers are held as quantize.Bf16Linear (several rows multiplied in
    fp32), a fp16 model's as quantize.Fp16Linear (fbgemm's fp16 GEMM), and their ViT and perceiver in fp32: a CPU
    without bf16 or fp16 arithmetic (AVX2) runs a GEMM in those several times slower than an fp32 one, and the ViT
    and perceiver run on hundreds of positions at once."""
    if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return quantize_to or {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype], torch.float32
    return quantize_to, dtype


def fill_module(name: str, module: nn.Module, sources: dict, device, dtype, merge: bool, quantize_to, group_size,
                bar) -> nn.Module:
    """One module of fill(): made real, filled, merged, quantized."""
    module = made_real(module, device, dtype)
    if name in ("embed_tokens", "lm_head"):
        module.weight[-3:] = 0      # the 3 added tokens' rows, which LLaMA's files do not hold
    for k, view in file_views(name, module).items():
        for t in sources.get(k, ()):
            view[: t.shape[0]].copy_(t)
            bar.update(t.nbytes)
    if merge and isinstance(module, lora_lib.LoRALinear):
        module.merge()
    if quantize_to and quantize.is_quantized(name) and isinstance(module, (nn.Linear, lora_lib.LoRALinear)):
        module = quantize.quantize_linear(module, quantize_to, group_size)
    return module


def give_back_freed():
    """Hand the pages of freed blocks back to the kernel. glibc keeps freed blocks under its mmap threshold (which
    grows up to 32 MB) in its heap, between the layers kept: the LoRA products merging adds and the full-precision
    layers quantizing drops would count as held."""
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


_libc = ctypes.CDLL(None)


def made_real(module: nn.Module, device, dtype) -> nn.Module:
    """A module laid out on the meta device, its own parameters allocated (not filled) on `device`: floating point
    ones in `dtype`, LoRA's as they were laid out; a LoRA layer made anew (its mask is computed, not loaded)."""
    own = dict(module.named_parameters(recurse=False))
    if not any(t.is_meta for t in own.values()):
        return module

    def empty(t, dtype=dtype):
        return nn.Parameter(torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device),
                            requires_grad=t.requires_grad)

    if isinstance(module, lora_lib.LoRALinear):
        base = SimpleNamespace(weight=empty(module.weight), parts=module.parts,
                               bias=None if module.bias is None else empty(module.bias))
        dropout = module.dropout.p if isinstance(module.dropout, nn.Dropout) else 0.0
        return lora_lib.LoRALinear(base, module.r, module.alpha, dropout, module.adapted, module.lora_A.dtype)
    for n, t in own.items():
        setattr(module, n, empty(t))
    return module


def file_views(name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters under the names files use (lora.file_layout: a fused layer by its parts)."""
    if getattr(module, "parts", None):
        parent = name.rpartition(".")[0]
        return {f"{parent}.{k}" if parent else k: v for views in lora_lib.file_layout(module).values()
                for k, v in views.items()}
    return {f"{name}.{n}" if name else n: t for n, t in module.named_parameters(recurse=False)}


def load(llama=None, openflamingo=None, lora=None, vision="ViT-L-14", vision_weights="openai", device="cpu",
         dtype=torch.float32, attend_previous: bool = False, fusion: str = "xattn"):
    """Build MultiModal-GPT from the files users have. Returns (model, tokenizer, image_transform).

    llama: HF LLaMA directory (config.json, weights, tokenizer.model). openflamingo: its checkpoint.pt, or None
    for fresh cross-attention blocks (gates at zero: the plain LLaMA). lora: the MultiModal-GPT release .pt or
    this project's lora.pt (held in fp32, unmerged). vision: open_clip model name or model-config JSON;
    vision_weights: open_clip pretrained tag, a local CLIP weights file, or None (random). Frozen weights are held
    in `dtype`. attend_previous: the media-masking rule the weights were trained with (the release: False). fusion:
    "xattn" (the releases) or "prefix" (mmgpt.Config.fusion: OpenFlamingo's perceiver and embeddings are used, its
    cross-attention blocks are not). plan and fill do the same in two steps (the programs check the memory between).
    """
    return fill(plan(llama, openflamingo, lora, vision, vision_weights, attend_previous, fusion), device, dtype)


def save_llama(model: MMGPT, directory: str, tokenizer_file: str):
    """Write the language model as an HF LLaMA directory (config.json, model.safetensors, tokenizer.model)."""
    import shutil
    cfg = model.cfg
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
                   "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
                   "num_attention_heads": cfg.n_heads, "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
                   "max_position_embeddings": cfg.max_seq_len, "bos_token_id": 1, "eos_token_id": 2,
                   "hidden_act": "silu"}, f, indent=2)
    tensors = {_hf_name(n): t.detach().contiguous() for n, t in lora_lib.file_tensors(model).items()
               if is_llama_param(n)}
    save_safetensors(tensors, os.path.join(directory, "model.safetensors"))
    if os.path.abspath(tokenizer_file) != os.path.abspath(os.path.join(directory, "tokenizer.model")):
        shutil.copyfile(tokenizer_file, os.path.join(directory, "tokenizer.model"))


def openflamingo_keys(name: str) -> list[str]:
    """Our parameter name -> its keys in OpenFlamingo's checkpoint.pt (a cross-attention block's: two)."""
    if m := re.match(r"layers\.(\d+)\.xattn\.(.*)", name):
        return [f"lang_encoder.model.layers.{m.group(1)}.gated_cross_attn_layer.{m.group(2)}",
                f"lang_encoder.gated_cross_attn_layers.{m.group(1)}.{m.group(2)}"]
    return ["lang_encoder.model.embed_tokens.weight" if name == "embed_tokens.weight" else name]


def save_openflamingo(model: MMGPT, path: str):
    """Write perceiver, cross-attention blocks and embeddings in OpenFlamingo's checkpoint.pt layout."""
    sd = {}
    for n, p in model.named_parameters():
        if is_flamingo_param(n):
            t = p.detach().clone()
            sd.update({k: t for k in openflamingo_keys(n)})
    torch.save(sd, path)


# Where the MultiModal-GPT README tells people to put the released weights, and where each comes from.
RELEASE = {"llama": "checkpoints/llama-7b_hf", "openflamingo": "checkpoints/OpenFlamingo-9B/checkpoint.pt",
           "lora": "checkpoints/mmgpt-lora-v0-release.pt"}
RELEASE_SOURCES = {
    "llama": "LLaMA-7B in HuggingFace format (convert Meta's weights with transformers' "
             "convert_llama_weights_to_hf.py); holds config.json, the weights and tokenizer.model",
    "openflamingo": "https://huggingface.co/openflamingo/OpenFlamingo-9B (checkpoint.pt)",
    "lora": "https://download.openmmlab.com/mmgpt/v0/mmgpt-lora-v0-release.pt",
}
BASE_FILES = ("llama", "openflamingo", "vision", "vision_weights")  # what a lora.pt's settings name to rebuild


def atomic_write(path: str, write):
    """write(f) into a temporary file, fsync it, rename it over `path`, fsync the folder: a crash or power cut
    leaves the old file or the new one, never a half-written or empty one, under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)


def atomic_save(obj, path: str):
    """torch.save, atomically (see atomic_write)."""
    atomic_write(path, lambda f: torch.save(obj, f))


TRAIN_STATE_KEYS = ("step", "bad_steps", "world", "batch_size", "grad_accum", "settings", "trainable", "optimizer",
                    "scheduler", "vl_stream", "lang_stream", "rng")


def save_train_state(state: dict, path: str):
    """train.py's ckpt.pt: tensors and plain containers only (RNG states included), so that it loads with
    weights_only=True; written atomically."""
    atomic_save({"format": "mmgpt-train-state", **state}, path)


def read_train_state(path: str) -> dict:
    """A ckpt.pt written by save_train_state. Run folders are shared: nothing in the file may run code, and a
    file that is not one names itself."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a mmgpt training state (it holds objects other than tensors and plain "
                              f"containers; refused: {first_line(e)[:200]})") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable torch file (truncated or corrupt?): {first_line(e)}") from None
    if not isinstance(state, dict) or state.get("format") != "mmgpt-train-state":
        raise CheckpointError(f"{path}: not a mmgpt training state (no format 'mmgpt-train-state')")
    missing = [k for k in TRAIN_STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a mmgpt training state (missing keys: {', '.join(missing)})")
    return state


def save_lora(model: MMGPT, path: str, settings: dict, unfrozen=()):
    """This project's lora.pt: the LoRA tensors, any parameters trained in full (names in `unfrozen`), and the
    settings that rebuild the model (lora_r, lora_alpha, lora_dropout, lora_targets, attend_previous, fusion; llama,
    openflamingo, vision, vision_weights: paths relative to the file's folder or absolute)."""
    weights = {n: t.detach().cpu().clone() for p, views in lora_lib.file_layout(model).items()
               for n, t in views.items() if n.endswith((".lora_A", ".lora_B")) or p in set(unfrozen)}
    here = os.path.dirname(os.path.abspath(path))

    def relative(p):  # a file inside the run folder is stored relative to it, so the folder can move
        inside = p and os.path.exists(p) and os.path.abspath(p).startswith(here + os.sep)
        return os.path.relpath(os.path.abspath(p), here) if inside else p

    settings = {k: relative(v) if k in BASE_FILES else v for k, v in settings.items()}
    atomic_save({"format": "mmgpt-lora", "weights": weights, "settings": settings}, path)


def plan_run(path: str) -> Plan:
    """A train.py output folder (or its lora.pt): the plan of the base it was trained on, with its weights on top;
    or a file convert.py wrote (plan_converted)."""
    file = os.path.join(path, "lora.pt") if os.path.isdir(path) else path
    obj = read_checkpoint(file)
    if isinstance(obj, dict) and obj.get("format") == CONVERTED:
        return plan_converted(obj, file)
    weights = read_lora(file, obj)   # read once: its settings name the base, its tensors go on top of it
    settings = weights.settings
    if not settings:
        raise CheckpointError(f"{file}: not a train.py output (it names no base model); "
                              f"pass --llama, --openflamingo and --lora instead")
    here = os.path.dirname(os.path.abspath(file))

    def where(p):  # paths are stored relative to the run folder when they lie inside it
        return p if not p or os.path.isabs(p) or not os.path.exists(os.path.join(here, p)) else os.path.join(here, p)

    return plan(**{k: where(settings.get(k)) for k in BASE_FILES}, lora=file, lora_weights=weights,
                attend_previous=settings.get("attend_previous", False), fusion=settings.get("fusion", "xattn"))


def load_run(path: str, device="cpu", dtype=torch.float32):
    """A train.py output folder (or its lora.pt) loaded: (model, tokenizer, image_transform), LoRA apart."""
    return fill(plan_run(path), device, dtype)


# ----------------------------------------------------------------------------------------------------------------
# Converted files (convert.py): the model as a decoding program holds it on a CPU (LoRA merged; the decoder's linear
# layers in bf16, int8 or 4-bit as quantize.py packs them; the ViT and perceiver as decoding_forms keeps them), with
# its config and tokenizer, in one torch file. Loading maps it (torch.load(mmap=True)) and uses every tensor in place:
# nothing is read, cast or quantized, the weights stay pages of the file in the kernel's page cache (shared, dropped
# and read back under pressure, never counted as the process's own), and a load costs what mapping a file costs.

CONVERTED = "mmgpt converted"


def save_converted(model: MMGPT, tokenizer: Tokenizer, layers: str, group_size: int, path: str):
    """Write a model that fill(merge=True) made on a CPU, its decoder's layers held as quantize.py's `layers` form
    (bf16, int8, int4 with group_size), atomically."""
    form = {"dtype": model.embed_tokens.weight.dtype, "layers": layers, "group_size": group_size}
    atomic_save({"format": CONVERTED, "config": asdict(model.cfg), "form": form,
                 "tokenizer": tokenizer.sp.serialized_model_proto(), "weights": model.state_dict()}, path)


def is_converted(path: str) -> bool:
    """Whether path is a file convert.py wrote (one that cannot be read is not)."""
    try:
        obj = read_checkpoint(path)
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and obj.get("format") == CONVERTED


def plan_converted(obj: dict, path: str) -> Plan:
    """A convert.py file read (mapped): its config, tokenizer and the model laid out on the meta device in the
    file's form."""
    try:
        form, weights = obj["form"], obj["weights"]
        cfg = Config(**obj["config"])
        tokenizer = Tokenizer(obj["tokenizer"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: a convert.py file with a bad header (convert it again): "
                              f"{first_line(e)}") from None
    tokenizer.picture_tokens = cfg.picture_tokens
    model = build(cfg, "meta")
    quantize.quantize(model, form["layers"], form["group_size"])
    return Plan(cfg, model, tokenizer, cfg.vision, None, None, None, None, None, None, None, [],
                converted={"path": path, "form": form, "weights": weights})


def fill_converted(p: Plan, device="cpu"):
    """The converted file's tensors put in place of the meta model's (on a CPU the mapped tensors themselves; on a
    GPU copied there). Returns (model, tokenizer, image_transform)."""
    model, path = p.model, p.converted["path"]
    try:
        model.load_state_dict(p.converted["weights"], assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: does not match its own config (convert it again): {first_line(e)}") from None
    model.rope_cos, model.rope_sin = rope_tables(p.cfg, device)
    model.to(device).requires_grad_(False)
    return model.eval(), p.tokenizer, image_transform_for(p.vision_cfg)


def converted_bytes(p: Plan) -> int:
    """The bytes a converted file's weights take once placed."""
    return sum(t.nbytes for t in p.converted["weights"].values())
