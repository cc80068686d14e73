"""MultiModal-GPT = OpenFlamingo (CLIP ViT -> perceiver resampler -> LLaMA with gated cross-attention) + LoRA; or,
with Config.fusion = "prefix", Lynx's prefix-finetuning (the perceiver's latents as input positions instead).

Read top-down:
  Config, PRESETS                    what the model is, named sizes
  RMSNorm, RoPE, Attention, MLP      the LLaMA decoder, written out (HF layout: rotate-half RoPE; q/k/v and gate/up
                                     each one fused matmul, files still name the parts)
  VisionEncoder                      open_clip's ViT, returning patch tokens WITHOUT ln_post (see its docstring)
  MMGPT                              the whole model: forward / loss for training, decode() for cached decoding
  KVCache, Step                      the static key/value buffers decode() writes, and where a step goes in them
  lm_loss, build                     the masked next-token loss; a random model made on its device and dtype

The weight files (HF LLaMA dirs, OpenFlamingo checkpoint.pt, MultiModal-GPT LoRA .pt, load()) are in
checkpoints.py; text to ids in tokenizer.py; decoding (batching, sampling, stopping, the fast path) is engine.py's.
"""
import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from perceiver import GatedCrossAttentionBlock, PerceiverResampler, make_picture_mask, media_index

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
    # How pictures reach the decoder. "xattn": Flamingo's gated cross-attention blocks (the releases). "prefix":
    # Lynx's prefix-finetuning, no cross-attention blocks: each <image> stands for the picture's perceiver latents,
    # projected to the decoder's width (prefix_proj), as `perceiver_latents` positions of the sequence.
    fusion: str = "xattn"

    def __post_init__(self):
        if self.fusion not in ("xattn", "prefix"):
            raise ValueError(f"fusion {self.fusion!r}: 'xattn' or 'prefix'")
        if self.fusion == "prefix":
            self.xattn_layers = ()
        elif self.xattn_layers is None:
            self.xattn_layers = (i for i in range(self.n_layers) if (i + 1) % 4 == 0)
        self.xattn_layers = tuple(self.xattn_layers)

    @property
    def picture_tokens(self) -> int:
        """Positions a picture takes in the sequence (its <image> token written that many times)."""
        return self.perceiver_latents if self.fusion == "prefix" else 1

    @property
    def vision_dim(self) -> int:
        return self.vision["vision_cfg"]["width"]

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# Named configs (vocab_size / image_id come from the tokenizer unless given). "7b": OpenFlamingo-9B's shapes, the
# Config defaults; "demo": the built-in demo's base model; "tiny": the tests'; "bench-tiny": bench.py --tiny, the
# full 32-layer depth at small widths (counting the ops one training step dispatches needs the real depth).
_SMALL_VISION = {"embed_dim": 32, "quick_gelu": True,
                 "vision_cfg": {"image_size": 28, "layers": 1, "width": 64, "patch_size": 14}}
PRESETS = {
    "7b": {},
    "demo": dict(dim=192, n_layers=4, n_heads=6, hidden_dim=512, max_seq_len=256, xattn_layers=(0, 1, 2, 3),
                 perceiver_depth=2, perceiver_latents=16,
                 vision={"embed_dim": 64, "quick_gelu": False, "vision_cfg": {"image_size": 32, "layers": 2,
                                                                              "width": 128, "patch_size": 8,
                                                                              "head_width": 32}}),
    "tiny": dict(dim=64, n_layers=4, n_heads=4, hidden_dim=128, max_seq_len=256, xattn_layers=(1, 3),
                 perceiver_depth=2, perceiver_latents=4, vision=_SMALL_VISION),
    "bench-tiny": dict(vocab_size=512, image_id=509, dim=128, n_layers=32, n_heads=4, hidden_dim=256,
                       max_seq_len=1024, perceiver_depth=2, perceiver_latents=8,
                       vision=dict(_SMALL_VISION, vision_cfg=dict(_SMALL_VISION["vision_cfg"], layers=2))),
}


