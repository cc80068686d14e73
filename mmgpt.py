"""MultiModal-GPT = OpenFlamingo (CLIP ViT -> perceiver resampler -> LLaMA with gated cross-attention) + LoRA.

Read top-down:
  Config, Tokenizer                  what the model is and how text becomes ids (same ids as MultiModal-GPT's)
  RMSNorm, RoPE, Attention, MLP      the LLaMA decoder, written out (HF weight layout: rotate-half RoPE)
  VisionEncoder                      open_clip's ViT, returning patch tokens WITHOUT ln_post (see its docstring)
  MMGPT                              the whole model: forward for training, extend() for KV-cached decoding
  lm_loss, sample, generate          the masked next-token loss and decoding
  load() and the readers/writers     HF LLaMA dirs, OpenFlamingo checkpoint.pt, MultiModal-GPT LoRA .pt
"""
import contextlib
import json
import math
import os
import pickle
import re
from dataclasses import asdict, dataclass, field

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lora as lora_lib
from perceiver import GatedCrossAttentionBlock, PerceiverResampler, media_index

# The open_clip ViT-L/14 that OpenFlamingo-9B uses (open_clip's own "ViT-L-14" config).
VIT_L_14 = {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}}


@dataclass
class Config:
    # LLaMA (defaults: LLaMA-7B). vocab_size counts the 3 added tokens: sentencepiece's V + 3.
    vocab_size: int = 32003
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    hidden_dim: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    # Flamingo. xattn_layers: decoder layers that get a gated cross-attention block BEFORE them; by default
    # every 4th, layer i when (i + 1) % 4 == 0 (OpenFlamingo-9B: 3, 7, ..., 31).
    image_id: int = 32001
    # The media-masking rule (perceiver.media_index): False = OpenFlamingo v1's, which the released weights
    # need; True = attend_previous, each token sees the picture before it (the demo trains with it).
    attend_previous: bool = False
    xattn_layers: tuple | None = None
    xattn_heads: int = 8
    xattn_dim_head: int = 64
    ff_mult: int = 4
    perceiver_depth: int = 6
    perceiver_latents: int = 64
    perceiver_heads: int = 8
    perceiver_dim_head: int = 64
    # open_clip model config ({"embed_dim", "vision_cfg", optional "quick_gelu"}); only the vision tower is built.
    vision: dict = field(default_factory=lambda: dict(VIT_L_14, quick_gelu=True))

    def __post_init__(self):
        if self.xattn_layers is None:
            self.xattn_layers = tuple(i for i in range(self.n_layers) if (i + 1) % 4 == 0)
        self.xattn_layers = tuple(self.xattn_layers)

    @property
    def vision_dim(self) -> int:
        return self.vision["vision_cfg"]["width"]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer

class Tokenizer:
    """sentencepiece + the 3 tokens MultiModal-GPT adds, giving the ids of its LlamaTokenizer (transformers 4.28).

    The text is cut at special strings; whitespace next to the 3 added tokens is stripped on both sides (they
    were added as plain strings, which HF strips) but not next to <s>, </s>, <unk> (AddedTokens without strip);
    every remaining piece is encoded by sentencepiece on its own, so each gets its own dummy-prefix space.
    """
    ADDED = ("<|endofchunk|>", "<image>", "<PAD>")

    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        n = self.sp.vocab_size()
        self.eoc_id, self.image_id, self.pad_id = n, n + 1, n + 2
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.vocab_size = n + 3
        self.special = {"<|endofchunk|>": n, "<image>": n + 1, "<PAD>": n + 2,
                        "<s>": self.bos_id, "</s>": self.eos_id, "<unk>": self.unk_id}
        self.special_str = {i: s for s, i in self.special.items()}
        self._splitter = re.compile("(" + "|".join(re.escape(s) for s in self.special) + ")")

    def _pieces(self, text: str) -> list[str]:
        pieces = [p for p in self._splitter.split(text) if p]
        for i, p in enumerate(pieces):
            if p in self.ADDED:
                if i + 1 < len(pieces):
                    pieces[i + 1] = pieces[i + 1].lstrip()
                if i > 0:
                    pieces[i - 1] = pieces[i - 1].rstrip()
        return [p for p in pieces if p]

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = [self.bos_id] if bos else []
        for p in self._pieces(text):
            ids += [self.special[p]] if p in self.special else self.sp.encode(p)
        return ids + ([self.eos_id] if eos else [])

    def encode_spans(self, text: str, bos: bool = True) -> tuple[list[int], list[tuple[int, int]]]:
        """encode() plus the character span (start, end) of text that each id came from (BOS: (0, 0))."""
        ids, spans = ([self.bos_id], [(0, 0)]) if bos else ([], [])
        pos = 0
        for p in self._pieces(text):
            start = text.index(p, pos)
            pos = start + len(p)
            if p in self.special:
                ids.append(self.special[p])
                spans.append((start, pos))
                continue
            # Rebuild each piece's bytes (▁ = space, <0xNN> = a byte) to find where in p it came from. With
            # LLaMA's identity normalisation the pieces spell out the dummy-prefix space followed by p exactly.
            pieces = self.sp.encode(p, out_type=str)
            raw = [bytes([int(x[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", x) else x.replace("▁", " ").encode()
                   for x in pieces]
            text_bytes = p.encode("utf-8")
            skip = len(b"".join(raw)) - len(text_bytes)  # the dummy prefix
            if skip not in (0, 1) or b"".join(raw)[skip:] != text_bytes:
                raise ValueError("encode_spans needs a sentencepiece model with identity normalisation (as LLaMA's)")
            # char_of[b]: the character that byte b belongs to (a piece may end inside a character: byte fallback)
            char_of = [i for i, ch in enumerate(p) for _ in ch.encode("utf-8")] + [len(p)]
            end = -skip
            for x, r in zip(pieces, raw):
                begin, end = max(end, 0), end + len(r)
                ids.append(self.sp.piece_to_id(x))
                spans.append((start + char_of[begin], start + char_of[max(end, 0)]))
        return ids, spans

    def decode(self, ids) -> str:
        out, run = [], []
        for i in list(ids):
            if i in self.special_str and i != self.unk_id:
                out.append(self.sp.decode(run))
                out.append(self.special_str[i])
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    @property
    def never_generate(self) -> list[int]:
        """Ids that generation must never emit."""
        return [self.image_id, self.eoc_id, self.pad_id, self.bos_id, self.unk_id]


# ----------------------------------------------------------------------------------------------------------------
# The LLaMA decoder

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF LLaMA: normalise in fp32, cast back, then scale.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(cfg: Config, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_seq_len, head_dim) for rotate-half RoPE (HF's layout; q/k weights are permuted for it)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            # Write this step's keys/values at input_pos and attend over the whole preallocated cache (the mask
            # hides what lies beyond): every decode step has the same shapes, so it compiles/graphs once.
            k_all, v_all = cache
            k, v = k_all.index_copy_(2, input_pos, k), v_all.index_copy_(2, input_pos, v)
        if mask is None:  # plain causal (no padding, no cache)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """A LLaMA layer; `xattn` (a gated cross-attention block) runs before it when present."""

    def __init__(self, cfg: Config, with_xattn: bool):
        super().__init__()
        self.xattn = GatedCrossAttentionBlock(cfg.dim, cfg.vision_dim, cfg.xattn_heads, cfg.xattn_dim_head,
                                              cfg.ff_mult) if with_xattn else None
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, media=None, cache=None, input_pos=None):
        if self.xattn is not None and media is not None:
            kv, index = media
            x = self.xattn(x, kv, index)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------------
# Vision

def build_visual(vision_cfg: dict) -> nn.Module:
    """open_clip's vision tower alone (the text tower is never built)."""
    from open_clip.model import _build_vision_tower
    return _build_vision_tower(vision_cfg["embed_dim"], vision_cfg["vision_cfg"],
                               quick_gelu=vision_cfg.get("quick_gelu", False))


class VisionEncoder(nn.Module):
    """CLIP ViT -> the final block's patch tokens, CLS dropped, WITHOUT ln_post.

    That is what open_clip 2.16 returned and what OpenFlamingo's perceiver was trained on. open_clip 3.x's
    `output_tokens=True` applies ln_post to the tokens first, which silently changes the features, so the tower
    is run step by step here instead.
    """

    def __init__(self, vision_cfg: dict):
        super().__init__()
        self.visual = build_visual(vision_cfg)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(pixels.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)      # (B, patches, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.transformer(v.ln_pre(x))                                                 # batch-first in open_clip 3
        return x[:, 1:]


# ----------------------------------------------------------------------------------------------------------------
# The model

class MMGPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg.vision)
        self.perceiver = PerceiverResampler(cfg.vision_dim, cfg.perceiver_depth, cfg.perceiver_latents,
                                            cfg.perceiver_heads, cfg.perceiver_dim_head, cfg.ff_mult)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i in cfg.xattn_layers) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, self.embed_tokens.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.grad_checkpointing = False

    # -- pictures ---------------------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, 3, H, W) -> perceiver latents (B, N, latents, vision_dim). A frozen ViT (the paper's) keeps no
        activations for backward; one being trained (train.py --vision-lr) does."""
        B, N = images.shape[:2]
        # Checked only when gradients are on: decoding (no_grad) never walks the ViT's parameters.
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(trained):
            patches = self.vision(images.flatten(0, 1))
        return self.perceiver(patches.view(B, N, *patches.shape[1:]).to(self.perceiver.latents.dtype))

    def media_kv(self, latents: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each cross-attention layer's keys/values of the pictures' latents (computed once per picture)."""
        return {i: self.layers[i].xattn.attn.media_kv(latents) for i in self.cfg.xattn_layers}

    # -- training / full forward ------------------------------------------------------------------------------
    def forward(self, images, input_ids, attention_mask=None, attend_previous: bool | None = None):
        """images: (B, N, 3, H, W) in the order of the <image> tokens, or None for language-only (then the
        cross-attention blocks are skipped entirely); attention_mask: (B, T) 1 = token, 0 = right padding;
        attend_previous: the media-masking rule, by default cfg.attend_previous. Returns logits (B, T, vocab)."""
        kv = None if images is None else self.media_kv(self.encode_images(images))
        rule = self.cfg.attend_previous if attend_previous is None else attend_previous
        index = media_index(input_ids, self.cfg.image_id, rule)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            T = input_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]
        return self._decode(input_ids, kv, index, mask)

    def _decode(self, input_ids, kv, index, mask, cache=None, input_pos=None):
        x = self.embed_tokens(input_ids)
        T = input_ids.shape[1]
        cos, sin = ((self.rope_cos[:T], self.rope_sin[:T]) if input_pos is None
                    else (self.rope_cos[input_pos], self.rope_sin[input_pos]))
        for i, layer in enumerate(self.layers):
            media = (kv[i], index) if kv is not None and layer.xattn is not None else None
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, media, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, media, layer_cache, input_pos)
        return self.lm_head(self.norm(x))

    # -- KV-cached decoding -----------------------------------------------------------------------------------
    def new_cache(self, max_len: int | None = None) -> "KVCache":
        return KVCache(self, max_len or self.cfg.max_seq_len)

    @torch.no_grad()
    def extend(self, cache: "KVCache", ids: list[int], images: torch.Tensor | None = None) -> torch.Tensor:
        """Append `ids` (batch 1) to the cached sequence; return the logits (vocab,) after its last token.

        images: (1, n, 3, H, W) for the n <image> tokens in ids. With the default masking rule, the tokens after
        the previous picture belong to the NEXT picture, so a new picture changes them: they are dropped from
        the cache and computed again (under attend_previous a token's picture never changes). The result always
        equals a full forward over cache.ids.
        """
        n_new = ids.count(self.cfg.image_id)
        if n_new != (0 if images is None else images.shape[1]):
            raise ValueError(f"{n_new} <image> tokens but {0 if images is None else images.shape[1]} pictures")
        if not ids or len(cache.ids) + len(ids) > cache.max_len:  # checked before the cache changes
            raise ValueError(f"cannot extend a context of {len(cache.ids)} tokens by {len(ids)} "
                             f"(the cache holds {cache.max_len})")
        media = cache.media
        if n_new:
            kv = self.media_kv(self.encode_images(images.to(self.rope_cos.device)))
            media = kv if media is None else {i: tuple(torch.cat([a, b], dim=2) for a, b in zip(media[i], kv[i]))
                                              for i in kv}
            if not self.cfg.attend_previous:
                last = max((p for p, t in enumerate(cache.ids) if t == self.cfg.image_id), default=-1)
                ids = cache.ids[last + 1:] + ids
                cache.truncate(last + 1)
        pos = len(cache.ids)
        device = self.rope_cos.device
        x = torch.tensor([ids], device=device)
        index = media_index(x, self.cfg.image_id, self.cfg.attend_previous,
                            images_before=cache.ids.count(self.cfg.image_id))
        input_pos = torch.arange(pos, pos + len(ids), device=device)
        mask = torch.arange(cache.max_len, device=device) <= input_pos[:, None]  # causal over the cache
        logits = self.decode_step(x, media, index, mask, cache, input_pos)
        # Only now is the cache updated: interrupted above (Ctrl-C), it still holds a valid (shorter) context.
        cache.ids += ids
        cache.media = media
        return logits[0, -1]

    def decode_step(self, input_ids, kv, index, mask, cache, input_pos):
        """One cached forward. A separate method so that bench.py/chat.py can torch.compile it."""
        return self._decode(input_ids, kv, index, mask, cache, input_pos)


class KVCache:
    """Preallocated keys/values for batch 1, the token ids they belong to, and the pictures' cross-attention K/V."""

    def __init__(self, model: MMGPT, max_len: int):
        cfg, p = model.cfg, model.embed_tokens.weight
        shape = (1, cfg.n_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.n_layers)]
        self.max_len, self.image_id = max_len, cfg.image_id
        self.ids: list[int] = []
        self.media = None

    def reset(self):
        self.ids, self.media = [], None

    def truncate(self, n: int):
        """Keep the first n tokens (and the pictures among them); what lies past them is masked, then overwritten."""
        del self.ids[n:]
        pictures = self.ids.count(self.image_id)
        if self.media is not None:
            self.media = {i: (k[:, :, :pictures], v[:, :, :pictures]) for i, (k, v) in self.media.items()} \
                if pictures else None


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t, over labels != -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