def config(preset: str, **overrides) -> Config:
    """Config(**PRESETS[preset], **overrides): a named config with some fields changed."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return Config(**copy.deepcopy({**PRESETS[preset], **overrides}))


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
    """cos, sin of shape (max_seq_len, 3, 1, head_dim) for rotate-half RoPE (HF's layout; q/k weights are permuted
    for it), with rotate-half's sign folded into sin's first half: apply_rope then needs no negation. The 3 rows are
    for q, k and v: v's cos is 1 and its sin 0, so q, k and v go through apply_rope in one go (v unchanged, exactly)
    without being split apart first."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32) / d))
    freqs = torch.outer(torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32), inv_freq)
    cos, sin = torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
    return (torch.stack([cos, cos, torch.ones_like(cos)], 1)[:, :, None],
            torch.stack([sin, sin, torch.zeros_like(sin)], 1)[:, :, None])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1): the minus lives in rope_tables' sin, and (x2, x1)
    is x rolled by half its width (one op where chunk + cat take several)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class FusedLinear(nn.Linear):
    """Several projections of the same input in one matmul: the `parts` side by side, out_features rows each
    (q/k/v: 3 matmuls become 1). Files (HF LLaMA, LoRA) still name the parts; lora.file_layout splits them."""

    def __init__(self, in_features: int, out_features: int, parts: tuple[str, ...]):
        super().__init__(in_features, out_features * len(parts), bias=False)
        self.parts = parts


class Pictures(NamedTuple):
    """What a layer's cross-attention block attends to."""
    kv: tuple[torch.Tensor, torch.Tensor] | None   # this layer's keys/values of the latents; None: no token sees one
    mask: torch.Tensor | None                       # perceiver.make_picture_mask: each token's own picture
    rows: torch.Tensor | None                       # (B * T, 1) tokens of rows that have pictures; None: all


class LayerCache(NamedTuple):
    """Where a cached forward keeps one layer's keys and values: its buffers of the KVCache, and the Step."""
    k: torch.Tensor
    v: torch.Tensor
    step: "Step"