def sample(logits: torch.Tensor, banned: list[int], temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None) -> int:
    logits = logits.float().clone()
    logits[banned] = -float("inf")
    if greedy or temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits[logits < kth] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p   # keep the smallest prefix whose mass reaches top_p
        logits[order[drop]] = -float("inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model: MMGPT, cache: KVCache, ids: list[int], images=None, *, max_new_tokens: int = 256,
             eos_id: int, banned: list[int], **sampling):
    """Extend the cache with ids (and their pictures), then yield new token ids until EOS or the limit.

    Every yielded token is fed back, so cache.ids is always the whole context; EOS is neither yielded nor
    cached (the caller closes the answer with `</s>` in the next round's text)."""
    logits = model.extend(cache, ids, images)
    for _ in range(max_new_tokens):
        token = sample(logits, banned, **sampling)
        if token == eos_id:
            return
        yield token
        logits = model.extend(cache, [token])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: reading what users have (safely), and writing the same layouts

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
    config) is read by a restricted unpickler that only rebuilds plain containers and tensors."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    import zipfile
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read safely: {e}") from None


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
    return not name.startswith(("vision.", "perceiver.")) and ".xattn." not in name and ".lora_" not in name


def is_flamingo_param(name: str) -> bool:
    """What OpenFlamingo trained: perceiver, cross-attention blocks, input embeddings."""
    return (name.startswith("perceiver.") or ".xattn." in name or name == "embed_tokens.weight") \
        and ".lora_" not in name