class Attention(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv_proj = FusedLinear(cfg.dim, cfg.dim, ("q_proj", "k_proj", "v_proj"))
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        """x: (B * T, dim), B rows of T tokens; cos, sin: (B or 1, T, 3, 1, head_dim) from rope_tables, already in
        the activations' dtype (MMGPT._embed casts them once). cache: a LayerCache when decoding with a KVCache
        (MMGPT.decode), else None."""
        T = cos.shape[1]
        B = x.shape[0] // T
        qkv = self.qkv_proj(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = apply_rope(qkv, cos, sin).unbind(2)                # (B, T, heads, d) each; v as it was
        if cache is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:
            # Write this step's keys/values into their slots' columns, then attend over those slots' rows (the mask
            # hides the columns a token may not see). The buffers are module state with fixed shapes, so a decode
            # step compiles once per batch and width bucket and runs as one CUDA graph.
            step = cache.step
            cache.k[step.rows, :, step.columns] = k
            cache.v[step.rows, :, step.columns] = v
            k, v = (step.read(t[:, :, :step.width]) for t in (cache.k, cache.v))
        q = q.transpose(1, 2)                                         # (B, heads, T, d)
        if mask is None:  # plain causal (no padding, no cache)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B * T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.dim, cfg.hidden_dim, ("gate_proj", "up_proj"))
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


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

    def forward(self, x, cos, sin, mask, pictures=None, cache=None):
        """x: (B * T, dim); pictures: what the cross-attention block attends to (Pictures), or None for
        language-only input (the block is skipped); the rest as Attention's."""
        if self.xattn is not None and pictures is not None:
            kv, picture_mask, rows = pictures
            y = self.xattn(x, kv, picture_mask)
            # rows: in a batch that mixes rows with and without pictures, those without skip the block, as a
            # language-only forward does (the gated FFW would otherwise still change them).
            x = y if rows is None else torch.where(rows, y, x)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
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
        self.prefix_proj = nn.Linear(cfg.vision_dim, cfg.dim) if cfg.fusion == "prefix" else None
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
        latents = self.perceiver(patches.view(B, N, *patches.shape[1:]).to(self.perceiver.latents.dtype))
        return latents.to(self.embed_tokens.weight.dtype)      # a decoding model may hold its ViT in fp32

    def picture_kv(self, latents: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Each cross-attention layer's keys/values of the pictures' latents (computed once per picture)."""
        return {i: self.layers[i].xattn.attn.picture_kv(latents) for i in self.cfg.xattn_layers}

    def picture_inputs(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Prefix fusion: the decoder's inputs at the <image> positions of input_ids (B, T), in order: row b's
        pictures' projected latents, as many as it has <image> positions (n, dim)."""
        x = self.prefix_proj(self.encode_images(images)).flatten(1, 2)                    # (B, N * latents, dim)
        counts = (input_ids == self.cfg.image_id).sum(1, keepdim=True)
        return x[torch.arange(x.shape[1], device=x.device) < counts]

    # -- training / full forward ------------------------------------------------------------------------------
    def forward(self, images, input_ids, attention_mask=None, attend_previous: bool | None = None):
        """images: (B, N, 3, H, W) in the order of the <image> tokens, or None for language-only (then the
        cross-attention blocks are skipped entirely); attention_mask: (B, T) 1 = token, 0 = right padding;
        attend_previous: the media-masking rule, by default cfg.attend_previous. Returns logits (B, T, vocab)."""
        return self.lm_head(self.norm(self.hidden(images, input_ids, attention_mask, attend_previous)))

    def loss(self, images, input_ids, labels, attend_previous: bool | None = None):
        """lm_loss(forward(...), labels), with the final norm and lm_head applied only where a next-token label
        exists: no (T, vocab) logits for the prompt. Mean over the labelled positions of all rows; a row without
        labels adds nothing, and a batch without any gives NaN, as lm_loss does.

        No attention_mask: right padding (all the loader makes) changes nothing here -- causal attention never
        lets a token see a later pad, and pads carry no labels -- so the layers run the unmasked causal path.
        Selecting the labelled positions has a data-dependent size (one host sync), outside the decoder layers."""
        h = self.hidden(images, input_ids, attend_previous=attend_previous)[:, :-1]
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.lm_head(self.norm(h[keep]))
        return F.cross_entropy(logits.float(), targets[keep])

    def hidden(self, images, input_ids, attention_mask=None, attend_previous: bool | None = None):
        """The last decoder layer's output (B, T, dim), before the final norm (forward's arguments)."""
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            T = input_ids.shape[1]
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal & attention_mask.bool()[:, None, None, :]
        if self.prefix_proj is not None:
            inputs = None if images is None else self.picture_inputs(images, input_ids)
            return self._layers(input_ids, mask, inputs=inputs)
        kv = None if images is None else self.picture_kv(self.encode_images(images))
        rule = self.cfg.attend_previous if attend_previous is None else attend_previous
        return self._layers(input_ids, mask, kv, media_index(input_ids, self.cfg.image_id, rule))

    def _layers(self, input_ids, mask, kv=None, index=None, inputs=None):
        """The decoder layers over the whole of input_ids (B, T) -> (B, T, dim), no cache. kv: each cross-attention
        layer's keys/values of the pictures (None: language-only, the blocks are skipped); index: each token's
        picture (perceiver.media_index); inputs: prefix fusion's inputs at the <image> positions (picture_inputs)."""
        B, T = input_ids.shape
        x, cos, sin = self._embed(input_ids, inputs)
        picture_mask = None
        for i, layer in enumerate(self.layers):
            pictures = None
            if layer.xattn is not None and kv is not None:
                if picture_mask is None:      # the same for every block: made once
                    picture_mask = make_picture_mask(index, self.cfg.perceiver_latents, kv[i][0].shape[2], cos.dtype)
                pictures = Pictures(kv[i], picture_mask, None)
            if self.grad_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, pictures, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, pictures)
        return x.view(B, T, -1)

    def _embed(self, input_ids, inputs=None, positions=None):
        """The first layer's input x (B * T, dim) -- the layers work on (B * T, dim), so every linear layer is one
        plain matmul -- with prefix fusion's `inputs` at the <image> positions, and the RoPE tables at `positions`
        (B, T) (None: 0..T-1), cast once here, not in every layer, to the dtype q/k/v will have."""
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids).view(B * T, -1)
        if inputs is not None:
            x = x.masked_scatter((input_ids == self.cfg.image_id).view(-1, 1), inputs.to(x.dtype))
        cos, sin = ((self.rope_cos[:T], self.rope_sin[:T]) if positions is None
                    else (self.rope_cos[positions], self.rope_sin[positions]))
        dtype = self.activation_dtype()
        cos, sin = (t.to(dtype).view(-1, *t.shape[-4:]) for t in (cos, sin))          # (B or 1, T, 3, 1, d)
        return x, cos, sin

    # -- cached decoding (engine.py runs it) --------------------------------------------------------------------
    def decode(self, input_ids, step: "Step", rows=None, index=None, last=None, inputs=None):
        """One cached forward: logits (B, T, vocab) of input_ids (B, T) -- (B, 1, vocab) at column last[b] of each
        row when `last` (B,) is given -- written into the cache where `step` says, each token seeing its slot's
        columns up to its own. rows (B,): which rows have pictures (the others skip the cross-attention blocks, as a
        language-only forward does); None: no row has one. index (B, T): each token's picture among its slot's
        (perceiver.media_index), the first step.picture_keys of their keys/values read from the cache; None: no token
        sees a picture (the default masking rule's new tokens), so the blocks run their FFW only. inputs: as
        _layers'."""
        seen = torch.arange(step.width, device=input_ids.device) <= step.columns[:, None, :, None]   # (B, 1, T, W)
        # As an additive mask, made once: a boolean one would be turned into this in every layer.
        mask = torch.zeros(seen.shape, dtype=self.activation_dtype(), device=seen.device).masked_fill_(~seen, -math.inf)
        x = self._cached_layers(input_ids, step, mask, rows, index, inputs)
        if last is not None:
            # (gather, not take_along_dim: that one fixes T in compiled code, one graph per prefill length)
            x = x.gather(1, last.view(-1, 1, 1).expand(-1, 1, x.shape[-1]))
        return self.lm_head(self.norm(x))

    def _cached_layers(self, input_ids, step: "Step", mask, rows, index, inputs):
        """The decoder layers over input_ids (B, T) -> (B, T, dim), each layer's keys and values written into and
        read from the cache where `step` says, the pictures' keys/values read from it too (decode's arguments)."""
        B, T = input_ids.shape
        positions = step.columns.clamp(max=self.cfg.max_seq_len - 1)   # the scratch column may lie past the tables
        x, cos, sin = self._embed(input_ids, inputs, positions)
        rows = None if rows is None else rows.repeat_interleave(T)[:, None]
        c, picture_mask = step.cache, None
        for i, layer in enumerate(self.layers):
            pictures = None
            if layer.xattn is not None and rows is not None:
                kv = None
                if index is not None:
                    j = c.xattn[i]
                    kv = tuple(step.read(t[j, :, :, :step.picture_keys]) for t in (c.picture_k, c.picture_v))
                    if picture_mask is None:      # the same for every block: made once
                        picture_mask = make_picture_mask(index, self.cfg.perceiver_latents, kv[0].shape[2], cos.dtype)
                pictures = Pictures(kv, picture_mask, rows)
            x = layer(x, cos, sin, mask, pictures, LayerCache(c.k[i], c.v[i], step))
        return x.view(B, T, -1)

    def activation_dtype(self) -> torch.dtype:
        """The dtype keys and values come out in: autocast's when it is on (a fp32 model trained in bf16)."""
        device = self.rope_cos.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.embed_tokens.weight.dtype


class KVCache(nn.Module):
    """The keys/values of `slots` cached sequences, each of up to max_len tokens, for every layer (plus a scratch
    column, see MMGPT.decode), and each cross-attention layer's keys/values of up to `pictures` pictures per slot
    (their latents one after the other). One allocation each, made once (engine.Engine owns one); buffers of a
    module, as gpt-fast keeps them, so that a compiled step that writes them mutates no input and can run as a CUDA
    graph."""

    def __init__(self, cfg: Config, slots: int, max_len: int, pictures: int, dtype, device):
        super().__init__()
        self.xattn = {layer: j for j, layer in enumerate(cfg.xattn_layers)}   # layer -> its row in picture_k/v
        tokens = (cfg.n_layers, slots, cfg.n_heads, max_len + 1, cfg.head_dim)
        latents = (len(self.xattn), slots, cfg.xattn_heads, pictures * cfg.perceiver_latents, cfg.xattn_dim_head)
        for name, shape in (("k", tokens), ("v", tokens), ("picture_k", latents), ("picture_v", latents)):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)


class Step(NamedTuple):
    """Where a cached forward (MMGPT.decode) writes and reads. Row b is cache slot slots[b] (rows: the same as
    (B, 1), to index with); its tokens are written at columns[b] (B, T), which are also their positions. The
    keys/values read are each slot's first `width` columns (at least every real token's column + 1: attention
    costs what the sequences hold, not the cache's length). gather=False: the slots are 0..B-1, read as a view (a
    decode step); True: any slots, read as a copy (a prefill). The cache's last column is scratch: a row that
    carries no token (padding, a slot not decoding) is written there, its query sees every column read (finite
    values, never NaN), and no real token sees it."""
    cache: "KVCache"
    slots: torch.Tensor
    rows: torch.Tensor
    columns: torch.Tensor
    width: int
    gather: bool
    picture_keys: int = 0       # the pictures' keys read: the most pictures a row has (a bucket) x latents

    def read(self, buffer: torch.Tensor) -> torch.Tensor:
        if self.gather:
            return buffer.index_select(0, self.slots)
        return buffer if len(self.slots) == len(buffer) else buffer[:len(self.slots)]   # (a slice is an op too)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from positions <= t, over labels != -100."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------------------------------------------
# Making a model

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
        return MMGPT(cfg)