def copy_into(model: nn.Module, tensors: dict, path: str, required) -> set[str]:
    """Copy tensors (our names) into the model's parameters. Errors name the file and every bad key. Embedding and
    lm_head rows may number V (sentencepiece) instead of V + 3: the added tokens' rows then stay as they are."""
    params = dict(model.named_parameters())
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
    with torch.no_grad():
        for k, t in tensors.items():
            params[k][: t.shape[0]].copy_(t)
    return set(tensors)


def llama_files(directory: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        p = os.path.join(directory, index)
        if os.path.isfile(p):
            with open(p) as f:
                return [os.path.join(directory, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, single)):
            return [os.path.join(directory, single)]
    raise FileNotFoundError(f"{directory}: no LLaMA weights (model.safetensors, pytorch_model.bin, or a sharded "
                            f"index model.safetensors.index.json / pytorch_model.bin.index.json)")


def llama_config(directory: str) -> dict:
    """Config fields read off an HF LLaMA config.json."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        c = json.load(f)
    try:
        if c.get("num_key_value_heads", c["num_attention_heads"]) != c["num_attention_heads"]:
            raise CheckpointError(f"{path}: grouped-query attention (num_key_value_heads) is not LLaMA-7B's layout")
        return dict(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                    hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                    rope_theta=c.get("rope_theta", 10000.0),
                    max_seq_len=c.get("max_position_embeddings", c.get("max_sequence_length", 2048)))
    except KeyError as e:
        raise CheckpointError(f"{path}: missing field {e}") from None


def read_openflamingo(path: str) -> dict[str, torch.Tensor]:
    sd = read_checkpoint(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors (OpenFlamingo checkpoint.pt)")
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


def read_lora(path: str) -> LoRAWeights:
    """This project's lora.pt, or the MultiModal-GPT release (peft keys under `module.`, a pickled tuning_config)."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and ckpt.get("format") == "mmgpt-lora":
        s = ckpt["settings"]
        return LoRAWeights(s["lora_r"], s["lora_alpha"], s.get("lora_dropout", 0.0), tuple(s["lora_targets"]),
                           dict(ckpt["weights"]), s)
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise CheckpointError(f"{path}: neither this project's lora.pt nor a MultiModal-GPT checkpoint "
                              f"(no 'model_state_dict')")
    tensors = {n: t for k, t in ckpt["model_state_dict"].items() if (n := our_name(k)) is not None}
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith(".lora_A")}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: expected lora_A tensors of one rank, found ranks {sorted(ranks) or 'none'}")
    tc = ckpt.get("tuning_config") or {}
    targets = sorted({k.rsplit(".", 1)[0] for k in tensors if ".lora_" in k})
    targets = tuple(tc.get("lora_target_modules") or sorted({t.split(".", 2)[-1] for t in targets}))
    return LoRAWeights(ranks.pop(), float(tc.get("lora_alpha", 16)), float(tc.get("lora_dropout", 0.0)), targets,
                       tensors, {})


def apply_lora(model: "MMGPT", weights: LoRAWeights, path: str):
    """Inject LoRA layers (into the language model only, as MultiModal-GPT does) and load their weights."""
    names = lora_lib.inject(model, weights.r, weights.alpha, weights.dropout, weights.targets, within="layers.")
    required = [f"{n}.{ab}" for n in names for ab in ("lora_A", "lora_B")]
    copy_into(model, weights.tensors, path, required)
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
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        sd = read_checkpoint(path)
        sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    return sd


def image_transform_for(vision_cfg: dict):
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
    size = vision_cfg["vision_cfg"]["image_size"]
    pp = merge_preprocess_dict(PreprocessCfg(size=size), vision_cfg.get("preprocess", {}))
    return image_transform_v2(PreprocessCfg(**pp), is_train=False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype`: never an fp32 copy of the frozen weights."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build(cfg: Config, device="cpu", dtype=torch.float32) -> MMGPT:
    """A randomly initialised model made directly on `device` in `dtype`, cross-attention gates at zero."""
    with torch.device(device), default_dtype(dtype):
        model = MMGPT(cfg)
    return model


def load(llama=None, openflamingo=None, lora=None, vision="ViT-L-14", vision_weights="openai", device="cpu",
         dtype=torch.float32, attend_previous: bool = False):
    """Build MultiModal-GPT from the files users have. Returns (model, tokenizer, image_transform).

    llama: HF LLaMA directory (config.json, weights, tokenizer.model). openflamingo: its checkpoint.pt, or None
    for fresh cross-attention blocks (gates at zero: the plain LLaMA). lora: the MultiModal-GPT release .pt or
    this project's lora.pt. vision: open_clip model name or model-config JSON; vision_weights: open_clip
    pretrained tag, a local CLIP weights file, or None (random). Frozen weights are held in `dtype`.
    attend_previous: the media-masking rule the weights were trained with (the release: False).
    """
    if llama is None:
        raise ValueError("load() needs llama=DIR, an HF LLaMA directory")
    tokenizer_file = os.path.join(llama, "tokenizer.model")
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"{tokenizer_file}: no such file (the LLaMA directory must hold tokenizer.model)")
    tokenizer = Tokenizer(tokenizer_file)
    flamingo = read_openflamingo(openflamingo) if openflamingo else None
    vcfg = vision_model_config(vision, vision_weights)
    cfg = Config(**llama_config(llama), vocab_size=tokenizer.vocab_size, image_id=tokenizer.image_id, vision=vcfg,
                 attend_previous=attend_previous, **(flamingo_layout(flamingo, openflamingo) if flamingo else {}))
    model = build(cfg, device, dtype)
    # Rows of the 3 added tokens that no checkpoint holds (lm_head always; embeddings without OpenFlamingo) are 0.
    with torch.no_grad():
        model.embed_tokens.weight[-3:] = 0
        model.lm_head.weight[-3:] = 0
    if vision_weights:
        path = vision_weights_file(vision, vision_weights)
        copy_into(model.vision.visual, read_vision_weights(path), path, dict(model.vision.visual.named_parameters()))
    required = [n for n, _ in model.named_parameters() if is_llama_param(n)]
    loaded = set()
    for path in llama_files(llama):
        tensors = {n: t for k, t in read_checkpoint(path).items() if (n := our_name(k)) is not None}
        loaded |= copy_into(model, tensors, path, [])
        del tensors
    missing = [n for n in required if n not in loaded]
    if missing:
        raise CheckpointError(f"{llama}: missing keys: {_some(_hf_name(n) for n in missing)}")
    if flamingo:
        copy_into(model, flamingo, openflamingo, [n for n, _ in model.named_parameters() if is_flamingo_param(n)])
    if lora:
        apply_lora(model, read_lora(lora), lora)
    model.requires_grad_(False)
    return model.eval(), tokenizer, image_transform_for(vcfg)


def save_llama(model: MMGPT, directory: str, tokenizer_file: str):
    """Write the language model as an HF LLaMA directory (config.json, model.safetensors, tokenizer.model)."""
    from safetensors.torch import save_file
    import shutil
    cfg = model.cfg
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
                   "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
                   "num_attention_heads": cfg.n_heads, "rms_norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size,
                   "max_position_embeddings": cfg.max_seq_len, "bos_token_id": 1, "eos_token_id": 2,
                   "hidden_act": "silu"}, f, indent=2)
    tensors = {_hf_name(n): p.detach().contiguous() for n, p in model.named_parameters() if is_llama_param(n)}
    save_file(tensors, os.path.join(directory, "model.safetensors"))
    if os.path.abspath(tokenizer_file) != os.path.abspath(os.path.join(directory, "tokenizer.model")):
        shutil.copyfile(tokenizer_file, os.path.join(directory, "tokenizer.model"))


def save_openflamingo(model: MMGPT, path: str):
    """Write perceiver, cross-attention blocks and embeddings in OpenFlamingo's checkpoint.pt layout."""
    sd = {}
    for n, p in model.named_parameters():
        if not is_flamingo_param(n):
            continue
        t = p.detach().clone()
        if m := re.match(r"layers\.(\d+)\.xattn\.(.*)", n):
            sd[f"lang_encoder.model.layers.{m.group(1)}.gated_cross_attn_layer.{m.group(2)}"] = t
            sd[f"lang_encoder.gated_cross_attn_layers.{m.group(1)}.{m.group(2)}"] = t
        elif n == "embed_tokens.weight":
            sd["lang_encoder.model.embed_tokens.weight"] = t
        else:
            sd[n] = t
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


def atomic_save(obj, path: str):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written file under `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_lora(model: MMGPT, path: str, settings: dict, unfrozen=()):
    """This project's lora.pt: the LoRA tensors, any parameters trained in full (names in `unfrozen`), and the
    settings that rebuild the model (lora_r, lora_alpha, lora_dropout, lora_targets, attend_previous; llama,
    openflamingo, vision, vision_weights: paths relative to the file's folder or absolute)."""
    weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters()
               if n.endswith((".lora_A", ".lora_B")) or n in set(unfrozen)}
    here = os.path.dirname(os.path.abspath(path))

    def relative(p):  # a file inside the run folder is stored relative to it, so the folder can move
        inside = p and os.path.exists(p) and os.path.abspath(p).startswith(here + os.sep)
        return os.path.relpath(os.path.abspath(p), here) if inside else p

    settings = {k: relative(v) if k in BASE_FILES else v for k, v in settings.items()}
    atomic_save({"format": "mmgpt-lora", "weights": weights, "settings": settings}, path)


def load_run(path: str, device="cpu", dtype=torch.float32):
    """A train.py output folder (or its lora.pt): load the base it was trained on, then its weights."""
    file = os.path.join(path, "lora.pt") if os.path.isdir(path) else path
    settings = read_lora(file).settings
    if not settings:
        raise CheckpointError(f"{file}: not a train.py output (it names no base model); "
                              f"pass --llama, --openflamingo and --lora instead")
    here = os.path.dirname(os.path.abspath(file))

    def where(p):  # paths are stored relative to the run folder when they lie inside it
        return p if not p or os.path.isabs(p) or not os.path.exists(os.path.join(here, p)) else os.path.join(here, p)

    return load(**{k: where(settings.get(k)) for k in BASE_FILES}, lora=file, device=device, dtype=dtype,
                attend_previous=settings.get("attend_previous", False))
